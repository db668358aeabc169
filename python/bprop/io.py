"""Checkpoints in the safetensors format: no pickle, nothing executed on load.

A checkpoint holds one tensor per parameter, named as ``Network.parameters()``
names them (``layers.0.weight``, ``layers.0.bias``, ...), and optionally the
optimizer's state arrays (``optimizer.layers.0.weight.exp_avg``, ...). The
safetensors metadata (string to string) holds:

* ``format`` = "bprop", ``format_version`` = "1", ``bprop_version``;
* ``dtype`` = "float32" or "float64";
* ``architecture``: JSON list of {"in_features", "out_features", "activation",
  "negative_slope"}, one per layer;
* ``sha256``: digest of every tensor's name, dtype, shape and bytes, so that a
  flipped bit anywhere in the data is detected;
* ``metadata_sha256``: digest of format, format_version, dtype and architecture,
  so that an edited negative_slope or width is detected too;
* ``optimizer`` (optional): JSON {"class", "hyperparameters", "step"}, and
  ``optimizer_sha256``, its digest (checked only when the optimizer is loaded,
  so that a damaged optimizer state does not keep the network from loading).

``save`` writes atomically: the bytes go to a temporary file in the same folder,
which is flushed and fsynced and then renamed over the target with
``os.replace`` (and the folder is fsynced); if anything fails, the temporary
file is removed and an existing checkpoint stays as it was. A save killed
outright (SIGKILL, power loss) cannot remove its temporary file; such files are
named ``.<name>.<8 random characters>.tmp`` (hidden, never read by ``load``),
and the next save to the same path removes those whose writer is gone: each
writer holds an flock on its file, which the kernel releases when the process
dies, so a file that can be locked is stale (on platforms without fcntl they
stay).

``load`` checks the whole file (header size, JSON, metadata, architecture,
every tensor's name, dtype, shape and byte range, the digests) before it builds
a network, and raises :class:`CheckpointError` for anything truncated, corrupted
or foreign. Nothing is allocated from sizes the file declares before they are
checked against the file: the header size is bounded (100 MiB and the file's
length) before it is read, and each tensor's element count (computed in Python
integers, which cannot overflow) must equal its byte range, which must lie in
the file; so the network built at the end is never larger than the file.

    net.save("model.safetensors", optimizer=opt)
    net = bprop.load("model.safetensors")
    net, opt = bprop.load("model.safetensors", with_optimizer=True)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import tempfile
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from ._validation import check_path, type_name
from .network import ACTIVATIONS, Dense, Network

try:
    import fcntl
except ImportError:  # Windows: stale temporary files are not cleaned up
    fcntl = None

__all__ = ["CheckpointError", "save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "bprop"
FORMAT_VERSION = "1"

# safetensors' own limit on the JSON header
_MAX_HEADER = 100 * 1024 * 1024
_DTYPE_CODES = {"float32": "F32", "float64": "F64"}
_OPT_PREFIX = "optimizer."

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A file is not a readable bprop checkpoint: truncated, corrupted, foreign,
    or inconsistent with itself. Raised before any network is built."""


def _require_safetensors(where: str):
    try:
        import safetensors.numpy
    except ImportError as exc:
        raise ImportError(f"[{where}] checkpoints need the safetensors package: pip install "
                          "safetensors (or pip install 'bprop[train]')") from exc
    return safetensors.numpy


