"""Crash-safe, bitwise resume of fit: ``fit(..., checkpoint=path, checkpoint_every=N)``.

The file is written atomically (io._atomic_write: temporary file, fsync, rename),
every N minibatch steps and at the end of each epoch, and holds everything the
rest of the run depends on:

* ``model``: the network and optimizer as a bprop checkpoint (the format of
  ``bprop.save(net, path, optimizer)``, with its sha256 digests): parameters,
  buffers, the dropout clock, the optimizer's state and step count;
* ``fit``: JSON with the position (epoch, next minibatch, the epoch's running
  loss sums and the lr it started with), the shuffling generator's state at the
  run's start (which the validation split drew from) and at the epoch's start
  (which the epoch's permutation is drawn from again), the History, the
  callbacks' ``state_dict()`` (schedules, EarlyStopping, ModelCheckpoint,
  CSVLogger and any user callback with state_dict/load_state_dict), and the
  fingerprint of the configuration;
* one array per array in a callback's state (EarlyStopping's best weights).

The fingerprint describes what the run's result depends on apart from the
weights: the architecture and dtype, the data (shapes, dtypes and a CRC-32 of
every byte of X, y, sample_weight and validation_data), fit's arguments, the
optimizer and its hyperparameters as given, the callbacks' types and the number
of MPI ranks. A file whose fingerprint differs is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import io as _stdio
import json
import zipfile
import zlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ._validation import is_sparse, type_name
from .io import CheckpointError, _atomic_write, _decode, _encode

FORMAT = "bprop-fit-checkpoint"
VERSION = 1
_CRC_CHUNK = 1 << 22  # bytes hashed per call: a memmap X is read in place, in pieces


def _crc(crc: int, a: Optional[np.ndarray]) -> int:
    """crc updated with every byte of `a` (an array, a memmap or a CSR matrix)."""
    if a is None:
        return zlib.crc32(b"none", crc)
    if is_sparse(a):
        crc = zlib.crc32(repr(("csr", a.shape, a.dtype.str)).encode(), crc)
        for part in (a.data, a.indices.astype(np.int64), a.indptr.astype(np.int64)):
            crc = _crc(crc, part)
        return crc
    crc = zlib.crc32(repr((a.shape, a.dtype.str)).encode(), crc)
    if a.size == 0:
        return crc
    rows = max(1, _CRC_CHUNK // max(1, a[:1].nbytes))
    for lo in range(0, a.shape[0], rows):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(a[lo:lo + rows])).cast("B"), crc)
    return crc


def data_fingerprint(datasets) -> str:
    """Shapes, dtypes and CRC-32 of every (name, X, y, w) in `datasets`."""
    parts = []
    for name, X, y, w in datasets:
        crc = 0
        for a in (X, y, w):
            crc = _crc(crc, a)
        shapes = ", ".join("none" if a is None else f"{a.shape} {a.dtype.name}" for a in (X, y, w))
        parts.append(f"{name} {shapes} crc32 {crc:08x}")
    return "; ".join(parts)


def _digest(members: Dict[str, np.ndarray]) -> str:
    """sha256 of every member but "model" (a bprop checkpoint, with digests of its own)."""
    h = hashlib.sha256()
    for name in sorted(set(members) - {"model"}):
        a = np.ascontiguousarray(members[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _split_arrays(value: Any, arrays: Dict[str, np.ndarray], key: str) -> Any:
    """A callback's state as JSON data, its arrays moved into `arrays`."""
    if isinstance(value, np.ndarray):
        arrays[key] = value
        return {"__array__": key}
    if isinstance(value, dict):
        return {str(k): _split_arrays(v, arrays, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_arrays(v, arrays, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


def _join_arrays(value: Any, arrays: Dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            return arrays[value["__array__"]]
        return {k: _join_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_arrays(v, arrays) for v in value]
    return value


def stateful(callbacks: list) -> List[Tuple[int, Any]]:
    """The callbacks whose state a checkpoint holds, numbered among themselves:
    those with state_dict and load_state_dict (the others, a progress printer say,
    may differ between the run that wrote a checkpoint and the one resuming)."""
    return list(enumerate(cb for cb in callbacks
                          if callable(getattr(cb, "state_dict", None))
                          and callable(getattr(cb, "load_state_dict", None))))


class Checkpoint:
    """The checkpoint file of one fit: reads it at the start, writes it as training
    goes (rank 0 only under MPI; every rank reads)."""

    def __init__(self, path: str, every: Optional[int], fingerprint: Dict[str, str],
                 writer: bool) -> None:
        self.path, self.every, self.fingerprint, self.writer = path, every, fingerprint, writer
        self.rng_initial: Any = None

    # ---- reading ---------------------------------------------------------------------
    def read(self, net, optimizer) -> Optional[Dict[str, Any]]:
        """The saved state, checked against this run's fingerprint and network (the
        network rebuilt from the file, not yet copied into `net`); None if there is
        no file. Raises ValueError (CheckpointError) if the file is unreadable or
        was written by another configuration."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            with np.load(_stdio.BytesIO(raw), allow_pickle=False) as z:
                entries = {k: z[k] for k in z.files}
            digest = entries.pop("sha256").tobytes().decode()
            if digest != _digest(entries):
                raise ValueError("its sha256 digest does not match its contents")
            meta = json.loads(entries.pop("fit").tobytes().decode())
            model = entries.pop("model").tobytes()
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"[fit] {self.path!r} is not a readable fit checkpoint "
                                  f"({type_name(exc)}: {exc}); delete it to start over") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT \
                or meta.get("version") != VERSION:
            raise CheckpointError(f"[fit] {self.path!r} is not a fit checkpoint of format "
                                  f"{FORMAT} version {VERSION}")
        saved = meta.get("fingerprint", {})
        if saved != self.fingerprint:
            diffs = []
            for key in sorted(set(saved) | set(self.fingerprint)):
                old, new = saved.get(key), self.fingerprint.get(key)
                if old != new:
                    diffs.append(f"{key}: {_clip(str(old))!s} in the file, "
                                 f"{_clip(str(new))!s} now")
            raise ValueError(f"[fit] checkpoint {self.path!r} was written by a different "
                             f"configuration, so this fit cannot resume from it: "
                             f"{'; '.join(diffs)}. Call fit with the arguments of the run "
                             "that wrote it, or delete the file (or pass another path) to "
                             "start over")
        saved_net, saved_opt = _decode(self.path, _stdio.BytesIO(model), len(model), True)
        if saved_opt is None or type(saved_opt) is not type(optimizer):
            raise CheckpointError(f"[fit] {self.path!r} holds no {type(optimizer).__name__} "
                                  "state")
        meta["_net"], meta["_optimizer"] = saved_net, saved_opt
        meta["_arrays"] = entries
        return meta

    def restore(self, state: Dict[str, Any], net, optimizer, callbacks: list, history) -> None:
        """Copies a state from read() into the run's network, optimizer, History and
        callbacks."""
        saved_net, saved_opt = state["_net"], state["_optimizer"]
        for (_, p, _), (_, q, _) in zip(net.parameters(), saved_net.parameters()):
            np.copyto(p, q)
        for (_, b), (_, c) in zip(net.buffers(), saved_net.buffers()):
            np.copyto(b, c)
        net._core.dropout_seed = saved_net.dropout_seed
        net._core.dropout_step = saved_net.dropout_step
        optimizer.load_state_dict(saved_opt.state_dict())
        h = state["history"]
        history.loss, history.val_loss, history.lr, history.time = (
            list(h["loss"]), list(h["val_loss"]), list(h["lr"]), list(h["time"]))
        history.metrics = {k: list(v) for k, v in h["metrics"].items()}
        history.best_epoch, history.stopped_early = h["best_epoch"], h["stopped_early"]
        arrays = state["_arrays"]
        by_index = {entry["index"]: entry for entry in state["callbacks"]}
        for i, cb in stateful(callbacks):
            entry = by_index.get(i)
            if entry is None or entry["type"] != type_name(cb):
                raise CheckpointError(f"[fit] {self.path!r} holds no state for the callback "
                                      f"{type_name(cb)}")
            cb.load_state_dict(_join_arrays(entry["state"], arrays))

    # ---- writing ---------------------------------------------------------------------
    def write(self, net, optimizer, callbacks: list, history, *, epoch: int, batch: int,
              totals: Tuple[float, float], epoch_lr: float, rng_epoch: Any,
              finished: bool = False) -> None:
        """Writes the state at a position: `batch` minibatches of `epoch` made (the
        epoch's permutation drawn from a generator in state `rng_epoch`)."""
        if not self.writer:
            return
        arrays: Dict[str, np.ndarray] = {}
        entries = []
        for i, cb in stateful(callbacks):
            entries.append({"index": i, "type": type_name(cb),
                            "state": _split_arrays(cb.state_dict(), arrays, f"cb{i}")})
        meta = {
            "format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
            "finished": finished, "epoch": epoch, "batch": batch,
            "totals": [float(totals[0]), float(totals[1])], "epoch_lr": float(epoch_lr),
            "rng_initial": self.rng_initial, "rng_epoch": rng_epoch,
            "history": {"loss": history.loss, "val_loss": history.val_loss,
                        "lr": history.lr, "time": history.time, "metrics": history.metrics,
                        "best_epoch": history.best_epoch,
                        "stopped_early": history.stopped_early},
            "callbacks": entries,
        }
        text = json.dumps(meta).encode()
        model = _encode("fit", net, optimizer, refusal="so no checkpoint is written").to_bytes()
        members = {"fit": np.frombuffer(text, np.uint8),
                   "model": np.frombuffer(model, np.uint8), **arrays}
        members["sha256"] = np.frombuffer(_digest(members).encode(), np.uint8)

        def write(f) -> None:
            np.savez(f, **members)

        _atomic_write(self.path, write)
