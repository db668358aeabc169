"""Argument checks shared by the Python layer. Every message names the call,
the argument, what was expected and what arrived."""

from __future__ import annotations

import math
import os
import numbers
import operator

import numpy as np

DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


def type_name(value: object) -> str:
    return type(value).__name__


def check_int(where: str, name: str, value: object, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """An integer (Python or NumPy, never bool) within [minimum, maximum]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"[{where}] {name} must be an int, but got {type_name(value)} {value!r}")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"[{where}] {name} must be >= {minimum}, but got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"[{where}] {name} must be <= {maximum}, but got {value}")
    return value


def check_float(where: str, name: str, value: object, *, minimum: float | None = None,
                exclusive_minimum: bool = False, maximum: float | None = None,
                exclusive_maximum: bool = False) -> float:
    """A finite real number (never bool) within the given bounds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"[{where}] {name} must be a real number, but got "
                        f"{type_name(value)} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"[{where}] {name} must be finite, but got {value}")
    if minimum is not None and (value < minimum or (exclusive_minimum and value == minimum)):
        op = ">" if exclusive_minimum else ">="
        raise ValueError(f"[{where}] {name} must be {op} {minimum}, but got {value}")
    if maximum is not None and (value > maximum or (exclusive_maximum and value == maximum)):
        op = "<" if exclusive_maximum else "<="
        raise ValueError(f"[{where}] {name} must be {op} {maximum}, but got {value}")
    return value


def check_dtype(where: str, dtype: object) -> np.dtype:
    """'float32' or 'float64' (or the NumPy equivalents)."""
    dt = None
    if dtype is not None:  # np.dtype(None) would be float64
        try:
            dt = np.dtype(dtype)  # type: ignore[call-overload]
        except TypeError:
            dt = None
    if dt is None or dt.name not in DTYPES or not dt.isnative:
        raise ValueError(f"[{where}] dtype must be 'float32' or 'float64', but got {dtype!r}")
    return DTYPES[dt.name]


def _is_sparse(X: object) -> bool:
    """A scipy.sparse matrix or array, recognised without importing scipy."""
    return type(X).__module__.startswith("scipy.sparse") and hasattr(X, "toarray")


def is_sparse(X: object) -> bool:
    """A scipy.sparse matrix or array (any format)."""
    return _is_sparse(X)


def csr_batch(where: str, name: str, X, dtype: np.dtype) -> tuple:
    """The core's form of a sparse batch for the low-level calls (forward,
    train_step), which never convert: X must be a 2-D scipy.sparse CSR matrix or
    array of exactly `dtype`. Returns (data, indices, indptr, n_features), the
    matrix's own arrays (no copy); the core checks their contents (check_csr:
    indices in range, sorted, no duplicates; finite values)."""
    if len(X.shape) != 2:
        raise ValueError(f"[{where}] {name} must be 2-D (batch, features), but has shape "
                         f"{X.shape}")
    if X.format != "csr":
        raise TypeError(f"[{where}] {name} is a sparse matrix in {X.format.upper()} format, "
                        f"but {where} takes CSR; convert it once with {name}.tocsr() (a copy "
                        f"of its stored values and indices)")
    if X.dtype != dtype:
        raise TypeError(f"[{where}] {name} must have dtype {dtype}, but has dtype {X.dtype}; "
                        f"convert it once with {name}.astype(np.{dtype})")
    return (X.data, X.indices, X.indptr, X.shape[1])


def as_csr(where: str, name: str, X, dtype: np.dtype, *, features: int | None = None,
           allow_empty: bool = False):
    """The sparse counterpart of as_float_matrix for the high-level calls
    (predict, fit, evaluate): a scipy.sparse CSR matrix or array of `dtype`, in
    canonical form, its indices in range, never densified.

    Other formats (CSC, COO, ...) are converted to CSR once, here: a copy of the
    stored values and indices, O(nnz) time and memory. Integer and floating
    values are cast (a copy of the stored values only when the dtype differs);
    bool and complex are refused. Unsorted or duplicate column indices are
    refused with the fix (X.sum_duplicates()), as are column indices out of range
    (a hand-built matrix); non-finite values are the callers' to refuse.
    """
    if len(X.shape) != 2:
        raise ValueError(f"[{where}] {name} must be 2-D (samples, features), but has shape "
                         f"{X.shape}")
    if X.dtype.kind not in "iuf":
        raise TypeError(f"[{where}] {name} must hold real numbers (integer or floating), "
                        f"but has dtype {X.dtype}")
    rows, cols = X.shape
    if rows == 0 and not allow_empty:
        raise ValueError(f"[{where}] {name} has 0 samples; expected at least one")
    if features is not None and cols != features:
        raise ValueError(f"[{where}] {name} has {cols} features, but the network "
                         f"expects {features}")
    if X.format != "csr":
        X = X.tocsr()  # the one conversion: O(nnz), sums COO's duplicates
    check_csr_structure(where, name, X)
    if not csr_is_canonical(X):
        raise ValueError(f"[{where}] {name} has unsorted or duplicate column indices; put it "
                         f"in canonical form once with {name}.sum_duplicates() (which also "
                         f"sorts), or {name}.sort_indices()")
    if X.dtype != dtype:
        X = X.astype(dtype)
    return X


def check_csr_structure(where: str, name: str, X) -> None:
    """Refuses a CSR matrix whose arrays do not describe a (rows, cols) matrix:
    indptr of rows + 1 entries from 0, not decreasing, ending at most at the
    number of stored values; column indices in [0, cols). A hand-built matrix is
    checked here, before scipy's row indexing (or the core) reads it: scipy's
    own flags may be stale, since its arrays can be assigned directly. O(nnz)."""
    rows, cols = X.shape
    indices, indptr = X.indices, X.indptr
    nnz = indices.shape[0]
    if (indptr.shape != (rows + 1,) or X.data.shape != (nnz,) or indptr[0] != 0
            or indptr[-1] > nnz or (rows and np.any(np.diff(indptr) < 0))):
        raise ValueError(f"[{where}] {name} is not a valid CSR matrix: indptr must have "
                         f"{rows + 1} entries, start at 0, not decrease and end at most at "
                         f"the number of stored values ({nnz})")
    if nnz and (int(indices.min()) < 0 or int(indices.max()) >= cols):
        bad = int(indices.min()) if int(indices.min()) < 0 else int(indices.max())
        raise ValueError(f"[{where}] {name} has a column index out of range: it stores "
                         f"column {bad}, but has {cols} columns")


def csr_is_canonical(X) -> bool:
    """Whether each row's column indices strictly increase (sorted, no
    duplicates: scipy's canonical form), computed from the arrays, not from
    scipy's cached flags. X must pass check_csr_structure. O(nnz)."""
    indices, indptr = X.indices, X.indptr
    nnz = indices.shape[0]
    increasing = np.diff(indices) > 0  # entry k against entry k + 1
    starts = indptr[1:-1]
    increasing[starts[(starts > 0) & (starts < nnz)] - 1] = True  # a new row begins
    return bool(increasing.all())


def csr_nbytes_per_row(X) -> int:
    """The bytes of a CSR matrix per row, on average (at least 1)."""
    rows = max(1, X.shape[0])
    return max(1, (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) // rows)


def as_float_matrix(where: str, name: str, X: object, dtype: np.dtype, *,
                    features: int | None = None, allow_empty: bool = False) -> np.ndarray:
    """Converts X to a C-contiguous (rows, features) array of `dtype`.

    This is the one place where the high-level calls (predict, fit, evaluate)
    convert input: real integer and floating arrays are cast (a copy only when
    the dtype or layout differs); bool, complex, object and str arrays, ragged
    lists and None are refused. Low-level calls (forward, backward) never
    convert.
    """
    if X is None:
        raise TypeError(f"[{where}] {name} must be a 2-D array of numbers, but got None")
    if _is_sparse(X):
        rows, cols = X.shape
        raise TypeError(f"[{where}] {name} is a sparse matrix ({type_name(X)}, shape "
                        f"({rows}, {cols})), which {where} does not take; "
                        f"densify it with {name}.toarray() (this needs {rows} x {cols} x "
                        f"{dtype.itemsize} = {rows * cols * dtype.itemsize:,} bytes)")
    if not isinstance(X, np.ndarray):
        try:
            X = np.asarray(X)
        except ValueError as exc:  # ragged nested sequences
            raise ValueError(f"[{where}] {name} must be a rectangular 2-D array, but "
                             f"got a ragged {type_name(X)}") from exc
    kind = X.dtype.kind
    if kind not in "iuf":
        raise TypeError(f"[{where}] {name} must hold real numbers (integer or floating), "
                        f"but has dtype {X.dtype}")
    if X.ndim != 2:
        hint = "; use X.reshape(1, -1) for a single sample" if X.ndim == 1 else ""
        raise ValueError(f"[{where}] {name} must be 2-D (samples, features), but has shape "
                         f"{X.shape}{hint}")
    if X.shape[0] == 0 and not allow_empty:
        raise ValueError(f"[{where}] {name} has 0 samples; expected at least one")
    if features is not None and X.shape[1] != features:
        raise ValueError(f"[{where}] {name} has {X.shape[1]} features, but the network "
                         f"expects {features}")
    return np.ascontiguousarray(X, dtype=dtype)


def check_path(where: str, path: object) -> str:
    """A file path given as a str or an os.PathLike of str, returned as a str."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"[{where}] path must be a str or os.PathLike, but got "
                        f"{type_name(path)} {path!r}")
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"[{where}] path must be a str or os.PathLike of str, but got "
                        f"{type_name(path)} {path!r}")
    return path
