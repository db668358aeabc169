"""bprop.Network: the Python face of the C++ core."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from . import _core
from ._init import INIT_BYTES_PER_WEIGHT, initial_parameters
from ._memory import check_fits_in_memory, format_bytes
from ._validation import (as_csr, as_float_matrix, check_dtype, check_float, check_int,
                          csr_batch, is_sparse, type_name)
from .layers import (ACTIVATIONS, Activation, BatchNorm, Dense, Dropout, Layer, LayerNorm,
                     Residual, input_width, layer_from_description, walk, _chain)

# Network's checkpoint, pickling, ONNX and PyTorch methods (and Optimizer's
# pickling) are implemented in bprop.io and bprop.interop, which import this
# module: each registers its functions here when imported (bprop/__init__ imports
# both), so that the dependency goes one way.
_DELEGATES: Dict[str, Callable[..., Any]] = {}


def _where(name: str) -> str:
    """A layer's dotted name as an index expression: layers.4.layers.0 -> layers[4].layers[0]."""
    parts = name.split(".")
    return ".".join(f"{parts[k]}[{parts[k + 1]}]" for k in range(0, len(parts), 2))


def _check_memory(layers: Sequence[Layer], dtype: np.dtype, draw: bool) -> None:
    """Refuses, before allocating, a network whose parameters and gradients (and,
    if `draw`, the float64 draw of one layer's initial weights) do not fit in the
    memory available."""
    flat = [(name, layer) for name, _, layer in walk(layers)]
    sizes = [sum(int(np.prod(shape)) for _, shape in layer._parameter_shapes()) * 2 * dtype.itemsize
             for _, layer in flat]
    temporary = 0
    if draw:
        temporary = max((L.in_features * L.out_features for _, L in flat if isinstance(L, Dense)),
                        default=0) * INIT_BYTES_PER_WEIGHT
    i = int(np.argmax(sizes))
    name, big = flat[i]
    shapes = " and ".join(f"{p} {s}" for p, s in big._parameter_shapes())
    what = (f"the parameters and gradients of this network ({dtype.name}; the largest, "
            f"{name} {big!r}, has {shapes}: {format_bytes(sizes[i])})")
    if temporary:
        what += f", with {format_bytes(temporary)} to draw its initial weights,"
    check_fits_in_memory("Network", what, sum(sizes) + temporary)


