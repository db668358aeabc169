"""Checkpoints in the safetensors format: no pickle, nothing executed on load.

A checkpoint holds one tensor per parameter, named as ``Network.parameters()``
names them (``layers.0.weight``, ``layers.4.layers.0.bias``, ...), one per
buffer, named as ``Network.buffers()`` names them (``layers.1.running_mean``,
...), and optionally the optimizer's state arrays, one per parameter and slot
(``optimizer.layers.4.layers.0.weight.exp_avg``, ...). The safetensors metadata
(string to string) holds:

* ``format`` = "bprop", ``format_version`` = "2", ``bprop_version``;
* ``dtype`` = "float32" or "float64";
* ``architecture``: the JSON list of the layers' descriptions
  (``Layer._description()``): each an object with ``kind`` ("Dense",
  "Activation", "Dropout", "BatchNorm", "LayerNorm", "Residual") and exactly
  that kind's settings, a Residual's ``layers`` a list of descriptions in turn
  (nested at most 32 Residuals deep, 100000 layers in all);
* ``training``: "true" or "false", the network's mode;
* ``dropout_seed`` and ``dropout_step``: the dropout clock, decimal integers,
  so that a resumed run draws the masks the original would have drawn;
* ``sha256``: digest of every tensor's name, dtype, shape and bytes, so that a
  flipped bit anywhere in the data is detected;
* ``metadata_sha256``: digest of format, format_version, dtype, architecture,
  training, dropout_seed and dropout_step, so that an edited negative_slope,
  width, mode or seed is detected too;
* ``optimizer`` (optional): JSON {"class", "hyperparameters", "step"}, and
  ``optimizer_sha256``, its digest (checked only when the optimizer is loaded,
  so that a damaged optimizer state does not keep the network from loading).

Version-1 checkpoints (Dense layers only, with biases: ``architecture`` a JSON
list of {"in_features", "out_features", "activation", "negative_slope"}, no
buffers, mode or dropout clock, ``metadata_sha256`` over format,
format_version, dtype and architecture) still load, as networks in training
mode with dropout clock 0.

The file is safetensors as its specification lays it out (an 8-byte
little-endian header size, the JSON header padded with spaces to a multiple of
8 bytes, then the tensors back to back, little-endian, in name order); this
module writes and reads it itself, in the layout the ``safetensors`` package
writes (the same bytes but for the order of the metadata keys), so that package
is not needed: it reads these files, and bprop reads its files.

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

``load`` checks before it reads, and raises :class:`CheckpointError` naming the
path and the reason for anything that is not a checkpoint:

* the path must name a regular file (a symlink to one is fine): a directory, a
  FIFO, a device (``/dev/zero``) or a socket is refused from ``stat`` before it
  is opened, and again from ``fstat`` of the open descriptor (opened with
  ``O_NONBLOCK``, so that a FIFO swapped in meanwhile cannot block);
* the header size is bounded (100 MiB, safetensors' own limit, and the file's
  size) before the header is read; then the header (JSON, metadata,
  architecture, every tensor's name, dtype, shape and byte range) is checked:
  each tensor's element count, computed in Python integers (which cannot
  overflow), must equal its byte range, and the ranges must lie in the file and
  cover its data section back to back, as safetensors requires;
* the architecture is checked as the layers' constructors check their
  arguments (a Residual that changes the width, a layer whose width does not
  chain, an unknown kind or setting, a setting of the wrong type), and every
  parameter, buffer and optimizer slot it implies must be in the file with its
  shape, and nothing else;
* only then is each tensor allocated and read straight into its array, so the
  file is never held twice in memory and nothing is allocated from a size the
  file declares before it is checked against the file's size; a file that
  shrinks while it is read is a CheckpointError too;
* the digests and finiteness are checked before a network is built.

Pickling and copies go through the same format. ``pickle.dumps(net)`` and
``copy.deepcopy(net)`` encode the network (with the optimizer ``fit``
remembers for it) as checkpoint bytes, and unpickling decodes and checks them
as ``load`` does: the payload is data, never code. An optimizer pickles as its
network plus a checkpoint of both, so ``pickle.loads(pickle.dumps((net, opt)))``
gives an optimizer bound to the restored network (unpickled alone, it keeps its
state and parameters, but, holding only a weak reference to its Network, not
the network object). This does not make pickle
safe: a pickle stream can name any callable, so unpickling untrusted bytes can
run arbitrary code whatever they claim to hold. Exchange networks with parties
you do not trust as ``.safetensors`` files through :func:`load`, which runs
none. ``copy.copy`` of a network or an optimizer raises TypeError: a shallow
copy would share the C++ storage.

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
import stat
import struct
import tempfile
from io import BytesIO
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from . import _core
from ._validation import check_path, type_name
from .layers import Layer, Residual, _chain, input_width, layer_from_description, walk
from .network import _DELEGATES, ACTIVATIONS, Dense, Network
from .optim import OPTIMIZERS, Optimizer

try:
    import fcntl
except ImportError:  # Windows: stale temporary files are not cleaned up
    fcntl = None

__all__ = ["CheckpointError", "save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "bprop"
FORMAT_VERSION = "2"
# the versions load reads: 1 (Dense-only) and the current one
_READABLE_VERSIONS = ("1", FORMAT_VERSION)

# safetensors' own limit on the JSON header
_MAX_HEADER = 100 * 1024 * 1024
_DTYPE_CODES = {"float32": "F32", "float64": "F64"}
_OPT_PREFIX = "optimizer."
# A layer tree is walked recursively (here, by the Network and by the core):
# bounded, so that a hostile file cannot exhaust the stack or spin on millions
# of parameterless layers. save refuses a network beyond them.
_MAX_DEPTH = 32  # Residuals around a layer
_MAX_LAYERS = 100_000

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A file is not a readable bprop checkpoint: not a regular file, truncated,
    corrupted, foreign, or inconsistent with itself. No network is returned (every
    size is checked against the file before anything is allocated for it)."""