def _digest(tensors: Dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = tensors[name]
        h.update(f"{name}|{a.dtype.name}|{a.shape}\n".encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def _metadata_digest(meta: Dict[str, str], keys: Tuple[str, ...]) -> str:
    """sha256 of the metadata entries `keys` (absent ones count as null)."""
    text = json.dumps({k: meta.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


_NETWORK_KEYS = ("format", "format_version", "dtype", "architecture")
_OPTIMIZER_KEYS = ("optimizer",)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode() -> int:
    """0666 minus the umask: the mode open() gives a new file (mkstemp makes 0600)."""
    mask = None
    try:  # Linux: read the umask without changing it (os.umask would, for all threads)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
                    break
    except (OSError, ValueError):
        pass
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


_TMP_SUFFIX = ".tmp"


def _remove_stale_temporaries(folder: str, prefix: str) -> None:
    """Removes the temporary files of saves to the same path that were killed
    before they could clean up: those nobody holds a lock on."""
    if fcntl is None:
        return
    pattern = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}" + re.escape(_TMP_SUFFIX))
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not pattern.fullmatch(name):
            continue
        full = os.path.join(folder, name)
        try:
            fd = os.open(full, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a live save is writing it
            continue
        try:
            os.unlink(full)  # while locked: its writer cannot be starting now
        except OSError:
            pass
        finally:
            os.close(fd)


def _locked_temporary(folder: str, prefix: str) -> Tuple[int, str]:
    """A new temporary file in `folder`, locked for as long as it is open."""
    while True:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=_TMP_SUFFIX)
        if fcntl is None:
            return fd, tmp
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0:
            return fd, tmp
        # a concurrent save's cleanup took it for stale between mkstemp and flock
        os.close(fd)


def _atomic_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    prefix = "." + os.path.basename(path) + "."
    _remove_stale_temporaries(folder, prefix)
    fd, tmp = _locked_temporary(folder, prefix)
    try:
        try:
            # the descriptor stays open, and the file locked, until it is renamed:
            # a cleanup running meanwhile must not take it for a killed save's
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _file_mode())
            os.replace(tmp, path)
        finally:
            os.close(fd)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


def save(net: Network, path: PathLike, optimizer=None) -> None:
    """Writes the network, and optionally its optimizer's state, to a safetensors
    file, atomically.

    Args:
        net: the network.
        path: the file to write (replaced if it exists).
        optimizer: a ``bprop.optim`` optimizer bound to ``net``, or None.
    """
    from .optim import Optimizer

    where = "save"
    if not isinstance(net, Network):
        raise TypeError(f"[{where}] net must be a bprop.Network, but got {type_name(net)}")
    path = check_path(where, path)
    if optimizer is not None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"[{where}] optimizer must be a bprop.optim optimizer or None, but "
                            f"got {type_name(optimizer)}")
        if optimizer._net_ref() is not net:
            raise ValueError(f"[{where}] the optimizer is bound to another network")
    st = _require_safetensors(where)

    tensors = {name: np.ascontiguousarray(p).copy() for name, p, _ in net.parameters()}
    for name, a in tensors.items():
        if not np.isfinite(a).all():
            raise ValueError(f"[{where}] {name} holds NaN or inf; such a network cannot be "
                             "loaded again, so it is not saved")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bprop_version": _version(),
        "dtype": net.dtype.name,
        "architecture": json.dumps([
            {"in_features": L.in_features, "out_features": L.out_features,
             "activation": L.activation, "negative_slope": L.negative_slope}
            for L in net.layers]),
    }
    if optimizer is not None:
        sd = optimizer.state_dict()
        for pname, arrays in sd["state"].items():
            for k, a in arrays.items():
                tensors[f"{_OPT_PREFIX}{pname}.{k}"] = np.ascontiguousarray(a)
        metadata["optimizer"] = json.dumps({"class": sd["optimizer"],
                                            "hyperparameters": sd["hyperparameters"],
                                            "step": sd["step"]})
        metadata["optimizer_sha256"] = _metadata_digest(metadata, _OPTIMIZER_KEYS)
    metadata["metadata_sha256"] = _metadata_digest(metadata, _NETWORK_KEYS)
    metadata["sha256"] = _digest(tensors)
    _atomic_write(path, st.save(tensors, metadata=metadata))


def _version() -> str:
    from . import _core

    return str(_core.build_info().get("version", "unknown"))


# ---- load --------------------------------------------------------------------------

def _fail(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"[load] {path} is not a valid bprop checkpoint: {why}")


