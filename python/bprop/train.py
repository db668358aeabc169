"""fit, evaluate and gradcheck.

``fit`` checks and converts its inputs once, before the first step, then trains
through the one training loop (``bprop._loop.Loop``: minibatch passes, one step
each) with a strategy that says how a step is taken and how the ranks agree:
:class:`Local` in one process, ``bprop.distributed.DataParallel`` over MPI.
What happens between epochs (History, metrics, validation, early stopping,
callbacks) is fit's own; the callbacks' hooks are those of ``bprop.callbacks``.
"""

from __future__ import annotations

import functools

import math
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from . import _core, _loop, _resume
from ._validation import (as_csr, as_float_matrix, check_float, check_int, check_path,
                          csr_nbytes_per_row, is_sparse, type_name)
from .distributed import DataParallel
from .losses import _builtin, check_labels, check_sample_weight, get_loss
from .losses import binary_cross_entropy_with_logits as _bce
from .losses import softmax_cross_entropy as _softmax_ce
from .layers import BatchNorm, Dense, walk
from .network import Network, _step_function
from .optim import Adam, Optimizer, _Schedule
from .callbacks import Callback, EarlyStopping
from .io import _architecture

__all__ = ["History", "fit", "evaluate", "gradcheck", "METRICS"]

#: The hooks fit calls on a callback, with their arguments.
_HOOKS = ("on_train_begin", "on_epoch_begin", "on_batch_end", "on_epoch_end", "on_train_end")

#: Built-in metric names. "accuracy" compares argmax(output) with the labels
#: (a threshold for one-wide and multi-label outputs); "mse" is the mean
#: squared error of output and target.
METRICS = ("accuracy", "mse", "mean_squared_error")


# ---- History ---------------------------------------------------------------------

class History:
    """What ``fit`` recorded, one entry per completed epoch.

    Attributes:
        loss: mean training loss of each epoch (the sample-weighted mean of the
            minibatch losses, taken while the weights changed, as Keras does).
        val_loss: loss on the validation data after each epoch (empty without).
        metrics: {name: [per epoch]} for the training data ("accuracy", ...) and
            the validation data ("val_accuracy", ...), computed after each epoch.
        lr: learning rate each epoch started with (a schedule stepped per
            minibatch step changes it within the epoch).
        time: wall time of each epoch in seconds (validation included).
        best_epoch: 0-based index of the epoch whose weights early stopping
            restored (None without early stopping).
        stopped_early: True if early stopping ended the fit before ``epochs``.
    """

    def __init__(self) -> None:
        self.loss: List[float] = []
        self.val_loss: List[float] = []
        self.metrics: Dict[str, List[float]] = {}
        self.lr: List[float] = []
        self.time: List[float] = []
        self.best_epoch: Optional[int] = None
        self.stopped_early = False

    @property
    def epochs(self) -> int:
        return len(self.loss)

    @property
    def total_time(self) -> float:
        return float(sum(self.time))

    @property
    def history(self) -> Dict[str, List[float]]:
        """Everything per epoch in one dict, Keras style: loss, val_loss, the
        metrics, lr and time."""
        out = {"loss": list(self.loss)}
        if self.val_loss:
            out["val_loss"] = list(self.val_loss)
        out.update({k: list(v) for k, v in self.metrics.items()})
        out["lr"] = list(self.lr)
        out["time"] = list(self.time)
        return out

    def __len__(self) -> int:
        return len(self.loss)

    def _append(self, logs: Dict[str, float], metrics: List[str], validated: bool) -> None:
        """Records fit's logs of one epoch."""
        self.loss.append(logs["loss"])
        if validated:
            self.val_loss.append(logs["val_loss"])
        for name in metrics:
            self.metrics.setdefault(name, []).append(logs[name])
            if validated:
                self.metrics.setdefault("val_" + name, []).append(logs["val_" + name])
        self.lr.append(logs["lr"])
        self.time.append(logs["time"])

    def __repr__(self) -> str:
        if not self.loss:
            return "History(epochs=0)"
        parts = [f"epochs={len(self.loss)}", f"loss={self.loss[-1]:.4g}"]
        if self.val_loss:
            parts.append(f"val_loss={self.val_loss[-1]:.4g}")
        parts += [f"{k}={v[-1]:.4g}" for k, v in self.metrics.items()]
        parts.append(f"time={self.total_time:.3g}s")
        return f"History({', '.join(parts)})"

    def plot(self, path, *, log_scale: bool = False) -> None:
        """Writes a PNG of the loss curves (and of the metrics, in a second panel).

        Uses matplotlib's Agg canvas directly: no pyplot, no global state, no
        display needed.

        Args:
            path: where to write the PNG.
            log_scale: logarithmic loss axis.

        Raises:
            ImportError: matplotlib is not installed (``pip install matplotlib``).
            ValueError: the history is empty.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError("[History.plot] needs matplotlib: pip install matplotlib "
                              "(or pip install 'bprop[plot]')") from exc
        if not self.loss:
            raise ValueError("[History.plot] the history is empty: nothing to plot")
        epochs = np.arange(1, len(self.loss) + 1)
        panels = 2 if self.metrics else 1
        fig = Figure(figsize=(6.0 * panels, 4.0), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, panels, 1)
        ax.plot(epochs, self.loss, label="training loss")
        if self.val_loss:
            ax.plot(epochs, self.val_loss, label="validation loss")
        if self.best_epoch is not None:
            ax.axvline(self.best_epoch + 1, color="grey", linestyle=":", label="best epoch")
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title("loss")
        ax.grid(True, alpha=0.3)
        ax.legend()
        if self.metrics:
            ax2 = fig.add_subplot(1, panels, 2)
            for name, values in self.metrics.items():
                ax2.plot(epochs, values, label=name)
            ax2.set_xlabel("epoch")
            ax2.set_title("metrics")
            ax2.grid(True, alpha=0.3)
            ax2.legend()
        fig.tight_layout()
        fig.savefig(path, format="png")


# ---- checks shared by fit, evaluate and gradcheck ---------------------------------

def _check_network(where: str, net: object) -> Network:
    if not isinstance(net, Network):
        raise TypeError(f"[{where}] net must be a bprop.Network, but got {type_name(net)}")
    return net


def _get_loss(where: str, loss):
    fn = get_loss(loss, where)
    return fn, _builtin(fn)


def _prepare_target(where: str, name: str, y: object, rows: int, net: Network, builtin,
                    ref: str = "X") -> np.ndarray:
    """Checks y against the loss once, for the whole dataset.

    Built-in losses: labels (int64) for softmax cross-entropy (or probability
    rows), 2-D float targets of the network's dtype for mse and bce; a 1-D target
    of a one-wide network becomes a column. User losses: y as an array with the
    same number of rows, float data in the network's dtype, integers kept."""
    shape = (rows, net.out_features)
    if builtin is not None:
        return builtin.prepare(where, name, y, shape, net.dtype, ref)
    if y is None:
        raise TypeError(f"[{where}] {name} must be an array, but got None")
    arr = np.asarray(y)
    if arr.ndim == 0:
        raise ValueError(f"[{where}] {name} must have one row per sample, but is a scalar")
    if arr.shape[0] != rows:
        raise ValueError(f"[{where}] {name} has {arr.shape[0]} rows, but {ref} has {rows}")
    if arr.dtype.kind == "f":
        return np.ascontiguousarray(arr, dtype=net.dtype)
    return np.ascontiguousarray(arr)


def _user_loss(where: str, fn, net: Network):
    """Wraps a user loss so that its grad reaches backward as a C-contiguous array
    of the network's dtype with the output's shape."""
    dtype = net.dtype
    name = getattr(fn, "__name__", type_name(fn))

    def call(output, target, weight):
        result = fn(output, target, weight)
        try:
            value, grad = result
        except (TypeError, ValueError):
            raise TypeError(f"[{where}] the loss {name} must return (value, grad_output), but "
                            f"returned {type_name(result)}") from None
        grad = np.asarray(grad)
        if grad.shape != output.shape:
            raise ValueError(f"[{where}] the loss {name} returned grad_output of shape "
                             f"{grad.shape}, but the output has shape {output.shape}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"[{where}] the loss {name} must return a number as its value, "
                            f"but returned {type_name(value)}") from None
        return value, np.ascontiguousarray(grad, dtype=dtype)

    return call