def _digest_entry(name: str, dtype: np.dtype, shape: Tuple[int, ...]) -> bytes:
    """What the tensors' sha256 takes before each tensor's bytes (in name order)."""
    return f"{name}|{dtype.name}|{tuple(shape)}\n".encode()


def _digest(tensors: Dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = tensors[name]
        h.update(_digest_entry(name, a.dtype, a.shape))
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def _metadata_digest(meta: Dict[str, str], keys: Tuple[str, ...]) -> str:
    """sha256 of the metadata entries `keys` (absent ones count as null)."""
    text = json.dumps({k: meta.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


_NETWORK_KEYS = ("format", "format_version", "dtype", "architecture", "training",
                 "dropout_seed", "dropout_step")
_NETWORK_KEYS_V1 = ("format", "format_version", "dtype", "architecture")
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


def _atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Calls write(f) on a temporary file next to `path`, then renames it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = "." + os.path.basename(path) + "."
    _remove_stale_temporaries(folder, prefix)
    fd, tmp = _locked_temporary(folder, prefix)
    try:
        try:
            # the descriptor stays open, and the file locked, until it is renamed:
            # a cleanup running meanwhile must not take it for a killed save's
            with os.fdopen(fd, "wb", closefd=False) as f:
                write(f)
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


# ---- the encoder: save and pickling ---------------------------------------------------

class _Encoded:
    """A checkpoint ready to be written: the size field and padded JSON header,
    then the tensors in file order (little-endian, C-contiguous)."""

    def __init__(self, header: bytes, tensors: List[np.ndarray]) -> None:
        self.header = header
        self.tensors = tensors

    def write(self, f: BinaryIO) -> None:
        f.write(self.header)
        f.writelines(memoryview(a).cast("B") for a in self.tensors)

    def to_bytes(self) -> bytes:
        return b"".join([self.header, *(memoryview(a).cast("B") for a in self.tensors)])


def _check_net_and_optimizer(where: str, net: Any, optimizer: Any) -> None:
    if not isinstance(net, Network):
        raise TypeError(f"[{where}] net must be a bprop.Network, but got {type_name(net)}")
    if optimizer is not None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"[{where}] optimizer must be a bprop.optim optimizer or None, but "
                            f"got {type_name(optimizer)}")
        if optimizer._net_ref() is not net:
            raise ValueError(f"[{where}] the optimizer is bound to another network")


def _architecture(layers: Tuple[Layer, ...]) -> str:
    """The ``architecture`` metadata: the JSON list of the layers' descriptions."""
    return json.dumps([L._description() for L in layers])


def _encode(where: str, net: Network, optimizer=None, *, refusal: str = "so it is not saved"
            ) -> _Encoded:
    """The checkpoint of `net` (and `optimizer`, bound to it, or None)."""
    paths = [p for _, p, _ in walk(net.layers)]
    depth = max(len(p) for p in paths) - 1
    if len(paths) > _MAX_LAYERS or depth > _MAX_DEPTH:
        raise ValueError(f"[{where}] the network has {len(paths)} layers, nested in up to "
                         f"{depth} Residuals; a checkpoint holds at most {_MAX_LAYERS} layers "
                         f"nested in at most {_MAX_DEPTH}, {refusal}")
    tensors = {name: np.ascontiguousarray(p).copy() for name, p, _ in net.parameters()}
    for name, b in net.buffers():  # buffer names never clash with parameter names
        tensors[name] = np.ascontiguousarray(b).copy()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bprop_version": _version(),
        "dtype": net.dtype.name,
        "architecture": _architecture(net.layers),
        "training": "true" if net.training else "false",
        "dropout_seed": str(int(net.dropout_seed)),
        "dropout_step": str(int(net.dropout_step)),
    }
    if optimizer is not None:
        sd = optimizer.state_dict()  # copies of the state arrays
        for pname, arrays in sd["state"].items():
            for k, a in arrays.items():
                tensors[f"{_OPT_PREFIX}{pname}.{k}"] = np.ascontiguousarray(a)
        metadata["optimizer"] = json.dumps({"class": sd["optimizer"],
                                            "hyperparameters": sd["hyperparameters"],
                                            "step": sd["step"]})
        metadata["optimizer_sha256"] = _metadata_digest(metadata, _OPTIMIZER_KEYS)
    for name, a in tensors.items():
        if not np.isfinite(a).all():
            raise ValueError(f"[{where}] {name} holds NaN or inf; such a network cannot be "
                             f"loaded again, {refusal}")
    metadata["metadata_sha256"] = _metadata_digest(metadata, _NETWORK_KEYS)
    metadata["sha256"] = _digest(tensors)

    # safetensors' layout: tensors sorted by name (one dtype), back to back; the
    # JSON compact, __metadata__ first, padded with spaces to a multiple of 8
    code = _DTYPE_CODES[net.dtype.name]
    little = net.dtype.newbyteorder("<")
    header: Dict[str, Any] = {"__metadata__": metadata}
    ordered = []
    offset = 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype=little)
        header[name] = {"dtype": code, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        ordered.append(a)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return _Encoded(struct.pack("<Q", len(raw)) + raw, ordered)


def save(net: Network, path: PathLike, optimizer=None) -> None:
    """Writes the network, and optionally its optimizer's state, to a safetensors
    file, atomically.

    Args:
        net: the network.
        path: the file to write (replaced if it exists).
        optimizer: a ``bprop.optim`` optimizer bound to ``net``, or None.

    Raises:
        ValueError: a parameter, buffer or state array holds NaN or inf, or the
            network has more than 100000 layers or nests Residuals more than 32
            deep (nothing written: load would refuse the file).
    """
    where = "save"
    _check_net_and_optimizer(where, net, optimizer)
    path = check_path(where, path)
    encoded = _encode(where, net, optimizer)
    _atomic_write(path, encoded.write)


def _version() -> str:
    return str(_core.build_info().get("version", "unknown"))


# ---- load ------------------------------------------------------------------------------

def _fail(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"[load] {path} is not a valid bprop checkpoint: {why}")


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"))


def _not_a_regular_file(path: str, mode: int) -> CheckpointError:
    kind = next((name for test, name in _KINDS if test(mode)),
                f"of file type {stat.S_IFMT(mode):#o}")
    if os.path.islink(path):
        kind = f"a symlink to {os.path.realpath(path)}, which is {kind}"
    return _fail(path, f"it is {kind}, not a regular file")


# O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOCTTY: a terminal
# must not become the process's controlling terminal. Not O_NOFOLLOW: a symlink
# to a regular file is a fine checkpoint.
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


def _open_regular_file(path: str) -> Tuple[BinaryIO, int]:
    """Opens `path` for reading if it is a regular file: (unbuffered file, size)."""
    # stat first, so that a device or FIFO is not even opened ...
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_a_regular_file(path, mode)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except IsADirectoryError:  # replaced by a folder since the stat (or Windows)
        raise _fail(path, "it is a directory, not a regular file") from None
    try:
        # ... and fstat the descriptor, for a path replaced between stat and open
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_a_regular_file(path, info.st_mode)
        if _OPEN_FLAGS & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    return f, info.st_size


def _read_into(f: BinaryIO, buffer: memoryview) -> int:
    """Fills `buffer` from `f`; the number of bytes read (fewer only at the end)."""
    done = 0
    total = len(buffer)
    while done < total:
        n = f.readinto(buffer[done:])
        if not n:
            break
        done += n
    return done


def _read_header(path: str, f: BinaryIO, size: int) -> Tuple[Dict[str, Any], int]:
    """Reads and checks the safetensors framing from the start of `f`, a file of
    `size` bytes: the 8-byte little-endian header size, bounded before the header
    is read, and the JSON object. Returns (header, offset of the data section)."""
    if size < 8:
        raise _fail(path, f"the file has {size} bytes, too few for a safetensors header "
                          "(empty or truncated)")
    field = bytearray(8)
    if _read_into(f, memoryview(field)) < 8:
        raise _fail(path, "the file ended within the header size field (truncated while it "
                          "was read?)")
    (n,) = struct.unpack("<Q", field)
    if n > _MAX_HEADER:
        raise _fail(path, f"the header claims {n} bytes, more than safetensors' limit of "
                          f"{_MAX_HEADER} (not a safetensors file)")
    if n > size - 8:
        raise _fail(path, f"the header claims {n} bytes, but the file has {size - 8} "
                          "after the size field (truncated or not a safetensors file)")
    raw = bytearray(n)
    got = _read_into(f, memoryview(raw))
    if got < n:
        raise _fail(path, f"the file ended after {got} of the header's {n} bytes (truncated "
                          "while it was read?)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"the header is not valid JSON ({exc})") from None
    except RecursionError:
        raise _fail(path, "the header nests too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise _fail(path, "the header is not a JSON object")
    return header, 8 + n


def _json_metadata(path: str, what: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"the {what} metadata is not valid JSON ({exc})") from None
    except RecursionError:
        raise _fail(path, f"the {what} metadata nests too deeply") from None


def _parse_architecture_v1(path: str, text: str) -> List[Layer]:
    """The Dense layers of a version-1 ``architecture``: a JSON list of
    {"in_features", "out_features", "activation", "negative_slope"}."""
    layers = _json_metadata(path, "architecture", text)
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
    try:
        return [Dense(n_in, n_out, act, negative_slope=slope) for n_in, n_out, act, slope in specs]
    except (TypeError, ValueError) as exc:  # e.g. in_features * out_features beyond the limit
        raise _fail(path, f"the architecture does not build ({exc})") from None


def _parse_architecture(path: str, text: str) -> List[Layer]:
    """The layers (descriptions, not yet in a Network) of a version-2
    ``architecture``: a JSON list of layer descriptions, checked node by node as
    the constructors check their arguments, and their widths chained."""
    tree = _json_metadata(path, "architecture", text)
    if not isinstance(tree, list) or not tree:
        raise _fail(path, "the architecture metadata must be a non-empty list of layer "
                          f"descriptions, but it is {type_name(tree)} {_clip(tree)}")
    count = [0]
    layers = [_layer_from_node(path, node, f"layers.{i}", 0, count)
              for i, node in enumerate(tree)]
    features = input_width(layers)
    if features is None:
        raise _fail(path, "no layer of the architecture has a width of its own (Dense, "
                          "BatchNorm, LayerNorm)")
    for i, layer in enumerate(layers):
        try:
            features = _chain(f"layers.{i}", layer, features)
        except ValueError as exc:
            raise _fail(path, f"the architecture's widths do not chain ({exc})") from None
    return layers


def _clip(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _layer_from_node(path: str, node: Any, name: str, depth: int, count: List[int]) -> Layer:
    """The layer one node of the architecture describes; `depth` Residuals enclose it."""
    count[0] += 1
    if count[0] > _MAX_LAYERS:
        raise _fail(path, f"the architecture has more than {_MAX_LAYERS} layers")
    if not isinstance(node, dict) or not isinstance(node.get("kind"), str):
        raise _fail(path, f"architecture {name} must be an object with a 'kind' string, but it "
                          f"is {type_name(node)} {_clip(node)}")
    kind = node["kind"]
    if kind == "Residual":
        inner = node.get("layers")
        if set(node) != {"kind", "layers"} or not isinstance(inner, list) or not inner:
            raise _fail(path, f"architecture {name} (Residual) must be an object with the keys "
                              "['kind', 'layers'], 'layers' a non-empty list of layer "
                              f"descriptions, but it is {_clip(node)}")
        if depth >= _MAX_DEPTH:
            raise _fail(path, f"architecture {name} nests Residuals more than {_MAX_DEPTH} deep")
        return Residual([_layer_from_node(path, child, f"{name}.layers.{j}", depth + 1, count)
                         for j, child in enumerate(inner)])
    try:
        layer = layer_from_description(node)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _fail(path, f"architecture {name} ({kind}) does not build: {exc}") from None
    # Exactly the description bprop writes: no setting missing (the constructor
    # would fill in its default), none extra, each of the type the layer keeps.
    described = layer._description()
    if set(node) != set(described):
        raise _fail(path, f"architecture {name} ({kind}) has the keys {sorted(node)}, but a "
                          f"{kind} is described by {sorted(described)}")
    if any(type(node[k]) is not type(v) or node[k] != v for k, v in described.items()):
        raise _fail(path, f"architecture {name} ({kind}) is {_clip(node, 200)}, but its "
                          f"settings read back as {_clip(described, 200)} (a setting of the "
                          "wrong type?)")
    return layer


def _parse_mode(path: str, meta: Dict[str, Any]) -> Tuple[bool, int, int]:
    """(training, dropout_seed, dropout_step) of a version-2 checkpoint."""
    for key in ("training", "dropout_seed", "dropout_step"):
        if not isinstance(meta.get(key), str):
            raise _fail(path, f"the metadata lacks {key!r}")
    if meta["training"] not in ("true", "false"):
        raise _fail(path, f"training is {_clip(meta['training'])}, expected 'true' or 'false'")
    clock = []
    for key, limit in (("dropout_seed", 2**64 - 1), ("dropout_step", 2**63 - 1)):
        text = meta[key]
        # ASCII digits only (int() would take '٣' and ' 3_0'), at most 20 of them
        if not re.fullmatch(r"[0-9]{1,20}", text) or int(text) > limit:
            raise _fail(path, f"{key} is {_clip(text)}, expected a decimal integer in "
                              f"[0, {limit}]")
        clock.append(int(text))
    return meta["training"] == "true", clock[0], clock[1]


def _parse_optimizer(path: str, text: str) -> Dict[str, Any]:
    info = _json_metadata(path, "optimizer", text)
    if not isinstance(info, dict) or set(info) != {"class", "hyperparameters", "step"}:
        raise _fail(path, "the optimizer metadata must be an object with the keys "
                          "['class', 'hyperparameters', 'step']")
    if not isinstance(info["class"], str) or info["class"] not in OPTIMIZERS:
        raise _fail(path, f"unknown optimizer class {_clip(info['class'])}; expected one of "
                          f"{sorted(OPTIMIZERS)}")
    if not isinstance(info["hyperparameters"], dict):
        raise _fail(path, "the optimizer hyperparameters must be a JSON object")
    return info


def _expected_tensors(layers: List[Layer]) -> Tuple[Dict[str, Tuple[int, ...]],
                                                    Dict[str, Tuple[int, ...]]]:
    """The (parameters, buffers) a network of `layers` has: name -> shape."""
    params: Dict[str, Tuple[int, ...]] = {}
    buffers: Dict[str, Tuple[int, ...]] = {}
    for name, _, layer in walk(layers):
        params.update((f"{name}.{p}", shape) for p, shape in layer._parameter_shapes())
        buffers.update((f"{name}.{b}", shape) for b, shape in layer._buffer_shapes())
    return params, buffers


def _check_tensor_entries(path: str, header: Dict[str, Any], params: Dict[str, Tuple[int, ...]],
                          buffers: Dict[str, Tuple[int, ...]], opt_info: Optional[Dict[str, Any]],
                          dtype_name: str, data_len: int) -> List[Tuple[int, str, Tuple[int, ...]]]:
    """Checks every tensor of the header against the architecture's parameters
    and buffers and the data section's `data_len` bytes; returns (begin, name,
    shape) in file order."""
    # Every tensor: a known name, the dtype of the checkpoint, the expected shape
    # (optimizer state has its parameter's shape), a byte range inside the file.
    code = _DTYPE_CODES[dtype_name]
    itemsize = np.dtype(dtype_name).itemsize
    names = [k for k in header if k != "__metadata__"]
    ranges = []
    for name in names:
        entry = header[name]
        if name.startswith(_OPT_PREFIX):
            if opt_info is None:
                raise _fail(path, f"tensor {name!r} is optimizer state, but the metadata "
                                  "describes no optimizer")
            # the slot is the last component: optimizer.layers.4.layers.0.weight.exp_avg
            pname = name[len(_OPT_PREFIX):].rsplit(".", 1)[0]
            shape = params.get(pname)  # buffers have no optimizer state
        else:
            shape = params.get(name, buffers.get(name))
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
        ranges.append((offsets[0], offsets[1], name, shape))
    missing = sorted((set(params) | set(buffers)) - set(names))
    if missing:
        raise _fail(path, f"tensors {missing} are missing")
    # safetensors: the ranges cover the data section back to back, no gap, no overlap
    ranges.sort()
    end = 0
    for begin, stop, name, _ in ranges:
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else f"leaves a gap of " \
                f"{begin - end} bytes after the tensor before it"
            raise _fail(path, f"tensor {name!r} at data offsets [{begin}, {stop}] {what}")
        end = stop
    if end != data_len:
        raise _fail(path, f"the file has {data_len - end} bytes after the last tensor "
                          "(appended data?)")
    return [(begin, name, shape) for begin, _, name, shape in ranges]


def _decode(path: str, f: BinaryIO, size: int, with_optimizer: bool):
    """Reads and checks the checkpoint of `size` bytes in `f` (at its start) and
    builds (network, optimizer or None); `path` names it in errors."""
    header, data_start = _read_header(path, f, size)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, "its metadata has no format='bprop' entry (a safetensors file "
                          "written by something else?)")
    version = meta.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise _fail(path, f"format_version {_clip(version)} is not supported (this bprop reads "
                          f"versions {', '.join(_READABLE_VERSIONS)})")
    for key in ("dtype", "architecture", "sha256"):
        if not isinstance(meta.get(key), str):
            raise _fail(path, f"the metadata lacks {key!r}")
    dtype_name = meta["dtype"]
    if dtype_name not in _DTYPE_CODES:
        raise _fail(path, f"dtype {_clip(dtype_name)} is not 'float32' or 'float64'")
    if version == "1":
        layers = _parse_architecture_v1(path, meta["architecture"])
        mode = None
        network_keys, described = _NETWORK_KEYS_V1, "dtype, architecture"
    else:
        layers = _parse_architecture(path, meta["architecture"])
        mode = _parse_mode(path, meta)
        network_keys = _NETWORK_KEYS
        described = "dtype, architecture, training, dropout_seed, dropout_step"
    params, buffers = _expected_tensors(layers)
    opt_info = None
    if "optimizer" in meta:
        if not isinstance(meta["optimizer"], str):
            raise _fail(path, "the optimizer metadata is not a string")
        opt_info = _parse_optimizer(path, meta["optimizer"])
    layout = _check_tensor_entries(path, header, params, buffers, opt_info, dtype_name,
                                   size - data_start)

    # Every size is checked against the file: build the network, then read each
    # tensor once, in the digest's (name) order, straight into its parameter or
    # buffer; optimizer state into arrays when it is wanted, else only through the
    # digest, a piece at a time. The file is never held in memory beside the network.
    try:
        net = Network._zeros(layers, dtype=dtype_name)
    except (TypeError, ValueError, OverflowError) as exc:  # a slope beyond float32's range
        raise _fail(path, f"the architecture does not build ({exc})") from None
    built = ([name for name, _, _ in net.parameters()], [name for name, _ in net.buffers()])
    if sorted(built[0]) != sorted(params) or sorted(built[1]) != sorted(buffers):
        # the network names its tensors otherwise than this module expects
        raise _fail(path, f"the network built from the architecture has the parameters "
                          f"{built[0]} and buffers {built[1]}, not those of the file")
    targets: Dict[str, np.ndarray] = {name: p for name, p, _ in net.parameters()}
    targets.update(net.buffers())
    optimizer = None
    if with_optimizer and opt_info is not None:
        hyper = dict(opt_info["hyperparameters"])
        if isinstance(hyper.get("betas"), list):
            hyper["betas"] = tuple(hyper["betas"])
        try:  # built with the saved hyperparameters; its state is read into place below
            optimizer = OPTIMIZERS[opt_info["class"]](net, **hyper)
        except (TypeError, ValueError) as exc:
            raise _fail(path, f"the optimizer state does not load ({exc})") from None
        for pname, arrays in optimizer._state.items():
            targets.update((f"{_OPT_PREFIX}{pname}.{k}", a) for k, a in arrays.items())
    little = np.dtype(dtype_name).newbyteorder("<")
    state: Dict[str, np.ndarray] = {}
    digest = hashlib.sha256()
    nonfinite = None
    scratch = np.empty(0, dtype=little)
    for begin, name, shape in sorted(layout, key=lambda entry: entry[1]):
        digest.update(_digest_entry(name, little, shape))
        f.seek(data_start + begin)
        target = targets.get(name)
        if target is None and optimizer is not None:  # a slot the optimizer does not have:
            target = np.empty(shape, dtype=little)    # load_state_dict names it below
        if optimizer is not None and name.startswith(_OPT_PREFIX):
            state[name] = target
        if target is not None:
            pieces = [target if target.flags.c_contiguous and target.dtype == little
                      else np.empty(shape, dtype=little)]
        else:  # unwanted optimizer state: hashed and checked in pieces of at most 4 MiB
            count = math.prod(shape)
            step = max(1, (4 << 20) // little.itemsize)
            if scratch.size < min(count, step):
                scratch = np.empty(0)  # freed before the larger one is made
                scratch = np.empty(min(count, step), dtype=little)
            pieces = [scratch[:min(step, count - i)] for i in range(0, count, step)]
        short = 0
        for piece in pieces:
            got = _read_into(f, memoryview(piece).cast("B"))
            short += piece.nbytes - got
            if short:
                break
            digest.update(memoryview(piece).cast("B"))
            if nonfinite is None and not np.isfinite(piece).all():
                nonfinite = name
        if short:
            raise _fail(path, f"the file ended {short} bytes short of the end of tensor "
                              f"{name!r} (it shrank while it was read?)")
        if target is not None and pieces[0] is not target:
            target[...] = pieces[0]
    if digest.hexdigest() != meta["sha256"]:
        raise _fail(path, "the sha256 digest of its tensors does not match the metadata: the "
                          "data are corrupted")
    if meta.get("metadata_sha256") != _metadata_digest(meta, network_keys):
        what = "lacks" if "metadata_sha256" not in meta else "does not match"
        raise _fail(path, f"the digest of its metadata ({described}) {what} "
                          "metadata_sha256: the header is corrupted")
    if nonfinite is not None:
        raise _fail(path, f"tensor {nonfinite!r} holds NaN or inf")

    if mode is not None:
        net._core.training, net._core.dropout_seed, net._core.dropout_step = mode
    if optimizer is not None:
        slots: Dict[str, Dict[str, np.ndarray]] = {}
        for pname in params:
            prefix = f"{_OPT_PREFIX}{pname}."
            slots[pname] = {k[len(prefix):]: a for k, a in state.items()
                            if k.startswith(prefix)}
        sd = {"optimizer": opt_info["class"], "step": opt_info["step"],
              "hyperparameters": hyper, "state": slots}
        try:
            # every check of load_state_dict, on the arrays read (its own, in place:
            # adopted, not copied); refusing them means a corrupt checkpoint
            optimizer._load_state_dict(sd, adopt=True)
        except (TypeError, ValueError) as exc:
            raise _fail(path, f"the optimizer state does not load ({exc})") from None
        if meta.get("optimizer_sha256") != _metadata_digest(meta, _OPTIMIZER_KEYS):
            raise _fail(path, "the digest of its optimizer metadata does not match "
                              "optimizer_sha256: the header is corrupted")
    return net, optimizer


def load(path: PathLike, *, with_optimizer: bool = False):
    """Reads a checkpoint written by :func:`save` (or ``Network.save``).

    Only a regular file (or a symlink to one) is opened; its header is read and
    checked, and every declared size checked against the file's size, before any
    tensor is read (see the module docstring). Nothing in the file is executed.

    Args:
        path: the safetensors file.
        with_optimizer: also rebuild the saved optimizer, bound to the new network.

    Returns:
        The network; with ``with_optimizer``, the pair (network, optimizer), the
        optimizer None if the checkpoint holds none.

    Raises:
        CheckpointError: the path is not a regular file (a directory, FIFO,
            device, ...), or the file is truncated, corrupted, foreign or
            inconsistent; no network is returned.
        OSError: the file cannot be read (FileNotFoundError, PermissionError, ...).
    """
    where = "load"
    if not isinstance(with_optimizer, (bool, np.bool_)):
        raise TypeError(f"[{where}] with_optimizer must be a bool, but got "
                        f"{type_name(with_optimizer)}")
    path = check_path(where, path)
    f, size = _open_regular_file(path)
    with f:
        net, optimizer = _decode(path, f, size, bool(with_optimizer))
    if with_optimizer:
        return net, optimizer
    return net


# ---- pickling and deep copies: the checkpoint format in memory --------------------------

_PICKLED = "pickled data"


def _decode_bytes(data: bytes) -> Tuple[Network, Any]:
    if not isinstance(data, (bytes, bytearray)):
        raise _fail(_PICKLED, f"expected checkpoint bytes, but got {type_name(data)}")
    return _decode(_PICKLED, BytesIO(data), len(data), True)


def _network_from_checkpoint(data: bytes) -> Network:
    """Unpickles a Network: decodes and checks checkpoint bytes as :func:`load`
    does; the optimizer they hold, if any, becomes the one ``fit`` continues with."""
    net, optimizer = _decode_bytes(data)
    if optimizer is not None:
        net._fit_optimizer = optimizer
    return net


def _optimizer_from_checkpoint(net: Network, data: bytes):
    """Unpickles an optimizer: decodes checkpoint bytes holding it and a network
    like `net` (the unpickled network, which pickle's memo shares with the rest
    of the stream), and binds a new optimizer with that state to `net`."""
    saved_net, saved = _decode_bytes(data)
    if saved is None:
        raise _fail(_PICKLED, "it holds no optimizer")
    # the same dtype and the same layer tree, compared as the checkpoint stores it
    if (not isinstance(net, Network) or net.dtype != saved_net.dtype
            or _architecture(net.layers) != _architecture(saved_net.layers)):
        raise _fail(_PICKLED, "the optimizer's network differs from the network it is "
                              "restored onto")
    optimizer = type(saved)(net, **saved.hyperparameters)
    optimizer.load_state_dict(saved.state_dict())
    return optimizer


def _fit_optimizer_of(net: Network):
    """Unpickles the optimizer ``fit`` remembers for `net` (restored with `net`)."""
    optimizer = getattr(net, "_fit_optimizer", None)
    if optimizer is None:
        raise _fail(_PICKLED, "the network holds no optimizer")
    return optimizer


def _reduce_network(net: Network):
    """Network.__reduce__: the network, with the optimizer fit remembers for it, as
    checkpoint bytes."""
    optimizer = getattr(net, "_fit_optimizer", None)
    if optimizer is not None and optimizer._net_ref() is not net:
        optimizer = None
    data = _encode("pickle", net, optimizer,
                   refusal="so it is not pickled or copied").to_bytes()
    return _network_from_checkpoint, (data,)


def _reduce_optimizer(optimizer):
    """Optimizer.__reduce__: its network (pickled by itself, so shared through
    pickle's memo) and a checkpoint of both; or, for the optimizer ``fit``
    remembers, which the network's checkpoint already holds, the network alone.

    The restored optimizer, like any, holds its network's parameters but only a
    weak reference to the Network: unpickle it together with its network (or keep
    ``opt.net``) to use the network object."""
    net = optimizer._net_ref()
    if net is None:
        raise RuntimeError(f"[pickle] the network this {type(optimizer).__name__} was built on "
                           "has been freed; an optimizer is pickled with its network")
    if getattr(net, "_fit_optimizer", None) is optimizer:
        return _fit_optimizer_of, (net,)
    data = _encode("pickle", net, optimizer,
                   refusal="so it is not pickled or copied").to_bytes()
    return _optimizer_from_checkpoint, (net, data)


_DELEGATES.update(save=save, reduce_network=_reduce_network, reduce_optimizer=_reduce_optimizer)
