"""The layers a bprop.Network is built from: Dense, Activation, Dropout, BatchNorm,
LayerNorm and Residual.

A layer object is a description (its kind and settings) until it is placed in a
Network; from then on its parameters, buffers and caches are NumPy views of the
network's C++ storage (cpp/include/bprop/layers.hpp does the arithmetic, and
bprop.reference writes the same layers in NumPy as the oracle). Each layer belongs
to one network.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ._validation import check_float, check_int, type_name
from .activations import ACTIVATIONS

# A layer's weight must be addressable: in_features * out_features elements.
_MAX_LAYER_ELEMENTS = 2**40


def _check_activation(where: str, activation: object) -> str:
    if not isinstance(activation, str):
        raise TypeError(f"[{where}] activation must be a str, one of {ACTIVATIONS}, but got "
                        f"{type_name(activation)} {activation!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"[{where}] activation must be one of {ACTIVATIONS}, but got "
                         f"{activation!r}")
    return activation


def _check_bool(where: str, name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"[{where}] {name} must be a bool, but got {type_name(value)}")
    return bool(value)


class Layer:
    """What every layer has: its kind and settings, and once it is part of a
    Network, its place there (``path``) and views of its storage.

    Subclasses set ``_settings`` (the constructor's arguments, by name) and
    implement ``_widths``; the network binds them with ``_attach``.
    """

    _settings: Dict[str, Any]

    def __init__(self) -> None:
        # The network's C++ core, not the Network: a layer referring back to the
        # Network that holds it would make a reference cycle, and a network would
        # then be freed only by the cycle collector, which knows nothing of the
        # megabytes the core holds.
        self._core = None
        self._path: Tuple[int, ...] = ()
        self._params: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self._buffers: Dict[str, np.ndarray] = {}
        self._features: Optional[int] = None  # input width, once placed

    # ---- description ----------------------------------------------------------
    @property
    def kind(self) -> str:
        return type(self).__name__

    def _description(self) -> Dict[str, Any]:
        """The dict the core builds the layer from (and checkpoints store)."""
        return {"kind": self.kind, **self._settings}

    def _widths(self, where: str, features: int) -> int:
        """The output width given the input width; raises ValueError for a width
        the layer cannot take."""
        raise NotImplementedError

    def _declared_in(self) -> Optional[int]:
        """The input width the layer itself declares, or None if it takes any."""
        return None

    def _children(self) -> Tuple["Layer", ...]:
        return ()

    def _parameter_shapes(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """(name, shape) of its own parameters (not its children's), for the memory
        check."""
        return []

    def _buffer_shapes(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """(name, shape) of its own buffers, as the core names them."""
        return []

    def __reduce__(self):
        """A layer not yet in a Network pickles and copies as its description; one
        in a Network is refused (its storage belongs to the network: pickle or
        deep-copy the network)."""
        if self._core is not None:
            raise TypeError(f"[{self.kind}] a layer of a Network cannot be pickled or copied on "
                            "its own: its storage belongs to the network; pickle or "
                            "copy.deepcopy the network")
        return (layer_from_description, (self._description(),))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_settings())
        return f"{self.kind}({args})"

    def _repr_settings(self):
        return self._settings.items()

    # ---- place in a network -----------------------------------------------------
    def _attach(self, core, path: Tuple[int, ...], parameters: Dict[str, Tuple[np.ndarray, np.ndarray]],
                buffers: Dict[str, np.ndarray], features: int) -> None:
        """Binds the layer to the network's core: `parameters` and `buffers` are
        its own, by local name ("weight", "running_mean")."""
        self._core = core
        self._path = path
        self._params = parameters
        self._buffers = buffers
        self._features = features

    @property
    def path(self) -> Tuple[int, ...]:
        """Its index in the network, then its index inside each Residual."""
        return self._path

    def _bound(self, what: str):
        if self._core is None:
            raise RuntimeError(f"[{self.kind}.{what}] this layer is not part of a Network yet; "
                               "its storage exists once bprop.Network([...]) is built")
        return self._core

    def parameters(self) -> Iterator[Tuple[str, np.ndarray, np.ndarray]]:
        """(local name, value view, gradient view) of its own parameters."""
        self._bound("parameters")
        for name, (value, grad) in self._params.items():
            yield name, value, grad

    def buffers(self) -> Iterator[Tuple[str, np.ndarray]]:
        """(local name, view) of its own buffers."""
        self._bound("buffers")
        yield from self._buffers.items()

    def _cache(self, name: str) -> Optional[np.ndarray]:
        return self._bound(name).layer_caches(list(self._path))[name]

    @property
    def input(self) -> Optional[np.ndarray]:
        """Read-only view of the last forward's input (None before one, and for
        the first layer after a forward pass over a sparse X, which has no dense
        view: the network holds the CSR arrays themselves)."""
        return self._cache("input")

    @property
    def output(self) -> Optional[np.ndarray]:
        """Read-only view of the last forward's output (None before one)."""
        return self._cache("output")

    @property
    def in_features(self) -> Optional[int]:
        """Its input width (for Activation and Dropout, None until placed)."""
        declared = self._declared_in()
        return declared if declared is not None else self._features

    @property
    def out_features(self) -> Optional[int]:
        features = self.in_features
        if features is None:
            return None
        return self._widths(self.kind, features)

    # ---- parameter views with checked assignment ---------------------------------
    def _param(self, name: str, grad: bool = False) -> Optional[np.ndarray]:
        self._bound(("grad_" if grad else "") + name)
        pair = self._params.get(name)
        return None if pair is None else pair[1 if grad else 0]

    def _assign(self, name: str, target: Optional[np.ndarray], value) -> None:
        where = f"{self.kind}.{name}"
        if target is None:
            raise AttributeError(f"[{where}] this layer has no {name} (built with "
                                 f"{'bias' if name == 'bias' and self.kind == 'Dense' else 'affine'}"
                                 "=False)")
        arr = np.asarray(value)
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"[{where}] must be assigned real numbers, but got dtype {arr.dtype}")
        if arr.shape != target.shape:
            raise ValueError(f"[{where}] must have shape {target.shape}, but got {arr.shape}")
        # check finiteness in the network's dtype: 1e39 is finite in float64, not in float32
        with np.errstate(over="ignore"):
            arr = arr.astype(target.dtype)
        if not np.isfinite(arr).all():
            raise ValueError(f"[{where}] must be finite in {target.dtype}, but the array holds "
                             "NaN or inf (or values too large for the dtype)")
        target[...] = arr  # copies into the C++ storage