def _metric_fns(where: str, metrics, loss_fn) -> List[Tuple[str, Callable]]:
    if metrics is None:
        return []
    if isinstance(metrics, str) or callable(metrics):
        metrics = [metrics]
    if not isinstance(metrics, (list, tuple)):
        raise TypeError(f"[{where}] metrics must be a list of names {list(METRICS)} or "
                        f"callables, but got {type_name(metrics)}")
    out = []
    for m in metrics:
        if isinstance(m, str):
            if m == "accuracy":
                threshold = 0.0 if loss_fn is _bce else 0.5
                multilabel = loss_fn is _bce
                out.append(("accuracy", lambda o, t, w, th=threshold, ml=multilabel:
                            _accuracy(o, t, w, th, ml)))
            elif m in ("mse", "mean_squared_error"):
                out.append((m, _mse_metric))
            else:
                raise ValueError(f"[{where}] unknown metric {m!r}; expected one of "
                                 f"{list(METRICS)} or a callable metric(output, target, "
                                 "sample_weight=None) -> float")
        elif callable(m):
            out.append((getattr(m, "__name__", type_name(m)), m))
        else:
            raise TypeError(f"[{where}] each metric must be a name {list(METRICS)} or a "
                            f"callable, but got {type_name(m)}")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"[{where}] metric names must be unique, but got {names}")
    return out


def _weighted_mean(values: np.ndarray, weight: Optional[np.ndarray]) -> float:
    if weight is None:
        return float(np.mean(values))
    return float(np.dot(values.astype(np.float64), weight) / np.sum(weight, dtype=np.float64))


def _accuracy(output, target, weight, threshold, multilabel) -> float:
    k = output.shape[1]
    if target.ndim == 1 and k > 1:
        correct = np.argmax(output, axis=1) == target
    elif target.ndim == 1:
        correct = (output[:, 0] > threshold) == (target > 0.5)
    elif k > 1 and not multilabel:
        correct = np.argmax(output, axis=1) == np.argmax(target, axis=1)
    else:  # one-wide or multi-label: elementwise, averaged per sample
        correct = ((output > threshold) == (target > 0.5)).mean(axis=1)
    return _weighted_mean(np.asarray(correct, dtype=np.float64), weight)


def _mse_metric(output, target, weight) -> float:
    if target.ndim == 1:
        if output.shape[1] != 1:
            raise ValueError("[mse metric] needs float targets of the output's shape "
                             f"{output.shape}, but got labels of shape {target.shape}")
        target = target.reshape(-1, 1)
    if target.shape != output.shape:
        raise ValueError(f"[mse metric] target has shape {target.shape}, but the output has "
                         f"shape {output.shape}")
    diff = output.astype(np.float64) - target
    return _weighted_mean((diff * diff).mean(axis=1), weight)


def _describe(fn: object) -> str:
    """A loss (name, function or functools.partial) as text that is the same in
    every process (no addresses)."""
    if isinstance(fn, functools.partial):
        args = [_describe(fn.func)] + [repr(a) for a in fn.args] + [
            f"{k}={v!r}" for k, v in sorted(fn.keywords.items())]
        return f"partial({', '.join(args)})"
    if isinstance(fn, str):
        return repr(fn)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type_name(fn))}"


def _as_bool(where: str, name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"[{where}] {name} must be a bool, but got {type_name(value)} {value!r}")
    return bool(value)


