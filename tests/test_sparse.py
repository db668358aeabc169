"""Sparse (scipy.sparse CSR) input for the first Dense layer: the same results as
the dense input to the suite's tolerances, bitwise the same for any thread count,
and hostile sparse input refused before anything changes."""

from __future__ import annotations

import numpy as np
import pytest

sp = pytest.importorskip("scipy.sparse")

import bprop  # noqa: E402
from bprop import optim  # noqa: E402

TOL = {"float32": 1e-5, "float64": 1e-12}


def make_net(dtype="float64", seed=0, first=None, in_features=12):
    layers = [first] if first is not None else []
    layers += [bprop.Dense(in_features, 8, "tanh"), bprop.Dense(8, 6, "relu"),
               bprop.Dense(6, 3)]
    return bprop.Network(layers, dtype=dtype, seed=seed)


def sparse_data(rng, rows=40, cols=12, density=0.3, dtype="float64", fmt=sp.csr_matrix):
    X = sp.random(rows, cols, density=density, format="csr", random_state=rng,
                  dtype=np.float64)
    X.data = rng.standard_normal(X.nnz)
    X.data[X.indptr[3]:X.indptr[4]] = 0.0
    X.eliminate_zeros()  # row 3 empty
    X = fmt(X.astype(dtype))
    X.sort_indices()
    y = rng.integers(0, 3, rows)
    return X, y


def snapshot(net):
    return [p.copy() for _, p, _ in net.parameters()]


