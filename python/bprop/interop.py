"""Exchange with the rest of the ecosystem: ONNX export and PyTorch conversion.

Both ``onnx`` and ``torch`` are optional and imported only when a function here
needs them; a missing package raises an ImportError that says what to install.

Every layer kind maps both ways:

=================  ==========================================  ===========================
bprop              torch.nn                                     ONNX (eval mode)
=================  ==========================================  ===========================
Dense              Linear (+ the activation's module)           Gemm (+ the activation)
Activation         ReLU, LeakyReLU, Sigmoid, Tanh, GELU,        Relu, LeakyRelu, ...
                   Softmax, ELU, SELU, SiLU, Softplus,
                   Identity
Dropout            Dropout                                      nothing (eval: identity)
BatchNorm          BatchNorm1d                                  BatchNormalization
LayerNorm          LayerNorm(features)                          LayerNormalization
                                                                (opset >= 17; decomposed
                                                                below)
Residual           TorchResidual(body=Sequential)               the body, then Add
=================  ==========================================  ===========================

Weight layout: bprop stores W as (in_features, out_features) and computes
z = a W + b, so ONNX's Gemm takes W as its B input unchanged, while
``torch.nn.Linear.weight`` (out_features, in_features) is W transposed.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import (TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Sequence,
                    Tuple, Union)

import numpy as np

from . import _core
from ._validation import check_dtype, check_float, check_int, check_path, type_name
from .activations import GELU_OPSET, REGISTRY
from .layers import (Activation, BatchNorm, Dense, Dropout, Layer, LayerNorm, Residual,
                     layer_from_description, walk)
from .network import _DELEGATES, Network

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["to_onnx", "from_torch", "to_torch"]

# Softmax changed meaning in opset 13 (an axis of its own instead of "flatten from
# axis into 2-D"); starting there keeps every node's semantics the same across the range.
MIN_OPSET = 13
# The first opset with a LayerNormalization operator; below it LayerNorm is built from
# ReduceMean, Sub, Mul, Add, Sqrt and Reciprocal.
_LAYER_NORM_OPSET = 17
# The first opset in which ReduceMean takes its axes as an input, not an attribute.
_REDUCE_AXES_INPUT_OPSET = 18
# A ModelProto is one protobuf message, which cannot exceed 2 GiB; keep headroom for
# the graph itself.
_MAX_ONNX_PARAMETER_BYTES = 2**31 - 2**24


def _require(package: str, where: str):
    try:
        if package == "onnx":
            import onnx

            return onnx
        import torch

        return torch
    except ImportError as exc:
        raise ImportError(
            f"[{where}] needs the optional package '{package}', which is not installed; "
            f"install it with `pip install {package}` (the bprop[{package}] extra)"
        ) from exc


# ---- building an ONNX graph ---------------------------------------------------------


class _OnnxGraph:
    """The nodes and initializers of the graph being built, in the network's dtype."""

    def __init__(self, onnx, dtype: np.dtype, opset: int) -> None:
        self.helper, self.numpy_helper = onnx.helper, onnx.numpy_helper
        self.dtype, self.opset = dtype, opset
        self.nodes: list = []
        self.initializers: list = []

    def node(self, op: str, inputs: Sequence[str], output: str, name: str, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op, list(inputs), [output], name=name, **attrs))
        return output

    def tensor(self, name: str, value, dtype=None) -> str:
        """An initializer holding a copy of `value` (so the model does not alias the
        network's storage), in the network's dtype unless `dtype` is given."""
        array = np.array(value, dtype=self.dtype if dtype is None else dtype)
        self.initializers.append(self.numpy_helper.from_array(array, name=name))
        return name


# ---- ONNX -------------------------------------------------------------------------


def _check_name(where: str, name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"[{where}] {name} must be a str, but got {type_name(value)} {value!r}")
    if not value:
        raise ValueError(f"[{where}] {name} must be a non-empty str")
    return value


def _check_path(where: str, path: object) -> str:
    path = check_path(where, path)
    if not path:
        raise ValueError(f"[{where}] path must be a non-empty file name")
    if os.path.isdir(path):
        raise IsADirectoryError(f"[{where}] path {path!r} is a directory; give a file name "
                                "such as 'model.onnx'")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"[{where}] the folder {folder!r} of path {path!r} does not "
                                "exist")
    return path


