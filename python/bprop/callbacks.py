"""Callbacks for :func:`bprop.fit`, after Keras's.

A callback is any object with some of these methods; fit calls the ones it has
(epoch and batch 0-based):

* ``set_network(net)``: once, before training, with the network being trained;
* ``on_train_begin(logs)``: before the first epoch (logs: {});
* ``on_epoch_begin(epoch, logs)``: before each epoch (logs: {"lr": the lr the
  epoch starts with});
* ``on_batch_end(batch, logs)``: after each minibatch step (batch: the step's
  index within the epoch; logs: {"loss": the epoch's running mean loss, "lr":
  the lr the step used});
* ``on_epoch_end(epoch, logs)``: after each epoch (logs: loss, val_loss,
  metrics, lr and time of the epoch, as recorded in the History);
* ``on_train_end(logs)``: after the last epoch, when fit returns normally (logs:
  those of the last epoch). Not called when fit raises.

Stopping: a true value returned by ``on_batch_end`` or ``on_epoch_end`` stops
training (where Keras sets ``model.stop_training = True``). From
``on_batch_end`` the epoch ends after that step (its logs are of the steps
made, its validation runs and ``on_epoch_end`` is called); from
``on_epoch_end`` after that epoch. Over MPI one rank's stop stops them all.

:class:`Callback` is a base whose hooks do nothing (fit skips them); the
learning-rate schedules of ``bprop.optim`` are callbacks too.
"""

from __future__ import annotations

import csv
import math
import os
from typing import IO, Any, Dict, List, Optional, Union

import numpy as np

from ._validation import check_float, check_int, type_name
from .network import Network

__all__ = ["Callback", "EarlyStopping", "ModelCheckpoint", "CSVLogger"]

#: a file path as the callbacks take it
PathLike = Union[str, "os.PathLike[str]"]


class Callback:
    """Base of the built-in callbacks: every hook does nothing; ``set_network``
    keeps the network fit trains as ``self.network``."""

    network: Optional[Network] = None

    def set_network(self, net: Network) -> None:
        self.network = net

    def on_train_begin(self, logs: Dict[str, float]) -> None:
        pass

    def on_epoch_begin(self, epoch: int, logs: Dict[str, float]) -> None:
        pass

    def on_batch_end(self, batch: int, logs: Dict[str, float]) -> Optional[bool]:
        pass

    def on_epoch_end(self, epoch: int, logs: Dict[str, float]) -> Optional[bool]:
        pass

    def on_train_end(self, logs: Dict[str, float]) -> None:
        pass

    def _network(self) -> Network:
        if self.network is None:
            raise RuntimeError(f"[{type(self).__name__}] has no network: pass it to "
                               "bprop.fit(..., callbacks=[...]), which gives it the network")
        return self.network


def _check_monitor(where: str, monitor: object) -> str:
    if not isinstance(monitor, str) or not monitor:
        raise TypeError(f"[{where}] monitor must be the name of a fit log (a str such as "
                        f"'val_loss'), but got {type_name(monitor)} {monitor!r}")
    return monitor