class _Affine(Layer):
    """A layer with parameters ``weight`` and ``bias`` (possibly absent)."""

    @property
    def weight(self) -> Optional[np.ndarray]:
        return self._param("weight")

    @weight.setter
    def weight(self, value) -> None:
        self._assign("weight", self._param("weight"), value)

    @property
    def bias(self) -> Optional[np.ndarray]:
        return self._param("bias")

    @bias.setter
    def bias(self, value) -> None:
        self._assign("bias", self._param("bias"), value)

    @property
    def grad_weight(self) -> Optional[np.ndarray]:
        return self._param("weight", grad=True)

    @property
    def grad_bias(self) -> Optional[np.ndarray]:
        return self._param("bias", grad=True)


class Dense(_Affine):
    """A dense layer: z = a W + b, output = activation(z).

    Args:
        in_features: width of the layer's input a.
        out_features: width of its output.
        activation: one of ``ACTIVATIONS``.
        negative_slope: slope of leaky_relu for z < 0.
        bias: False for a layer without b (as before a BatchNorm).

    Until the layer is placed in a :class:`Network` it is only a description;
    afterwards its attributes are NumPy views of the network's C++ storage:

    * ``weight`` (in_features, out_features) and ``bias`` (out_features,) (None
      without bias): writable views; assigning an array copies it in after a shape
      check.
    * ``grad_weight``, ``grad_bias``: dL/dW = a^T delta and dL/db of the last backward.
    * ``input`` (batch, in_features), ``z``, ``output`` (batch, out_features): read-only
      views of what the last forward cached; ``delta`` = dL/dz of the last backward.
      ``None`` before the first forward (backward for ``delta``). A view of a cache
      stays valid memory, but is overwritten by the next forward/backward and left
      stale (no longer updated) once a larger batch makes the core grow its buffers.
    """

    def __init__(self, in_features: int, out_features: int, activation: str = "identity",
                 *, negative_slope: float = 0.01, bias: bool = True) -> None:
        super().__init__()
        n_in = check_int("Dense", "in_features", in_features, minimum=1)
        n_out = check_int("Dense", "out_features", out_features, minimum=1)
        if n_in * n_out > _MAX_LAYER_ELEMENTS:
            raise ValueError(f"[Dense] in_features * out_features = {n_in} * {n_out} "
                             f"exceeds the limit of {_MAX_LAYER_ELEMENTS} weights per layer")
        self._settings = dict(in_features=n_in, out_features=n_out,
                              activation=_check_activation("Dense", activation),
                              negative_slope=check_float("Dense", "negative_slope", negative_slope),
                              bias=_check_bool("Dense", "bias", bias))

    @property
    def in_features(self) -> int:
        return self._settings["in_features"]

    @property
    def out_features(self) -> int:
        return self._settings["out_features"]

    @property
    def activation(self) -> str:
        return self._settings["activation"]

    @property
    def negative_slope(self) -> float:
        return self._settings["negative_slope"]

    @property
    def has_bias(self) -> bool:
        return self._settings["bias"]

    def _declared_in(self) -> Optional[int]:
        return self.in_features

    def _widths(self, where: str, features: int) -> int:
        return self.out_features

    def _parameter_shapes(self):
        shapes = [("weight", (self.in_features, self.out_features))]
        return shapes + [("bias", (self.out_features,))] if self.has_bias else shapes

    def __repr__(self) -> str:
        s = self._settings
        extra = f", negative_slope={s['negative_slope']}" if s["activation"] == "leaky_relu" else ""
        extra += "" if s["bias"] else ", bias=False"
        return (f"Dense({s['in_features']}, {s['out_features']}, "
                f"activation={s['activation']!r}{extra})")

    @property
    def z(self) -> Optional[np.ndarray]:
        return self._cache("z")

    @property
    def delta(self) -> Optional[np.ndarray]:
        return self._cache("delta")