def _onnx_activation(g: _OnnxGraph, name: str, activation: str, slope: float, z: str) -> str:
    """out = activation(z) for the layer called `name`; identity adds nothing."""
    emit = REGISTRY[activation].onnx
    if emit is None:
        return z
    out = f"{name}.output"
    emit(g, f"{name}.{activation}", z, out, slope)
    return out


def _onnx_dense(g: _OnnxGraph, layer: Dense, name: str, a: str) -> str:
    # z = a W (+ b): Gemm's Y = A B (+ C) with B = W (in_features, out_features)
    inputs = [a, g.tensor(f"{name}.weight", layer.weight)]
    if layer.has_bias:
        inputs.append(g.tensor(f"{name}.bias", layer.bias))
    z = f"{name}.output" if layer.activation == "identity" else f"{name}.z"
    g.node("Gemm", inputs, z, f"{name}.gemm")
    return _onnx_activation(g, name, layer.activation, layer.negative_slope, z)


def _onnx_batch_norm(g: _OnnxGraph, layer: BatchNorm, name: str, a: str) -> str:
    # eval mode: (a - running_mean) / sqrt(running_var + eps) * weight + bias
    if layer.affine:
        scale, shift = g.tensor(f"{name}.weight", layer.weight), g.tensor(f"{name}.bias",
                                                                          layer.bias)
    else:
        scale = g.tensor(f"{name}.ones", np.ones(layer.features))
        shift = g.tensor(f"{name}.zeros", np.zeros(layer.features))
    mean = g.tensor(f"{name}.running_mean", layer.running_mean)
    if g.dtype == np.float32:
        # the epsilon attribute is a 32-bit float, as the float32 core's eps
        var = g.tensor(f"{name}.running_var", layer.running_var)
        eps = layer.eps
    else:
        # float64: the attribute would round eps to 32 bits (1e-4 moves by 2.5e-12), so
        # the variance input is running_var + eps, added in float64 as the core adds it,
        # and epsilon is 0
        var = g.tensor(f"{name}.running_var_eps", layer.running_var + np.float64(layer.eps))
        eps = 0.0
    return g.node("BatchNormalization", [a, scale, shift, mean, var], f"{name}.output",
                  f"{name}.batch_norm", epsilon=eps)


def _onnx_layer_norm(g: _OnnxGraph, layer: LayerNorm, name: str, a: str) -> str:
    out = f"{name}.output"
    affine = layer.elementwise_affine
    # float64 is spelled out at every opset: LayerNormalization's epsilon attribute is a
    # 32-bit float, which would round eps (and move a row of small variance by ~1e-10).
    if g.opset >= _LAYER_NORM_OPSET and g.dtype == np.float32:
        scale = (g.tensor(f"{name}.weight", layer.weight) if affine else
                 g.tensor(f"{name}.ones", np.ones(layer.features)))
        inputs = [a, scale] + ([g.tensor(f"{name}.bias", layer.bias)] if affine else [])
        return g.node("LayerNormalization", inputs, out, f"{name}.layer_norm", axis=-1,
                      epsilon=layer.eps)
    # The core's arithmetic: per row, xhat = (a - mean) * invstd with
    # invstd = 1 / sqrt(var + eps), var the biased variance; then xhat * weight + bias.
    p = f"{name}.layer_norm"
    xhat = out if not affine else f"{p}.xhat"
    if g.opset >= _REDUCE_AXES_INPUT_OPSET:
        axes = g.tensor(f"{p}.axes", [-1], dtype=np.int64)
        g.node("ReduceMean", [a, axes], f"{p}.mean", f"{p}.mean", keepdims=1)
        g.node("Sub", [a, f"{p}.mean"], f"{p}.centered", f"{p}.center")
        g.node("Mul", [f"{p}.centered", f"{p}.centered"], f"{p}.squared", f"{p}.square")
        g.node("ReduceMean", [f"{p}.squared", axes], f"{p}.var", f"{p}.var", keepdims=1)
    else:
        g.node("ReduceMean", [a], f"{p}.mean", f"{p}.mean", axes=[-1], keepdims=1)
        g.node("Sub", [a, f"{p}.mean"], f"{p}.centered", f"{p}.center")
        g.node("Mul", [f"{p}.centered", f"{p}.centered"], f"{p}.squared", f"{p}.square")
        g.node("ReduceMean", [f"{p}.squared"], f"{p}.var", f"{p}.var", axes=[-1], keepdims=1)
    g.node("Add", [f"{p}.var", g.tensor(f"{name}.eps", layer.eps)], f"{p}.var_eps",
           f"{p}.add_eps")
    g.node("Sqrt", [f"{p}.var_eps"], f"{p}.std", f"{p}.sqrt")
    g.node("Reciprocal", [f"{p}.std"], f"{p}.invstd", f"{p}.invstd")
    g.node("Mul", [f"{p}.centered", f"{p}.invstd"], xhat, f"{p}.normalize")
    if affine:
        g.node("Mul", [xhat, g.tensor(f"{name}.weight", layer.weight)], f"{p}.scaled",
               f"{p}.scale")
        g.node("Add", [f"{p}.scaled", g.tensor(f"{name}.bias", layer.bias)], out,
               f"{p}.shift")
    return out