def assert_unchanged(net, before):
    for (name, p, _), b in zip(net.parameters(), before):
        np.testing.assert_array_equal(p, b, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("fmt", [sp.csr_matrix, sp.csr_array])
@pytest.mark.parametrize("index", [np.int32, np.int64])
def test_forward_and_gradients_match_dense(rng, dtype, fmt, index):
    X, _ = sparse_data(rng, dtype=dtype, fmt=fmt)
    X.indices, X.indptr = X.indices.astype(index), X.indptr.astype(index)
    D = X.toarray()
    dense, sparse = make_net(dtype), make_net(dtype)
    G = rng.standard_normal((X.shape[0], 3)).astype(dtype)
    out_d = dense.forward(D)
    out_s = sparse.forward(X)
    np.testing.assert_allclose(out_s, out_d, rtol=TOL[dtype], atol=TOL[dtype])
    dense.backward(G)
    sparse.backward(G)
    for (name, _, gd), (_, _, gs) in zip(dense.parameters(), sparse.parameters()):
        scale = np.abs(gd).max()
        np.testing.assert_allclose(gs, gd, rtol=TOL[dtype], atol=TOL[dtype] * scale,
                                   err_msg=name)
    # accumulate adds X^T delta to the stored gradient
    dense.backward(G, accumulate=True)
    sparse.backward(G, accumulate=True)
    for (name, _, gd), (_, _, gs) in zip(dense.parameters(), sparse.parameters()):
        np.testing.assert_allclose(gs, gd, rtol=TOL[dtype], atol=TOL[dtype] * np.abs(gd).max(),
                                   err_msg=name)
    # the first layer's cached input has no dense view
    assert sparse.layers[0].input is None
    assert sparse.layers[1].input is not None


@pytest.mark.parametrize("make_optimizer", [
    lambda net: optim.SGD(net, lr=0.05),
    lambda net: optim.SGD(net, lr=0.05, momentum=0.9),
    lambda net: optim.Adam(net, lr=0.01),
], ids=["sgd", "sgd-momentum", "adam"])
def test_train_step_trajectory_matches_dense(rng, make_optimizer):
    X, y = sparse_data(rng)
    D = X.toarray()
    dense, sparse = make_net(), make_net()
    od, os_ = make_optimizer(dense), make_optimizer(sparse)
    for step in range(20):
        rows = rng.permutation(X.shape[0])[:16]
        ld = dense.train_step(np.ascontiguousarray(D[rows]), y[rows], optimizer=od)
        ls = sparse.train_step(X[rows], y[rows], optimizer=os_)
        assert ls == pytest.approx(ld, rel=1e-12, abs=1e-12), step
    for (name, pd, _), (_, ps, _) in zip(dense.parameters(), sparse.parameters()):
        np.testing.assert_allclose(ps, pd, rtol=1e-12, atol=1e-12, err_msg=name)


def test_train_step_with_sample_weight_and_mse(rng):
    X, _ = sparse_data(rng)
    Y = rng.standard_normal((X.shape[0], 3))
    w = rng.uniform(0.5, 2.0, X.shape[0])
    dense, sparse = make_net(), make_net()
    od, os_ = optim.Adam(dense, lr=0.01), optim.Adam(sparse, lr=0.01)
    for _ in range(5):
        ld = dense.train_step(X.toarray(), Y, "mean_squared_error", od, sample_weight=w)
        ls = sparse.train_step(X, Y, "mean_squared_error", os_, sample_weight=w)
        assert ls == pytest.approx(ld, rel=1e-12)
    for (name, pd, _), (_, ps, _) in zip(dense.parameters(), sparse.parameters()):
        np.testing.assert_allclose(ps, pd, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_fit_matches_dense(rng, fmt):
    X, y = sparse_data(rng, rows=90)
    w = rng.uniform(0.5, 2.0, X.shape[0])
    Xv, yv = sparse_data(rng, rows=20)
    dense, sparse = make_net(), make_net()
    kw = dict(epochs=3, batch_size=16, seed=3, sample_weight=w)
    hd = bprop.fit(dense, X.toarray(), y, validation_split=0.2, **kw)
    hs = bprop.fit(sparse, X.asformat(fmt), y, validation_split=0.2, **kw)
    np.testing.assert_allclose(hs.history["loss"], hd.history["loss"], rtol=1e-10)
    np.testing.assert_allclose(hs.history["val_loss"], hd.history["val_loss"], rtol=1e-10)
    for (name, pd, _), (_, ps, _) in zip(dense.parameters(), sparse.parameters()):
        np.testing.assert_allclose(ps, pd, rtol=1e-10, atol=1e-10, err_msg=name)
    hd = bprop.fit(dense, X.toarray(), y, validation_data=(Xv.toarray(), yv), epochs=2,
                   batch_size=16, seed=4, shuffle=False)
    hs = bprop.fit(sparse, X.asformat(fmt), y, validation_data=(Xv, yv), epochs=2,
                   batch_size=16, seed=4, shuffle=False)
    np.testing.assert_allclose(hs.history["val_loss"], hd.history["val_loss"], rtol=1e-10)
    ed = bprop.evaluate(dense, X.toarray(), y, metrics=["accuracy"])
    es = bprop.evaluate(sparse, X, y, metrics=["accuracy"])
    assert es == pytest.approx(ed, rel=1e-10)


def test_fit_never_densifies(rng, monkeypatch):
    X, y = sparse_data(rng, rows=50)
    net = make_net()

    def refuse(*args, **kwargs):
        raise AssertionError("densified")
    monkeypatch.setattr(type(X), "toarray", refuse)
    monkeypatch.setattr(type(X), "todense", refuse)
    bprop.fit(net, X, y, epochs=1, batch_size=8, validation_split=0.2, seed=0)
    net.predict(X, batch_size=7)
    bprop.evaluate(net, X, y)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_predict_equals_dense(rng, dtype):
    X, _ = sparse_data(rng, rows=37, dtype=dtype)
    net = make_net(dtype)
    want = net.predict(X.toarray())
    for batch_size in (None, 1, 5, 37, 100):
        got = net.predict(X, batch_size=batch_size)
        np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    # other formats and dtypes are converted once
    np.testing.assert_allclose(net.predict(X.tocsc()), want, rtol=TOL[dtype], atol=TOL[dtype])
    Xi = sp.csr_matrix((np.ones(X.nnz, np.int64), X.indices, X.indptr), shape=X.shape)
    np.testing.assert_allclose(net.predict(Xi), net.predict(Xi.toarray()), rtol=TOL[dtype],
                               atol=TOL[dtype])
    assert not net._core.has_forward  # predict leaves the training caches alone


def test_bitwise_identical_for_any_thread_count(rng):
    X, y = sparse_data(rng, rows=300, cols=400, density=0.05)
    threads = bprop.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 4):
            bprop.set_num_threads(n)
            net = bprop.Network([bprop.Dense(400, 64, "relu"), bprop.Dense(64, 3)],
                                dtype="float64", seed=0)
            opt = optim.Adam(net, lr=0.01)
            losses = [net.train_step(X, y, optimizer=opt) for _ in range(3)]
            net.forward(X)
            net.backward(np.ones((300, 3)))
            results.append((losses, [p.tobytes() for _, p, _ in net.parameters()],
                            [g.tobytes() for _, _, g in net.parameters()],
                            net.predict(X, batch_size=64).tobytes()))
    finally:
        bprop.set_num_threads(threads)
    assert results[1] == results[0]
    assert results[2] == results[0]
    assert results[3] == results[0]


def test_zero_stored_values_and_empty_rows(rng):
    X, _ = sparse_data(rng)
    Xz = X.copy()
    Xz.data[::3] = 0.0  # stored zeros count as zeros
    Xz.data[Xz.indptr[5]:Xz.indptr[6]] = 0.0
    assert Xz.indptr[6] > Xz.indptr[5]
    net = make_net()
    np.testing.assert_allclose(net.forward(Xz), net.forward(Xz.toarray()), rtol=1e-12,
                               atol=1e-12)
    empty = sp.csr_matrix((4, 12))
    np.testing.assert_allclose(net.predict(empty), net.predict(np.zeros((4, 12))), rtol=1e-12)


# ---- refusals: clear errors, the network unchanged --------------------------------

def hand_built(data, indices, indptr, shape):
    """A CSR matrix scipy does not check (as one built by hand from arrays)."""
    X = sp.csr_matrix(shape)
    X.data, X.indices, X.indptr = np.asarray(data, np.float64), np.asarray(indices, np.int32), \
        np.asarray(indptr, np.int32)
    return X


HOSTILE = {
    "out-of-range": (hand_built([1.0, 2.0], [0, 12], [0, 1, 2], (2, 12)), "out of range"),
    "negative index": (hand_built([1.0, 2.0], [0, -1], [0, 1, 2], (2, 12)), "out of range"),
    "unsorted": (hand_built([1.0, 2.0], [5, 2], [0, 2, 2], (2, 12)), r"sum_duplicates"),
    "duplicate": (hand_built([1.0, 2.0], [5, 5], [0, 2, 2], (2, 12)), r"sum_duplicates"),
    "nan": (hand_built([1.0, np.nan], [0, 3], [0, 1, 2], (2, 12)), "finite"),
    "inf": (hand_built([1.0, np.inf], [0, 3], [0, 1, 2], (2, 12)), "finite"),
    "shape": (sp.csr_matrix(np.ones((2, 11))), "11 features"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_refused_network_unchanged(rng, case):
    X, match = HOSTILE[case]
    X0, y0 = sparse_data(rng, rows=8)
    net = make_net()
    opt = optim.Adam(net, lr=0.1)
    net.train_step(X0, y0, optimizer=opt)
    before, steps = snapshot(net), opt.step_count
    y = np.zeros(X.shape[0], np.int64)
    with pytest.raises(ValueError, match=match):
        net.forward(X)
    with pytest.raises(ValueError, match=match):
        net.train_step(X, y, optimizer=opt)
    with pytest.raises(ValueError, match=match):
        net.predict(X)
    with pytest.raises(ValueError, match=match):
        bprop.fit(net, X, y, epochs=1, optimizer=opt)
    with pytest.raises(ValueError, match=match):
        bprop.evaluate(net, X, y)
    assert_unchanged(net, before)
    assert opt.step_count == steps


def test_wrong_dtype_and_format_refused_by_low_level_calls(rng):
    X, y = sparse_data(rng, rows=8)
    net = make_net()
    opt = optim.SGD(net, lr=0.1)
    before = snapshot(net)
    with pytest.raises(TypeError, match=r"dtype float64, but has dtype float32.*astype"):
        net.forward(X.astype(np.float32))
    with pytest.raises(TypeError, match=r"dtype float64, but has dtype int64"):
        net.train_step(X.astype(np.int64), y, optimizer=opt)
    with pytest.raises(TypeError, match=r"CSC format.*tocsr\(\)"):
        net.forward(X.tocsc())
    with pytest.raises(TypeError, match=r"COO format.*tocsr\(\)"):
        net.train_step(X.tocoo(), y, optimizer=opt)
    with pytest.raises(TypeError, match=r"real numbers.*bool"):
        net.predict(X.astype(bool))
    with pytest.raises(TypeError, match=r"real numbers.*complex"):
        bprop.fit(net, X.astype(np.complex128), y, epochs=1)
    assert_unchanged(net, before)
    assert not net._core.has_forward


def test_input_grad_refused_for_sparse_input(rng):
    X, _ = sparse_data(rng, rows=8)
    net = make_net()
    net.forward(X)
    with pytest.raises(ValueError, match=r"input_grad=True.*sparse.*toarray"):
        net.backward(np.ones((8, 3)), input_grad=True)
    assert net._core.has_forward and not net._core.has_backward
    net.backward(np.ones((8, 3)))  # without dL/dX it works
    assert net._core.has_backward


@pytest.mark.parametrize("first", [bprop.BatchNorm(12), bprop.LayerNorm(12),
                                   bprop.Residual([bprop.Dense(12, 12)]),
                                   bprop.Activation("relu"), bprop.Dropout(0.1)],
                         ids=["BatchNorm", "LayerNorm", "Residual", "Activation", "Dropout"])
def test_first_layer_not_dense_refused(rng, first):
    X, y = sparse_data(rng, rows=8)
    net = make_net(first=first)
    name = type(first).__name__
    opt = optim.SGD(net, lr=0.1)
    before = snapshot(net)
    msg = rf"sparse, which only a Dense first layer takes, but layer 0 is {name}"
    with pytest.raises(ValueError, match=msg):
        net.forward(X)
    with pytest.raises(ValueError, match=msg):
        net.train_step(X, y, optimizer=opt)
    with pytest.raises(ValueError, match=msg):
        net.predict(X)
    with pytest.raises(TypeError, match=msg):
        bprop.fit(net, X, y, epochs=1)
    assert_unchanged(net, before)
    assert not net._core.has_forward


def test_stale_canonical_flag_and_bad_indptr_refused_by_fit(rng):
    # scipy caches has_canonical_format; a matrix whose arrays were assigned after
    # the flag was set is checked from its arrays, before scipy's row indexing.
    X = sp.csr_matrix((2, 12))
    assert X.has_canonical_format
    X.data, X.indices, X.indptr = (np.array([1.0, 2.0]), np.array([5, 2], np.int32),
                                   np.array([0, 2, 2], np.int32))
    net = make_net()
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"\[fit\] X has unsorted or duplicate.*sum_dup"):
        bprop.fit(net, X, np.zeros(2, np.int64), epochs=1)
    X.indices, X.indptr = np.array([2, 5], np.int32), np.array([0, 3, 2], np.int32)
    with pytest.raises(ValueError, match=r"\[fit\] X is not a valid CSR matrix: indptr"):
        bprop.fit(net, X, np.zeros(2, np.int64), epochs=1)
    with pytest.raises(ValueError, match=r"\[Network.forward\] X is not a valid CSR matrix"):
        net.forward(X)
    assert_unchanged(net, before)


def test_train_step_with_a_user_loss(rng):
    X, y = sparse_data(rng)
    Y = rng.standard_normal((X.shape[0], 3))

    def half_squares(output, target, sample_weight):
        diff = output - target
        return 0.5 * float((diff * diff).sum()), diff

    dense, sparse = make_net(), make_net()
    od, os_ = optim.SGD(dense, lr=0.01), optim.SGD(sparse, lr=0.01)
    for _ in range(5):
        ld = dense.train_step(X.toarray(), Y, half_squares, od)
        ls = sparse.train_step(X, Y, half_squares, os_)
        assert ls == pytest.approx(ld, rel=1e-12)
    for (name, pd, _), (_, ps, _) in zip(dense.parameters(), sparse.parameters()):
        np.testing.assert_allclose(ps, pd, rtol=1e-12, atol=1e-12, err_msg=name)