class Activation(Layer):
    """output = activation(input), any of ``ACTIVATIONS`` as a layer of its own (for
    Dense -> BatchNorm -> Activation). Its width is its input's."""

    def __init__(self, activation: str, *, negative_slope: float = 0.01) -> None:
        super().__init__()
        self._settings = dict(activation=_check_activation("Activation", activation),
                              negative_slope=check_float("Activation", "negative_slope",
                                                         negative_slope))

    @property
    def activation(self) -> str:
        return self._settings["activation"]

    @property
    def negative_slope(self) -> float:
        return self._settings["negative_slope"]

    def _widths(self, where, features):
        return features

    def __repr__(self) -> str:
        s = self._settings
        extra = f", negative_slope={s['negative_slope']}" if s["activation"] == "leaky_relu" else ""
        return f"Activation({s['activation']!r}{extra})"


class Dropout(Layer):
    """Inverted dropout: in training mode each element is zeroed with probability
    ``p`` and the kept ones are scaled by 1 / (1 - p); in eval mode, the identity.

    The masks come from a counter-based generator keyed by the network's
    ``dropout_seed``, the training step and the layer's position, so a seeded run
    draws the same masks for any thread count. ``mask`` views the last training
    forward's mask (1 kept, 0 dropped).
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.integer,
                                                                  np.floating)):
            raise TypeError(f"[Dropout] p must be a float in [0, 1), but got {type_name(p)}")
        p = float(p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"[Dropout] p must be in [0, 1), but got {p}")
        self._settings = dict(p=p)

    @property
    def p(self) -> float:
        return self._settings["p"]

    def _widths(self, where, features):
        return features

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"

    @property
    def mask(self) -> Optional[np.ndarray]:
        return self._cache("mask")


class _Norm(_Affine):
    def __init__(self, where: str, features: int, eps: float, affine: bool, **extra) -> None:
        super().__init__()
        features = check_int(where, "features", features, minimum=1)
        eps = check_float(where, "eps", eps, minimum=0.0, exclusive_minimum=True)
        self._settings = dict(features=features, eps=eps, affine=affine, **extra)

    @property
    def features(self) -> int:
        return self._settings["features"]

    @property
    def eps(self) -> float:
        return self._settings["eps"]

    def _declared_in(self) -> Optional[int]:
        return self.features

    def _widths(self, where, features):
        return self.features

    def _parameter_shapes(self):
        return ([("weight", (self.features,)), ("bias", (self.features,))]
                if self._settings["affine"] else [])

    @property
    def normalized(self) -> Optional[np.ndarray]:
        """The last forward's normalised input (before weight and bias)."""
        return self._cache("normalized")


