"""Shared fixtures: seeded random numbers, a bprop network with its NumPy-reference
twin, the comparison at the suite's stated tolerances, and a record of the largest
errors measured (listed at the end of the run)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import bprop
from bprop import reference

# bprop against bprop.reference, relative (issue 2): 1e-12 in float64, 1e-5 in float32.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def _dense(module, spec):
    """A Dense of `module` (bprop or bprop.reference) from a spec
    (in_features, out_features[, activation[, negative_slope]])."""
    n_in, n_out, *rest = spec
    kwargs = {"negative_slope": rest[1]} if len(rest) > 1 else {}
    return module.Dense(n_in, n_out, *rest[:1], **kwargs)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's id: reproducible, and different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def make_network():
    """make_network(specs, dtype="float64", seed=0) -> bprop.Network.

    specs: list of (in_features, out_features[, activation[, negative_slope]])."""
    def make(specs, dtype="float64", seed=0):
        return bprop.Network([_dense(bprop, s) for s in specs], dtype=dtype, seed=seed)
    return make


@pytest.fixture
def make_pair():
    """make_pair(specs, dtype="float64", seed=0, ref_dtype=None) -> (bprop.Network,
    reference.Network) of the same architecture and the same initial weights.

    With ref_dtype=None the reference has `dtype` and the same seed (so the same bits).
    With a wider ref_dtype (float64 for a float32 network) it starts from the bprop
    network's weights, converted exactly, and computes the float32 network's exact
    result: then a comparison measures bprop's rounding alone, not the sum of two
    float32 roundings."""
    def make(specs, dtype="float64", seed=0, ref_dtype=None):
        net = bprop.Network([_dense(bprop, s) for s in specs], dtype=dtype, seed=seed)
        ref = reference.Network([_dense(reference, s) for s in specs],
                                dtype=ref_dtype or dtype, seed=seed)
        if ref.dtype != net.dtype:
            for L, R in zip(net.layers, ref.layers):
                R.weight, R.bias = L.weight, L.bias
        return net, ref
    return make


@pytest.fixture
def assert_close():
    """assert_close(actual, desired, err_msg="") at the RTOL of the less precise of
    the two dtypes; returns the relative error in the max norm,
    max|actual - desired| / max|desired|.

    The core and NumPy sum the terms of each matrix product in different orders
    (Eigen's blocked GEMM, NumPy's BLAS), so the rounding error of an entry is
    bounded relative to the magnitudes of its terms, not to its value, which can be
    near zero after cancellation (a gradient summed over the batch, a softmax JVP).
    atol = rtol * max|desired| covers those entries; entries of the array's own
    magnitude are held to rtol."""
    def check(actual, desired, err_msg=""):
        desired = np.asarray(desired)
        assert actual is not None, err_msg
        assert actual.shape == desired.shape, f"{err_msg}: shape {actual.shape} != {desired.shape}"
        rtol = max(RTOL[np.dtype(actual.dtype)], RTOL[desired.dtype])
        scale = float(np.max(np.abs(desired))) if desired.size else 0.0
        np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale,
                                   err_msg=err_msg)
        diff = np.abs(actual.astype(np.float64) - desired.astype(np.float64))
        return float(diff.max() / scale) if scale > 0 else float(diff.max(initial=0.0))
    return check


# ---- largest errors measured, reported at the end of the run ------------------------
_LARGEST: dict = {}


@pytest.fixture
def record_error():
    """record_error(name, value): keeps the largest value per name; the end of the
    run lists them (the measured errors that notes and issues quote)."""
    def record(name: str, value: float) -> None:
        _LARGEST[name] = max(float(value), _LARGEST.get(name, 0.0))
    return record


def pytest_terminal_summary(terminalreporter):
    if _LARGEST:
        terminalreporter.section("largest errors measured")
        for name in sorted(_LARGEST):
            terminalreporter.write_line(f"{name:<56} {_LARGEST[name]:.2e}")


# ---- threads and bitwise fingerprints (test_reproducibility, test_determinism) -------
@pytest.fixture
def threads():
    """threads(n) sets bprop.set_num_threads(n) for the test; the count in force before
    is restored afterwards."""
    before = bprop.get_num_threads()
    yield bprop.set_num_threads
    bprop.set_num_threads(before)


@pytest.fixture
def fingerprint():
    """fingerprint(net, optimizer, history) -> list of bytes/str: every bit a fit
    produces (weights, optimizer state and step count, History)."""
    def take(net, opt, history):
        out = [p.tobytes() for _, p, _ in net.parameters()]
        sd = opt.state_dict()
        out += [sd["state"][p][k].tobytes()
                for p in sorted(sd["state"]) for k in sorted(sd["state"][p])]
        out += [repr(sd["step"]), repr(history.loss), repr(history.val_loss),
                repr(history.metrics)]
        return out
    return take
