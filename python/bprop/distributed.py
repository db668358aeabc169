"""Data-parallel training over MPI: ``bprop.fit(..., comm=MPI.COMM_WORLD)``.

Run the same script on every rank, each holding the whole dataset::

    # train.py; run with: mpiexec -n 4 python -m mpi4py train.py
    from mpi4py import MPI
    import bprop

    net = bprop.Network([bprop.Dense(784, 256, "relu"), bprop.Dense(256, 10)], seed=0)
    opt = bprop.optim.Adam(net, lr=1e-3)
    history = bprop.fit(net, X, y, optimizer=opt, batch_size=256, seed=0,
                        comm=MPI.COMM_WORLD)
    if MPI.COMM_WORLD.rank == 0:
        net.save("model.safetensors")

What each rank does (the minibatch size and the epochs are global: 4 ranks and
``batch_size=256`` make the same 256-sample steps as one process does):

* Before training, the ranks allgather a small signature (parameter and buffer
  names, shapes and dtypes, every layer by its dotted name, nested ones
  included, the optimizer and its hyperparameters, the data's shapes and a
  checksum of sampled rows, the settings of fit and the state of the shuffling
  generator) and compare it with rank 0's; any difference raises the same
  ValueError on every rank. Then rank 0's weights, buffers (BatchNorm's running
  statistics), dropout key and clock (``dropout_seed``, ``dropout_step``) and
  optimizer state are broadcast in place into the other ranks' storage.
* Every rank draws the same permutation (``seed=None`` becomes a seed drawn on
  rank 0; a Generator gets rank 0's state), so all ranks see the same global
  minibatches. Rank r of R takes rows [lo_r, hi_r) of each minibatch, split as
  ``np.array_split`` does (sizes differ by at most one; a rank may get none).
  A sparse X (scipy.sparse, first layer Dense; see bprop.fit) is never
  densified: the minibatch is gathered from the CSR matrix by row index as in
  one process, and a rank's rows are a slice of its CSR arrays (data and
  indices viewed, indptr rebased: a copy of hi_r - lo_r + 1 entries).
* It computes the gradient of the mean loss over its rows, scaled by its share
  of the minibatch, n_r / n (with sample weights, sum(w_r) / sum(w)): the sum
  of the ranks' gradients is then exactly the gradient of the minibatch's mean
  loss. The scaling is applied to dL/d(output) (batch, out_features) before the
  backward sweep, so it costs nothing per parameter. A rank without rows (or
  with zero weights only) contributes zero gradients.
* The gradients are summed with one ``comm.Allreduce(MPI.IN_PLACE, grad,
  op=MPI.SUM)`` per parameter, straight in the C++ gradient buffers (no copy),
  and the loss with one more (a float64 scalar). Every rank then takes the same
  optimizer step; the fused SGD update of single-process fit is never used,
  since the gradient must be summed before the update.
* BatchNorm normalises each rank's rows with their own statistics (PyTorch's
  DistributedDataParallel without SyncBatchNorm), and updates the rank's running
  statistics from them. After every step the ranks' buffers are replaced by
  their average weighted by the rows each rank normalised in that step (one
  ``Allreduce`` in float64; a rank that made no forward pass weighs 0). Chosen
  over broadcasting rank 0's buffers (DDP's choice): the average uses every
  rank's rows, and since the running update is linear, ``running_mean`` follows
  the statistic of the whole minibatch exactly as one process would, and
  ``running_var`` the row-weighted mean of the ranks' (unbiased) variances,
  which lacks only the spread between the ranks' means. So after every step
  every rank holds the same parameters and buffers. A minibatch that would give
  some rank exactly one row is refused before training (the variance of one row
  is undefined): every minibatch, the last included, needs 2 rows per rank.
* Dropout: rank 0 draws its masks with the network's ``dropout_seed`` (the
  masks one process would draw for its rows), rank r > 0 with
  ``rank_dropout_key(dropout_seed, r)``, so the ranks' masks are independent
  and every run reproducible. ``dropout_step`` advances by one per step on
  every rank (with rows or without), and ``dropout_seed`` is the network's own
  again between steps: after fit both are the same on every rank, and one
  rank's fit equals one process's.
* Validation loss and metrics: each rank predicts its share of the rows, the
  outputs are allgathered, and every rank computes the loss and metrics on the
  whole output, so any metric (not only means) comes out exact and identical.
  The epoch's time is the slowest rank's, the stop decision any rank's: the
  History is the same on every rank.
* Only rank 0 shows the progress bar (``verbose``); saving is the script's
  business (``if comm.rank == 0``).

``fit`` trains through :class:`DataParallel`, its strategy for MPI (the
single-process one is ``bprop.train.Local``): fit's loop calls the same methods
of either, and only these differ.

Failures: an error raised on some ranks before the signatures are compared
(say, invalid data on one of them) is reported on every rank (the others raise
RuntimeError naming the rank). Errors raised on every rank alike (a mismatch,
divergence: the loss checked is the summed one) are raised normally. Any other
exception during training would leave the other ranks waiting in a collective
forever, so fit prints its traceback and calls ``comm.Abort(1)``, which ends
every rank with a non-zero status. Run scripts with ``python -m mpi4py`` so that
an exception outside fit aborts the job as well instead of hanging it.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
import zlib
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from ._validation import is_sparse, type_name
from .layers import BatchNorm, Residual, walk

__all__ = ["rank_dropout_key", "shard_bounds"]

# Methods fit calls on a communicator (mpi4py's Intracomm has them all).
_COMM_METHODS = ("Get_rank", "Get_size", "Allreduce", "Allgatherv", "Bcast", "allgather",
                 "bcast", "Abort")

# Rows sampled per array for the data checksum of the signature.
_CHECKSUM_ROWS = 1024

# What to do when the ranks' signatures differ, by part.
_HINTS = {
    "network": "Build the same architecture on every rank (rank 0's weights are then "
               "broadcast, so the seeds may differ).",
    "optimizer": "Build the same optimizer with the same hyperparameters on every rank "
                 "(rank 0's state is then broadcast).",
    "data": "Every rank passes the whole dataset, the same on every rank: each trains on "
            "its share of every minibatch.",
    "settings": "Call fit with the same arguments on every rank.",
    "shuffling generator": "Pass the same seed on every rank (or seed=None: rank 0 then "
                           "draws one for all).",
}


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError("[fit] comm= needs mpi4py and an MPI library: pip install mpi4py "
                          "mpich (or pip install 'bprop[mpi]')") from exc
    return MPI


def shard_bounds(rows: int, rank: int, size: int) -> Tuple[int, int]:
    """The rows [lo, hi) of a minibatch of `rows` that rank `rank` of `size`
    trains on: contiguous, in rank order, sizes differing by at most one (the
    first ``rows % size`` ranks get one more), as ``np.array_split``."""
    q, rem = divmod(rows, size)
    lo = rank * q + min(rank, rem)
    return lo, lo + q + (1 if rank < rem else 0)


def rank_dropout_key(key: int, rank: int) -> int:
    """The key of the dropout masks of rank `rank` > 0 during a data-parallel fit
    of a network whose key (``dropout_seed``) is `key`: a 64-bit hash of the
    pair (rank 0 uses `key` itself)."""
    state = np.random.SeedSequence([int(key), int(rank)]).generate_state(1, np.uint64)
    return int(state[0])


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _layer_line(layer) -> str:
    """A layer on one line (a Residual's layers are listed after it by walk)."""
    if isinstance(layer, Residual):
        return f"Residual of {_plural(len(layer), 'layer')}"
    return repr(layer)


def _collective(exc: BaseException) -> BaseException:
    """Marks an exception that every rank raises at the same point (so fit may
    raise it instead of aborting)."""
    exc._bprop_collective = True  # type: ignore[attr-defined]
    return exc


def _checksum(crc: int, arr: Any) -> int:
    """crc updated with an array's shape, dtype and sampled rows (None, a NumPy
    array or a scipy.sparse CSR matrix)."""
    if arr is None:
        return zlib.crc32(b"none", crc)
    sparse = is_sparse(arr)
    crc = zlib.crc32(repr((arr.shape, arr.dtype.str, sparse)).encode(), crc)
    n = arr.shape[0]
    if n == 0:
        return crc
    rows = np.unique(np.linspace(0, n - 1, min(n, _CHECKSUM_ROWS)).astype(np.int64))
    if sparse:  # the sampled rows' CSR arrays (the index width may differ between ranks)
        part = arr[rows]
        for a in (part.data, part.indices.astype(np.int64), part.indptr.astype(np.int64)):
            crc = zlib.crc32(np.ascontiguousarray(a).tobytes(), crc)
        return crc
    return zlib.crc32(np.ascontiguousarray(np.take(arr, rows, axis=0)).tobytes(), crc)


def _describe(data) -> str:
    if data is None:
        return "none"
    w = "none" if data.w is None else f"{data.w.shape}"
    X = data.X
    kind = f" sparse CSR with {X.nnz} stored values" if is_sparse(X) else ""
    return (f"X {X.shape} {X.dtype.name}{kind}, y {data.y.shape} {data.y.dtype.name}, "
            f"sample_weight {w}")


def _batch_rows(Xb: Any) -> int:
    """The rows of a minibatch as the loop passes it: an array, or a sparse one as
    the core's CSR arrays (data, indices, indptr, n_features)."""
    return Xb[2].shape[0] - 1 if isinstance(Xb, tuple) else Xb.shape[0]


def _rows(Xb: Any, lo: int, hi: int) -> Any:
    """Rows lo..hi of such a minibatch: a slice of an array, or of the CSR arrays
    (data and indices viewed, indptr rebased to start at 0)."""
    if not isinstance(Xb, tuple):
        return Xb[lo:hi]
    data, indices, indptr, n_features = Xb
    a, b = indptr[lo], indptr[hi]
    return data[a:b], indices[a:b], indptr[lo:hi + 1] - a, n_features


class DataParallel:
    """The strategy of one data-parallel fit over a communicator: ``fit(...,
    comm=comm)`` makes it, and calls it where one process would call
    ``bprop.train.Local``."""

    def __init__(self, comm: Any) -> None:
        missing = [m for m in _COMM_METHODS if not callable(getattr(comm, m, None))]
        if missing:
            raise TypeError(f"[fit] comm must be an mpi4py communicator such as "
                            f"MPI.COMM_WORLD, but got {type_name(comm)} (without "
                            f"{', '.join(missing)})")
        self.MPI = _mpi()
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())
        # "setup": checking arguments, no collective entered since the seed;
        # "started": inside or past the signature exchange.
        self.phase = "setup"
        self._scalar = np.zeros(1, dtype=np.float64)

    # ---- before fit checks its arguments ---------------------------------------------
    def shared_seed(self, seed: Any) -> Any:
        """The shuffling seed every rank uses: None becomes a Generator seeded on
        rank 0, a Generator takes rank 0's state. Other seeds are left alone (an
        int that differs between ranks is caught by the signature check)."""
        mine = None
        if self.rank == 0:
            if seed is None:
                mine = ("entropy", np.random.SeedSequence().entropy)
            elif isinstance(seed, np.random.Generator):
                mine = ("state", seed.bit_generator.state)
            else:
                mine = ("given", None)
        kind, value = self.comm.bcast(mine, root=0)
        if kind == "entropy" and seed is None:
            return np.random.default_rng(value)
        if kind == "state" and isinstance(seed, np.random.Generator) and self.rank != 0:
            try:
                seed.bit_generator.state = value
            except (TypeError, ValueError):
                pass  # another kind of bit generator: the signature check reports it
        return seed

    # ---- once fit has checked its arguments -----------------------------------------
    def start(self, net, optimizer, rng: np.random.Generator, train, valid,
              **settings: Any) -> None:
        """Compares the ranks' signatures, then broadcasts rank 0's weights,
        buffers, dropout key and clock, and optimizer state in place. Raises the
        same error on every rank when a rank failed its argument checks, the
        signatures differ, or a BatchNorm would get one row on some rank."""
        self.phase = "started"
        params = list(net.parameters())
        buffers = list(net.buffers())
        crc = 0
        for data in (train, valid):
            for arr in (None,) * 4 if data is None else (data.X, data.y, data.w, data.rows):
                crc = _checksum(crc, arr)
        state = zlib.crc32(repr(rng.bit_generator.state).encode())
        signature = {
            "network": tuple([f"{name} {tuple(p.shape)} {p.dtype.name}" for name, p, _ in params]
                             + [f"{name} {tuple(b.shape)} {b.dtype.name}" for name, b in buffers]
                             + [f"{name} {_layer_line(L)}" for name, _, L in walk(net.layers)]),
            "optimizer": (repr(optimizer),),
            "data": (f"training {_describe(train)}", f"validation {_describe(valid)}",
                     f"rows with checksum {crc:08x}"),
            "settings": tuple(f"{k}={v!r}" for k, v in sorted(settings.items())),
            "shuffling generator": (f"a generator in state {state:08x}",),
        }
        gathered = self.comm.allgather(("ok", signature))
        self._check_gathered(gathered)
        if any(isinstance(L, BatchNorm) for _, _, L in walk(net.layers)):
            self._check_batch_norm_rows(len(train), int(settings["batch_size"]))
        for _, p, _ in params:
            self.comm.Bcast(p, root=0)
        for _, b in buffers:
            self.comm.Bcast(b, root=0)
        # the key of the dropout masks and their clock: rank 0's, on every rank
        core = net._core
        core.dropout_seed, core.dropout_step = self.comm.bcast(
            (core.dropout_seed, core.dropout_step), root=0)
        # The optimizer's state (same names and shapes: the signature matched).
        for arrays in optimizer._state.values():
            for a in arrays.values():
                self.comm.Bcast(a, root=0)
        optimizer._step_count = self.comm.bcast(optimizer._step_count, root=0)
        self._grads = [g for _, _, g in params]
        self._dtype = net.dtype
        self._mpi_dtype = self.MPI.FLOAT if net.dtype == np.float32 else self.MPI.DOUBLE

    def _check_batch_norm_rows(self, n: int, batch_size: int) -> None:
        """BatchNorm refuses a training batch of one row: refuses, on every rank
        alike and before training, minibatches that give some rank one row."""
        full = min(batch_size, n)
        for rows in sorted({full, n % full} - {0}, reverse=True):
            for r in range(self.size):
                lo, hi = shard_bounds(rows, r, self.size)
                if hi - lo == 1:
                    which = "the last minibatch" if rows != full else "a minibatch"
                    raise _collective(ValueError(
                        f"[fit, rank {self.rank} of {self.size}] the network has BatchNorm, "
                        f"which needs at least 2 rows per batch in training mode, but "
                        f"{which} ({_plural(rows, 'row')} of {n} samples, batch_size="
                        f"{batch_size}) split over {_plural(self.size, 'rank')} gives rank "
                        f"{r} one row; give every minibatch, the last one included, at "
                        f"least {2 * self.size} rows, or use fewer ranks"))

    def _check_gathered(self, gathered: List[Tuple[str, Any]]) -> None:
        where = f"fit, rank {self.rank} of {self.size}"
        failed = [(r, info) for r, (status, info) in enumerate(gathered) if status == "error"]
        if failed:
            ranks = ", ".join(str(r) for r, _ in failed)
            details = "; ".join(f"rank {r}: {info}" for r, info in failed)
            raise _collective(RuntimeError(
                f"[{where}] rank{'s' if len(failed) > 1 else ''} {ranks} failed before "
                f"training, so no rank trains: {details}"))
        reference = gathered[0][1]
        for r, (_, signature) in enumerate(gathered[1:], start=1):
            for key, ours in reference.items():
                theirs = signature[key]
                if theirs == ours:
                    continue
                i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                         min(len(ours), len(theirs)))
                a = ours[i] if i < len(ours) else "nothing more"
                b = theirs[i] if i < len(theirs) else "nothing more"
                raise _collective(ValueError(
                    f"[{where}] the ranks disagree on the {key}: rank 0 has {a}, but rank {r} "
                    f"has {b}. {_HINTS[key]}"))

    def report_failure(self, exc: BaseException) -> None:
        """Called for an error raised before this rank reached ``start``: takes part
        in the signature exchange so that the other ranks raise instead of waiting."""
        self.phase = "started"
        self.comm.allgather(("error", f"{type(exc).__name__}: {exc}"))

    # ---- per step --------------------------------------------------------------------
    def step_function(self, net, optimizer, kernel: Callable, name: Optional[str],
                      clip_grad_norm: Optional[float] = None) -> Callable:
        """The loop's step: one global minibatch (batch, in_features), or a sparse
        one as the core's CSR arrays (data, indices, indptr, n_features); this
        rank's share of the gradient, the allreduce, the optimizer step. Returns
        the minibatch's mean loss, the same on every rank (NaN/inf without a step).

        ``kernel`` is the loss as ``(output, target, weight) -> (value, grad)``:
        the built-in loss ``name``'s kernel or fit's wrapped user loss."""
        core, dtype, MPI, comm = net._core, net.dtype, self.MPI, self.comm
        rank, size = self.rank, self.size
        out_features = net.out_features
        grads = self._grads
        loss_sum = np.zeros(1, dtype=np.float64)
        # Dropout: rank 0 draws with the network's key (the masks one process
        # would draw for those rows), rank r > 0 with a key derived from it and r.
        shared_key = core.dropout_seed
        key = shared_key if rank == 0 else rank_dropout_key(shared_key, rank)
        buffers = [b for _, b in net.buffers()]
        packed = np.empty(sum(b.size for b in buffers), dtype=np.float64)

        def step(Xb: Any, yb: np.ndarray, wb: Optional[np.ndarray], weight: float) -> float:
            n = _batch_rows(Xb)
            lo, hi = shard_bounds(n, rank, size)
            if wb is None:
                ws = None
                share = (hi - lo) / n
            else:  # weight: the minibatch's sum of weights
                ws = wb[lo:hi]
                share = float(ws.sum(dtype=np.float64)) / weight
            clock = core.dropout_step  # the same on every rank
            if share > 0:
                core.dropout_seed = key
                try:
                    output = core.forward(_rows(Xb, lo, hi))
                finally:
                    core.dropout_seed = shared_key
                value, grad = kernel(output, yb[lo:hi], ws)
                # dL/d(output) of the minibatch's mean loss, restricted to these rows
                core.backward(grad * share, False, False)
                loss_sum[0] = value * share
            else:
                if not core.has_backward:  # gives the optimizer its gradient buffers' first use
                    # in eval mode: one row, no batch statistics or masks to draw
                    training = core.training
                    core.training = False
                    try:
                        core.forward(_rows(Xb, 0, 1))
                        core.backward(np.zeros((1, out_features), dtype), False, False)
                    finally:
                        core.training = training
                for g in grads:
                    g.fill(0)
                loss_sum[0] = 0.0
            core.dropout_step = clock + 1  # one step, on every rank, with rows or without
            for g in grads:
                comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)
            comm.Allreduce(MPI.IN_PLACE, loss_sum, op=MPI.SUM)
            if buffers:
                self._average_buffers(buffers, packed, n, wb)
            value = float(loss_sum[0])
            if math.isfinite(value):
                if clip_grad_norm is not None:  # the summed gradient, the same on every rank
                    core.clip_grad_norm(clip_grad_norm)
                optimizer.step()
            return value
        return step

    def _average_buffers(self, buffers: List[np.ndarray], packed: np.ndarray, n: int,
                         wb: Optional[np.ndarray]) -> None:
        """Replaces every rank's buffers (BatchNorm's running statistics, each
        updated from the rank's own rows) by their average weighted by the rows
        each rank normalised in this step (0 for a rank that made no forward
        pass): one allreduce, in float64."""
        rows = []
        for r in range(self.size):
            lo, hi = shard_bounds(n, r, self.size)
            made = hi > lo if wb is None else float(wb[lo:hi].sum(dtype=np.float64)) > 0
            rows.append(hi - lo if made else 0)
        total = sum(rows)
        if total == 0:
            return
        fraction = rows[self.rank] / total  # 1.0 for a lone rank: its buffers exactly
        offset = 0
        for b in buffers:
            part = packed[offset:offset + b.size]
            np.multiply(b.reshape(-1), fraction, out=part)
            offset += b.size
        self.comm.Allreduce(self.MPI.IN_PLACE, packed, op=self.MPI.SUM)
        offset = 0
        for b in buffers:
            b.reshape(-1)[...] = packed[offset:offset + b.size]
            offset += b.size

    # ---- per epoch -------------------------------------------------------------------
    def outputs(self, net, data, batch_size: int = 0) -> np.ndarray:
        """The network's output on a whole dataset (validation, metrics), the
        forward pass split over the ranks: each predicts its rows and the outputs
        are allgathered, so every rank scores the whole output alike."""
        n, k = len(data), net.out_features
        bounds = [shard_bounds(n, r, self.size) for r in range(self.size)]
        lo, hi = bounds[self.rank]
        out = np.empty((n, k), dtype=self._dtype)
        mine = (data.predict(net._core, lo, hi, batch_size) if hi > lo
                else np.empty((0, k), dtype=self._dtype))
        counts = [(b - a) * k for a, b in bounds]
        displs = [a * k for a, _ in bounds]
        self.comm.Allgatherv(mine, [out, counts, displs, self._mpi_dtype])
        return out

    def slowest(self, seconds: float) -> float:
        """The largest of the ranks' values (the epoch's wall time)."""
        self._scalar[0] = seconds
        self.comm.Allreduce(self.MPI.IN_PLACE, self._scalar, op=self.MPI.MAX)
        return float(self._scalar[0])

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (a callback's stop)."""
        self._scalar[0] = 1.0 if flag else 0.0
        self.comm.Allreduce(self.MPI.IN_PLACE, self._scalar, op=self.MPI.MAX)
        return bool(self._scalar[0] > 0)

    # ---- failures ----------------------------------------------------------------------
    def abort(self, exc: BaseException) -> None:
        """Prints the traceback tagged with the rank and ends every rank."""
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        sys.stderr.write(f"[bprop.distributed] rank {self.rank} of {self.size}: fit raised "
                         f"{type(exc).__name__} while the other ranks may be waiting in a "
                         f"collective; calling comm.Abort(1) to end every rank.\n{text}")
        sys.stderr.flush()
        sys.stdout.flush()
        # MPICH's launcher forwards a rank's output through its proxy, and an abort
        # tears the proxies down at once: the message was lost in about 1 run in 5
        # (tests/test_distributed.py). A moment lets the proxy pass it on.
        time.sleep(0.5)
        self.comm.Abort(1)

    def failed(self, exc: BaseException) -> None:
        """Called with any exception fit raises, before it propagates: see the
        module docstring."""
        if self.phase == "setup":
            self.report_failure(exc)
        elif not _raised_by_every_rank(exc):
            self.abort(exc)


def _raised_by_every_rank(exc: BaseException) -> bool:
    if getattr(exc, "_bprop_collective", False):
        return True
    # fit's divergence check reads the summed loss and the (identical) weights
    return isinstance(exc, FloatingPointError) and hasattr(exc, "history")