class BatchNorm(_Norm):
    """PyTorch's BatchNorm1d over (batch, features).

    Training mode normalises with the batch's mean and biased variance and updates
    the buffers ``running_mean`` and ``running_var`` (unbiased) with ``momentum``:
    running = (1 - momentum) * running + momentum * batch statistic. Eval mode
    normalises with the running statistics. ``weight`` (gamma, ones) and ``bias``
    (beta, zeros) when ``affine``. A training batch of one row is refused.
    """

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5,
                 affine: bool = True) -> None:
        momentum = check_float("BatchNorm", "momentum", momentum, minimum=0.0, maximum=1.0)
        super().__init__("BatchNorm", features, eps, _check_bool("BatchNorm", "affine", affine),
                         momentum=momentum)

    def _buffer_shapes(self):
        return [("running_mean", (self.features,)), ("running_var", (self.features,))]

    @property
    def momentum(self) -> float:
        return self._settings["momentum"]

    @property
    def affine(self) -> bool:
        return self._settings["affine"]

    @property
    def running_mean(self) -> np.ndarray:
        self._bound("running_mean")
        return self._buffers["running_mean"]

    @running_mean.setter
    def running_mean(self, value) -> None:
        self._assign("running_mean", self.running_mean, value)

    @property
    def running_var(self) -> np.ndarray:
        self._bound("running_var")
        return self._buffers["running_var"]

    @running_var.setter
    def running_var(self, value) -> None:
        self._assign("running_var", self.running_var, value)

    def __repr__(self) -> str:
        s = self._settings
        return (f"BatchNorm({s['features']}, momentum={s['momentum']}, eps={s['eps']}, "
                f"affine={s['affine']})")


class LayerNorm(_Norm):
    """PyTorch's LayerNorm over the last dimension: each row normalised by its own
    mean and biased variance, then ``weight`` (ones) and ``bias`` (zeros) when
    ``elementwise_affine``. The same in training and eval mode."""

    def __init__(self, features: int, eps: float = 1e-5, elementwise_affine: bool = True) -> None:
        super().__init__("LayerNorm", features, eps,
                         _check_bool("LayerNorm", "elementwise_affine", elementwise_affine))

    @property
    def elementwise_affine(self) -> bool:
        return self._settings["affine"]

    def __repr__(self) -> str:
        s = self._settings
        return (f"LayerNorm({s['features']}, eps={s['eps']}, "
                f"elementwise_affine={s['affine']})")