class _Dataset:
    """X, target and weights checked and converted for one network and loss.

    ``rows`` is None when the dataset is all of X, else the rows of X (in order)
    that make it up: a part of a dataset (the training part of validation_split)
    is held by index, so an X too large for memory (a numpy.memmap) is read in
    place, one chunk of rows per gather, and never copied whole. ``y`` and ``w``
    always hold this dataset's own rows.
    """

    def __init__(self, where: str, net: Network, X, y, sample_weight, builtin,
                 names=("X", "y", "sample_weight")) -> None:
        self.sparse = is_sparse(X)
        if self.sparse:
            self.X = _sparse_matrix(where, names[0], X, net)
        else:
            with np.errstate(over="ignore"):  # too large for the dtype becomes inf: refused below
                self.X = as_float_matrix(where, names[0], X, net.dtype,
                                         features=net.in_features)
        if not self.sparse and not _core.all_finite(self.X):
            i, j = np.argwhere(~np.isfinite(self.X))[0]
            raise ValueError(f"[{where}] {names[0]} must be finite in {net.dtype.name}, but "
                             f"{names[0]}[{i}, {j}] = {self.X[i, j]}")
        rows = self.X.shape[0]
        self.rows: Optional[np.ndarray] = None
        self.y = _prepare_target(where, names[1], y, rows, net, builtin, names[0])
        self.w = check_sample_weight(where, sample_weight, rows, net.dtype, names[0], names[2])

    def __len__(self) -> int:
        return self.y.shape[0]

    def subset(self, index: np.ndarray, *, copy: bool) -> "_Dataset":
        """The samples `index` as a new dataset: X's rows copied (C-contiguous) if
        `copy`, else referred to by index; y and w are copied."""
        part = _Dataset.__new__(_Dataset)
        part.sparse = self.sparse
        rows = index if self.rows is None else self.rows[index]
        if copy:  # scipy's CSR row indexing for a sparse X
            part.X = self.X[rows] if self.sparse else np.take(self.X, rows, axis=0)
            part.rows = None
        else:
            part.X, part.rows = self.X, rows
        part.y = np.take(self.y, index, axis=0)
        part.w = None if self.w is None else np.take(self.w, index, axis=0)
        return part

    def predict(self, core, lo: int = 0, hi: Optional[int] = None,
                batch_size: int = 0) -> np.ndarray:
        """The network's output (hi - lo, out_features) for samples lo..hi."""
        hi = len(self) if hi is None else hi
        if self.sparse:
            gather = _loop._csr_arrays  # the core's form of a CSR matrix
            take = lambda rows: self.X[rows]  # noqa: E731
            row_bytes = csr_nbytes_per_row(self.X)
        else:
            gather = lambda X: X  # noqa: E731
            take = lambda rows: np.take(self.X, rows, axis=0)  # noqa: E731
            row_bytes = self.X[:1].nbytes
        if self.rows is None:
            return core.predict(gather(self.X[lo:hi]), batch_size)
        out = np.empty((hi - lo, core.out_features), self.X.dtype)
        step = batch_size or max(1, _loop._CHUNK_BYTES // max(1, row_bytes))
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            out[a - lo:b - lo] = core.predict(gather(take(self.rows[a:b])), 0)
        return out


def _is_batch_source(data: object) -> bool:
    """True for what fit takes as minibatches rather than as one X: anything
    iterable or callable that is not an array (a NumPy array, a scipy.sparse
    matrix, or a list or tuple, which are array-like unless they hold batches)."""
    if isinstance(data, np.ndarray) or is_sparse(data):
        return False
    if isinstance(data, (list, tuple)):
        return len(data) > 0 and isinstance(data[0], tuple)
    return callable(data) or hasattr(data, "__iter__")


class _Stream:
    """Training or validation data given as minibatches: a re-iterable of
    ``(X_batch, y_batch)`` or ``(X_batch, y_batch, w_batch)`` tuples (iterated
    once per pass), a callable returning such an iterable (called once per
    pass: a generator function), or an iterator (one pass only). Each batch is
    checked and converted as fit converts X, y and sample_weight, when it comes."""

    def __init__(self, where: str, name: str, source, net: Network, builtin, passes: int
                 ) -> None:
        self.where, self.name, self.net, self.builtin = where, name, net, builtin
        if callable(source) and not hasattr(source, "__iter__"):
            self.make = source
        else:
            if iter(source) is source and passes > 1:
                raise TypeError(
                    f"[{where}] {name} is an iterator ({type_name(source)}), which the first "
                    f"pass would exhaust, but fit makes {passes} passes over it; pass a "
                    "re-iterable (a list, or an object whose __iter__ starts a new pass) or a "
                    "generator function (called once per pass) instead")
            self.make = lambda: source
        self.sparse = False

    def batches(self):
        """(index, X, y, w) of each minibatch of one pass, checked and converted."""
        where, net = self.where, self.net
        items = self.make()
        try:
            items = iter(items)
        except TypeError:
            raise TypeError(f"[{where}] {self.name} returned {type_name(items)}, which is not "
                            "iterable (expected (X_batch, y_batch[, w_batch]) tuples)") from None
        for i, item in enumerate(items):
            what = f"{self.name} batch {i}"
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise TypeError(f"[{where}] {what} must be a tuple (X_batch, y_batch) or "
                                f"(X_batch, y_batch, w_batch), but got {type_name(item)}")
            Xb = item[0]
            names = (f"{what}: X_batch", f"{what}: y_batch", f"{what}: w_batch")
            if is_sparse(Xb):
                Xb = _sparse_matrix(where, names[0], Xb, net)
                rows = Xb.shape[0]
            else:
                with np.errstate(over="ignore"):
                    Xb = as_float_matrix(where, names[0], Xb, net.dtype,
                                         features=net.in_features)
                if not _core.all_finite(Xb):
                    r, c = np.argwhere(~np.isfinite(Xb))[0]
                    raise ValueError(f"[{where}] {names[0]} must be finite in "
                                     f"{net.dtype.name}, but X_batch[{r}, {c}] = {Xb[r, c]}")
                rows = Xb.shape[0]
            yb = _prepare_target(where, names[1], item[1], rows, net, self.builtin, names[0])
            wb = None
            if len(item) == 3 and item[2] is not None:
                wb = check_sample_weight(where, item[2], rows, net.dtype, names[0], names[2])
            yield i, (_loop._csr_arrays(Xb) if is_sparse(Xb) else Xb), yb, wb

    def outputs(self, core) -> Tuple[np.ndarray, "_Stream._Targets"]:
        """The network's output over one pass, and the pass's targets and weights."""
        outs, ys, ws = [], [], []
        for _, Xb, yb, wb in self.batches():
            outs.append(core.predict(Xb, 0))
            ys.append(yb)
            ws.append(wb)
        if not outs:
            raise ValueError(f"[{self.where}] {self.name} yielded no batches")
        if any(w is None for w in ws) and not all(w is None for w in ws):
            ws = [np.ones(y.shape[0], self.net.dtype) if w is None else w
                  for w, y in zip(ws, ys)]
        targets = _Stream._Targets()
        targets.y = np.concatenate(ys)
        targets.w = None if ws[0] is None else np.concatenate(ws)
        return np.concatenate(outs), targets

    class _Targets:
        y: np.ndarray
        w: Optional[np.ndarray]


def _sparse_matrix(where: str, name: str, X, net: Network):
    """A sparse X for fit, evaluate and the validation data: a CSR matrix of the
    network's dtype in canonical form with finite values (as_csr; other formats
    converted to CSR once, O(nnz)), for a network whose first layer is Dense.
    Never densified."""
    first = net.layers[0]
    if not isinstance(first, Dense):
        raise TypeError(f"[{where}] {name} is sparse, which only a Dense first layer takes, but "
                        f"layer 0 is {type_name(first)}; densify it ({name}.toarray()) or start "
                        "the network with a Dense layer")
    with np.errstate(over="ignore"):  # too large for the dtype becomes inf: refused below
        X = as_csr(where, name, X, net.dtype, features=net.in_features)
    finite = np.isfinite(X.data)
    if not finite.all():
        k = int(np.argmin(finite))
        i = int(np.searchsorted(X.indptr, k, side="right")) - 1
        raise ValueError(f"[{where}] {name} must be finite in {net.dtype.name}, but "
                         f"{name}[{i}, {X.indices[k]}] = {X.data[k]}")
    return X


def _scores(out: np.ndarray, data: _Dataset, loss_fn, metric_fns,
            prefix: str = "") -> Dict[str, float]:
    """Loss and metrics of the network's output `out` on a whole dataset."""
    logs = {}
    if loss_fn is not None:
        logs[prefix + "loss"] = float(loss_fn(out, data.y, data.w)[0])
    for name, fn in metric_fns:
        logs[prefix + name] = float(fn(out, data.y, data.w))
    return logs


# ---- the strategy of one process -------------------------------------------------

class Local:
    """How fit trains in one process. bprop.distributed.DataParallel, the strategy
    over MPI, has the same methods (there: the same seed on every rank, rank 0's
    weights broadcast at the start, a rank's share of each minibatch and an
    allreduce per step, outputs gathered, the slowest time, any rank's stop,
    failures reported to the other ranks); fit calls nothing else that differs."""

    rank = 0

    def shared_seed(self, seed):
        return seed

    def start(self, net: Network, optimizer: Optimizer, rng: np.random.Generator, train,
              valid, **settings) -> None:
        """Called once the arguments are checked, before the network changes; the
        last checks that depend on the strategy (DataParallel: each rank's share)."""
        n, batch_size = len(train), settings["batch_size"]
        if (min(batch_size, n) == 1 or n % batch_size == 1) and any(
                isinstance(layer, BatchNorm) for _, _, layer in walk(net.layers)):
            # found before the first step, not by the step that meets the minibatch
            raise ValueError(f"[fit] {n} training samples in minibatches of {batch_size} make "
                             "a minibatch of one row, on which BatchNorm cannot train (the "
                             "variance of one row is 0); choose another batch_size")

    def step_function(self, net: Network, optimizer: Optimizer, kernel: Callable,
                      name: Optional[str], clip_grad_norm: Optional[float] = None) -> Callable:
        """The loop's step: the built-in loss `name`, or `kernel` (a user's loss)."""
        return _step_function(net, kernel if name is None else name, optimizer,
                              clip_grad_norm=clip_grad_norm)

    def outputs(self, net: Network, data: _Dataset, batch_size: int = 0) -> np.ndarray:
        """The network's output on a whole dataset (the training caches untouched)."""
        return data.predict(net._core, batch_size=batch_size)

    def slowest(self, seconds: float) -> float:
        return seconds

    def any(self, flag: bool) -> bool:
        return flag

    def failed(self, exc: BaseException) -> None:
        """Called with any exception fit raises, before it propagates."""


def _first_nonfinite(net: Network) -> Optional[str]:
    for name, p, _ in net.parameters():
        if not _core.all_finite(p):
            return name
    return None


class _Progress:
    """One tqdm bar over all minibatches of the fit: the description names the
    epoch, the postfix shows the running loss of the epoch (refreshed every few
    batches, so the bar costs next to nothing per step) and, at each epoch's end,
    its validation loss and metrics. Without tqdm, one plain line per epoch on
    stderr (``epoch 3/60: loss=0.1234, ...``)."""

    def __init__(self, epochs: int, batches: int) -> None:
        self.epochs = epochs
        self.width = len(str(epochs))
        self.every = max(1, batches // 10)
        self.pending = 0
        self.epoch = 0
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.bar = None
            return
        self.bar = tqdm(total=epochs * batches or None, unit="batch", dynamic_ncols=True, leave=True,
                        desc=self._desc(0))

    def _desc(self, epoch: int) -> str:
        return f"epoch {epoch + 1:>{self.width}}/{self.epochs}"

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.bar is not None:
            self.bar.set_description_str(self._desc(epoch), refresh=False)

    def update(self, running_loss: float) -> None:
        self.pending += 1
        if self.pending >= self.every and self.bar is not None:
            self.bar.set_postfix_str(f"loss={running_loss:.4f}", refresh=False)
            self.bar.update(self.pending)
            self.pending = 0

    def end_epoch(self, logs: Dict[str, float]) -> None:
        if self.bar is None:
            print(f"{self._desc(self.epoch)}: {_format_logs(logs)} ({logs['time']:.2f} s)",
                  file=sys.stderr, flush=True)
        else:
            self.bar.set_postfix_str(_format_logs(logs), refresh=False)
            self.bar.update(self.pending)
        self.pending = 0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _format_logs(logs: Dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in logs.items() if k not in ("time", "lr"))


# ---- class weights -------------------------------------------------------------------

def _class_labels(y: np.ndarray) -> np.ndarray:
    """Integer labels (samples,) of a checked classification target: softmax labels,
    or a 0/1 column for binary cross-entropy."""
    return np.asarray(y).reshape(-1).astype(np.int64)


def _class_weights(where: str, class_weight, loss_fn, y, out_features: int
                   ) -> Optional[np.ndarray]:
    """fit's class_weight as one float64 weight per class (indexed by label), or None."""
    if class_weight is None:
        return None
    base = loss_fn.func if isinstance(loss_fn, functools.partial) else loss_fn
    arr = np.asarray(y)
    if base is _softmax_ce:
        if arr.ndim != 1 and not (arr.ndim == 2 and arr.shape[1] == 1):
            raise ValueError(f"[{where}] class_weight needs integer class labels (samples,) "
                             f"for softmax_cross_entropy, but y has shape {arr.shape} "
                             "(probability rows); fold the weights into the rows instead")
        classes = out_features
        y = check_labels(where, "y", arr, arr.shape[0], classes, "X")
    elif base is _bce:
        if out_features != 1 or arr.ndim == 2 and arr.shape[1] != 1:
            raise ValueError(f"[{where}] class_weight with binary_cross_entropy_with_logits "
                             f"needs one output column of 0/1 targets, but the network has "
                             f"{out_features} outputs")
        bad = (arr != 0) & (arr != 1)
        if bad.any():
            raise ValueError(f"[{where}] class_weight with binary_cross_entropy_with_logits "
                             f"needs 0/1 targets, but y holds {arr[bad].reshape(-1)[0]}")
        classes = 2
    else:
        raise ValueError(f"[{where}] class_weight is for classification losses "
                         "(softmax_cross_entropy with labels, binary_cross_entropy_with_logits "
                         f"with 0/1 targets), but loss is {getattr(base, '__name__', base)!r}")
    labels = _class_labels(y)
    counts = np.bincount(labels, minlength=classes)
    present = np.flatnonzero(counts)
    weights = np.ones(classes)
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise ValueError(f"[{where}] class_weight must be None, 'balanced' or a dict "
                             f"{{label: weight}}, but got {class_weight!r}")
        # scikit-learn's compute_class_weight("balanced"): n_samples / (n_classes * bincount)
        weights[present] = labels.shape[0] / (present.size * counts[present])
        return weights
    if not isinstance(class_weight, dict):
        raise TypeError(f"[{where}] class_weight must be None, 'balanced' or a dict "
                        f"{{label: weight}}, but got {type_name(class_weight)}")
    for label, weight in class_weight.items():
        if (isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer))
                or not 0 <= label < classes):
            raise ValueError(f"[{where}] class_weight has label {label!r}, which is not a class "
                             f"(expected integer labels in [0, {classes}))")
        if counts[label] == 0:
            raise ValueError(f"[{where}] class_weight has label {label}, which does not occur "
                             "in y")
        if (isinstance(weight, (bool, np.bool_))
                or not isinstance(weight, (int, float, np.integer, np.floating))
                or not (np.isfinite(weight) and weight > 0)):
            raise ValueError(f"[{where}] class_weight[{label}] must be a finite number > 0, "
                             f"but got {weight!r}")
        weights[int(label)] = float(weight)
    return weights


