"""Exchange with the rest of the ecosystem: ONNX export and PyTorch conversion.

Both ``onnx`` and ``torch`` are optional and imported only when a function here
needs them; a missing package raises an ImportError that says what to install.

Weight layout: bprop stores W as (in_features, out_features) and computes
z = a W + b, so ONNX's Gemm takes W as its B input unchanged, while
``torch.nn.Linear.weight`` (out_features, in_features) is W transposed.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._validation import check_dtype, check_int, check_path, type_name
from .network import _DELEGATES, Dense, Network

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["to_onnx", "from_torch", "to_torch"]

# Softmax changed meaning in opset 13 (an axis of its own instead of "flatten from
# axis into 2-D"); starting there keeps every node's semantics the same across the range.
MIN_OPSET = 13
# The first opset with a Gelu operator; below it GELU is built from Erf.
_GELU_OPSET = 20
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


def _activation_nodes(onnx, layer: Dense, index: int, z: str, out: str, dtype: np.dtype,
                      opset: int) -> Tuple[list, list]:
    """Nodes computing out = activation(z) for one layer, and the constants they use."""
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    prefix = f"layers.{index}"
    act = layer.activation
    if act == "sigmoid":
        return [helper.make_node("Sigmoid", [z], [out], name=f"{prefix}.sigmoid")], []
    if act == "tanh":
        return [helper.make_node("Tanh", [z], [out], name=f"{prefix}.tanh")], []
    if act == "relu":
        return [helper.make_node("Relu", [z], [out], name=f"{prefix}.relu")], []
    if act == "leaky_relu":
        if dtype == np.float32:
            # LeakyRelu's alpha attribute is a 32-bit float, as the float32 core's slope
            return [helper.make_node("LeakyRelu", [z], [out], name=f"{prefix}.leaky_relu",
                                     alpha=layer.negative_slope)], []
        # float64: a float attribute would round the slope to 32 bits (and onnxruntime
        # has no double LeakyRelu kernel), so spell out the core's select(z > 0, z, slope * z)
        # with the slope as a float64 constant.
        p = f"{prefix}.leaky_relu"
        consts = [numpy_helper.from_array(np.array(v, dtype=dtype), name=f"{p}.{n}")
                  for n, v in (("negative_slope", layer.negative_slope), ("zero", 0.0))]
        nodes = [
            helper.make_node("Greater", [z, f"{p}.zero"], [f"{p}.positive"],
                             name=f"{p}.greater"),
            helper.make_node("Mul", [z, f"{p}.negative_slope"], [f"{p}.scaled"],
                             name=f"{p}.scale"),
            helper.make_node("Where", [f"{p}.positive", z, f"{p}.scaled"], [out],
                             name=f"{p}.where"),
        ]
        return nodes, consts
    if act == "softmax":
        # row-wise over the features, as the core does (batch, out_features)
        return [helper.make_node("Softmax", [z], [out], name=f"{prefix}.softmax",
                                 axis=-1)], []
    if act == "gelu":
        if opset >= _GELU_OPSET:
            return [helper.make_node("Gelu", [z], [out], name=f"{prefix}.gelu",
                                     approximate="none")], []
        # exact GELU z * Phi(z) = 0.5 * z * (1 + erf(z / sqrt(2))), in the core's order:
        # (0.5 * z) * (1 + erf(z * (1/sqrt(2))))
        p = f"{prefix}.gelu"
        consts = [numpy_helper.from_array(np.array(v, dtype=dtype), name=f"{p}.{n}")
                  for n, v in (("inv_sqrt2", 1.0 / math.sqrt(2.0)), ("one", 1.0),
                               ("half", 0.5))]
        nodes = [
            helper.make_node("Mul", [z, f"{p}.inv_sqrt2"], [f"{p}.scaled"], name=f"{p}.scale"),
            helper.make_node("Erf", [f"{p}.scaled"], [f"{p}.erf"], name=f"{p}.erf"),
            helper.make_node("Add", [f"{p}.erf", f"{p}.one"], [f"{p}.one_plus_erf"],
                             name=f"{p}.add_one"),
            helper.make_node("Mul", [f"{p}.half", z], [f"{p}.half_z"], name=f"{p}.halve"),
            helper.make_node("Mul", [f"{p}.half_z", f"{p}.one_plus_erf"], [out],
                             name=f"{p}.product"),
        ]
        return nodes, consts
    raise ValueError(f"[to_onnx] layer {index} has activation {act!r}, which has no ONNX "
                     "export")  # pragma: no cover - every activation above is handled


def _build_onnx_model(net: Network, opset: int, input_name: str, output_name: str):
    onnx = _require("onnx", "to_onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    dtype = net.dtype
    elem_type = helper.np_dtype_to_tensor_dtype(dtype)
    nodes: list = []
    initializers: list = []
    a = input_name
    last = len(net) - 1
    for i, layer in enumerate(net):
        prefix = f"layers.{i}"
        out = output_name if i == last else f"{prefix}.output"
        z = out if layer.activation == "identity" else f"{prefix}.z"
        # copies of the parameters, so the model does not alias the network's storage
        initializers.append(numpy_helper.from_array(np.array(layer.weight, dtype=dtype),
                                                    name=f"{prefix}.weight"))
        initializers.append(numpy_helper.from_array(np.array(layer.bias, dtype=dtype),
                                                    name=f"{prefix}.bias"))
        # z = a W + b: Gemm's Y = A B + C with B = W (in_features, out_features)
        nodes.append(helper.make_node("Gemm", [a, f"{prefix}.weight", f"{prefix}.bias"], [z],
                                      name=f"{prefix}.gemm"))
        if layer.activation != "identity":
            act_nodes, consts = _activation_nodes(onnx, layer, i, z, out, dtype, opset)
            nodes += act_nodes
            initializers += consts
        a = out
    produced = [o for node in nodes for o in node.output]
    internal = {t.name for t in initializers} | set(produced[:-1])  # the last is the output
    for name, value in (("input_name", input_name), ("output_name", output_name)):
        if value in internal:
            raise ValueError(f"[to_onnx] {name} {value!r} collides with an internal tensor "
                             "name of the graph; choose a name not starting with 'layers.'")
    graph = helper.make_graph(
        nodes, "bprop.Network",
        [helper.make_tensor_value_info(input_name, elem_type, ["batch", net.in_features])],
        [helper.make_tensor_value_info(output_name, elem_type, ["batch", net.out_features])],
        initializer=initializers,
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
    """Writes the network as an ONNX model, for inference in onnxruntime and others.

    Per layer the graph holds a Gemm (z = a W + b, weight and bias as initializers in
    the network's dtype) followed by the activation: Sigmoid, Tanh, Relu,
    LeakyRelu(alpha=negative_slope) (for float64, Where(z > 0, z, slope * z) with a
    float64 slope, since the alpha attribute is 32-bit), Softmax(axis=-1), and exact
    GELU as the Gelu operator for opset >= 20 or as 0.5 * z * (1 + Erf(z / sqrt(2)))
    below it. The batch
    dimension is symbolic ("batch"). The model passes ``onnx.checker.check_model``
    before it is written; the file is replaced atomically (a temporary file in the same
    folder, then ``os.replace``), so a failed export leaves any existing file intact.

    Args:
        net: the network to export.
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
    nbytes = net.num_parameters * net.dtype.itemsize
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


def _torch_activation(torch, module: Any, index: int) -> Optional[Tuple[str, float]]:
    """(activation, negative_slope) for a supported activation module; None for any
    other module. Raises for a supported type configured in a way bprop cannot match."""
    nn = torch.nn
    kind = type(module)  # exact types: a subclass may override forward
    where = f"[from_torch] module {index} ({kind.__name__})"
    if kind is nn.ReLU:
        return "relu", 0.01
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if kind is nn.Sigmoid:
        return "sigmoid", 0.01
    if kind is nn.Tanh:
        return "tanh", 0.01
    if kind is nn.GELU:
        if module.approximate != "none":
            raise ValueError(f"{where} uses approximate={module.approximate!r}; bprop's gelu "
                             "is the exact erf form, GELU(approximate='none')")
        return "gelu", 0.01
    if kind is nn.Softmax:
        if module.dim not in (-1, 1):
            raise ValueError(f"{where} has dim={module.dim!r}; bprop's softmax runs over the "
                             "features of each sample, Softmax(dim=-1) or Softmax(dim=1)")
        return "softmax", 0.01
    return None


def from_torch(module: Union["torch.nn.Sequential", Sequence["torch.nn.Module"]],
               dtype: Optional[Union[str, np.dtype]] = None) -> Network:
    """Builds a bprop.Network equal to a PyTorch stack of Linear layers and activations.

    Each ``torch.nn.Linear`` becomes a Dense layer whose weight is the Linear's weight
    transposed (copied exactly) and whose bias is its bias (zeros for ``bias=False``).
    An activation module applies to the Linear before it: ReLU, LeakyReLU(negative_slope),
    Sigmoid, Tanh, GELU(approximate='none'), Softmax(dim=-1 or 1). A Linear with no
    activation after it gets identity; ``torch.nn.Identity`` is a no-op anywhere.
    Module types are matched exactly (a subclass may change forward).

    Args:
        module: a ``torch.nn.Sequential``, or a list/tuple of modules.
        dtype: "float32" or "float64" for the network; None takes the dtype of the
            parameters, which must then all be float32 or all float64. An explicit dtype
            casts parameters of any floating dtype.

    Returns:
        a new Network; it shares no memory with the module.

    Raises:
        TypeError: module is not a Sequential or list of modules.
        ValueError: an unsupported module (named by index and type), two activations in
            a row, an activation before any Linear, widths that do not chain, or
            parameters of a dtype bprop does not hold.
        ImportError: torch is not installed.
    """
    where = "from_torch"
    torch = _require("torch", where)
    nn = torch.nn
    if isinstance(module, nn.Sequential):
        modules = list(module)
    elif isinstance(module, (list, tuple)):
        modules = list(module)
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"[{where}] module {i} must be a torch.nn.Module, but got "
                                f"{type_name(m)}")
    else:
        raise TypeError(f"[{where}] module must be a torch.nn.Sequential or a list of "
                        f"modules, but got {type_name(module)}")
    if dtype is not None:
        dtype = check_dtype(where, dtype)

    # (index, Linear, activation, negative_slope) per Dense layer
    stack: List[list] = []
    has_activation = False
    for i, m in enumerate(modules):
        kind = type(m).__name__
        if type(m) is nn.Linear:
            stack.append([i, m, "identity", 0.01])
            has_activation = False
            continue
        if type(m) is nn.Identity:
            continue
        act = _torch_activation(torch, m, i)
        if act is None:
            hint = (" (bprop has no dropout: build the Sequential without it, e.g. "
                    "nn.Sequential(*[m for m in model if not isinstance(m, nn.Dropout)]))"
                    if "Dropout" in kind else "")
            raise ValueError(f"[{where}] module {i} ({kind}) is not supported; expected "
                             "Linear, ReLU, LeakyReLU, Sigmoid, Tanh, GELU, Softmax or "
                             f"Identity{hint}")
        if not stack:
            raise ValueError(f"[{where}] module {i} ({kind}) is an activation with no Linear "
                             "before it; the stack must start with a Linear")
        if has_activation:
            prev = stack[-1]
            raise ValueError(f"[{where}] module {i} ({kind}) follows another activation; "
                             f"each Linear takes at most one (Linear at module {prev[0]} "
                             f"already has {prev[2]!r})")
        stack[-1][2], stack[-1][3] = act
        has_activation = True
    if not stack:
        raise ValueError(f"[{where}] module holds no Linear layer; expected at least one")

    params = []
    dtypes = set()
    for i, linear, _, _ in stack:
        for name in ("weight", "bias"):
            p = getattr(linear, name)
            if p is None:
                continue
            if p.is_meta:
                raise ValueError(f"[{where}] module {i} (Linear) has its {name} on the meta "
                                 "device, without values to copy")
            if not p.is_floating_point():
                raise ValueError(f"[{where}] module {i} (Linear) has a {p.dtype} {name}; "
                                 "expected floating point")
            dtypes.add(p.dtype)
    if dtype is None:
        if dtypes - {torch.float32, torch.float64} or len(dtypes) != 1:
            found = ", ".join(sorted(str(d) for d in dtypes))
            raise ValueError(f"[{where}] cannot infer the dtype from parameters of dtype "
                             f"{found}; expected all torch.float32 or all torch.float64, or "
                             "pass dtype='float32' / 'float64'")
        dtype = check_dtype(where, str(next(iter(dtypes))).replace("torch.", ""))
    torch_dtype = torch.float32 if dtype == np.float32 else torch.float64

    layers = []
    for n, (i, linear, activation, slope) in enumerate(stack):
        if n > 0 and linear.in_features != stack[n - 1][1].out_features:
            j = stack[n - 1][0]
            raise ValueError(f"[{where}] module {i} (Linear) expects {linear.in_features} "
                             f"input features, but module {j} (Linear) produces "
                             f"{stack[n - 1][1].out_features}")
        with torch.no_grad():
            W = linear.weight.detach().to(device="cpu", dtype=torch_dtype).numpy().T
            b = (np.zeros(linear.out_features, dtype=dtype) if linear.bias is None else
                 linear.bias.detach().to(device="cpu", dtype=torch_dtype).numpy())
        if not (np.isfinite(W).all() and np.isfinite(b).all()):
            raise ValueError(f"[{where}] module {i} (Linear) holds NaN or inf parameters")
        layers.append(Dense(linear.in_features, linear.out_features, activation=activation,
                            negative_slope=slope))
        params.append((W, b))
    net = Network._zeros(layers, dtype=dtype)
    for layer, (W, b) in zip(net, params):
        layer.weight = W
        layer.bias = b
    return net