def _check_mode(where: str, mode: object, monitor: str) -> str:
    """"min" or "max"; "auto" as Keras infers it: "max" for a monitor that
    contains "acc" (accuracy, val_accuracy) or starts with "fmeasure", else "min"."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"[{where}] mode must be 'auto', 'min' or 'max', but got {mode!r}")
    if mode == "auto":
        return "max" if "acc" in monitor or monitor.startswith("fmeasure") else "min"
    return str(mode)


def _monitored(where: str, monitor: str, logs: Dict[str, float]) -> float:
    if monitor not in logs:
        hint = ("; give fit validation data, or monitor a training log such as 'loss'"
                if monitor.startswith("val_") else "")
        raise KeyError(f"[{where}] monitor {monitor!r} is not among the fit logs "
                       f"{sorted(logs)}{hint}")
    return float(logs[monitor])


def _check_bool(where: str, name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"[{where}] {name} must be a bool, but got {type_name(value)} {value!r}")
    return bool(value)


class EarlyStopping(Callback):
    """Stops training when a monitored log has stopped improving, as Keras's
    EarlyStopping: an epoch improves when value < best - min_delta (mode "min")
    or value > best + min_delta ("max"); training stops once ``patience``
    epochs in a row have not improved. ``bprop.fit(..., early_stopping=k)`` is
    this callback with patience k, restore_best_weights=True and the monitor
    val_loss (with validation data) or loss.

    Args:
        monitor: the fit log watched ("val_loss", "loss", "val_accuracy", ...);
            a missing one raises KeyError at the first epoch's end.
        patience: epochs without improvement tolerated (>= 0).
        min_delta: the smallest change that counts as an improvement (>= 0).
        mode: "min", "max" or "auto" ("max" if the monitor contains "acc", as Keras).
        restore_best_weights: at the end of training (stopped or not), restore
            the parameters and buffers of the best epoch, as Keras 3 does.

    Attributes:
        best: the best value seen; best_epoch: its 0-based epoch (None before
        the first); stopped_epoch: the epoch that stopped training (None if none).
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0,
                 mode: str = "auto", restore_best_weights: bool = False) -> None:
        where = "EarlyStopping"
        self.monitor = _check_monitor(where, monitor)
        self.patience = check_int(where, "patience", patience, minimum=0)
        self.min_delta = check_float(where, "min_delta", min_delta, minimum=0.0)
        self.mode = _check_mode(where, mode, self.monitor)
        self.restore_best_weights = _check_bool(where, "restore_best_weights",
                                                restore_best_weights)
        self._reset()

    def _reset(self) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch: Optional[int] = None
        self.stopped_epoch: Optional[int] = None
        self.wait = 0
        self._best_weights: Optional[List[np.ndarray]] = None

    def _arrays(self) -> List[np.ndarray]:
        net = self._network()
        return [p for _, p, _ in net.parameters()] + [b for _, b in net.buffers()]

    def on_train_begin(self, logs: Dict[str, float]) -> None:
        self._reset()

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value + self.min_delta < self.best
        return value - self.min_delta > self.best

    def on_epoch_end(self, epoch: int, logs: Dict[str, float]) -> Optional[bool]:
        value = _monitored("EarlyStopping", self.monitor, logs)
        self.wait += 1
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                if self._best_weights is None:
                    self._best_weights = [a.copy() for a in self._arrays()]
                else:
                    for dst, a in zip(self._best_weights, self._arrays()):
                        np.copyto(dst, a)
            return None
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            return True
        return None

    def on_train_end(self, logs: Dict[str, float]) -> None:
        if self.restore_best_weights and self._best_weights is not None:
            for src, a in zip(self._best_weights, self._arrays()):
                np.copyto(a, src)

    def state_dict(self) -> Dict[str, Any]:
        """The position of the watch (fit's checkpoint): best, best_epoch, wait,
        stopped_epoch and copies of the best weights (None if none kept)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "stopped_epoch": self.stopped_epoch,
                "best_weights": None if self._best_weights is None
                else [a.copy() for a in self._best_weights]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores a state_dict(); the network must have been set (set_network)."""
        where = "EarlyStopping.load_state_dict"
        if not isinstance(state, dict) or set(state) != {"best", "best_epoch", "wait",
                                                         "stopped_epoch", "best_weights"}:
            raise ValueError(f"[{where}] expected a dict from state_dict(), but got "
                             f"{type_name(state)}")
        weights = state["best_weights"]
        if weights is not None:
            arrays = self._arrays()
            if len(weights) != len(arrays) or any(
                    np.shape(w) != a.shape for w, a in zip(weights, arrays)):
                raise ValueError(f"[{where}] the best weights do not fit the network's "
                                 "parameters and buffers")
            weights = [np.array(w, dtype=a.dtype) for w, a in zip(weights, arrays)]
        self.best = float(state["best"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        self.wait = int(state["wait"])
        self.stopped_epoch = (None if state["stopped_epoch"] is None
                              else int(state["stopped_epoch"]))
        self._best_weights = weights


class ModelCheckpoint(Callback):
    """Saves the network after an epoch, as Keras's ModelCheckpoint: with
    ``save_best_only`` only when the monitored log is the best so far (strictly),
    else after every epoch. Each save is ``net.save(path)``: a safetensors
    checkpoint written atomically (temporary file, fsync, rename), so a crash
    mid-save leaves the previous checkpoint whole. Load it with
    :func:`bprop.load`.

    Args:
        path: the file (str or os.PathLike). It may hold format fields, filled
            per save as Keras does: ``{epoch}`` (1-based) and the epoch's logs,
            e.g. ``"ckpt-{epoch:03d}-{val_loss:.3f}.safetensors"``.
        monitor: the fit log compared with save_best_only (a missing one
            raises KeyError at the first epoch's end, where Keras warns).
        save_best_only: save only improvements (True), or every epoch.
        mode: "min", "max" or "auto" ("max" if the monitor contains "acc").

    Attributes:
        best: the best monitored value saved; last_path: the last file written.
    """

    def __init__(self, path: PathLike, monitor: str = "val_loss", save_best_only: bool = True,
                 mode: str = "auto") -> None:
        where = "ModelCheckpoint"
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"[{where}] path must be a str or os.PathLike, but got "
                            f"{type_name(path)}")
        self.path = os.fspath(path)
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"[{where}] path must be a non-empty str path, but got {path!r}")
        self.monitor = _check_monitor(where, monitor)
        self.save_best_only = _check_bool(where, "save_best_only", save_best_only)
        self.mode = _check_mode(where, mode, self.monitor)
        self.best = math.inf if self.mode == "min" else -math.inf
        self.last_path: Optional[str] = None

    def _filepath(self, epoch: int, logs: Dict[str, float]) -> str:
        try:
            return self.path.format(epoch=epoch + 1, **logs)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"[ModelCheckpoint] path {self.path!r} cannot be formatted with "
                             f"epoch and the fit logs {sorted(logs)}: {exc!r}") from None

    def on_epoch_end(self, epoch: int, logs: Dict[str, float]) -> None:
        if self.save_best_only:
            value = _monitored("ModelCheckpoint", self.monitor, logs)
            better = value < self.best if self.mode == "min" else value > self.best
            if not better:
                return
            self.best = value
        path = self._filepath(epoch, logs)
        self._network().save(path)
        self.last_path = path

    def state_dict(self) -> Dict[str, Any]:
        """{"best", "last_path"} (fit's checkpoint)."""
        return {"best": self.best, "last_path": self.last_path}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"best", "last_path"}:
            raise ValueError("[ModelCheckpoint.load_state_dict] expected a dict from "
                             f"state_dict(), but got {type_name(state)}")
        self.best, self.last_path = float(state["best"]), state["last_path"]