# ---- fit -------------------------------------------------------------------------

def fit(net: Network, X, y=None, loss="softmax_cross_entropy", optimizer: Optional[Optimizer] = None,
        epochs: int = 10, batch_size: int = 32, shuffle: bool = True, seed=None,
        validation_split: float = 0.0, validation_data=None,
        early_stopping: Optional[int] = None, metrics=None, callbacks=None,
        sample_weight=None, verbose: bool = False, check_finite: bool = False,
        comm=None, class_weight=None, clip_grad_norm: Optional[float] = None,
        checkpoint=None, checkpoint_every: Optional[int] = None) -> History:
    """Trains the network by minibatch gradient descent.

    Args:
        net: the network; trained in place.
        X: (samples, in_features) real numbers; converted once to the network's
            dtype (bprop._validation.as_float_matrix). Or a scipy.sparse matrix
            or array if the network's first layer is Dense: never densified;
            converted once to CSR of the network's dtype if it is not (a copy of
            its stored values and indices, O(nnz)); its minibatches are gathered
            with scipy's CSR row indexing (a copy of each chunk's rows). Column
            indices must be sorted without duplicates (``X.sum_duplicates()``).
            A numpy.memmap of the network's dtype is read in place, never copied
            whole. Or minibatches (then y and sample_weight are None): a
            re-iterable of ``(X_batch, y_batch)`` or ``(X_batch, y_batch,
            w_batch)`` tuples (a list, or an object whose ``__iter__`` starts a
            new pass), a generator function (called once per epoch) or, with
            ``epochs=1``, an iterator; batches may differ in size and each is
            checked and converted as X, y and sample_weight are, when it comes.
            The order is the iterable's: ``shuffle`` and ``batch_size`` do not
            apply, and validation_split, class_weight, checkpoint and comm are
            refused.
        y: targets checked against the loss: integer labels (samples,) or
            probability rows for softmax cross-entropy; (samples, out_features)
            floats for mean squared error and binary cross-entropy ((samples,)
            for a one-wide network). A user loss gets y's rows as given (float
            data in the network's dtype).
        loss: a name from ``bprop.losses.LOSSES`` or a callable
            ``loss(output, target, sample_weight=None) -> (value, grad_output)``.
            A ``functools.partial`` of a built-in loss sets its options
            (``partial(bprop.losses.huber, delta=2.0)``); with every option at its
            default it runs the fused core step as the name does, otherwise as a
            user loss (the loss and its gradient computed in Python per minibatch).
        optimizer: a ``bprop.optim`` optimizer bound to ``net``. None reuses the
            optimizer of this network's previous fit (so a second call continues
            where the first stopped: warm start), or makes ``Adam(net, lr=1e-3)``
            the first time. The optimizer used is remembered on the network.
        epochs: passes over the training data (>= 1).
        batch_size: samples per minibatch (>= 1); the last one may be smaller.
        shuffle: a new permutation of the samples each epoch (arrays only).
        seed: int, None or numpy Generator; seeds the shuffling and the
            validation split (same seed, same batches).
        validation_split: fraction in [0, 1) held out for validation: the data
            are permuted once with ``seed`` (if shuffle) and the last
            ``samples - int(samples * (1 - validation_split))`` rows are held
            out, as Keras takes the tail (unstratified). The validation rows are
            copied; the training rows are not: they are gathered by index from X
            one chunk (about 1 MiB) at a time, so a numpy.memmap X is read in place.
        validation_data: (X_val, y_val) or (X_val, y_val, sample_weight_val),
            or minibatches as X may be; excludes validation_split.
        early_stopping: patience in epochs (>= 0), or None. Watches val_loss
            when there is validation data, else the training loss; stops after
            ``patience`` epochs in a row without a strict improvement (Keras'
            rule) and restores the
            weights of the best epoch (also when the epochs run out). The
            optimizer state is that of the last epoch. The short form of
            ``callbacks=[bprop.callbacks.EarlyStopping(monitor, patience,
            restore_best_weights=True)]``, run before the other callbacks; it
            also sets the History's ``best_epoch``.
        metrics: names from ``METRICS`` or callables
            ``metric(output, target, sample_weight) -> float``, computed after
            each epoch on the training data and on the validation data
            ("val_" + name).
        callbacks: objects with any of the hooks ``on_train_begin(logs)``,
            ``on_epoch_begin(epoch, logs)``, ``on_batch_end(batch, logs)``,
            ``on_epoch_end(epoch, logs)`` (logs: this epoch's loss, val_loss,
            metrics, lr and time), ``on_train_end(logs)`` and
            ``set_network(net)``, called in list order (see ``bprop.callbacks``:
            ``EarlyStopping``, ``ModelCheckpoint``, ``CSVLogger``). A true value
            returned by ``on_batch_end`` or ``on_epoch_end`` stops training
            (after that step, or that epoch). The ``bprop.optim`` schedules are
            callbacks: stepped per epoch or per minibatch step (their
            ``interval``).
        sample_weight: non-negative weights (samples,). Each minibatch's loss is
            the weighted mean over its samples; a minibatch whose weights are
            all zero is skipped.
        verbose: show a tqdm progress bar per epoch with the running loss (without
            tqdm installed, one plain line per epoch on stderr).
        check_finite: also check every parameter for NaN/inf after each step
            (the loss is always checked, the parameters once per epoch), so
            that the step that made them non-finite is the one reported.
        comm: an mpi4py communicator (e.g. ``MPI.COMM_WORLD``) for data-parallel
            training: every rank calls fit with the same arguments and the
            whole dataset, trains on its share of each minibatch and steps with
            the summed gradient; batch_size is global. A sparse X (and
            validation data) is taken as without comm: each rank's rows of a
            minibatch are a slice of its CSR arrays, never densified. See
            bprop.distributed.
        class_weight: None, "balanced" or {label: weight}, for classification:
            softmax cross-entropy with integer labels, or binary cross-entropy
            with one output column of 0/1 targets (a ``functools.partial`` of
            either counts). Each training sample's weight is multiplied by its
            class's (sample_weight times class weight, per row; the minibatch
            mean divides by the sum of these products, torch's weighted mean).
            "balanced" is scikit-learn's n_samples / (n_classes * bincount(y)),
            over the classes occurring in y; a dict's labels must be classes that
            occur in y, its weights finite and > 0, and absent classes weigh 1.
            The weights apply to the training samples only; the validation loss
            (validation_split or validation_data) is not class-weighted.
        clip_grad_norm: a max_norm >= 0 to clip each step's gradients to that
            global 2-norm before the update, as ``torch.nn.utils.clip_grad_norm_``
            between ``backward()`` and ``optimizer.step()`` (over MPI: the summed
            gradient); None (the default) for no clipping. See
            ``bprop.clip_grad_norm``.
        checkpoint: None, or a file (str or os.PathLike) that makes the fit
            crash-safe: written atomically (temporary file, fsync, rename) every
            ``checkpoint_every`` minibatch steps and at the end of each epoch
            (and once more when fit returns), it holds everything the rest of the
            run depends on: weights, buffers and dropout clock, optimizer state,
            the shuffling generator, the position (epoch, minibatch, the epoch's
            running loss), the History and the state of every callback with
            ``state_dict``/``load_state_dict`` (schedules, EarlyStopping,
            ModelCheckpoint, CSVLogger). If the file exists when fit is called,
            fit resumes from it, and ends bit for bit where the uninterrupted
            run would have (History's ``time`` aside); a file left by a finished
            run makes fit restore its final state and return its History without
            training. A file written with another network, data (shapes and a
            CRC-32 of every byte), arguments, optimizer settings, callbacks or
            number of MPI ranks is refused (ValueError naming what differs).
            Over MPI rank 0 writes and every rank reads (give every rank the
            same path on a shared file system). Not with ``verbose`` progress
            bars' positions, which restart at the resumed step.
        checkpoint_every: minibatch steps between checkpoints within an epoch
            (>= 1), or None (the default) for the ends of epochs only.

    Returns:
        History of the epochs run (the same on every rank under comm).

    Raises:
        FloatingPointError: the loss became NaN or inf. The message names the
            epoch and the first layer whose weights went non-finite, and where
            the failing step's first non-finite value arose (forward pass,
            loss, backward pass or update; with the layer); the weights
            (and optimizer state) are restored to the last finite ones, and the
            exception's ``history`` attribute holds the completed epochs.
        KeyboardInterrupt: Ctrl-C (or another exception raised by a signal
            handler, which then propagates instead). The step it interrupted was
            either made and counted in the optimizer's ``step_count`` or not made
            at all, so the network and optimizer agree; the exception's
            ``history`` attribute holds the completed epochs (early stopping's
            best weights are not restored). Calling fit again goes on from
            there: with ``optimizer=None`` it reuses the same optimizer.
        RuntimeError: another thread's fit is training the network. While fit
            runs, the network's forward, backward, step and train_step (and the
            optimizer's step) from other threads raise RuntimeError too; predict
            keeps working, and calls from fit's own thread (callbacks, a user
            loss) work as usual.
    """
    strategy = Local() if comm is None else DataParallel(comm)
    seed = strategy.shared_seed(seed)
    if strategy.rank != 0:
        verbose = False  # one progress bar
    try:
        return _fit(strategy, net, X, y, loss, optimizer, epochs, batch_size, shuffle, seed,
                    validation_split, validation_data, early_stopping, metrics, callbacks,
                    sample_weight, verbose, check_finite, class_weight, clip_grad_norm,
                    checkpoint, checkpoint_every)
    except BaseException as exc:
        strategy.failed(exc)  # over MPI: one failing rank must not leave the others waiting
        raise