class Residual(Layer):
    """y = x + f(x), f its layers in sequence, whose output width must equal their
    input width. Its parameters and buffers are its layers'."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        super().__init__()
        if isinstance(layers, Layer) or not isinstance(layers, (list, tuple)):
            raise TypeError("[Residual] layers must be a list of layers, but got "
                            f"{type_name(layers)}")
        if len(layers) == 0:
            raise ValueError("[Residual] layers must hold at least one layer, but got none")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"[Residual] layers[{i}] must be a bprop layer (Dense, "
                                f"Activation, Dropout, BatchNorm, LayerNorm, Residual), but got "
                                f"{type_name(layer)}")
        self._layers = tuple(layers)
        self._settings = {}

    @property
    def layers(self) -> Tuple[Layer, ...]:
        return self._layers

    def _children(self):
        return self._layers

    def _description(self):
        return {"kind": "Residual", "layers": [L._description() for L in self._layers]}

    def _declared_in(self):
        return input_width(self._layers)

    def _widths(self, where, features):
        width = features
        for i, layer in enumerate(self._layers):
            width = _chain(f"{where}.layers.{i}", layer, width)
        if width != features:
            raise ValueError(f"[Network] {where} is a Residual whose layers map {features} "
                             f"features to {width}; y = x + f(x) needs f to keep the width")
        return width

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, i: int) -> Layer:
        return self._layers[i]

    def __iter__(self) -> Iterator[Layer]:
        return iter(self._layers)

    def __repr__(self) -> str:
        lines = ["Residual("]
        for i, layer in enumerate(self._layers):
            inner = repr(layer).replace("\n", "\n  ")
            lines.append(f"  ({i}): {inner}")
        return "\n".join(lines) + "\n)"


def _chain(where: str, layer: Layer, features: int) -> int:
    """The output width of `layer` fed `features`, after checking that it takes
    that width."""
    declared = layer._declared_in()
    if declared is not None and declared != features:
        raise ValueError(f"[Network] {where} ({layer.kind}) expects {declared} input "
                         f"features, but the layer before it produces {features}")
    return layer._widths(where, features)


def input_width(layers: Sequence[Layer]) -> Optional[int]:
    """The width of the input of a sequence: that of its first layer with a width
    of its own (Activation and Dropout take their neighbours'), or None."""
    for layer in layers:
        declared = layer._declared_in()
        if declared is not None:
            return declared
    return None


def walk(layers: Sequence[Layer], prefix: str = "layers",
         path: Tuple[int, ...] = ()) -> Iterator[Tuple[str, Tuple[int, ...], Layer]]:
    """(dotted name, path, layer) of every layer, depth first, a Residual before
    its layers: ("layers.4", (4,), Residual), ("layers.4.layers.0", (4, 0), Dense)."""
    for i, layer in enumerate(layers):
        name, where = f"{prefix}.{i}", path + (i,)
        yield name, where, layer
        yield from walk(layer._children(), f"{name}.layers", where)


_KINDS = {cls.__name__: cls for cls in (Dense, Activation, Dropout, BatchNorm, LayerNorm, Residual)}


def layer_from_description(d: Dict[str, Any]) -> Layer:
    """The layer a description (``Layer._description()``) describes, checked as
    the constructor checks it. Raises ValueError/TypeError for one that is not."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"[layer_from_description] expected a dict with 'kind', but got "
                         f"{type_name(d)}")
    kind = d["kind"]
    if kind not in _KINDS:
        raise ValueError(f"[layer_from_description] unknown layer kind {kind!r}; expected one "
                         f"of {sorted(_KINDS)}")
    settings = {k: v for k, v in d.items() if k != "kind"}
    if kind == "Residual":
        inner = settings.get("layers")
        if not isinstance(inner, list):
            raise ValueError("[layer_from_description] a Residual needs a list 'layers'")
        return Residual([layer_from_description(x) for x in inner])
    if kind == "LayerNorm" and "affine" in settings:
        settings["elementwise_affine"] = settings.pop("affine")
    try:
        return _KINDS[kind](**settings)
    except TypeError as exc:
        if "argument" in str(exc):  # unknown or missing setting
            raise ValueError(f"[layer_from_description] {kind} settings {sorted(settings)} do "
                             f"not fit: {exc}") from None
        raise
