"""The training loop: passes over a dataset in minibatches, one step per minibatch.

Everything in bprop that trains runs its epochs through :class:`Loop`:
:func:`bprop.fit`, in one process or data-parallel over MPI, and the
scikit-learn estimators (:mod:`bprop.sklearn`). What differs between them is
passed in, not copied:

* the step, ``step(X, y, sample_weight, weight) -> loss`` on one minibatch:
  ``bprop.network._step_function`` (one call of the core for a built-in loss or
  scikit-learn's objective, four calls for a user's loss) or, over MPI, a
  rank's share of the minibatch and an allreduce
  (``bprop.distributed.DataParallel.step_function``);
* the order of each epoch's rows (a permutation, or None for the stored order);
* ``diverged(epoch, batch, loss)``, which raises when a loss (or, if asked, a
  parameter) is NaN or inf;
* a callback after each step (fit's progress bar) and how the epoch's loss
  averages the minibatch losses.

What happens between epochs (fit's History, metrics, early stopping and
callbacks; scikit-learn's stopping rule and learning-rate schedules) is the
caller's.

Gathering: in a given order (or from rows held by index), the rows are gathered
with ``np.take`` into preallocated C-contiguous buffers, a whole number of
minibatches (about ``_CHUNK_BYTES``) per call, so that a tiny network does not
pay a gather call per step; each minibatch is then a contiguous slice of those
buffers (or, in the stored order, of the data itself).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from . import _core

# Bytes of rows gathered per np.take call (a whole number of minibatches).
_CHUNK_BYTES = 1 << 20

#: step(X (batch, in_features), y, sample_weight (batch,) or None, weight) -> loss
Step = Callable[[np.ndarray, np.ndarray, Optional[np.ndarray], float], float]


def _all_finite(arrays: Sequence[np.ndarray]) -> bool:
    return all(_core.all_finite(a) for a in arrays)


class Loop:
    """Minibatch passes over one dataset.

    Args:
        X: (samples, in_features) inputs of the network's dtype; with ``rows``,
            the larger array whose rows ``rows`` make up the dataset (read in
            place, one chunk at a time: a numpy.memmap is never copied whole).
        y: the targets, one row per sample of the dataset.
        w: sample weights (samples,), or None.
        batch_size: rows per minibatch; the last one may be smaller.
        step: trains on one minibatch and returns its loss (see the module
            docstring); ``weight`` is the minibatch's row count, or the sum of its
            sample weights. A minibatch whose weights are all zero is skipped.
        diverged: called with (epoch, batch index, loss) when a step's loss is
            NaN or inf (or a parameter of ``params`` is); expected to raise.
        rows: the rows of X that make up the dataset, in order; None for all.
        params: parameters checked for NaN or inf after each epoch (and, with
            ``check_finite``, after every step); None: not checked.
        check_finite: check ``params`` after every step.
        mean_over_rows: average the epoch's minibatch losses by their rows, not
            by their sample weights (scikit-learn's ``loss_curve_``).

    Attributes:
        batches: minibatches per epoch.
        on_step: None, or called with the epoch's running mean loss after each step.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, w: Optional[np.ndarray], batch_size: int,
                 step: Step, diverged: Callable[[int, int, float], None], *,
                 rows: Optional[np.ndarray] = None, params: Optional[List[np.ndarray]] = None,
                 check_finite: bool = False, mean_over_rows: bool = False) -> None:
        self.X, self.y, self.w, self.rows = X, y, w, rows
        self.step, self.diverged = step, diverged
        self.params, self.check_finite = params, check_finite
        self.mean_over_rows = mean_over_rows
        self.on_step: Optional[Callable[[float], None]] = None
        self.n = n = y.shape[0]
        self.batch_size = bs = min(batch_size, n)
        self.batches = -(-n // bs)
        row_bytes = X[:1].nbytes + y[:1].nbytes + (0 if w is None else w.itemsize)
        chunk = bs * max(1, min(self.batches, _CHUNK_BYTES // max(1, bs * row_bytes)))
        self.chunk_rows = min(chunk, n)
        self._buffers: Optional[Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = None

    def _chunk(self, order: Optional[np.ndarray], lo: int, hi: int):
        """The dataset's rows lo..hi of this epoch (in `order`): (X, y, w), C-contiguous."""
        X, y, w, rows = self.X, self.y, self.w, self.rows
        if order is None and rows is None:
            return X[lo:hi], y[lo:hi], None if w is None else w[lo:hi]
        if self._buffers is None:
            m = self.chunk_rows
            self._buffers = (np.empty((m,) + X.shape[1:], X.dtype),
                             np.empty((m,) + y.shape[1:], y.dtype),
                             None if w is None else np.empty(m, w.dtype))
        Xbuf, ybuf, wbuf = self._buffers
        m = hi - lo
        # mode="clip" skips the bounds check (the indices are a permutation, or rows
        # checked once) and lets take write straight into the buffer, no temporary.
        if order is None:
            Xc = np.take(X, rows[lo:hi], axis=0, out=Xbuf[:m], mode="clip")
            return Xc, y[lo:hi], None if w is None else w[lo:hi]
        idx = order[lo:hi]
        Xc = np.take(X, idx if rows is None else rows[idx], axis=0, out=Xbuf[:m], mode="clip")
        yc = np.take(y, idx, axis=0, out=ybuf[:m], mode="clip")
        wc = None if w is None else np.take(w, idx, axis=0, out=wbuf[:m], mode="clip")
        return Xc, yc, wc

    def epoch(self, epoch: int, order: Optional[np.ndarray] = None) -> Tuple[float, float]:
        """One pass over the dataset, a step per minibatch.

        Args:
            epoch: the epoch's index, passed on to ``diverged``.
            order: a permutation of the samples, or None for the stored order.

        Returns:
            (sum of weight * loss, sum of weights) over the minibatches stepped;
            their ratio is the epoch's mean loss.
        """
        step, on_step, bs, n = self.step, self.on_step, self.batch_size, self.n
        params, by_rows = self.params or [], self.mean_over_rows
        every_step = self.check_finite and bool(params)
        isfinite = math.isfinite
        total = total_weight = 0.0
        b = -1
        value = math.nan
        for c_lo in range(0, n, self.chunk_rows):
            c_hi = min(c_lo + self.chunk_rows, n)
            Xc, yc, wc = self._chunk(order, c_lo, c_hi)
            for lo in range(0, c_hi - c_lo, bs):
                b += 1
                hi = lo + bs
                Xb = Xc[lo:hi]
                if wc is None:
                    wb = None
                    weight = Xb.shape[0]
                else:
                    wb = wc[lo:hi]
                    weight = float(wb.sum(dtype=np.float64))
                    if weight == 0.0:
                        continue  # nothing to learn from: the weighted mean is 0/0
                value = step(Xb, yc[lo:hi], wb, weight)
                if not isfinite(value) or (every_step and not _all_finite(params)):
                    self.diverged(epoch, b, value)
                if by_rows:
                    weight = Xb.shape[0]
                total += value * weight
                total_weight += weight
                if on_step is not None:
                    on_step(total / total_weight)
        if params and not every_step and not _all_finite(params):
            # A finite loss (a float32 loss is summed in float64) can leave non-finite
            # weights behind; caught here, while the caller's snapshot is still finite.
            self.diverged(epoch, b, value)
        return total, total_weight