def _fit(strategy, net, X, y, loss, optimizer, epochs, batch_size, shuffle, seed,
         validation_split, validation_data, early_stopping, metrics, callbacks, sample_weight,
         verbose, check_finite, class_weight=None, clip_grad_norm=None, checkpoint=None,
         checkpoint_every=None) -> History:
    """fit, inside its strategy's failure handling: every check, then the training."""
    run = _Fit(strategy, net)
    run.check_data(X, y, loss, epochs, sample_weight, validation_split, class_weight,
                   checkpoint)
    run.check_arguments(batch_size, shuffle, verbose, check_finite, clip_grad_norm, seed,
                        validation_split, validation_data, early_stopping, checkpoint,
                        checkpoint_every, metrics, callbacks, optimizer)
    run.check_validation_data(validation_data)
    run.open_checkpoint(loss, class_weight)
    run.split_validation(validation_data)
    run.weigh_classes_and_stop_early()
    # Everything is checked; from here on the network and optimizer change (from
    # fit's claim on the network in train, which refuses a second fit in another thread).
    run.build_loop()
    return run.train()


class _Fit:
    """One call of fit, in phases: its arguments and data checked, the checkpoint
    opened, the validation rows split off, the loop built, then the training."""

    where = "fit"

    def __init__(self, strategy, net) -> None:
        self.strategy, self.net = strategy, net

    # ---- checks: the network and optimizer change only once they all pass ----

    def check_data(self, X, y, loss, epochs, sample_weight, validation_split, class_weight,
                   checkpoint) -> None:
        """The network, loss and epochs; the training data (arrays or batches)."""
        where, strategy, net = self.where, self.strategy, self.net
        _check_network(where, net)
        self.loss_fn, self.builtin = _get_loss(where, loss)
        self.epochs = check_int(where, "epochs", epochs, minimum=1)
        self.stream = _is_batch_source(X)
        if self.stream:
            if y is not None or sample_weight is not None:
                raise TypeError(f"[{where}] X is an iterable of (X_batch, y_batch[, w_batch]) "
                                "tuples, so y and sample_weight must be None (they come with "
                                f"the batches), but got y={type_name(y)}, "
                                f"sample_weight={type_name(sample_weight)}")
            distributed = None if isinstance(strategy, Local) else "comm"
            for name, value, default in (("validation_split", validation_split, 0.0),
                                         ("class_weight", class_weight, None),
                                         ("checkpoint", checkpoint, None),
                                         ("comm", distributed, None)):
                if value is not None and value != default:
                    raise ValueError(
                        f"[{where}] {name} cannot be used with X given as batches (an "
                        "iterable): "
                        + {"validation_split": "fit cannot hold rows out of a stream; pass "
                                               "validation_data",
                           "class_weight": "fold the class weights into each batch's w_batch",
                           "checkpoint": "the position in a stream cannot be restored",
                           "comm": "give each rank arrays (X, y) instead"}[name])
            self.train_data = _Stream(where, "X", X, net, self.builtin, self.epochs)
            self.class_weights = None
        else:
            if y is None:
                raise TypeError(f"[{where}] y must be the targets of X, but got None (y may be "
                                "None only when X is an iterable of (X_batch, y_batch) tuples)")
            self.train_data = _Dataset(where, net, X, y, sample_weight, self.builtin)
            self.class_weights = _class_weights(where, class_weight, self.loss_fn,
                                                self.train_data.y, net.out_features)

    def check_arguments(self, batch_size, shuffle, verbose, check_finite, clip_grad_norm, seed,
                        validation_split, validation_data, early_stopping, checkpoint,
                        checkpoint_every, metrics, callbacks, optimizer) -> None:
        """The options, the metrics, the callbacks and the optimizer."""
        where = self.where
        self.batch_size = check_int(where, "batch_size", batch_size, minimum=1)
        self.shuffle = _as_bool(where, "shuffle", shuffle)
        self.verbose = _as_bool(where, "verbose", verbose)
        self.check_finite = _as_bool(where, "check_finite", check_finite)
        if clip_grad_norm is not None:
            clip_grad_norm = check_float(where, "clip_grad_norm", clip_grad_norm, minimum=0.0)
        self.clip_grad_norm = clip_grad_norm
        if isinstance(seed, np.random.Generator):
            self.rng = seed
        else:
            if seed is not None:
                seed = check_int(where, "seed", seed, minimum=0)
            self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.validation_split = check_float(where, "validation_split", validation_split,
                                            minimum=0.0, maximum=1.0, exclusive_maximum=True)
        if self.validation_split > 0 and validation_data is not None:
            raise ValueError(f"[{where}] give validation_split or validation_data, not both")
        if early_stopping is not None:
            early_stopping = check_int(where, "early_stopping", early_stopping, minimum=0)
        self.early_stopping = early_stopping
        if checkpoint is not None:
            checkpoint = check_path(where, checkpoint)
        self.checkpoint = checkpoint
        if checkpoint_every is not None:
            checkpoint_every = check_int(where, "checkpoint_every", checkpoint_every, minimum=1)
            if checkpoint is None:
                raise ValueError(f"[{where}] checkpoint_every={checkpoint_every} needs a "
                                 "checkpoint file (checkpoint=path)")
        self.checkpoint_every = checkpoint_every
        self.metric_fns = _metric_fns(where, metrics, self.loss_fn)
        if callbacks is None:
            callbacks = []
        if not isinstance(callbacks, (list, tuple)):
            raise TypeError(f"[{where}] callbacks must be a list, but got {type_name(callbacks)}")
        self.callbacks = list(callbacks)
        self.hooks = _hooks_of(where, self.callbacks)
        self.optimizer = self._check_optimizer(optimizer)

    def _check_optimizer(self, optimizer) -> Optimizer:
        """The optimizer given, else that of this network's previous fit, else a new Adam."""
        where, net = self.where, self.net
        if optimizer is None:
            optimizer = getattr(net, "_fit_optimizer", None)
            if optimizer is None:
                optimizer = Adam(net, lr=1e-3)
        elif not isinstance(optimizer, Optimizer):
            raise TypeError(f"[{where}] optimizer must be a bprop.optim optimizer or None, but "
                            f"got {type_name(optimizer)}")
        if optimizer._net_ref() is not net:
            raise ValueError(f"[{where}] the optimizer is bound to another network; create it "
                             "with this one, e.g. bprop.optim.Adam(net)")
        if getattr(self.strategy, "size", 1) > 1 and optimizer.hyperparameters.get("lazy", False):
            # each rank knows the rows its own batch touches, not the other ranks'
            raise ValueError(f"[{where}] a lazy optimizer ({optimizer!r}) cannot train over MPI "
                             "(comm with more than one rank): the ranks' batches touch "
                             "different rows; use lazy=False")
        return optimizer

    def check_validation_data(self, validation_data) -> None:
        """validation_data as arrays or batches, or None (split_validation may set it)."""
        where, net = self.where, self.net
        self.valid: Optional[_Dataset] = None
        if validation_data is not None and _is_batch_source(validation_data):
            self.valid = _Stream(where, "validation_data", validation_data, net, self.builtin,
                                 self.epochs)
        elif validation_data is not None:
            if (not isinstance(validation_data, (tuple, list))
                    or len(validation_data) not in (2, 3)):
                raise TypeError(f"[{where}] validation_data must be (X_val, y_val) or (X_val, "
                                f"y_val, sample_weight_val), but got "
                                f"{type_name(validation_data)}")
            vw = validation_data[2] if len(validation_data) == 3 else None
            self.valid = _Dataset(where, net, validation_data[0], validation_data[1], vw,
                                  self.builtin, ("validation_data[0]", "validation_data[1]",
                                                 "validation_data[2]"))

    def open_checkpoint(self, loss, class_weight) -> None:
        """Reads the checkpoint file, if any, and checks that it belongs to this run;
        a resumed run's generator goes back to its state at the start."""
        where, net, train, valid = self.where, self.net, self.train_data, self.valid
        self.ckpt, self.resumed = None, None
        if self.checkpoint is not None and isinstance(valid, _Stream):
            raise ValueError(f"[{where}] checkpoint cannot be used with validation_data given "
                             "as batches (an iterable): its checksum would need a pass over "
                             "it; pass (X_val, y_val) arrays")
        if self.checkpoint is None:
            return
        seed = self.seed
        settings = dict(epochs=self.epochs, batch_size=self.batch_size, shuffle=self.shuffle,
                        seed=seed if not isinstance(seed, np.random.Generator) else "Generator",
                        validation_split=self.validation_split,
                        early_stopping=self.early_stopping, loss=_describe(loss),
                        metrics=[name for name, _ in self.metric_fns],
                        class_weight=class_weight, clip_grad_norm=self.clip_grad_norm,
                        check_finite=self.check_finite, checkpoint_every=self.checkpoint_every)
        fingerprint = {
            "network": f"{net.dtype.name} {_architecture(net.layers)}",
            "data": _resume.data_fingerprint(
                [("training", train.X, train.y, train.w)]
                + ([] if valid is None else [("validation", valid.X, valid.y, valid.w)])),
            "arguments": ", ".join(f"{k}={v!r}" for k, v in settings.items()),
            "optimizer": repr(self.optimizer),
            "callbacks with state": repr([type_name(c)
                                          for _, c in _resume.stateful(self.callbacks)]),
            "ranks": str(getattr(self.strategy, "size", 1)),
        }
        self.ckpt = _resume.Checkpoint(self.checkpoint, self.checkpoint_every, fingerprint,
                                       writer=self.strategy.rank == 0)
        self.resumed = self.ckpt.read(net, self.optimizer)  # checked: raises before any change
        if self.resumed is not None:
            self.rng.bit_generator.state = self.resumed["rng_initial"]
        self.ckpt.rng_initial = self.rng.bit_generator.state

    def split_validation(self, validation_data) -> None:
        """Holds out the tail of a (shuffled) permutation for validation_split."""
        where, validation_split = self.where, self.validation_split
        if validation_data is not None or not validation_split > 0:
            return
        train = self.train_data
        n = len(train)
        split_at = int(n * (1.0 - validation_split))
        if split_at < 1 or split_at >= n:
            raise ValueError(f"[{where}] validation_split={validation_split} of {n} samples "
                             f"leaves {split_at} for training and {n - split_at} for "
                             "validation; both need at least one")
        order = self.rng.permutation(n) if self.shuffle else np.arange(n)
        # The validation rows are copied (evaluated once per epoch, in one piece);
        # the training rows stay where they are and are gathered by index.
        valid = train.subset(order[split_at:], copy=True)
        train = train.subset(order[:split_at], copy=False)
        self.train_data, self.valid = train, valid
        for part, data in (("training", train), ("validation", valid)):
            if data.w is not None and not data.w.sum(dtype=np.float64) > 0:
                raise ValueError(f"[{where}] the {part} part of validation_split={validation_split}"
                                 " has only zero sample weights")

    def weigh_classes_and_stop_early(self) -> None:
        """The class weights into the training rows' weights; early_stopping's callback."""
        train = self.train_data
        if self.class_weights is not None:  # the training rows only, after any split
            factor = self.class_weights[_class_labels(train.y)].astype(self.net.dtype)
            train.w = factor if train.w is None else train.w * factor
        self.monitor = "val_loss" if self.valid is not None else "loss"
        self.stopper = None
        if self.early_stopping is not None:  # the short form of EarlyStopping, run first
            self.stopper = EarlyStopping(self.monitor, patience=self.early_stopping,
                                         restore_best_weights=True)
            for name, fns in _hooks_of(self.where, [self.stopper]).items():
                self.hooks[name][:0] = fns
            self.callbacks.insert(0, self.stopper)

    # ---- the loop ----

    def build_loop(self) -> None:
        """The strategy started, the step function, the History and the Loop."""
        net, optimizer, strategy, train = self.net, self.optimizer, self.strategy, self.train_data
        builtin, loss_fn, resumed = self.builtin, self.loss_fn, self.resumed
        self.kernel = (builtin.kernel if builtin is not None
                       else _user_loss(self.where, loss_fn, net))
        if not self.stream:  # (Local: the BatchNorm check that needs every minibatch's size)
            strategy.start(net, optimizer, self.rng, train, self.valid, epochs=self.epochs,
                           batch_size=self.batch_size, shuffle=self.shuffle,
                           loss=getattr(loss_fn, "__name__", type_name(loss_fn)),
                           metrics=[name for name, _ in self.metric_fns],
                           early_stopping=self.early_stopping, check_finite=self.check_finite,
                           callbacks=[type_name(c) for c in self.callbacks],
                           resumed_from=None if resumed is None else (
                               resumed["epoch"], resumed["batch"], resumed["finished"]))
        step = strategy.step_function(net, optimizer, self.kernel, builtin and builtin.name,
                                      self.clip_grad_norm)
        self.history = History()
        # what a divergence or early stopping restores: parameters and buffers
        params = [p for _, p, _ in net.parameters()] + [b for _, b in net.buffers()]
        # (the loop holds diverged, which must not refer to the loop or to this
        # object: the cycle would keep the network alive after fit until the cycle
        # collector ran)
        self.diverged = _Divergence(net, optimizer, params, self.history, self.epochs)
        if self.stream:
            self.loop = _loop.Loop.over_batches(train.batches, step, self.diverged,
                                                params=params, check_finite=self.check_finite)
        else:
            self.loop = _loop.Loop(train.X, train.y, train.w, self.batch_size, step,
                                   self.diverged, rows=train.rows, params=params,
                                   check_finite=self.check_finite)
        self.diverged.n_batches = self.loop.batches

    def train(self) -> History:
        """The epochs, inside fit's claim on the network; restores the network's
        mode and closes the progress bar however they end."""
        net = self.net
        self.progress: Optional[_Progress] = None
        was_training = None
        self.logs: Dict[str, float] = {}
        try:
            # The claim: until fit returns, the network's forward, backward, step and
            # train_step (and fit) from other threads raise RuntimeError; predict works.
            # Made inside the try, so that a KeyboardInterrupt right after it releases it.
            net._core._begin_training("fit")
            net._fit_optimizer = self.optimizer
            was_training = net.training
            net._core.training = True  # fit trains in training mode, then restores the mode
            start = self._begin()
            if start is None:  # a finished run's checkpoint: nothing to train
                return self.history
            for epoch in range(start[0], self.epochs):
                if self._epoch(epoch, *start):
                    break
            for hook in self.hooks["on_train_end"]:  # early stopping restores the best weights
                hook(dict(self.logs))
            if self.ckpt is not None:  # the final state: a rerun returns it without training
                self.ckpt.write(net, self.optimizer, self.callbacks, self.history,
                                epoch=self.epochs, batch=0, totals=(0.0, 0.0),
                                epoch_lr=self.optimizer.lr, rng_epoch=self.rng.bit_generator.state,
                                finished=True)
        except KeyboardInterrupt as exc:
            # Ctrl-C: the interrupted step was made and counted, or not made (the core
            # counts steps in the call that makes them), so the network and optimizer
            # agree and fit can be called again to go on. The claim was made (nothing
            # before it in the try can raise this), so the optimizer is fit's, even if
            # the interrupt came right after the claim.
            net._fit_optimizer = self.optimizer
            exc.history = self.history
            raise
        finally:
            net._core._end_training()  # first: nothing may come between a raise and this
            if was_training is not None:
                net._core.training = was_training
            if self.progress is not None:
                self.progress.close()

        if self.verbose:
            _summary(self.history, self.epochs, self.monitor)
        return self.history

    def _begin(self) -> Optional[Tuple[int, int, Tuple[float, float]]]:
        """The progress bar, the step hooks, set_network and on_train_begin (or the
        checkpoint's state restored); returns where training starts (epoch, batch,
        the epoch's running totals), or None if the checkpoint's run had finished."""
        net, callbacks, hooks, resumed = self.net, self.callbacks, self.hooks, self.resumed
        if self.verbose:
            self.progress = _Progress(self.epochs, self.loop.batches)
        self.step_hooks = None
        if hooks["on_batch_end"] or self.progress is not None:
            self.step_hooks = _StepHooks(hooks["on_batch_end"], self.progress, self.optimizer,
                                         self.strategy)
            self.loop.on_step = self.step_hooks
        for cb in callbacks:
            set_network = getattr(cb, "set_network", None)
            if set_network is not None:
                set_network(net)
        if resumed is None:
            for hook in hooks["on_train_begin"]:
                hook({})
            return 0, 0, (0.0, 0.0)
        # the run that wrote the checkpoint began the training; its callbacks'
        # state is restored instead of calling their on_train_begin
        restored = {id(cb) for _, cb in _resume.stateful(callbacks)}
        self.ckpt.restore(resumed, net, self.optimizer, callbacks, self.history)
        for cb in callbacks:
            begin = getattr(cb, "on_train_begin", None)
            if id(cb) not in restored and begin in hooks["on_train_begin"]:
                begin({})
        if resumed["finished"]:  # the run's end, as it ended
            last = {k: v[-1] for k, v in self.history.history.items() if v}
            for hook in hooks["on_train_end"]:
                hook(last)
            return None
        self.rng.bit_generator.state = resumed["rng_epoch"]
        return resumed["epoch"], resumed["batch"], tuple(resumed["totals"])

    def _epoch(self, epoch: int, first_epoch: int, first_batch: int,
               totals: Tuple[float, float]) -> bool:
        """One epoch's steps (the first one resumed from first_batch and totals),
        then _end_epoch; true if training stops."""
        optimizer, rng, loop, ckpt = self.optimizer, self.rng, self.loop, self.ckpt
        start = time.perf_counter()
        self.diverged.remember()  # the last finite weights, should this epoch diverge
        rng_epoch = rng.bit_generator.state if ckpt is not None else None
        perm = (rng.permutation(len(self.train_data)) if self.shuffle and not self.stream
                else None)
        if self.progress is not None:
            self.progress.start_epoch(epoch)
        if epoch == first_epoch and first_batch > 0:  # resumed inside this epoch
            lr = self.resumed["epoch_lr"]
        else:
            lr = optimizer.lr
            for hook in self.hooks["on_epoch_begin"]:
                hook(epoch, {"lr": lr})
        self.diverged.lr = lr
        if self.step_hooks is not None:
            self.step_hooks.batch = (first_batch if epoch == first_epoch else 0) - 1
        if ckpt is not None and self.checkpoint_every is not None:
            loop.on_position = functools.partial(
                _write_position, ckpt, self.net, optimizer, self.callbacks, self.history,
                epoch, lr, rng_epoch)
            loop.position_every = self.checkpoint_every
        if epoch == first_epoch:
            total, total_weight = loop.epoch(epoch, perm, first_batch, totals)
        else:
            total, total_weight = loop.epoch(epoch, perm)
        if self.stream and loop.batches == 0:
            raise ValueError(f"[{self.where}] X yielded no batches in epoch {epoch + 1}; an "
                             "iterable that a pass exhausts must start a new pass each "
                             "time it is iterated (or pass a generator function)")
        return self._end_epoch(epoch, lr, start, total, total_weight)

    def _end_epoch(self, epoch: int, lr: float, start: float, total: float,
                   total_weight: float) -> bool:
        """The epoch's logs into the History, on_epoch_end, and the checkpoint of
        the next epoch's start; true if training stops."""
        history, loop, valid, metric_fns = self.history, self.loop, self.valid, self.metric_fns
        logs = {"loss": total / total_weight if total_weight else math.nan}
        self.logs = logs
        if metric_fns:
            logs.update(self._scores(self.train_data, None))
        if valid is not None:
            logs.update(self._scores(valid, self.kernel, "val_"))
        if not math.isfinite(logs.get("val_loss", 0.0)):
            self.diverged(epoch, loop.batches - 1, logs["val_loss"], "validation loss")
        logs["lr"] = lr
        logs["time"] = self.strategy.slowest(time.perf_counter() - start)  # one History per job
        history._append(logs, [name for name, _ in metric_fns], valid is not None)
        if self.progress is not None:
            self.progress.end_epoch(logs)

        stop = loop.stopped  # an on_batch_end stopped the epoch (on every rank)
        for hook in self.hooks["on_epoch_end"]:
            if hook(epoch, dict(logs)):
                stop = True
        if self.stopper is not None:
            history.best_epoch = self.stopper.best_epoch
        if self.strategy.any(stop):  # a callback that stops one rank stops them all
            history.stopped_early = epoch < self.epochs - 1 or loop.stopped
            return True
        if self.ckpt is not None and epoch < self.epochs - 1:  # the next epoch's start
            self.ckpt.write(self.net, self.optimizer, self.callbacks, history, epoch=epoch + 1,
                            batch=0, totals=(0.0, 0.0), epoch_lr=self.optimizer.lr,
                            rng_epoch=self.rng.bit_generator.state)
        return False

    def _scores(self, data, loss_fn, prefix: str = "") -> Dict[str, float]:
        """Loss (if loss_fn) and metrics of the network on data, names prefixed."""
        if isinstance(data, _Stream):  # a pass over the batches, outputs gathered
            out, targets = data.outputs(self.net._core)
            return _scores(out, targets, loss_fn, self.metric_fns, prefix)
        return _scores(self.strategy.outputs(self.net, data), data, loss_fn, self.metric_fns,
                       prefix)