def to_torch(net: Network) -> "torch.nn.Sequential":
    """A ``torch.nn.Sequential`` computing the same function as the network.

    Each Dense layer becomes ``torch.nn.Linear(in_features, out_features)`` with
    weight = W transposed and bias = b, copied exactly in the network's dtype,
    followed by its activation module (none for identity): ReLU, LeakyReLU(negative_slope),
    Sigmoid, Tanh, GELU(), Softmax(dim=-1). ``from_torch`` turns the result back into an
    equal network. The global torch RNG is not consumed.

    Returns:
        a new Sequential on the CPU, sharing no memory with the network.

    Raises:
        ImportError: torch is not installed.
    """
    where = "to_torch"
    if not isinstance(net, Network):
        raise TypeError(f"[{where}] net must be a bprop.Network, but got {type_name(net)}")
    torch = _require("torch", where)
    nn = torch.nn
    torch_dtype = torch.float32 if net.dtype == np.float32 else torch.float64
    modules: list = []
    for layer in net:
        # skip_init: no random initialisation, which would advance torch's global RNG
        linear = torch.nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features,
                                          dtype=torch_dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(layer.weight.T)))
            linear.bias.copy_(torch.from_numpy(np.array(layer.bias)))
        modules.append(linear)
        act = layer.activation
        if act == "relu":
            modules.append(nn.ReLU())
        elif act == "leaky_relu":
            modules.append(nn.LeakyReLU(layer.negative_slope))
        elif act == "sigmoid":
            modules.append(nn.Sigmoid())
        elif act == "tanh":
            modules.append(nn.Tanh())
        elif act == "gelu":
            modules.append(nn.GELU())
        elif act == "softmax":
            modules.append(nn.Softmax(dim=-1))
    return nn.Sequential(*modules)


_DELEGATES.update(to_onnx=to_onnx, from_torch=from_torch, to_torch=to_torch)
