"""bprop.Network and bprop.Dense: the Python face of the C++ core."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from . import _core
from ._init import INIT_BYTES_PER_WEIGHT, initial_parameters
from ._memory import check_fits_in_memory, format_bytes
from ._validation import as_float_matrix, check_dtype, check_float, check_int, type_name

ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "gelu", "softmax")

# A layer's weight must be addressable: in_features * out_features elements.
_MAX_LAYER_ELEMENTS = 2**40

# Network's checkpoint, pickling, ONNX and PyTorch methods (and Optimizer's
# pickling) are implemented in bprop.io and bprop.interop, which import this
# module: each registers its functions here when imported (bprop/__init__ imports
# both), so that the dependency goes one way.
_DELEGATES: Dict[str, Callable[..., Any]] = {}


class Dense:
    """A dense layer: z = a W + b, output = activation(z).

    Args:
        in_features: width of the layer's input a.
        out_features: width of its output.
        activation: one of ``ACTIVATIONS``.
        negative_slope: slope of leaky_relu for z < 0.

    Until the layer is placed in a :class:`Network` it is only a description;
    afterwards its attributes are NumPy views of the network's C++ storage:

    * ``weight`` (in_features, out_features) and ``bias`` (out_features,): writable
      views; assigning an array copies it in after a shape check.
    * ``grad_weight``, ``grad_bias``: dL/dW = a^T delta and dL/db of the last backward.
    * ``input`` (batch, in_features), ``z``, ``output`` (batch, out_features): read-only
      views of what the last forward cached; ``delta`` = dL/dz of the last backward.
      ``None`` before the first forward (backward for ``delta``). A view of a cache
      stays valid memory, but is overwritten by the next forward/backward and left
      stale (no longer updated) once a larger batch makes the core grow its buffers.
    """

    def __init__(self, in_features: int, out_features: int, activation: str = "identity",
                 *, negative_slope: float = 0.01) -> None:
        self._in = check_int("Dense", "in_features", in_features, minimum=1)
        self._out = check_int("Dense", "out_features", out_features, minimum=1)
        if self._in * self._out > _MAX_LAYER_ELEMENTS:
            raise ValueError(f"[Dense] in_features * out_features = {self._in} * {self._out} "
                             f"exceeds the limit of {_MAX_LAYER_ELEMENTS} weights per layer")
        if not isinstance(activation, str):
            raise TypeError(f"[Dense] activation must be a str, one of {ACTIVATIONS}, but got "
                            f"{type_name(activation)} {activation!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"[Dense] activation must be one of {ACTIVATIONS}, but got "
                             f"{activation!r}")
        self._activation = activation
        self._slope = check_float("Dense", "negative_slope", negative_slope)
        # The network's C++ core, not the Network: a layer referring back to the
        # Network that holds it would make a reference cycle, and a network would
        # then be freed only by the cycle collector, which knows nothing of the
        # megabytes the core holds.
        self._core = None
        self._index = -1

    # ---- description ----------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self._in

    @property
    def out_features(self) -> int:
        return self._out

    @property
    def activation(self) -> str:
        return self._activation

    @property
    def negative_slope(self) -> float:
        return self._slope

    def _spec(self) -> Tuple[int, int, str, float]:
        return (self._in, self._out, self._activation, self._slope)

    def __reduce__(self):
        """A layer not yet in a Network pickles and copies as its description; one
        in a Network is refused (its storage belongs to the network: pickle or
        deep-copy the network)."""
        if self._core is not None:
            raise TypeError("[Dense] a layer of a Network cannot be pickled or copied on its "
                            "own: its storage belongs to the network; pickle or "
                            "copy.deepcopy the network")
        return (_dense_from_spec, (self._spec(),))

    def __repr__(self) -> str:
        extra = f", negative_slope={self._slope}" if self._activation == "leaky_relu" else ""
        return f"Dense({self._in}, {self._out}, activation={self._activation!r}{extra})"

    # ---- views of the core's storage ------------------------------------------
    def _attach(self, core, index: int) -> None:
        self._core = core
        self._index = index
        # Parameters and gradients never move, so their views are made once.
        self._weight = core.weight(index)
        self._bias = core.bias(index)
        self._grad_weight = core.grad_weight(index)
        self._grad_bias = core.grad_bias(index)

    def _bound(self, what: str):
        if self._core is None:
            raise RuntimeError(f"[Dense.{what}] this layer is not part of a Network yet; "
                               "its storage exists once bprop.Network([...]) is built")
        return self._core

    @property
    def weight(self) -> np.ndarray:
        self._bound("weight")
        return self._weight

    @weight.setter
    def weight(self, value) -> None:
        self._bound("weight")
        self._assign("weight", self._weight, value)

    @property
    def bias(self) -> np.ndarray:
        self._bound("bias")
        return self._bias

    @bias.setter
    def bias(self, value) -> None:
        self._bound("bias")
        self._assign("bias", self._bias, value)

    @property
    def grad_weight(self) -> np.ndarray:
        self._bound("grad_weight")
        return self._grad_weight

    @property
    def grad_bias(self) -> np.ndarray:
        self._bound("grad_bias")
        return self._grad_bias

    @property
    def input(self) -> Optional[np.ndarray]:
        return self._bound("input").input(self._index)

    @property
    def z(self) -> Optional[np.ndarray]:
        return self._bound("z").z(self._index)

    @property
    def output(self) -> Optional[np.ndarray]:
        return self._bound("output").output(self._index)

    @property
    def delta(self) -> Optional[np.ndarray]:
        return self._bound("delta").delta(self._index)

    @staticmethod
    def _assign(name: str, target: np.ndarray, value) -> None:
        where = f"Dense.{name}"
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


def _dense_from_spec(spec: Tuple[int, int, str, float]) -> Dense:
    n_in, n_out, activation, slope = spec
    return Dense(n_in, n_out, activation, negative_slope=slope)


def _check_memory(layers: Sequence[Dense], dtype: np.dtype, draw: bool) -> None:
    """Refuses, before allocating, a network whose parameters and gradients (and,
    if `draw`, the float64 draw of one layer's initial weights) do not fit in the
    memory available."""
    sizes = [(layer.in_features * layer.out_features + layer.out_features) * 2 * dtype.itemsize
             for layer in layers]
    temporary = 0
    if draw:
        temporary = max(L.in_features * L.out_features for L in layers) * INIT_BYTES_PER_WEIGHT
    i = int(np.argmax(sizes))
    big = layers[i]
    what = (f"the parameters and gradients of this network ({dtype.name}; the largest, layer "
            f"{i} {big!r}, has weight ({big.in_features}, {big.out_features}) and bias "
            f"({big.out_features},): {format_bytes(sizes[i])})")
    if temporary:
        what += f", with {format_bytes(temporary)} to draw its initial weights,"
    check_fits_in_memory("Network", what, sum(sizes) + temporary)


class Network:
    """An ordered stack of :class:`Dense` layers trained by backpropagation.

    Args:
        layers: Dense layers whose widths chain (layer i's out_features equals layer
            i+1's in_features). Each Dense belongs to one network.
        dtype: "float32" (default) or "float64"; parameters, caches and the arrays
            forward/backward accept all have this dtype.
        seed: seed of the initial weights (He-normal for relu, leaky_relu and gelu;
            Glorot-uniform otherwise). The same seed gives the same bits.

    forward/backward are the low-level calls: they take C-contiguous arrays of the
    network's dtype exactly and never convert (a TypeError/ValueError says how to fix
    the input). predict converts its input explicitly.

    Ctrl-C: forward, backward and train_step run without the GIL; on the main thread,
    a call with batch * parameters >= 2**26 runs Python's signal handlers between
    layers (at most every 0.1 s; ``bprop._core.interrupt_polling``), so a
    KeyboardInterrupt arrives within about one layer's product instead of at the end
    of the call. An interrupted call changes no parameter and no optimizer state;
    each method says what it leaves.

    Threads: calls on one network are serialized; predict runs alongside other
    predicts. While :func:`bprop.fit` trains the network, forward, backward, step,
    train_step and fit (and the optimizer's step) from any other thread raise
    RuntimeError; predict keeps working (it sees the weights between two steps), and
    fit's own thread (callbacks, a user loss) may call everything.
    """

    def __init__(self, layers: Sequence[Dense], dtype="float32", seed: Optional[int] = None) -> None:
        self._build(layers, dtype, seed, draw=True)

    @classmethod
    def _zeros(cls, layers: Sequence[Dense], dtype="float32") -> "Network":
        """A network whose parameters are all zero, for callers that then set every
        parameter (load, unpickling, from_torch, copies, the estimators): drawing
        initial weights only to overwrite them took most of a large checkpoint's
        load time."""
        net = cls.__new__(cls)
        net._build(layers, dtype, None, draw=False)
        return net

    def _build(self, layers: Sequence[Dense], dtype, seed: Optional[int], draw: bool) -> None:
        if isinstance(layers, Dense) or not isinstance(layers, (list, tuple)):
            raise TypeError("[Network] layers must be a list of Dense layers, but got "
                            f"{type_name(layers)}")
        if len(layers) == 0:
            raise ValueError("[Network] layers must hold at least one Dense layer, but got none")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Dense):
                raise TypeError(f"[Network] layers[{i}] must be a Dense, but got "
                                f"{type_name(layer)}")
            if layer._core is not None:
                raise ValueError(f"[Network] layers[{i}] already belongs to another Network; "
                                 "create a new Dense for each network")
        if len({id(layer) for layer in layers}) != len(layers):
            raise ValueError("[Network] the same Dense object appears twice in layers")
        for i in range(1, len(layers)):
            if layers[i - 1].out_features != layers[i].in_features:
                raise ValueError(f"[Network] layer {i} expects {layers[i].in_features} input "
                                 f"features, but layer {i - 1} produces "
                                 f"{layers[i - 1].out_features}")
        self._dtype = check_dtype("Network", dtype)
        limit = float(np.finfo(self._dtype).max)
        for i, layer in enumerate(layers):
            if abs(layer.negative_slope) > limit:
                raise ValueError(f"[Network] layers[{i}].negative_slope = "
                                 f"{layer.negative_slope} overflows {self._dtype.name}")
        if seed is not None:
            seed = check_int("Network", "seed", seed, minimum=0)
        self._seed = seed
        specs = [layer._spec() for layer in layers]
        _check_memory(layers, self._dtype, draw)
        core_type = _core.Network32 if self._dtype == np.float32 else _core.Network64
        self._core = core_type(specs)  # parameters zero-filled
        if draw:
            for i, (W, b) in enumerate(initial_parameters(specs, self._dtype, seed)):
                self._core.weight(i)[...] = W  # cast into the core's storage, no temporary
                self._core.bias(i)[...] = b
                del W
        for i, layer in enumerate(layers):
            layer._attach(self._core, i)
        self._layers = tuple(layers)

    # ---- the three calls of training ------------------------------------------
    def forward(self, X: np.ndarray) -> np.ndarray:
        """Forward pass, caching each layer's input a and pre-activation z.

        Args:
            X: (batch, in_features), C-contiguous, of the network's dtype. It is
                cached by reference, not copied: keep it unchanged until backward.

        Returns:
            (batch, out_features), a new array the caller owns.

        Raises:
            KeyboardInterrupt: Ctrl-C during a long call; the cached forward pass
                is forgotten (backward needs a new forward), nothing else changes.
            RuntimeError: fit trains this network in another thread.
        """
        return self._core.forward(X)

    def backward(self, grad_output: np.ndarray, *, accumulate: bool = False,
                 input_grad: bool = False) -> Optional[np.ndarray]:
        """Backward sweep from dL/d(output), last layer to first.

        Args:
            grad_output: (batch, out_features) = dL/d(output) of the last forward.
            accumulate: add to the stored gradients instead of overwriting them.
            input_grad: also compute and return dL/dX (batch, in_features).

        Returns:
            dL/dX if ``input_grad``, else None.

        Raises:
            KeyboardInterrupt: Ctrl-C during a long call; the stored gradients,
                partly overwritten, are dropped (``step`` refuses them until the
                next backward); the forward cache and the parameters are unchanged.
            RuntimeError: fit trains this network in another thread.
        """
        if not isinstance(accumulate, (bool, np.bool_)):
            raise TypeError(f"[Network.backward] accumulate must be a bool, but got "
                            f"{type_name(accumulate)}")
        if not isinstance(input_grad, (bool, np.bool_)):
            raise TypeError(f"[Network.backward] input_grad must be a bool, but got "
                            f"{type_name(input_grad)}")
        return self._core.backward(grad_output, bool(accumulate), bool(input_grad))

    def step(self, lr: float) -> None:
        """Plain SGD on every parameter: W -= lr * dL/dW, b -= lr * dL/db."""
        lr = check_float("Network.step", "lr", lr, minimum=0.0,
                         maximum=float(np.finfo(self._dtype).max))
        self._core.step(lr)

    def train_step(self, X: np.ndarray, y: np.ndarray, loss="softmax_cross_entropy",
                   optimizer=None, *, sample_weight: Optional[np.ndarray] = None) -> float:
        """One training step: forward, loss, backward and the optimizer's update.

        With a built-in loss name the forward pass, the loss and the backward sweep
        run in one GIL-free C++ call; with plain SGD (no momentum, no weight decay)
        the update is fused into the backward sweep too, so the gradient buffers
        are not written. A callable loss runs the four calls from Python.

        Args:
            X: (batch, in_features), C-contiguous, of the network's dtype.
            y: int64 labels (batch,) for softmax_cross_entropy, else a
                (batch, out_features) array of the network's dtype.
            loss: a built-in loss name or a callable
                ``loss(output, target, sample_weight) -> (value, grad_output)``.
            optimizer: an optimizer from :mod:`bprop.optim` built on this network.
            sample_weight: (batch,) of the network's dtype, or None.

        Returns:
            The loss of the batch before the update.

        Raises:
            KeyboardInterrupt: Ctrl-C; with a built-in loss the step was either made
                and counted in ``optimizer.step_count`` or not made at all (then
                the training caches are dropped). Either way the network and the
                optimizer agree, and training can go on.
            RuntimeError: fit trains this network in another thread.
        """
        if optimizer is None or not hasattr(optimizer, "step"):
            raise TypeError("[Network.train_step] optimizer must be an optimizer from "
                            f"bprop.optim, but got {type_name(optimizer)}")
        net_ref = getattr(optimizer, "_net_ref", None)
        if net_ref is None or net_ref() is not self:
            raise ValueError("[Network.train_step] optimizer was built for another network")
        if isinstance(loss, str):
            plan = getattr(optimizer, "_plan", None)
            if plan is not None:  # _step_function's step, without making one per call
                return self._core.train_step(X, y, loss, sample_weight, -1.0, plan)
        elif not callable(loss):
            raise TypeError("[Network.train_step] loss must be a loss name or a callable, "
                            f"but got {type_name(loss)}")
        return _step_function(self, loss, optimizer)(X, y, sample_weight, None)

    def predict(self, X, batch_size: Optional[int] = None) -> np.ndarray:
        """Forward pass that leaves the training caches untouched.

        Args:
            X: (samples, in_features) array-like of real numbers; converted to a
                C-contiguous array of the network's dtype (a copy only if needed).
            batch_size: rows per chunk (bounds the workspace); None for all at once.

        Returns:
            (samples, out_features), a new array.
        """
        X = as_float_matrix("Network.predict", "X", X, self._dtype,
                            features=self._core.in_features)
        size = 0 if batch_size is None else check_int("Network.predict", "batch_size",
                                                       batch_size, minimum=1)
        return self._core.predict(X, size)

    # ---- description ----------------------------------------------------------
    @property
    def layers(self) -> Tuple[Dense, ...]:
        return self._layers

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def num_parameters(self) -> int:
        return self._core.num_parameters

    @property
    def in_features(self) -> int:
        return self._core.in_features

    @property
    def out_features(self) -> int:
        return self._core.out_features

    def parameters(self) -> Iterator[Tuple[str, np.ndarray, np.ndarray]]:
        """Yields (name, parameter view, gradient view) for every weight and bias,
        in a fixed order: layers.0.weight, layers.0.bias, layers.1.weight, ..."""
        for i, layer in enumerate(self._layers):
            yield f"layers.{i}.weight", layer._weight, layer._grad_weight
            yield f"layers.{i}.bias", layer._bias, layer._grad_bias

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, i: int) -> Dense:
        return self._layers[i]

    def __iter__(self) -> Iterator[Dense]:
        return iter(self._layers)

    def __repr__(self) -> str:
        lines = [f"Network(dtype={self._dtype.name}, parameters={self.num_parameters:,})"]
        lines += [f"  ({i}): {layer!r}" for i, layer in enumerate(self._layers)]
        return "\n".join(lines)

    # ---- checkpoints --------------------------------------------------------------
    def save(self, path, optimizer=None) -> None:
        """Writes the network (and optionally the optimizer state) to a safetensors
        file atomically; see :func:`bprop.load`."""
        _DELEGATES["save"](self, path, optimizer=optimizer)

    # ---- pickling and copies ------------------------------------------------------
    def __reduce__(self):
        """Pickles (and deep-copies) the network as checkpoint bytes: the format of
        :func:`bprop.save`, with the optimizer ``fit`` remembers for it. Unpickling
        decodes and checks them as :func:`bprop.load` does; the copy has its own
        storage, the same parameters bit for bit, and no forward/backward caches
        or gradients. Only the payload is data: pickle itself can run any code a
        stream names, so never unpickle untrusted bytes (load a .safetensors file
        with :func:`bprop.load` instead).

        Raises:
            ValueError: a parameter holds NaN or inf (it could not be restored).
        """
        return _DELEGATES["reduce_network"](self)

    def __copy__(self):
        # A shallow copy would share the C++ storage (and the Dense layers, which
        # belong to one network), so it is refused rather than half-copied.
        raise TypeError("[Network.__copy__] copy.copy would share the network's storage; "
                        "use copy.deepcopy(net) for an independent copy")

    # ---- interoperability (optional extras) ---------------------------------------
    def to_onnx(self, path, *, opset: int = 17, input_name: str = "X",
                output_name: str = "output") -> None:
        """Writes the network as an ONNX model atomically; see :func:`bprop.interop.to_onnx`."""
        _DELEGATES["to_onnx"](self, path, opset=opset, input_name=input_name,
                              output_name=output_name)

    @staticmethod
    def from_torch(module, dtype=None) -> "Network":
        """A Network equal to a torch Sequential of Linear layers and activations;
        see :func:`bprop.interop.from_torch`."""
        return _DELEGATES["from_torch"](module, dtype=dtype)

    def to_torch(self):
        """A torch.nn.Sequential with the same weights and dtype; see
        :func:`bprop.interop.to_torch`."""
        return _DELEGATES["to_torch"](self)


def _step_function(net: Network, loss, optimizer, objective: Optional[Tuple[float, float, float]]
                   = None) -> Callable[..., float]:
    """The one training step (Network.train_step, the loops of fit and of the
    scikit-learn estimators): ``step(X, y, sample_weight, weight) -> loss`` runs
    forward, loss, backward and the optimizer's update on one minibatch; a
    non-finite loss updates nothing.

    Args:
        net: the network; optimizer: a bprop.optim optimizer bound to it.
        loss: a built-in loss name, for which the step is one GIL-free call of the
            core (the update inside the backward sweep, the step counted in the
            same call: Ctrl-C finds it made and counted, or neither); or a callable
            ``loss(output, target, sample_weight) -> (value, grad_output)``.
        objective: (loss_scale, grad_scale, alpha): scikit-learn's objective, the
            L2 term 0.5 * alpha / weight * sum ||W||^2 (weight: the minibatch's row
            count or sum of sample weights). Built-in losses only.
    """
    core = net._core
    if callable(loss):
        dtype = net.dtype

        def user_loss_step(X, y, sample_weight, weight=None) -> float:
            value, grad = loss(core.forward(X), y, sample_weight)
            core.backward(np.ascontiguousarray(grad, dtype=dtype), False, False)
            if math.isfinite(value):
                optimizer.step()
            return float(value)
        return user_loss_step
    # The optimizer's current UpdatePlan on every step: setting its lr (a schedule)
    # or loading a state makes a new one.
    train_step = core.train_step
    if objective is not None:  # the estimators' optimizers (bprop.optim) all have a plan
        loss_scale, grad_scale, alpha = objective
        return lambda X, y, sample_weight, weight: train_step(
            X, y, loss, sample_weight, -1.0, optimizer._plan, loss_scale, grad_scale,
            alpha / weight)
    if getattr(optimizer, "_plan", None) is not None:
        return lambda X, y, sample_weight, weight=None: train_step(
            X, y, loss, sample_weight, -1.0, optimizer._plan)

    def unplanned_step(X, y, sample_weight, weight=None) -> float:
        # an optimizer without an UpdatePlan: its own step() after the sweep
        value = train_step(X, y, loss, sample_weight, -1.0)
        if math.isfinite(value):
            optimizer.step()
        return value
    return unplanned_step