class _Divergence:
    """The loop's on_diverged: restores the weights and optimizer state of the
    epoch's start (the last finite ones) and raises FloatingPointError."""

    def __init__(self, net: Network, optimizer: Optimizer, params: list, history: History,
                 epochs: int) -> None:
        self.net, self.optimizer, self.params = net, optimizer, params
        self.history, self.epochs = history, epochs
        self.n_batches = 0
        self.lr = math.nan
        self.snapshot: list = []
        self.opt_snapshot: dict = {}

    def remember(self) -> None:
        """Copies the parameters, buffers and optimizer state (at each epoch's start)."""
        self.snapshot = [p.copy() for p in self.params]
        self.opt_snapshot = self.optimizer.state_dict()

    def __call__(self, epoch: int, batch: int, value: float, what: str = "loss") -> None:
        _diverged(self.net, self.optimizer, self.params, self.snapshot, self.opt_snapshot,
                  self.history, epoch, self.epochs, batch, self.n_batches, value, self.lr, what)


def _write_position(ckpt, net, optimizer, callbacks, history, epoch, epoch_lr, rng_epoch,
                    batch, total, total_weight) -> None:
    """The loop's on_position: a checkpoint inside an epoch."""
    ckpt.write(net, optimizer, callbacks, history, epoch=epoch, batch=batch,
               totals=(total, total_weight), epoch_lr=epoch_lr, rng_epoch=rng_epoch)