def _read_header(path: str, data: bytes) -> Tuple[Dict[str, Any], int]:
    """Parses and checks the safetensors framing: 8-byte little-endian header
    size, a JSON object, data offsets inside the file."""
    if len(data) < 8:
        raise _fail(path, f"the file has {len(data)} bytes, too few for a safetensors header "
                          "(empty or truncated)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > _MAX_HEADER or size > len(data) - 8:
        raise _fail(path, f"the header claims {size} bytes, but the file has {len(data) - 8} "
                          "after the size field (truncated or not a safetensors file)")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"the header is not valid JSON ({exc})") from None
    except RecursionError:
        raise _fail(path, "the header nests too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise _fail(path, "the header is not a JSON object")
    return header, 8 + size


def _parse_architecture(path: str, text: str) -> List[Tuple[int, int, str, float]]:
    try:
        layers = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"the architecture metadata is not valid JSON ({exc})") from None
    except RecursionError:
        raise _fail(path, "the architecture metadata nests too deeply") from None
    if not isinstance(layers, list) or not layers:
        raise _fail(path, "the architecture metadata must be a non-empty list of layers")
    specs = []
    for i, L in enumerate(layers):
        keys = {"in_features", "out_features", "activation", "negative_slope"}
        if not isinstance(L, dict) or set(L) != keys:
            raise _fail(path, f"architecture layer {i} must be an object with the keys "
                              f"{sorted(keys)}")
        n_in, n_out, act, slope = (L["in_features"], L["out_features"], L["activation"],
                                   L["negative_slope"])
        for name, v in (("in_features", n_in), ("out_features", n_out)):
            if type(v) is not int or v < 1:
                raise _fail(path, f"architecture layer {i}: {name} must be a positive int, "
                                  f"but is {v!r}")
        if act not in ACTIVATIONS:
            raise _fail(path, f"architecture layer {i}: unknown activation {act!r}")
        if type(slope) not in (int, float) or not math.isfinite(slope):
            raise _fail(path, f"architecture layer {i}: negative_slope must be a finite "
                              f"number, but is {slope!r}")
        if i and specs[-1][1] != n_in:
            raise _fail(path, f"architecture layer {i} expects {n_in} inputs, but layer "
                              f"{i - 1} produces {specs[-1][1]}")
        specs.append((n_in, n_out, act, float(slope)))
    return specs


def _parse_optimizer(path: str, text: str) -> Dict[str, Any]:
    from .optim import OPTIMIZERS

    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"the optimizer metadata is not valid JSON ({exc})") from None
    except RecursionError:
        raise _fail(path, "the optimizer metadata nests too deeply") from None
    if not isinstance(info, dict) or set(info) != {"class", "hyperparameters", "step"}:
        raise _fail(path, "the optimizer metadata must be an object with the keys "
                          "['class', 'hyperparameters', 'step']")
    if info["class"] not in OPTIMIZERS:
        raise _fail(path, f"unknown optimizer class {info['class']!r}; expected one of "
                          f"{sorted(OPTIMIZERS)}")
    if not isinstance(info["hyperparameters"], dict):
        raise _fail(path, "the optimizer hyperparameters must be a JSON object")
    return info


def _expected_tensors(specs) -> Dict[str, Tuple[int, ...]]:
    shapes = {}
    for i, (n_in, n_out, _, _) in enumerate(specs):
        shapes[f"layers.{i}.weight"] = (n_in, n_out)
        shapes[f"layers.{i}.bias"] = (n_out,)
    return shapes