class Network:
    """An ordered sequence of layers trained by backpropagation.

    Args:
        layers: layers (:class:`Dense`, :class:`Activation`, :class:`Dropout`,
            :class:`BatchNorm`, :class:`LayerNorm`, :class:`Residual`) whose widths
            chain (each layer's input width is the output width of the one before).
            Each layer object belongs to one network.
        dtype: "float32" (default) or "float64"; parameters, caches and the arrays
            forward/backward accept all have this dtype.
        seed: seed of the initial weights (He-normal for relu, leaky_relu, gelu, elu,
            silu and softplus, LeCun-normal for selu; Glorot-uniform otherwise; norm layers start at weight 1, bias 0) and the
            key of the dropout masks. The same seed gives the same bits.

    A new network is in training mode (Dropout drops, BatchNorm normalises with the
    batch's statistics and updates its running ones); ``eval()`` switches to eval
    mode and ``train()`` back, as in PyTorch. ``forward`` uses the current mode;
    ``predict`` and :func:`bprop.evaluate` always run in eval mode; :func:`bprop.fit`
    trains in training mode and leaves the mode it found.

    forward/backward are the low-level calls: they take C-contiguous arrays of the
    network's dtype exactly and never convert (a TypeError/ValueError says how to fix
    the input). predict converts its input explicitly.

    Ctrl-C: forward, backward and train_step run without the GIL; on the main thread,
    a call with batch * parameters >= 2**26 runs Python's signal handlers between
    layers (at most every 0.1 s; ``bprop._core.interrupt_polling``), so a
    KeyboardInterrupt arrives within about one layer's product instead of at the end
    of the call. An interrupted call changes no parameter, buffer or optimizer
    state; each method says what it leaves.

    Threads: calls on one network are serialized; predict runs alongside other
    predicts. While :func:`bprop.fit` trains the network, forward, backward, step,
    train_step and fit (and the optimizer's step) from any other thread raise
    RuntimeError; predict keeps working (it sees the weights between two steps), and
    fit's own thread (callbacks, a user loss) may call everything.
    """

    def __init__(self, layers: Sequence[Layer], dtype="float32", seed: Optional[int] = None) -> None:
        self._build(layers, dtype, seed, draw=True)

    @classmethod
    def _zeros(cls, layers: Sequence[Layer], dtype="float32") -> "Network":
        """A network whose parameters are all zero, for callers that then set every
        parameter and buffer (load, unpickling, from_torch, copies, the estimators):
        drawing initial weights only to overwrite them took most of a large
        checkpoint's load time."""
        net = cls.__new__(cls)
        net._build(layers, dtype, None, draw=False)
        return net

    def _build(self, layers: Sequence[Layer], dtype, seed: Optional[int], draw: bool) -> None:
        if isinstance(layers, Layer) or not isinstance(layers, (list, tuple)):
            raise TypeError("[Network] layers must be a list of layers, but got "
                            f"{type_name(layers)}")
        if len(layers) == 0:
            raise ValueError("[Network] layers must hold at least one layer, but got none")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"[Network] layers[{i}] must be a bprop layer (Dense, "
                                "Activation, Dropout, BatchNorm, LayerNorm, Residual), but got "
                                f"{type_name(layer)}")
        seen: Dict[int, str] = {}
        for name, _, layer in walk(layers):
            if layer._core is not None:
                raise ValueError(f"[Network] {_where(name)} already belongs to another "
                                 f"Network; create a new {layer.kind} for each network")
            if id(layer) in seen:
                raise ValueError(f"[Network] the same {layer.kind} object appears twice in "
                                 f"layers, as {seen[id(layer)]} and {name}")
            seen[id(layer)] = name
        features = input_width(layers)
        if features is None:
            raise ValueError("[Network] no layer has a width of its own (Dense, BatchNorm, "
                             "LayerNorm): Activation and Dropout take their neighbours' width")
        widths = [features]
        for i, layer in enumerate(layers):
            try:
                widths.append(_chain(f"layers.{i}", layer, widths[-1]))
            except ValueError as exc:
                if isinstance(layer, Dense) and i > 0 and isinstance(layers[i - 1], Dense):
                    raise ValueError(f"[Network] layer {i} expects {layer.in_features} input "
                                     f"features, but layer {i - 1} produces "
                                     f"{layers[i - 1].out_features}") from None
                raise exc from None
        self._dtype = check_dtype("Network", dtype)
        limit = float(np.finfo(self._dtype).max)
        for name, _, layer in walk(layers):
            slope = getattr(layer, "negative_slope", 0.0)
            if abs(slope) > limit:
                raise ValueError(f"[Network] {_where(name)}.negative_slope = {slope} overflows "
                                 f"{self._dtype.name}")
        if seed is not None:
            seed = check_int("Network", "seed", seed, minimum=0)
        self._seed = seed
        _check_memory(layers, self._dtype, draw)
        core_type = _core.Network32 if self._dtype == np.float32 else _core.Network64
        self._core = core_type([layer._description() for layer in layers])  # zero-filled
        self._params = [(name, value, grad) for name, value, grad, _ in
                        self._core.parameter_views()]
        self._buffer_views = [tuple(b) for b in self._core.buffer_views()]
        self._attach(layers, "layers", (), features)
        self._layers = tuple(layers)
        if draw:
            self._initialize(seed)
            self._core.dropout_seed = (seed % 2**64 if seed is not None else
                                       int(np.random.SeedSequence().generate_state(1, np.uint64)[0]))

    def _attach(self, layers: Sequence[Layer], prefix: str, path: Tuple[int, ...],
                features: int) -> None:
        """Binds each layer to its views of the core's storage."""
        params = {name: (value, grad) for name, value, grad in self._params}
        buffers = dict(self._buffer_views)
        for i, layer in enumerate(layers):
            name, where = f"{prefix}.{i}", path + (i,)
            own = {key[len(name) + 1:]: pair for key, pair in params.items()
                   if key.startswith(name + ".") and "." not in key[len(name) + 1:]}
            own_buffers = {key[len(name) + 1:]: view for key, view in buffers.items()
                           if key.startswith(name + ".") and "." not in key[len(name) + 1:]}
            layer._attach(self._core, where, own, own_buffers, features)
            if layer._children():
                self._attach(layer._children(), f"{name}.layers", where, features)
            features = layer._widths(name, features)

    def _initialize(self, seed: Optional[int]) -> None:
        """Initial parameters: the Dense layers' weights drawn in depth-first order
        (a Dense-only network gets the bits it had before other layers existed);
        norm layers weight 1, bias 0, running_var 1."""
        flat = [layer for _, _, layer in walk(self._layers)]
        dense = [layer for layer in flat if isinstance(layer, Dense)]
        specs = [(L.in_features, L.out_features, L.activation, L.negative_slope) for L in dense]
        for layer, (W, b) in zip(dense, initial_parameters(specs, self._dtype, seed)):
            layer._params["weight"][0][...] = W  # cast into the core's storage, no temporary
            if layer.has_bias:
                layer._params["bias"][0][...] = b
            del W
        for layer in flat:
            if isinstance(layer, (BatchNorm, LayerNorm)) and "weight" in layer._params:
                layer._params["weight"][0][...] = 1
            if isinstance(layer, BatchNorm):
                layer._buffers["running_var"][...] = 1

    def _clone(self, dtype=None) -> "Network":
        """An independent copy (parameters, buffers, mode and dropout clock), in
        `dtype` (default: this network's); widening float32 to float64 is exact."""
        copy = Network._zeros([layer_from_description(L._description()) for L in self._layers],
                              dtype=self._dtype if dtype is None else dtype)
        for (_, dst, _), (_, src, _) in zip(copy._params, self._params):
            dst[...] = src
        for (_, dst), (_, src) in zip(copy._buffer_views, self._buffer_views):
            dst[...] = src
        copy._core.training = self.training
        copy._core.dropout_seed = self.dropout_seed
        copy._core.dropout_step = self.dropout_step
        return copy

    # ---- the three calls of training ------------------------------------------
    def forward(self, X: np.ndarray) -> np.ndarray:
        """Forward pass, caching each layer's input a and pre-activation z.

        Args:
            X: (batch, in_features), C-contiguous, of the network's dtype. It is
                cached by reference, not copied: keep it unchanged until backward.
                Or a scipy.sparse CSR matrix or array (csr_matrix, csr_array) of
                the network's dtype, int32 or int64 indices, in canonical form
                (sorted, no duplicates: ``X.sum_duplicates()``), if the first
                layer is Dense: z = X W + b is then a sparse x dense product, its
                arrays are cached by reference (the first layer's cached
                ``input`` is None), and backward forms dL/dW = X^T delta from
                them but no dL/dX. Other sparse formats are refused (``X.tocsr()``).

        Returns:
            (batch, out_features), a new array the caller owns.

        Raises:
            KeyboardInterrupt: Ctrl-C during a long call; the cached forward pass
                is forgotten (backward needs a new forward), nothing else changes.
            RuntimeError: fit trains this network in another thread.
        """
        if is_sparse(X):
            X = csr_batch("Network.forward", "X", X, self._dtype)
        return self._core.forward(X)

    def backward(self, grad_output: np.ndarray, *, accumulate: bool = False,
                 input_grad: bool = False) -> Optional[np.ndarray]:
        """Backward sweep from dL/d(output), last layer to first.

        Args:
            grad_output: (batch, out_features) = dL/d(output) of the last forward.
            accumulate: add to the stored gradients instead of overwriting them.
            input_grad: also compute and return dL/dX (batch, in_features).
                Refused (ValueError) after a forward pass over a sparse X.

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
                   optimizer=None, *, sample_weight: Optional[np.ndarray] = None,
                   clip_grad_norm: Optional[float] = None) -> float:
        """One training step: forward, loss, backward and the optimizer's update.

        With a built-in loss name the forward pass, the loss and the backward sweep
        run in one GIL-free C++ call; with plain SGD (no momentum, no weight decay)
        the update is fused into the backward sweep too, so the gradient buffers
        are not written. A callable loss runs the four calls from Python.

        Args:
            X: (batch, in_features), C-contiguous, of the network's dtype, or a
                scipy.sparse CSR matrix or array as :meth:`forward` takes it.
            y: int64 labels (batch,) for softmax_cross_entropy, else a
                (batch, out_features) array of the network's dtype.
            loss: a built-in loss name or a callable
                ``loss(output, target, sample_weight) -> (value, grad_output)``.
            optimizer: an optimizer from :mod:`bprop.optim` built on this network.
            sample_weight: (batch,) of the network's dtype, or None.
            clip_grad_norm: a max_norm >= 0 to clip the step's gradients to that
                global 2-norm before the update (as ``bprop.clip_grad_norm``
                between backward and ``optimizer.step()``; the update is then made
                after the whole sweep, from the stored gradients, plain SGD too),
                or None.

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
        clip = _check_max_norm("Network.train_step", "clip_grad_norm", clip_grad_norm)
        if is_sparse(X):
            X = csr_batch("Network.train_step", "X", X, self._dtype)
        if isinstance(loss, str):
            plan = getattr(optimizer, "_plan", None)
            if plan is not None:  # _step_function's step, without making one per call
                return self._core.train_step(X, y, loss, sample_weight, -1.0, plan, 1.0, 1.0,
                                             0.0, -1.0 if clip is None else clip)
        elif not callable(loss):
            raise TypeError("[Network.train_step] loss must be a loss name or a callable, "
                            f"but got {type_name(loss)}")
        return _step_function(self, loss, optimizer, clip_grad_norm=clip)(X, y, sample_weight,
                                                                          None)

    def predict(self, X, batch_size: Optional[int] = None) -> np.ndarray:
        """Forward pass that leaves the training caches untouched.

        Args:
            X: (samples, in_features) array-like of real numbers; converted to a
                C-contiguous array of the network's dtype (a copy only if needed).
                Or a scipy.sparse matrix or array, if the first layer is Dense:
                never densified; a format other than CSR is converted to CSR once
                (a copy of its stored values and indices), as are other dtypes.
            batch_size: rows per chunk (bounds the workspace); None for all at once.

        Returns:
            (samples, out_features), a new array.
        """
        if is_sparse(X):  # rows in chunks of batch_size, each a slice of the CSR arrays
            X = csr_batch("Network.predict", "X", as_csr("Network.predict", "X", X, self._dtype,
                                                         features=self._core.in_features),
                          self._dtype)
        else:
            X = as_float_matrix("Network.predict", "X", X, self._dtype,
                                features=self._core.in_features)
        size = 0 if batch_size is None else check_int("Network.predict", "batch_size",
                                                       batch_size, minimum=1)
        return self._core.predict(X, size)

    # ---- description ----------------------------------------------------------
    @property
    def layers(self) -> Tuple[Layer, ...]:
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
        """Yields (name, parameter view, gradient view) for every parameter of every
        layer in layer order (within a layer, weight then bias), with dotted names:
        layers.0.weight, layers.0.bias, ..., layers.4.layers.0.weight."""
        yield from self._params

    def buffers(self) -> Iterator[Tuple[str, np.ndarray]]:
        """Yields (name, view) for every buffer (state that is not trained:
        BatchNorm's running_mean and running_var), in layer order."""
        yield from self._buffer_views

    # ---- modes ----------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Network":
        """Sets training mode (eval mode for ``mode=False``); returns the network."""
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"[Network.train] mode must be a bool, but got {type_name(mode)}")
        self._core.training = bool(mode)
        return self

    def eval(self) -> "Network":
        """Sets eval mode (Dropout is the identity, BatchNorm uses its running
        statistics); returns the network."""
        return self.train(False)

    @property
    def training(self) -> bool:
        """True in training mode (a new network's), False in eval mode."""
        return self._core.training

    @property
    def dropout_seed(self) -> int:
        """The key of the dropout masks, in [0, 2^64): the seed, or drawn at random."""
        return self._core.dropout_seed

    @property
    def dropout_step(self) -> int:
        """Training-mode forward passes made so far: each draws its masks for this
        count, then adds 1. Settable, to replay a step's masks."""
        return self._core.dropout_step

    @dropout_step.setter
    def dropout_step(self, step: int) -> None:
        self._core.dropout_step = check_int("Network.dropout_step", "dropout_step", step,
                                            minimum=0, maximum=2**63 - 1)

    def summary(self) -> str:
        """A table of the layers, as Keras's ``model.summary()``: each layer's
        dotted name and type, output width and parameter count (a Residual's
        layers indented under it, its count theirs), then the totals. As in
        Keras, BatchNorm's running statistics count as non-trainable parameters::

            print(net.summary())

        Returns:
            The table, one line per layer.
        """
        sizes = [(name, p.size, True) for name, p, _ in self._params]
        sizes += [(name, b.size, False) for name, b in self._buffer_views]
        rows = []
        for name, path, layer in walk(self._layers):
            count = sum(n for key, n, _ in sizes if key.startswith(name + "."))
            rows.append(("  " * (len(path) - 1) + f"{name} ({layer.kind})",
                         f"{layer.out_features:,}", f"{count:,}"))
        head = ("Layer (type)", "Output width", "Param #")
        w = [max(len(r[k]) for r in rows + [head]) for k in range(3)]
        line = lambda r: f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}"  # noqa: E731
        rule = "=" * (w[0] + w[1] + w[2] + 4)
        trainable = sum(n for _, n, t in sizes if t)
        fixed = sum(n for _, n, t in sizes if not t)
        out = [f"Network ({self._dtype.name}, {self.in_features:,} input features, "
               f"{'training' if self.training else 'eval'} mode)", rule, line(head), rule]
        out += [line(r) for r in rows]
        out += [rule, f"Total params: {trainable + fixed:,}",
                f"Trainable params: {trainable:,}", f"Non-trainable params: {fixed:,}"]
        return "\n".join(out)

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, i: int) -> Layer:
        return self._layers[i]

    def __iter__(self) -> Iterator[Layer]:
        return iter(self._layers)

    def __repr__(self) -> str:
        lines = [f"Network(dtype={self._dtype.name}, parameters={self.num_parameters:,}"
                 + ("" if self.training else ", eval") + ")"]
        for i, layer in enumerate(self._layers):
            inner = repr(layer).replace("\n", "\n  ")
            lines.append(f"  ({i}): {inner}")
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
        """A Network equal to a torch model: nested nn.Sequential of Linear,
        BatchNorm1d, LayerNorm, Dropout, activation modules and
        bprop.interop.TorchResidual; see :func:`bprop.interop.from_torch`."""
        return _DELEGATES["from_torch"](module, dtype=dtype)

    def to_torch(self):
        """A torch.nn.Sequential with the same layers, parameters, buffers, mode and
        dtype; see :func:`bprop.interop.to_torch`."""
        return _DELEGATES["to_torch"](self)