def _hooks_of(where: str, callbacks: list) -> Dict[str, List[Callable]]:
    """The callbacks' hooks by name, in list order; a hook a callback inherits
    unchanged from bprop.callbacks.Callback (which does nothing) is left out, and
    so is the on_batch_end of a schedule stepped per epoch."""
    hooks: Dict[str, List[Callable]] = {name: [] for name in _HOOKS}
    for i, cb in enumerate(callbacks):
        for name in _HOOKS + ("set_network",):
            hook = getattr(cb, name, None)
            if hook is None:
                continue
            if not callable(hook):
                raise TypeError(f"[{where}] callbacks[{i}].{name} must be callable")
            if name == "set_network":
                continue
            if isinstance(cb, Callback) and getattr(type(cb), name, None) is getattr(Callback,
                                                                                     name):
                continue
            if name == "on_batch_end" and isinstance(cb, _Schedule) and cb.interval != "step":
                continue
            hooks[name].append(hook)
    return hooks


class _StepHooks:
    """The loop's on_step: the progress bar and the callbacks' on_batch_end after
    each step; true if a callback stops training (on any rank: over MPI the ranks
    agree after every step, which costs an allreduce of one number per step only
    when a callback has on_batch_end)."""

    def __init__(self, hooks: List[Callable], progress, optimizer: Optimizer,
                 strategy) -> None:
        self.hooks, self.progress, self.optimizer = hooks, progress, optimizer
        self.strategy = strategy
        self.batch = -1

    def __call__(self, running_loss: float) -> bool:
        self.batch += 1
        if self.progress is not None:
            self.progress.update(running_loss)
        if not self.hooks:
            return False
        logs = {"loss": running_loss, "lr": self.optimizer.lr}
        stop = False
        for hook in self.hooks:
            if hook(self.batch, dict(logs)):
                stop = True
        return self.strategy.any(stop)


def _summary(history: History, epochs: int, monitor: str) -> None:
    logs = {"loss": history.loss[-1]}
    if history.val_loss:
        logs["val_loss"] = history.val_loss[-1]
    logs.update({k: v[-1] for k, v in history.metrics.items()})
    line = (f"{history.epochs}/{epochs} epochs in {history.total_time:.2f} s: "
            f"{_format_logs(logs)}")
    if history.best_epoch is not None:
        best = (history.val_loss if monitor == "val_loss" else history.loss)[history.best_epoch]
        line += (f"; {'stopped early, ' if history.stopped_early else ''}restored the weights "
                 f"of epoch {history.best_epoch + 1} ({monitor}={best:.4g})")
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(line, file=sys.stderr, flush=True)
    else:
        tqdm.write(line, file=sys.stderr)  # where the bar was