def load(path: PathLike, *, with_optimizer: bool = False):
    """Reads a checkpoint written by :func:`save` (or ``Network.save``).

    Args:
        path: the safetensors file.
        with_optimizer: also rebuild the saved optimizer, bound to the new network.

    Returns:
        The network; with ``with_optimizer``, the pair (network, optimizer), the
        optimizer None if the checkpoint holds none.

    Raises:
        CheckpointError: the file is truncated, corrupted, foreign or
            inconsistent; no network is returned.
        OSError: the file cannot be read (FileNotFoundError, ...).
    """
    from .optim import OPTIMIZERS

    where = "load"
    if not isinstance(with_optimizer, (bool, np.bool_)):
        raise TypeError(f"[{where}] with_optimizer must be a bool, but got "
                        f"{type_name(with_optimizer)}")
    path = check_path(where, path)
    st = _require_safetensors(where)
    with open(path, "rb") as f:
        data = f.read()

    header, data_start = _read_header(path, data)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, "its metadata has no format='bprop' entry (a safetensors file "
                          "written by something else?)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise _fail(path, f"format_version {meta.get('format_version')!r} is not supported "
                          f"(this bprop reads version {FORMAT_VERSION})")
    for key in ("dtype", "architecture", "sha256"):
        if not isinstance(meta.get(key), str):
            raise _fail(path, f"the metadata lacks {key!r}")
    dtype_name = meta["dtype"]
    if dtype_name not in _DTYPE_CODES:
        raise _fail(path, f"dtype {dtype_name!r} is not 'float32' or 'float64'")
    specs = _parse_architecture(path, meta["architecture"])
    expected = _expected_tensors(specs)

    opt_info = None
    if "optimizer" in meta:
        opt_info = _parse_optimizer(path, meta["optimizer"])
    # Every tensor: a known name, the dtype of the checkpoint, the expected shape
    # (optimizer state has its parameter's shape), a byte range inside the file.
    code = _DTYPE_CODES[dtype_name]
    itemsize = np.dtype(dtype_name).itemsize
    data_len = len(data) - data_start
    names = [k for k in header if k != "__metadata__"]
    for name in names:
        entry = header[name]
        if name.startswith(_OPT_PREFIX):
            if opt_info is None:
                raise _fail(path, f"tensor {name!r} is optimizer state, but the metadata "
                                  "describes no optimizer")
            pname = name[len(_OPT_PREFIX):].rsplit(".", 1)[0]
            shape = expected.get(pname)
        else:
            shape = expected.get(name)
        if shape is None:
            raise _fail(path, f"unexpected tensor {name!r} for this architecture")
        if not isinstance(entry, dict) or entry.get("dtype") != code:
            got = entry.get("dtype") if isinstance(entry, dict) else entry
            raise _fail(path, f"tensor {name!r} has dtype {got!r}, expected {code}")
        if entry.get("shape") != list(shape):
            raise _fail(path, f"tensor {name!r} has shape {entry.get('shape')}, but the "
                              f"architecture needs {list(shape)}")
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len
                or offsets[1] - offsets[0] != math.prod(shape) * itemsize):
            raise _fail(path, f"tensor {name!r} has data offsets {offsets!r} that do not fit "
                              f"its shape or the file's {data_len} data bytes (truncated?)")
    missing = sorted(set(expected) - set(names))
    if missing:
        raise _fail(path, f"tensors {missing} are missing")

    try:
        tensors = st.load(data)
    except Exception as exc:  # safetensors reports framing errors with its own types
        raise _fail(path, f"safetensors could not decode it ({exc})") from None
    if _digest(tensors) != meta["sha256"]:
        raise _fail(path, "the sha256 digest of its tensors does not match the metadata: the "
                          "data are corrupted")
    if meta.get("metadata_sha256") != _metadata_digest(meta, _NETWORK_KEYS):
        what = "lacks" if "metadata_sha256" not in meta else "does not match"
        raise _fail(path, f"the digest of its metadata (dtype, architecture) {what} "
                          "metadata_sha256: the header is corrupted")
    for name, a in tensors.items():
        if not np.isfinite(a).all():
            raise _fail(path, f"tensor {name!r} holds NaN or inf")

    optimizer = None
    if with_optimizer and opt_info is not None:
        cls = OPTIMIZERS[opt_info["class"]]
        state = {}
        for pname in expected:
            prefix = f"{_OPT_PREFIX}{pname}."
            state[pname] = {k[len(prefix):]: a for k, a in tensors.items()
                            if k.startswith(prefix)}
        hyper = dict(opt_info["hyperparameters"])
        if isinstance(hyper.get("betas"), list):
            hyper["betas"] = tuple(hyper["betas"])
        sd = {"optimizer": opt_info["class"], "step": opt_info["step"],
              "hyperparameters": hyper, "state": state}

    # Checked: build the network (and optimizer) now.
    net = Network([Dense(n_in, n_out, act, negative_slope=slope)
                   for n_in, n_out, act, slope in specs], dtype=dtype_name, seed=0)
    for name, p, _ in net.parameters():
        p[...] = tensors[name]
    if with_optimizer and opt_info is not None:
        try:
            # Construct with the saved hyperparameters, then restore the state;
            # either one refusing the data is a corrupt checkpoint.
            optimizer = cls(net, **hyper)
            optimizer.load_state_dict(sd)
        except (TypeError, ValueError) as exc:
            raise _fail(path, f"the optimizer state does not load ({exc})") from None
        if meta.get("optimizer_sha256") != _metadata_digest(meta, _OPTIMIZER_KEYS):
            raise _fail(path, "the digest of its optimizer metadata does not match "
                              "optimizer_sha256: the header is corrupted")
    if with_optimizer:
        return net, optimizer
    return net