def _onnx_layers(g: _OnnxGraph, layers: Sequence[Layer], prefix: str, a: str) -> str:
    """Emits `layers` (named prefix.0, prefix.1, ...) on input `a`; returns the name of
    their output tensor (`a` itself if every layer is the identity in eval mode)."""
    for i, layer in enumerate(layers):
        name = f"{prefix}.{i}"
        if isinstance(layer, Dense):
            a = _onnx_dense(g, layer, name, a)
        elif isinstance(layer, Activation):
            a = _onnx_activation(g, name, layer.activation, layer.negative_slope, a)
        elif isinstance(layer, Dropout):
            pass  # eval mode: the identity, left out of the graph
        elif isinstance(layer, BatchNorm):
            a = _onnx_batch_norm(g, layer, name, a)
        elif isinstance(layer, LayerNorm):
            a = _onnx_layer_norm(g, layer, name, a)
        elif isinstance(layer, Residual):
            body = _onnx_layers(g, layer.layers, f"{name}.layers", a)
            a = g.node("Add", [a, body], f"{name}.output", f"{name}.add")  # y = x + f(x)
        else:  # pragma: no cover - every layer kind above is handled
            raise TypeError(f"[to_onnx] {name} is a {layer.kind}, which has no ONNX export")
    return a


def _build_onnx_model(net: Network, opset: int, input_name: str, output_name: str):
    onnx = _require("onnx", "to_onnx")
    helper = onnx.helper
    dtype = net.dtype
    elem_type = helper.np_dtype_to_tensor_dtype(dtype)
    g = _OnnxGraph(onnx, dtype, opset)
    result = _onnx_layers(g, net.layers, "layers", input_name)
    if result == input_name:  # pragma: no cover - a network always has a layer with nodes
        result = g.node("Identity", [input_name], "layers.output", "layers.identity")
    internal = {t.name for t in g.initializers} | {o for n in g.nodes for o in n.output}
    internal.discard(result)
    for name, value in (("input_name", input_name), ("output_name", output_name)):
        if value in internal:
            raise ValueError(f"[to_onnx] {name} {value!r} collides with an internal tensor "
                             "name of the graph; choose a name not starting with 'layers.'")
    for node in g.nodes:  # the last tensor is the graph's output
        for names in (node.input, node.output):
            for k, tensor in enumerate(names):
                if tensor == result:
                    names[k] = output_name
    graph = helper.make_graph(
        g.nodes, "bprop.Network",
        [helper.make_tensor_value_info(input_name, elem_type, ["batch", net.in_features])],
        [helper.make_tensor_value_info(output_name, elem_type, ["batch", net.out_features])],
        initializer=g.initializers,
        doc_string=repr(net),
    )
    opset_imports = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph, opset_imports=opset_imports, producer_name="bprop",
        producer_version=_core.build_info()["version"],
        # the oldest IR that can carry this opset, so older runtimes accept the file
        ir_version=helper.find_min_ir_version_for(opset_imports),
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def to_onnx(net: Network, path: Union[str, "os.PathLike[str]"], *, opset: int = 17,
            input_name: str = "X", output_name: str = "output") -> None:
    """Writes the network in eval mode (what ``predict`` computes) as an ONNX model, for
    inference in onnxruntime and others.

    Per layer, with parameters and buffers as initializers in the network's dtype and
    named as in ``net.parameters()`` / ``net.buffers()`` ("layers.4.layers.0.weight"):

    * Dense: Gemm (z = a W + b; without bias, Gemm with no C input), then the
      activation: Sigmoid, Tanh, Relu, LeakyRelu(alpha=negative_slope) (for float64,
      Where(z > 0, z, slope * z) with a float64 slope, since the alpha attribute is
      32-bit), Softmax(axis=-1), exact GELU as the Gelu operator for opset >= 20 or
      as 0.5 * z * (1 + Erf(z / sqrt(2))) below it, Elu(alpha=1), Selu, z * Sigmoid(z)
      for silu, and Where(z > 20, z, Softplus(z)) for softplus (ONNX's Softplus has no
      threshold). onnxruntime has no float64 Elu, Selu or Softplus kernel, so a float64
      graph spells them out: expm1(z) for z <= 0 as 2t / (1 - t), t = Tanh(z / 2),
      and log1p(u) as Log(1 + u) corrected for the rounding of 1 + u.
    * Activation: the same activation nodes; identity adds none.
    * Dropout: nothing (the identity in eval mode).
    * BatchNorm: BatchNormalization with the running statistics (ones and zeros as
      scale and bias without affine).
    * LayerNorm: LayerNormalization(axis=-1) for opset >= 17; below it the same
      function from ReduceMean, Sub, Mul, Add, Sqrt and Reciprocal.
    * Residual: its layers' nodes, then Add(x, f(x)).

    The ``epsilon`` attribute of BatchNormalization and LayerNormalization is a 32-bit
    float, exact for a float32 network. A float64 graph keeps eps in float64 instead:
    BatchNormalization gets ``running_var + eps`` (initializer "<layer>.running_var_eps",
    added in float64 as the core adds it) with epsilon 0, and LayerNorm is spelled out
    at every opset. The batch dimension is symbolic
    ("batch"). The model passes ``onnx.checker.check_model`` before it is written; the
    file is replaced atomically (a temporary file in the same folder, then
    ``os.replace``), so a failed export leaves any existing file intact.

    Args:
        net: the network to export (its mode is not changed).
        path: the .onnx file to write; its folder must exist.
        opset: ONNX opset of the default domain, from 13 to the newest the installed
            ``onnx`` knows. Runtimes support a bounded range of opsets, and not every
            kernel in every dtype: onnxruntime's CPU provider has no float64 Erf or Gelu,
            so it cannot run a float64 network with a gelu layer.
        input_name: name of the graph input (batch, in_features).
        output_name: name of the graph output (batch, out_features).

    Raises:
        ImportError: the optional ``onnx`` package is not installed.
    """
    where = "to_onnx"
    if not isinstance(net, Network):
        raise TypeError(f"[{where}] net must be a bprop.Network, but got {type_name(net)}")
    path = _check_path(where, path)
    input_name = _check_name(where, "input_name", input_name)
    output_name = _check_name(where, "output_name", output_name)
    if input_name == output_name:
        raise ValueError(f"[{where}] input_name and output_name must differ, but both are "
                         f"{input_name!r}")
    onnx = _require("onnx", where)
    opset = check_int(where, "opset", opset, minimum=MIN_OPSET,
                      maximum=onnx.defs.onnx_opset_version())
    elements = net.num_parameters + sum(view.size for _, view in net.buffers())
    nbytes = elements * net.dtype.itemsize
    if nbytes > _MAX_ONNX_PARAMETER_BYTES:
        raise ValueError(f"[{where}] the parameters take {nbytes:,} bytes, more than the "
                         f"{_MAX_ONNX_PARAMETER_BYTES:,} a single ONNX protobuf can hold")
    data = _build_onnx_model(net, opset, input_name, output_name).SerializeToString()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---- PyTorch ----------------------------------------------------------------------