def _locate_nonfinite(net: Network, value: float) -> str:
    """Where the failing step's first non-finite value arose, read from the caches
    it left: the forward pass from the input up, then (if the loss was finite) the
    backward pass from the output down, then the update."""
    flat = list(walk(net.layers))
    for name, _, layer in flat:
        for cache in ("z", "output"):
            a = getattr(layer, cache, None) if cache == "output" or isinstance(layer, Dense) \
                else None
            if a is not None and not _core.all_finite(a):
                return f"forward pass, {name} ({cache})"
    if not math.isfinite(value):
        return "the loss, of a finite output"
    if not net._core.has_backward:
        return "backward pass or SGD update (the fused SGD step keeps no gradients to inspect)"
    for name, _, layer in reversed(flat):
        arrays = [("delta", layer.delta)] if isinstance(layer, Dense) else []
        arrays += [(f"grad_{p}", g) for p, _, g in layer.parameters()]
        for what, a in arrays:
            if a is not None and not _core.all_finite(a):
                return f"backward pass, {name} ({what})"
    return "the optimizer's update, of finite gradients"


def _diverged(net, optimizer, params, snapshot, opt_snapshot, history, epoch, epochs, batch,
              n_batches, value, lr, what="loss"):
    """Raises the divergence error after restoring the last finite weights."""
    bad = _first_nonfinite(net)
    if bad is None:
        restored = ("the weights are still finite and were left as they were before the "
                    "failing step")
    else:
        for src, p in zip(snapshot, params):
            np.copyto(p, src)
        optimizer.load_state_dict(opt_snapshot)
        layer = bad.rsplit(".", 1)[0].replace("layers.", "layer ")
        restored = (f"{layer} ({bad}) was the first to hold non-finite weights; the weights "
                    f"and optimizer state from the start of epoch {epoch + 1} (the last finite "
                    "ones) were restored")
    where = ("validation" if what == "validation loss" else
             f"batch {batch + 1}/{n_batches}" if n_batches else f"batch {batch + 1}")
    origin = ""
    if what == "loss":
        origin = f" The first non-finite value of that step: {_locate_nonfinite(net, value)}."
    exc = FloatingPointError(
        f"[fit] training diverged in epoch {epoch + 1}/{epochs} ({where}): the {what} is "
        f"{value}; {restored}.{origin} Try a smaller learning rate (lr={lr:g}), scaling the "
        "inputs, or check the data for NaN/inf.")
    exc.history = history
    raise exc


# ---- evaluate ----------------------------------------------------------------------

def evaluate(net: Network, X, y, loss="softmax_cross_entropy", metrics=None,
             sample_weight=None, batch_size: Optional[int] = None) -> Dict[str, float]:
    """Loss and metrics of the network on a dataset, without changing it.

    Args:
        net: the network.
        X: (samples, in_features) real numbers, or a scipy.sparse matrix as
            ``fit`` takes it.
        y: targets, checked against the loss as in ``fit``.
        loss: a name from ``bprop.losses.LOSSES``, a callable, or None for
            metrics only.
        metrics: names from ``METRICS`` or callables
            ``metric(output, target, sample_weight) -> float``.
        sample_weight: optional non-negative weights (samples,).
        batch_size: rows per forward chunk (bounds the memory); None for all.

    Returns:
        {"loss": value, "accuracy": ..., ...}.
    """
    where = "evaluate"
    _check_network(where, net)
    if loss is None:
        loss_fn, builtin = None, None
    else:
        loss_fn, builtin = _get_loss(where, loss)
    metric_fns = _metric_fns(where, metrics, loss_fn)
    if loss_fn is None and not metric_fns:
        raise ValueError(f"[{where}] nothing to compute: give a loss or metrics")
    data = _Dataset(where, net, X, y, sample_weight, builtin)
    size = 0 if batch_size is None else check_int(where, "batch_size", batch_size, minimum=1)
    if loss_fn is None:
        kernel = None
    else:
        kernel = builtin.kernel if builtin is not None else _user_loss(where, loss_fn, net)
    return _scores(data.predict(net._core, batch_size=size), data, kernel, metric_fns)


# ---- gradcheck ---------------------------------------------------------------------

def gradcheck(net: Network, X, y, loss="softmax_cross_entropy", eps: float = 1e-6, *,
              sample_weight=None, max_checks: Optional[int] = None,
              seed: int = 0) -> Dict[str, float]:
    """Checks backpropagation against central finite differences, in float64.

    For each parameter p, the numerical gradient (L(p + eps) - L(p - eps)) / (2 eps)
    is compared with the gradient of one forward/backward pass on a float64 copy
    of the network (the network itself is not touched; a float32 network is
    copied with its weights and buffers widened exactly). The loss is that of the
    network's current mode: in training mode BatchNorm uses the batch statistics
    and every forward pass draws the same dropout masks (those of the network's
    ``dropout_step``), so the function differentiated is a fixed one.

    The error of a layer is normwise: max_i |analytic_i - numeric_i| divided by
    max_i max(|analytic_i|, |numeric_i|), over its weight and bias (0 when both
    gradients vanish). A correct backward gives about 1e-8 or less for smooth
    activations; keep inputs away from ReLU's kink.

    Only the parameters' gradients are checked, not dL/dX (the gradient with
    respect to the input), which gradcheck never asks backward for. So a sparse X
    is checked like a dense one: every parameter, the first layer's dL/dW =
    X^T delta formed from the CSR arrays included; bprop forms no dL/dX for a
    sparse X at all (``backward(..., input_grad=True)`` refuses it).

    Args:
        net: the network.
        X: (samples, in_features) inputs; a handful of samples is plenty. Or a
            scipy.sparse matrix or array if the first layer is Dense (as ``fit``
            takes it: converted once to CSR of float64 if it is not, never
            densified; column indices sorted without duplicates).
        y: targets, checked against the loss as in ``fit``.
        loss: a name from ``bprop.losses.LOSSES`` or a callable.
        eps: the finite-difference step (> 0).
        sample_weight: optional weights (samples,).
        max_checks: check at most this many randomly chosen entries per
            parameter (None: all of them; 2 forward passes each).
        seed: seed of that choice.

    Returns:
        {layer name: error} for each layer with parameters: {"layers.0": ...,
        "layers.4.layers.0": ...}.
    """
    where = "gradcheck"
    _check_network(where, net)
    loss_fn, builtin = _get_loss(where, loss)
    eps = check_float(where, "eps", eps, minimum=0.0, exclusive_minimum=True)
    if max_checks is not None:
        max_checks = check_int(where, "max_checks", max_checks, minimum=1)
    seed = check_int(where, "seed", seed, minimum=0)
    net64 = net._clone("float64")
    data = _Dataset(where, net64, X, y, sample_weight, builtin)
    # a sparse X as the core takes it: its CSR arrays, cached by reference by every forward
    inputs = _loop._csr_arrays(data.X) if data.sparse else data.X
    step_loss = builtin.kernel if builtin is not None else _user_loss(where, loss_fn, net64)
    core = net64._core
    step = core.dropout_step  # every forward below draws this step's dropout masks

    def loss_of_forward() -> Tuple[float, np.ndarray]:
        core.dropout_step = step
        return step_loss(core.forward(inputs), data.y, data.w)

    _, grad_output = loss_of_forward()
    core.backward(grad_output, False, False)

    def value() -> float:
        return float(loss_of_forward()[0])

    rng = np.random.default_rng(seed)
    result: Dict[str, float] = {}
    owners: Dict[str, list] = {}
    for name, p, g in net64.parameters():
        owners.setdefault(name.rsplit(".", 1)[0], []).append((p, g.copy()))
    for owner, pairs in owners.items():
        worst_diff = 0.0
        scale = 0.0
        for p, g in pairs:
            flat = p.reshape(-1)  # a view of the C++ storage
            analytic = g.reshape(-1).copy()
            index = np.arange(flat.size)
            if max_checks is not None and flat.size > max_checks:
                index = rng.choice(flat.size, size=max_checks, replace=False)
            numeric = np.empty(index.size)
            for j, k in enumerate(index):
                original = flat[k]
                flat[k] = original + eps
                plus = value()
                flat[k] = original - eps
                minus = value()
                flat[k] = original
                numeric[j] = (plus - minus) / (2 * eps)
            a = analytic[index]
            worst_diff = max(worst_diff, float(np.max(np.abs(a - numeric), initial=0.0)))
            scale = max(scale, float(np.max(np.abs(a), initial=0.0)),
                        float(np.max(np.abs(numeric), initial=0.0)))
        result[owner] = worst_diff / scale if scale > 0 else 0.0
    return result