class CSVLogger(Callback):
    """Writes each epoch's logs as a row of a CSV file, as Keras's CSVLogger:
    the columns are ``epoch`` (0-based, as Keras writes it), then the logs' keys
    sorted (loss, lr, time, val_loss, metrics ...); a value missing in a later
    epoch is written "NA". Floats are written in full (``repr``). The file is
    opened at the start of training, flushed after each row and closed at its
    end.

    Args:
        path: the CSV file (str or os.PathLike).
        separator: the field separator (one character).
        append: append to an existing file (no second header if it is not
            empty) instead of overwriting it.
    """

    def __init__(self, path: PathLike, separator: str = ",", append: bool = False) -> None:
        where = "CSVLogger"
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"[{where}] path must be a str or os.PathLike, but got "
                            f"{type_name(path)}")
        self.path = os.fspath(path)
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"[{where}] separator must be one character, but got "
                             f"{separator!r}")
        self.separator = separator
        self.append = _check_bool(where, "append", append)
        self._file: Optional[IO[str]] = None
        self._writer: Optional["csv.DictWriter[str]"] = None
        self._keys: Optional[List[str]] = None
        self._header = True

    def on_train_begin(self, logs: Dict[str, float]) -> None:
        self._close()
        self._header = not (self.append and os.path.isfile(self.path)
                            and os.path.getsize(self.path) > 0)
        self._file = open(self.path, "a" if self.append else "w", newline="",
                          encoding="utf-8")
        self._offset = self._file.tell()
        self._writer, self._keys = None, None

    def on_epoch_end(self, epoch: int, logs: Dict[str, float]) -> None:
        if self._file is None:
            raise RuntimeError("[CSVLogger] the file is not open: on_train_begin was not "
                               "called (pass the logger to bprop.fit)")
        if self._keys is None:
            self._keys = sorted(logs)
            self._writer = csv.DictWriter(self._file, fieldnames=["epoch"] + self._keys,
                                          delimiter=self.separator)
            if self._header:
                self._writer.writeheader()
        row: Dict[str, Any] = {"epoch": epoch}
        row.update({k: repr(float(logs[k])) if k in logs else "NA" for k in self._keys})
        assert self._writer is not None  # made with the keys
        self._writer.writerow(row)
        self._file.flush()
        self._offset = self._file.tell()

    def state_dict(self) -> Dict[str, Any]:
        """Where the file stands (fit's checkpoint): its length after the last row
        written and the columns."""
        return {"offset": getattr(self, "_offset", 0), "keys": self._keys,
                "header": self._header}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Reopens the file as a state_dict() left it, for fit resuming from a
        checkpoint (instead of on_train_begin): rows written after that point (by a
        run killed before its next checkpoint) are cut off, so that the resumed run
        writes each epoch's row once."""
        where = "CSVLogger.load_state_dict"
        if not isinstance(state, dict) or set(state) != {"offset", "keys", "header"}:
            raise ValueError(f"[{where}] expected a dict from state_dict(), but got "
                             f"{type_name(state)}")
        offset = int(state["offset"])
        size = os.path.getsize(self.path) if os.path.isfile(self.path) else -1
        if size < offset:
            raise ValueError(f"[{where}] {self.path!r} holds {max(size, 0)} bytes, fewer than "
                             f"the {offset} the checkpoint's rows took: it was changed since")
        self._close()
        os.truncate(self.path, offset)
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._offset = offset
        self._header = bool(state["header"])
        self._keys = None if state["keys"] is None else list(state["keys"])
        self._writer = None
        if self._keys is not None:
            self._writer = csv.DictWriter(self._file, fieldnames=["epoch"] + self._keys,
                                          delimiter=self.separator)

    def on_train_end(self, logs: Dict[str, float]) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._writer = None

    def __del__(self) -> None:  # fit raised: the rows written are flushed already
        try:
            self._close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