_TORCH_RESIDUAL: Optional[type] = None


def _torch_residual(torch) -> type:
    """The torch module of bprop.Residual, made on first use (torch is optional)."""
    global _TORCH_RESIDUAL
    if _TORCH_RESIDUAL is None:
        class TorchResidual(torch.nn.Module):
            """y = x + body(x): bprop.Residual as a torch module, ``body`` a
            ``torch.nn.Sequential``. ``bprop.interop.from_torch`` reads it back as a
            Residual."""

            def __init__(self, body) -> None:
                super().__init__()
                if not isinstance(body, torch.nn.Module):
                    raise TypeError("[TorchResidual] body must be a torch.nn.Module, but got "
                                    f"{type_name(body)}")
                self.body = body

            def forward(self, x):
                return x + self.body(x)

        # reachable as bprop.interop.TorchResidual (the module's __getattr__), so that
        # pickle and torch.save find the class
        TorchResidual.__module__ = __name__
        TorchResidual.__qualname__ = "TorchResidual"
        _TORCH_RESIDUAL = TorchResidual
    return _TORCH_RESIDUAL


def __getattr__(name: str):
    if name == "TorchResidual":
        return _torch_residual(_require("torch", "bprop.interop.TorchResidual"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _torch_dtype(torch, dtype: np.dtype):
    return torch.float32 if dtype == np.float32 else torch.float64


def _copy_into(torch, target, value: Any) -> None:
    """target[...] = value, a torch tensor (or view) from a NumPy array of its dtype."""
    with torch.no_grad():
        target.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def _torch_modules(torch, layers: Sequence[Layer], dtype) -> list:
    nn = torch.nn
    modules: list = []
    for layer in layers:
        if isinstance(layer, Dense):
            # skip_init: no random initialisation, which would advance torch's global RNG
            linear = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features,
                                        bias=layer.has_bias, dtype=dtype)
            _copy_into(torch, linear.weight.T, layer.weight)  # W is weight transposed
            if layer.has_bias:
                _copy_into(torch, linear.bias, layer.bias)
            modules.append(linear)
            if layer.activation != "identity":
                row = REGISTRY[layer.activation]
                modules.append(row.to_torch(nn, layer.negative_slope))
        elif isinstance(layer, Activation):
            modules.append(REGISTRY[layer.activation].to_torch(nn, layer.negative_slope))
        elif isinstance(layer, Dropout):
            modules.append(nn.Dropout(layer.p))
        elif isinstance(layer, BatchNorm):
            bn = nn.BatchNorm1d(layer.features, eps=layer.eps, momentum=layer.momentum,
                                affine=layer.affine, track_running_stats=True, dtype=dtype)
            if layer.affine:
                _copy_into(torch, bn.weight, layer.weight)
                _copy_into(torch, bn.bias, layer.bias)
            _copy_into(torch, bn.running_mean, layer.running_mean)
            _copy_into(torch, bn.running_var, layer.running_var)
            modules.append(bn)
        elif isinstance(layer, LayerNorm):
            ln = nn.LayerNorm(layer.features, eps=layer.eps,
                              elementwise_affine=layer.elementwise_affine, dtype=dtype)
            if layer.elementwise_affine:
                _copy_into(torch, ln.weight, layer.weight)
                _copy_into(torch, ln.bias, layer.bias)
            modules.append(ln)
        elif isinstance(layer, Residual):
            body = nn.Sequential(*_torch_modules(torch, layer.layers, dtype))
            modules.append(_torch_residual(torch)(body))
        else:  # pragma: no cover - every layer kind above is handled
            raise TypeError(f"[to_torch] a {layer.kind} layer has no torch module")
    return modules


def to_torch(net: Network) -> "torch.nn.Sequential":
    """A ``torch.nn.Sequential`` computing the same function as the network, in the
    same mode (``training``).

    Per layer, with parameters and buffers copied exactly in the network's dtype:
    Dense becomes ``Linear(in_features, out_features, bias=...)`` (weight = W
    transposed) followed by its activation module (none for identity): ReLU,
    LeakyReLU(negative_slope), Sigmoid, Tanh, GELU(), Softmax(dim=-1), ELU(alpha=1.0),
    SELU(), SiLU(), Softplus(beta=1.0, threshold=20.0); Activation
    becomes that module alone (Identity for identity); Dropout(p); BatchNorm becomes
    ``BatchNorm1d(features, eps, momentum, affine)`` with its running statistics
    (``num_batches_tracked`` stays 0: bprop does not count batches, and a float
    momentum does not use it); LayerNorm becomes ``LayerNorm(features, eps,
    elementwise_affine)``; Residual becomes ``bprop.interop.TorchResidual`` with its
    layers as ``body``, an ``nn.Sequential``. ``from_torch`` turns the result back into
    an equal network. The global torch RNG is not consumed.

    Returns:
        a new Sequential on the CPU, sharing no memory with the network.

    Raises:
        ImportError: torch is not installed.
    """
    where = "to_torch"
    if not isinstance(net, Network):
        raise TypeError(f"[{where}] net must be a bprop.Network, but got {type_name(net)}")
    torch = _require("torch", where)
    module = torch.nn.Sequential(*_torch_modules(torch, net.layers,
                                                 _torch_dtype(torch, net.dtype)))
    return module.train(net.training)


# What from_torch reads, for its error message: the activation modules come from the
# registry's rows (Identity, a no-op anywhere, is listed with the containers).
_SUPPORTED = ", ".join(["Linear", "BatchNorm1d", "LayerNorm", "Dropout",
                        *(row.torch for name, row in REGISTRY.items() if name != "identity"),
                        "Identity", "Sequential"]) + " or bprop.interop.TorchResidual"


class _Entry:
    """One bprop layer read from a torch module: its description, the torch tensors
    to copy into it (by bprop name), and where it came from."""

    def __init__(self, where: str, description: Dict[str, Any],
                 tensors: Optional[Dict[str, Any]] = None) -> None:
        self.where = where
        self.description = description
        self.tensors = tensors or {}
        self.children: List["_Entry"] = []

    def tree(self) -> Dict[str, Any]:
        if self.description["kind"] == "Residual":
            return {"kind": "Residual", "layers": [c.tree() for c in self.children]}
        return self.description

    def flat(self):
        yield self
        for child in self.children:
            yield from child.flat()


class _TorchReader:
    """Turns torch modules into _Entry trees, checking each module as it goes."""

    def __init__(self, torch) -> None:
        self.torch = torch
        nn = torch.nn
        self.activations = {getattr(nn, row.torch): (name, row)
                            for name, row in REGISTRY.items() if name != "identity"}
        self.residual = _torch_residual(torch)
        self.width: Optional[int] = None     # the width reaching the next module
        self.producer = ""                   # "module 2 (Linear)", which made that width
        self.modes: List[Tuple[str, bool]] = []  # (where, training) of Dropout, BatchNorm1d
        self.any_width = False

    def take_width(self, where: str, features: int) -> None:
        if self.width is not None and self.width != features:
            raise ValueError(f"[from_torch] {where} expects {features} input features, but "
                             f"{self.producer} produces {self.width}")

    def sets_width(self, where: str, features: int) -> None:
        self.width, self.producer, self.any_width = features, where, True

    def read(self, children: Sequence[Tuple[str, Any]], out: List[_Entry]) -> None:
        """Appends the entries of `children` ((path, module) pairs) to `out`; nested
        Sequentials are only grouping and are flattened into it."""
        nn = self.torch.nn
        for path, m in children:
            kind = type(m)  # exact types: a subclass may override forward
            where = f"module {path} ({kind.__name__})"
            if kind is nn.Sequential:
                self.read([(f"{path}.{n}", c) for n, c in m.named_children()], out)
            elif kind is nn.Identity:
                continue
            elif kind is nn.Linear:
                self.take_width(where, m.in_features)
                self.sets_width(where, m.out_features)
                tensors = {"weight": m.weight} if m.bias is None else {"weight": m.weight,
                                                                       "bias": m.bias}
                out.append(_Entry(where, dict(kind="Dense", in_features=m.in_features,
                                              out_features=m.out_features,
                                              activation="identity", negative_slope=0.01,
                                              bias=m.bias is not None), tensors))
            elif kind is nn.BatchNorm1d:
                out.append(self.batch_norm(where, m))
            elif kind is nn.LayerNorm:
                out.append(self.layer_norm(where, m))
            elif kind is nn.Dropout:
                p = check_float("from_torch", f"{where} p", m.p, minimum=0.0, maximum=1.0)
                if p == 1.0:
                    raise ValueError(f"[from_torch] {where} has p=1.0, which drops everything; "
                                     "bprop's Dropout takes p in [0, 1)")
                self.modes.append((where, m.training))
                out.append(_Entry(where, dict(kind="Dropout", p=p)))
            elif kind is self.residual:
                out.append(self.residual_entry(path, where, m))
            elif kind in self.activations:
                name, row = self.activations[kind]
                slope = row.from_torch(m, f"[from_torch] {where}")
                last = out[-1].description if out else None
                if last is not None and last["kind"] == "Dense" and \
                        last["activation"] == "identity":
                    # Linear followed by its activation: one Dense
                    last["activation"], last["negative_slope"] = name, slope
                else:
                    out.append(_Entry(where, dict(kind="Activation", activation=name,
                                                  negative_slope=slope)))
            else:
                raise ValueError(f"[from_torch] {where} is not supported; expected {_SUPPORTED}")

    def batch_norm(self, where: str, m) -> _Entry:
        if not m.track_running_stats or m.running_mean is None:
            raise ValueError(f"[from_torch] {where} has track_running_stats=False; bprop's "
                             "BatchNorm keeps running statistics (eval mode normalises with "
                             "them): use BatchNorm1d(..., track_running_stats=True)")
        if m.momentum is None:
            raise ValueError(f"[from_torch] {where} has momentum=None (a cumulative average); "
                             "bprop's BatchNorm takes an exponential average with a momentum "
                             "in [0, 1]")
        momentum = check_float("from_torch", f"{where} momentum", m.momentum, minimum=0.0,
                               maximum=1.0)
        eps = check_float("from_torch", f"{where} eps", m.eps, minimum=0.0,
                          exclusive_minimum=True)
        self.take_width(where, m.num_features)
        self.sets_width(where, m.num_features)
        self.modes.append((where, m.training))
        tensors = {"running_mean": m.running_mean, "running_var": m.running_var}
        if m.affine:
            tensors.update(weight=m.weight, bias=m.bias)
        return _Entry(where, dict(kind="BatchNorm", features=m.num_features, eps=eps,
                                  affine=bool(m.affine), momentum=momentum), tensors)

    def layer_norm(self, where: str, m) -> _Entry:
        shape = tuple(m.normalized_shape)
        if len(shape) != 1:
            raise ValueError(f"[from_torch] {where} normalizes over the last {len(shape)} "
                             f"dimensions {shape}; bprop's LayerNorm normalizes over the "
                             "features of each sample, LayerNorm(features)")
        affine = bool(m.elementwise_affine)
        if affine and m.bias is None:
            raise ValueError(f"[from_torch] {where} has a weight but no bias (bias=False); "
                             "bprop's LayerNorm has both or neither (elementwise_affine)")
        eps = check_float("from_torch", f"{where} eps", m.eps, minimum=0.0,
                          exclusive_minimum=True)
        self.take_width(where, shape[0])
        self.sets_width(where, shape[0])
        tensors = {"weight": m.weight, "bias": m.bias} if affine else {}
        return _Entry(where, dict(kind="LayerNorm", features=shape[0], eps=eps, affine=affine),
                      tensors)

    def residual_entry(self, path: str, where: str, m) -> _Entry:
        body = m.body
        children = ([(f"{path}.body.{n}", c) for n, c in body.named_children()]
                    if type(body) is self.torch.nn.Sequential else [(f"{path}.body", body)])
        width, producer = self.width, self.producer
        entry = _Entry(where, {"kind": "Residual"})
        self.read(children, entry.children)
        if not entry.children:
            raise ValueError(f"[from_torch] {where} has a body without layers (only Identity "
                             "or empty); bprop's Residual needs at least one layer")
        if width is None:
            width = self.width
        if self.width != width:
            raise ValueError(f"[from_torch] {where} has a body that maps {width} features to "
                             f"{self.width}; x + body(x) needs the body to keep the width")
        self.width, self.producer = width, (producer or where)
        return entry


def from_torch(module: Union["torch.nn.Sequential", Sequence["torch.nn.Module"]],
               dtype: Optional[Union[str, np.dtype]] = None) -> Network:
    """Builds a bprop.Network equal to a PyTorch model, in the same mode.

    Modules are read in order; nested ``torch.nn.Sequential`` containers are only
    grouping and are flattened into their parent:

    * ``Linear`` becomes a Dense layer whose weight is the Linear's weight transposed
      (copied exactly) and whose bias is its bias (``bias=False`` gives
      ``Dense(bias=False)``).
    * An activation module (ReLU, LeakyReLU(negative_slope), Sigmoid, Tanh,
      GELU(approximate='none'), Softmax(dim=-1 or 1), ELU(alpha=1.0), SELU, SiLU,
      Softplus(beta=1.0, threshold=20.0); other alpha, beta or threshold values are
      refused with a ValueError naming them) right after a Linear becomes that
      Dense layer's activation; anywhere else it becomes an Activation layer.
      ``Identity`` is a no-op anywhere.
    * ``Dropout(p)`` becomes Dropout(p) (``inplace`` makes no difference).
    * ``BatchNorm1d`` becomes BatchNorm with its momentum, eps, affine flag, weight,
      bias, running_mean and running_var (``track_running_stats=True`` and a float
      momentum are required).
    * ``LayerNorm(features)`` (over the last dimension only) becomes LayerNorm with its
      eps, elementwise_affine flag, weight and bias.
    * ``bprop.interop.TorchResidual`` (what ``to_torch`` makes of a Residual) becomes a
      Residual of its body's layers.

    The network's mode is the modules' ``training`` flag: that of the Dropout and
    BatchNorm1d modules, which must agree, or, without any, that of the Sequential (the
    first module of a list). Module types are matched exactly (a subclass may change
    forward). Errors name the module by its path, as ``module.get_submodule`` takes it.

    Args:
        module: a ``torch.nn.Sequential``, or a list/tuple of modules.
        dtype: "float32" or "float64" for the network; None takes the dtype of the
            parameters and buffers, which must then all be float32 or all float64. An
            explicit dtype casts parameters of any floating dtype.

    Returns:
        a new Network; it shares no memory with the module.

    Raises:
        TypeError: module is not a Sequential or list of modules.
        ValueError: an unsupported module or configuration (named by path and type),
            widths that do not chain, Dropout and BatchNorm1d modules in different
            modes, or parameters of a dtype bprop does not hold.
        ImportError: torch is not installed.
    """
    where = "from_torch"
    torch = _require("torch", where)
    nn = torch.nn
    if isinstance(module, nn.Sequential):
        children = list(module.named_children())
        mode = module.training
    elif isinstance(module, (list, tuple)):
        for i, m in enumerate(module):
            if not isinstance(m, nn.Module):
                raise TypeError(f"[{where}] module {i} must be a torch.nn.Module, but got "
                                f"{type_name(m)}")
        children = [(str(i), m) for i, m in enumerate(module)]
        mode = module[0].training if module else True
    else:
        raise TypeError(f"[{where}] module must be a torch.nn.Sequential or a list of "
                        f"modules, but got {type_name(module)}")
    if dtype is not None:
        dtype = check_dtype(where, dtype)

    reader = _TorchReader(torch)
    entries: List[_Entry] = []
    reader.read(children, entries)
    if not reader.any_width:
        raise ValueError(f"[{where}] module holds no Linear, BatchNorm1d or LayerNorm layer; "
                         "expected at least one (they give the network its width)")
    if reader.modes:
        modes = {training for _, training in reader.modes}
        if len(modes) > 1:
            train = next(w for w, t in reader.modes if t)
            evaluating = next(w for w, t in reader.modes if not t)
            raise ValueError(f"[{where}] {train} is in training mode but {evaluating} in eval "
                             "mode; a bprop network has one mode: call .train() or .eval() "
                             "on the whole model")
        mode = modes.pop()
    flat = [e for top in entries for e in top.flat()]

    dtypes = set()
    for entry in flat:
        for name, t in entry.tensors.items():
            if t.is_meta:
                raise ValueError(f"[{where}] {entry.where} has its {name} on the meta "
                                 "device, without values to copy")
            if not t.is_floating_point():
                raise ValueError(f"[{where}] {entry.where} has a {t.dtype} {name}; "
                                 "expected floating point")
            dtypes.add(t.dtype)
    if dtype is None:
        if dtypes - {torch.float32, torch.float64} or len(dtypes) != 1:
            found = ", ".join(sorted(str(d) for d in dtypes))
            raise ValueError(f"[{where}] cannot infer the dtype from parameters of dtype "
                             f"{found}; expected all torch.float32 or all torch.float64, or "
                             "pass dtype='float32' / 'float64'")
        dtype = check_dtype(where, str(next(iter(dtypes))).replace("torch.", ""))
    torch_dtype = _torch_dtype(torch, dtype)

    values: List[Dict[str, np.ndarray]] = []
    for entry in flat:
        arrays = {}
        for name, t in entry.tensors.items():
            with torch.no_grad():
                value = t.detach().to(device="cpu", dtype=torch_dtype).numpy()
            if not np.isfinite(value).all():
                raise ValueError(f"[{where}] {entry.where} holds NaN or inf in its {name} "
                                 f"(in {np.dtype(dtype).name})")
            arrays[name] = value.T if entry.description["kind"] == "Dense" and \
                name == "weight" else value
        values.append(arrays)

    layers = [layer_from_description(top.tree()) for top in entries]
    net = Network._zeros(layers, dtype=dtype)
    for (_, _, layer), arrays in zip(walk(net.layers), values):
        for name, value in arrays.items():
            setattr(layer, name, value)  # copies, after a shape check
    return net.train(bool(mode))


_DELEGATES.update(to_onnx=to_onnx, from_torch=from_torch, to_torch=to_torch)
