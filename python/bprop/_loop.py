"""The training loop: passes over a dataset in minibatches, one step each.

bprop.fit (in one process or over MPI) and the scikit-learn estimators train
through :class:`Loop`. What differs between them is passed in: the step
(``network._step_function``, or a rank's share and an allreduce over MPI), the
order of each epoch's rows, and what a NaN or inf does. What happens between
epochs (History, metrics, early stopping; scikit-learn's stopping rule and
learning-rate schedules) is the caller's.

In a given order (or from rows held by index) the rows are gathered with
``np.take`` into preallocated C-contiguous buffers, a whole number of minibatches
(about ``_CHUNK_BYTES``) per call, so that a tiny network does not pay a gather
per step; each minibatch is a contiguous slice of those buffers (or, in the
stored order, of the data). A sparse X (a scipy.sparse CSR matrix, see
bprop.fit) is gathered with scipy's CSR row indexing instead, a chunk of rows
at a time, and never densified; each minibatch goes to the step as the core's
(data, indices, indptr, n_features).
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from . import _core
from ._validation import csr_nbytes_per_row, is_sparse

# Bytes of rows gathered per np.take call (a whole number of minibatches).
_CHUNK_BYTES = 1 << 20

#: step(X (batch, in_features), y, sample_weight (batch,) or None, weight) -> loss
Step = Callable[[np.ndarray, np.ndarray, Optional[np.ndarray], Any], float]


def _all_finite(arrays: Sequence[np.ndarray]) -> bool:
    return all(_core.all_finite(a) for a in arrays)


class Loop:
    """Minibatch passes over one dataset.

    Args:
        X: (samples, in_features) inputs of the network's dtype (with ``rows``, the
            array whose rows ``rows`` are the dataset: read in place, a chunk at a time).
        y: the targets, one row per sample of the dataset.
        w: sample weights (samples,), or None.
        batch_size: rows per minibatch; the last one may be smaller.
        step: ``step(X, y, sample_weight, weight) -> loss`` trains on one minibatch;
            weight is its row count or sum of sample weights (0: skipped).
        diverged: ``diverged(epoch, batch, loss)``, called when a loss (or a
            parameter of ``params``) is NaN or inf; raises.
        rows: the rows of X that make up the dataset, in order; None for all.
        params: checked for NaN or inf after each epoch, or after each step with
            ``check_finite``; None: not checked.
        mean_over_rows: weigh the minibatch losses in the epoch's mean by rows, not
            by sample weights (scikit-learn's ``loss_curve_``).

    Attributes:
        batches: minibatches per epoch.
        on_step: None, or called with the epoch's running mean loss after each step;
            a true return value ends the epoch after that step (and sets ``stopped``).
        on_position: None, or ``on_position(batches_done, total, total_weight)``,
            called after every ``position_every``-th minibatch of an epoch (counted
            from its first, the epoch's last excluded): fit's checkpoint.
        stopped: True if on_step ended the last epoch early.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, w: Optional[np.ndarray], batch_size: int,
                 step: Step, diverged: Callable[[int, int, float], None], *,
                 rows: Optional[np.ndarray] = None, params: Optional[List[np.ndarray]] = None,
                 check_finite: bool = False, mean_over_rows: bool = False) -> None:
        self.X, self.y, self.w, self.rows = X, y, w, rows
        self.sparse = is_sparse(X)
        self.step, self.diverged = step, diverged
        self.params, self.check_finite = params, check_finite
        self.mean_over_rows = mean_over_rows
        self.on_step: Optional[Callable[[float], Optional[bool]]] = None
        self.on_position: Optional[Callable[[int, float, float], None]] = None
        self.position_every = 0
        self.stopped = False
        self.n = n = y.shape[0]
        self.batch_size = bs = min(batch_size, n)
        self.batches = -(-n // bs)
        x_bytes = csr_nbytes_per_row(X) if self.sparse else X[:1].nbytes
        row_bytes = x_bytes + y[:1].nbytes + (0 if w is None else w.itemsize)
        chunk = bs * max(1, min(self.batches, _CHUNK_BYTES // max(1, bs * row_bytes)))
        self.chunk_rows = min(chunk, n)
        self._buffers: Optional[Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = None
        self.stream: Optional[Callable[[], Any]] = None

    @classmethod
    def over_batches(cls, batches: Callable[[], Any], step: Step,
                     diverged: Callable[[int, int, float], None], *,
                     params: Optional[List[np.ndarray]] = None,
                     check_finite: bool = False) -> "Loop":
        """A loop whose epoch steps through the minibatches ``batches()`` yields,
        (index, X, y, w) each, as they come (fit's iterable data); ``batches`` is
        0 until the first epoch has counted them."""
        loop = cls.__new__(cls)
        loop.stream, loop.step, loop.diverged = batches, step, diverged
        loop.params, loop.check_finite = params, check_finite
        loop.mean_over_rows, loop.on_step, loop.stopped = False, None, False
        loop.on_position, loop.position_every, loop.batches = None, 0, 0
        return loop

    def _chunk(self, order: Optional[np.ndarray], lo: int, hi: int):
        """The dataset's rows lo..hi of this epoch (in `order`): (X, y, w), C-contiguous."""
        X, y, w, rows = self.X, self.y, self.w, self.rows
        if self.sparse:  # scipy's CSR row indexing: a new CSR matrix of the chunk's rows
            if order is None:
                Xc = X[lo:hi] if rows is None else X[rows[lo:hi]]
                return Xc, y[lo:hi], None if w is None else w[lo:hi]
            idx = order[lo:hi]
            Xc = X[idx if rows is None else rows[idx]]
            return Xc, np.take(y, idx, axis=0), None if w is None else np.take(w, idx, axis=0)
        if order is None and rows is None:
            return X[lo:hi], y[lo:hi], None if w is None else w[lo:hi]
        if self._buffers is None:
            m = self.chunk_rows
            self._buffers = (np.empty((m,) + X.shape[1:], X.dtype),
                             np.empty((m,) + y.shape[1:], y.dtype),
                             None if w is None else np.empty(m, w.dtype))
        Xbuf, ybuf, wbuf = self._buffers
        m = hi - lo
        # mode="clip" skips the bounds check (the indices are valid: a permutation, or
        # rows of X) and lets take write straight into the buffer, without a temporary.
        if order is None:
            Xc = np.take(X, rows[lo:hi], axis=0, out=Xbuf[:m], mode="clip")
            return Xc, y[lo:hi], None if w is None else w[lo:hi]
        idx = order[lo:hi]
        Xc = np.take(X, idx if rows is None else rows[idx], axis=0, out=Xbuf[:m], mode="clip")
        yc = np.take(y, idx, axis=0, out=ybuf[:m], mode="clip")
        wc = None if w is None else np.take(w, idx, axis=0, out=wbuf[:m], mode="clip")
        return Xc, yc, wc

    def _minibatches(self, order: Optional[np.ndarray], start: int):
        """(index, X, y, w) of each minibatch of an epoch in `order`, from `start`."""
        bs, n = self.batch_size, self.n
        first = start * bs
        for c_lo in range(first - first % self.chunk_rows, n, self.chunk_rows):
            c_hi = min(c_lo + self.chunk_rows, n)
            Xc, yc, wc = self._chunk(order, c_lo, c_hi)
            for lo in range(max(0, first - c_lo), c_hi - c_lo, bs):
                hi = lo + bs
                Xb = Xc[lo:hi]
                yield ((c_lo + lo) // bs, _csr_arrays(Xb) if self.sparse else Xb, yc[lo:hi],
                       None if wc is None else wc[lo:hi])

    def epoch(self, epoch: int, order: Optional[np.ndarray] = None, start: int = 0,
              totals: Tuple[float, float] = (0.0, 0.0)) -> Tuple[float, float]:
        """One pass over the dataset, a step per minibatch.

        Args:
            epoch: the epoch's index, passed on to ``diverged``.
            order: a permutation of the samples, or None for the stored order.
            start: the first minibatch to step (a resumed epoch: the ones before
                were made); its chunk is gathered whole, as in an epoch from the
                start, so every minibatch lies where it would have.
            totals: the running sums of the minibatches before ``start``.

        Returns:
            (sum of weight * loss, sum of weights) over the minibatches stepped;
            their ratio is the epoch's mean loss.
        """
        step, on_step = self.step, self.on_step
        params, by_rows = self.params or [], self.mean_over_rows
        every_step = self.check_finite and bool(params)
        isfinite = math.isfinite
        total, total_weight = totals
        on_position, every, last = self.on_position, self.position_every, self.batches - 1
        value = math.nan
        self.stopped = False
        b = start - 1
        source = self._minibatches(order, start) if self.stream is None else self.stream()
        for b, Xb, yb, wb in source:
            m = yb.shape[0]
            if wb is None:
                weight = m
            else:
                weight = float(wb.sum(dtype=np.float64))
                if weight == 0.0:
                    continue  # nothing to learn from: the weighted mean is 0/0
            value = step(Xb, yb, wb, weight)
            if not isfinite(value) or (every_step and not _all_finite(params)):
                self.diverged(epoch, b, value)
            if by_rows:
                weight = m
            total += value * weight
            total_weight += weight
            if on_step is not None and on_step(total / total_weight):
                self.stopped = True
                break
            if on_position is not None and (b + 1) % every == 0 and b < last:
                on_position(b + 1, total, total_weight)
        if self.stream is not None:
            self.batches = b + 1
        if params and not every_step and not _all_finite(params):
            # A finite loss (a float32 loss is summed in float64) can leave non-finite
            # weights behind; caught here, while the caller's snapshot is still finite.
            self.diverged(epoch, b, value)
        return total, total_weight


def _csr_arrays(X) -> tuple:
    """A CSR minibatch as the core takes it: (data, indices, indptr, n_features)."""
    indices, indptr = X.indices, X.indptr
    if indices.dtype != indptr.dtype:  # the core takes both int32 or both int64
        indices, indptr = indices.astype(np.int64), indptr.astype(np.int64)
    return (X.data, indices, indptr, X.shape[1])