def _step_function(net: Network, loss, optimizer, objective: Optional[Tuple[float, float, float]]
                   = None, clip_grad_norm: Optional[float] = None) -> Callable[..., float]:
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
        clip_grad_norm: a max_norm >= 0: every gradient of the step is formed, then
            all are scaled to that global 2-norm at most (clip_grad_norm), then
            the update; None for no clipping.
    """
    core = net._core
    clip = -1.0 if clip_grad_norm is None else float(clip_grad_norm)
    if callable(loss):
        dtype = net.dtype

        def user_loss_step(X, y, sample_weight, weight=None) -> float:
            value, grad = loss(core.forward(X), y, sample_weight)
            core.backward(np.ascontiguousarray(grad, dtype=dtype), False, False)
            if math.isfinite(value):
                if clip >= 0:
                    core.clip_grad_norm(clip)
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
            alpha / weight, clip)
    if getattr(optimizer, "_plan", None) is not None:
        return lambda X, y, sample_weight, weight=None: train_step(
            X, y, loss, sample_weight, -1.0, optimizer._plan, 1.0, 1.0, 0.0, clip)

    def unplanned_step(X, y, sample_weight, weight=None) -> float:
        # an optimizer without an UpdatePlan: its own step() after the sweep
        value = train_step(X, y, loss, sample_weight, -1.0)
        if math.isfinite(value):
            if clip >= 0:
                core.clip_grad_norm(clip)
            optimizer.step()
        return value
    return unplanned_step


def _check_max_norm(where: str, name: str, value) -> Optional[float]:
    if value is None:
        return None
    return check_float(where, name, value, minimum=0.0)


def clip_grad_norm(net: Network, max_norm: float) -> float:
    """Scales every stored gradient of ``net`` (those of the last backward) by
    ``min(1, max_norm / (norm + 1e-6))``, where norm is the 2-norm of all of them
    together, as ``torch.nn.utils.clip_grad_norm_``; returns that norm (before
    clipping). One C++ call; the norm is summed in float64, parameter by parameter
    in the network's order, so it does not depend on the thread count.

    Raises:
        RuntimeError: no backward pass has stored gradients (or a fused SGD step
            stored none).
        ValueError: max_norm is negative or not finite.
    """
    where = "clip_grad_norm"
    if not isinstance(net, Network):
        raise TypeError(f"[{where}] net must be a bprop.Network, but got {type_name(net)}")
    max_norm = check_float(where, "max_norm", max_norm, minimum=0.0)
    if not net._core.has_backward:
        raise RuntimeError(f"[{where}] the network holds no gradients: call net.forward and "
                           "net.backward first")
    return float(net._core.clip_grad_norm(max_norm))


def clip_grad_value(net: Network, clip_value: float) -> None:
    """Clamps every stored gradient of ``net`` to [-clip_value, clip_value], as
    ``torch.nn.utils.clip_grad_value_``.

    Raises:
        RuntimeError: no backward pass has stored gradients.
        ValueError: clip_value is negative or not finite.
    """
    where = "clip_grad_value"
    if not isinstance(net, Network):
        raise TypeError(f"[{where}] net must be a bprop.Network, but got {type_name(net)}")
    clip_value = check_float(where, "clip_value", clip_value, minimum=0.0)
    if not net._core.has_backward:
        raise RuntimeError(f"[{where}] the network holds no gradients: call net.forward and "
                           "net.backward first")
    net._core.clip_grad_value(clip_value)
