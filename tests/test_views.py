"""Zero-copy: parameters, gradients and caches are NumPy views of the C++ storage,
a C-contiguous input reaches the core without a copy, and no view dangles."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

import bprop

SPECS = [(5, 7, "tanh"), (7, 4, "relu"), (4, 3, "softmax")]


@pytest.fixture(params=["float32", "float64"])
def net(request, make_network):
    return make_network(SPECS, request.param, seed=3)


def _data(net, rng, batch):
    return (rng.standard_normal((batch, net.in_features)).astype(net.dtype),
            rng.standard_normal((batch, net.out_features)).astype(net.dtype))


PARAMS = ("weight", "bias", "grad_weight", "grad_bias")
CACHES = ("input", "z", "output", "delta")


@pytest.mark.parametrize("name", PARAMS)
def test_parameter_views_share_the_core_storage(net, name):
    for i, L in enumerate(net.layers):
        first, second = getattr(L, name), getattr(L, name)
        # a fresh view made by the binding
        views = {n: (v, g) for n, v, g, _ in net._core.parameter_views()}
        value, grad = views[f"layers.{i}.{name.replace('grad_', '')}"]
        core = grad if name.startswith("grad_") else value
        assert np.shares_memory(first, second) and np.shares_memory(first, core)
        assert first.dtype == net.dtype and first.flags.c_contiguous and first.flags.writeable
        assert first.shape == ((L.in_features, L.out_features) if "weight" in name
                               else (L.out_features,))


def test_parameters_yields_the_same_views(net):
    names = []
    for (name, p, g), L in zip(net.parameters(), [L for L in net.layers for _ in (0, 1)]):
        names.append(name)
        kind = name.rsplit(".", 1)[1]
        assert np.shares_memory(p, getattr(L, kind))
        assert np.shares_memory(g, getattr(L, "grad_" + kind))
    assert names == [f"layers.{i}.{k}" for i in range(len(net)) for k in ("weight", "bias")]


def test_writing_through_a_weight_view_changes_forward(net, rng):
    X, _ = _data(net, rng, 4)
    before = net.forward(X)
    last = net.layers[-1]
    last.weight[...] = 0
    last.bias[...] = np.arange(last.out_features)
    after = net.forward(X)
    assert not np.allclose(before, after)
    # z = 0 a + (0, 1, 2): softmax of (0, 1, 2) in every row
    e = np.exp(np.arange(3.0))
    np.testing.assert_allclose(after, np.tile(e / e.sum(), (4, 1)), rtol=1e-6)


def test_views_taken_earlier_see_backward_and_step(net, rng):
    X, G = _data(net, rng, 6)
    L = net.layers[0]
    W, gW = L.weight, L.grad_weight
    W_before = W.copy()
    net.forward(X)
    net.backward(G)
    assert np.any(gW != 0)
    np.testing.assert_array_equal(gW, L.grad_weight)
    net.step(0.5)
    np.testing.assert_allclose(W, W_before - net.dtype.type(0.5) * gW, rtol=1e-6)


def test_c_contiguous_input_is_not_copied(net, rng):
    X, _ = _data(net, rng, 8)
    net.forward(X)
    assert np.shares_memory(net.layers[0].input, X)
    assert net.layers[0].input.shape == X.shape
    assert X.flags.writeable  # the cache's read-only view leaves the caller's array alone


def test_hidden_input_is_the_output_of_the_layer_below(net, rng):
    X, _ = _data(net, rng, 8)
    net.forward(X)
    for below, L in zip(net.layers, net.layers[1:]):
        assert np.shares_memory(L.input, below.output)
        np.testing.assert_array_equal(L.input, below.output)


def test_forward_and_backward_return_arrays_the_caller_owns(net, rng):
    X, G = _data(net, rng, 8)
    out = net.forward(X)
    dX = net.backward(G, input_grad=True)
    for arr in (out, dX):
        assert arr.flags.owndata and arr.flags.writeable and arr.flags.c_contiguous
        for L in net.layers:
            for cache in CACHES:
                assert not np.shares_memory(arr, getattr(L, cache))
    out[...] = 0  # writing into the returned array leaves the cache alone
    assert np.any(net.layers[-1].output != 0)


def test_caches_are_none_until_computed(net, rng):
    X, G = _data(net, rng, 2)
    assert all(getattr(L, c) is None for L in net.layers for c in CACHES)
    net.forward(X)
    assert all(getattr(L, c) is not None for L in net.layers for c in ("input", "z", "output"))
    assert all(L.delta is None for L in net.layers)
    net.backward(G)
    assert all(L.delta.shape == (2, L.out_features) for L in net.layers)


@pytest.mark.parametrize("name", CACHES)
def test_caches_are_read_only(net, rng, name):
    X, G = _data(net, rng, 3)
    net.forward(X)
    net.backward(G)
    for L in net.layers:
        cache = getattr(L, name)
        assert not cache.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            cache[0, 0] = 1
    with pytest.raises(AttributeError):
        setattr(net.layers[0], name, np.zeros((3, 5), net.dtype))


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_assignment_copies_after_a_shape_check(net, name, rng):
    L = net.layers[1]
    view = getattr(L, name)
    new = rng.standard_normal(view.shape)  # float64, cast on the way in
    setattr(L, name, new)
    assert not np.shares_memory(getattr(L, name), new)
    assert np.shares_memory(getattr(L, name), view)  # copied into the same storage
    np.testing.assert_array_equal(view, new.astype(net.dtype))
    new[...] = 42  # the caller's array stays the caller's
    assert not np.any(view == 42)
    setattr(L, name, np.zeros(view.shape, dtype=np.int64).tolist())  # lists and ints too
    assert not np.any(view)


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_assignment_rejects_wrong_shapes_and_values(net, name):
    L = net.layers[1]  # weight (7, 4), bias (4,)
    view = getattr(L, name)
    before = view.copy()
    wrong = [np.zeros(view.shape + (1,)), np.zeros((1,) + view.shape), np.zeros(()),
             np.zeros(tuple(n + 1 for n in view.shape)), np.zeros(view.size + 1),
             np.zeros(view.shape[::-1]) if view.ndim == 2 else np.zeros((2, 2))]
    for value in wrong:
        with pytest.raises(ValueError, match=rf"\[Dense\.{name}\] must have shape"):
            setattr(L, name, value)
    bad = np.zeros(view.shape)
    bad.flat[0] = np.nan
    with pytest.raises(ValueError, match=rf"\[Dense\.{name}\] must be finite"):
        setattr(L, name, bad)
    for value in (np.zeros(view.shape, complex), np.zeros(view.shape, bool), None, "0"):
        with pytest.raises(TypeError, match=rf"\[Dense\.{name}\] must be assigned real"):
            setattr(L, name, value)
    np.testing.assert_array_equal(view, before)


def test_views_outlive_the_network(make_network, rng):
    net = make_network(SPECS, "float64", seed=3)
    X, G = _data(net, rng, 5)
    net.forward(X)
    net.backward(G)
    views = {f"{i}.{name}": getattr(L, name) for i, L in enumerate(net.layers)
             for name in PARAMS + CACHES}
    copies = {k: v.copy() for k, v in views.items()}
    alive = weakref.ref(net)
    del net
    gc.collect()
    assert alive() is None  # the network, its layers and its core are gone
    junk = [np.full((64, 64), 7.0) for _ in range(64)]  # reuse any freed memory
    for key, view in views.items():
        np.testing.assert_array_equal(view, copies[key], err_msg=key)
    del junk


def test_cache_views_survive_a_larger_batch(net, rng):
    """A larger batch makes the core grow its buffers: a view taken before stays
    valid memory holding the old values (stale, as documented); the layer's
    attributes then show the new batch."""
    X8, G8 = _data(net, rng, 8)
    net.forward(X8)
    net.backward(G8)
    old = {(i, c): getattr(L, c) for i, L in enumerate(net.layers) for c in CACHES}
    saved = {k: v.copy() for k, v in old.items()}
    X64, G64 = _data(net, rng, 64)
    net.forward(X64)
    net.backward(G64)
    junk = [np.full((64, 64), 7.0) for _ in range(64)]  # reuse any freed memory
    for key, view in old.items():
        np.testing.assert_array_equal(view, saved[key], err_msg=str(key))
    for L in net.layers:
        assert L.z.shape == L.output.shape == L.delta.shape == (64, L.out_features)
    del junk


def test_cache_views_are_overwritten_by_a_batch_that_fits(net, rng):
    """Within the capacity the core reuses its buffers (no allocation per step): an
    earlier view shares memory with the new cache and shows the new values."""
    X64, _ = _data(net, rng, 64)
    net.forward(X64)
    z64 = net.layers[0].z
    X4, _ = _data(net, rng, 4)
    net.forward(X4)
    z4 = net.layers[0].z
    assert z4.shape == (4, net.layers[0].out_features)
    assert np.shares_memory(z64, z4)
    np.testing.assert_array_equal(z64[:4], z4)


def test_a_layer_outside_a_network_has_no_storage():
    L = bprop.Dense(3, 2)
    for name in PARAMS + CACHES:
        with pytest.raises(RuntimeError, match=rf"\[Dense\.{name}\] this layer is not part"):
            getattr(L, name)
    with pytest.raises(RuntimeError, match=r"\[Dense\.weight\] this layer is not part"):
        L.weight = np.zeros((3, 2))


def test_the_cached_input_keeps_the_callers_array_alive(make_pair, rng):
    """forward caches X by reference; the network holds it, so an X the caller
    drops at once is still there for backward."""
    net, ref = make_pair(SPECS, "float64", seed=3)
    X = rng.standard_normal((6, 5))
    net.forward(X.copy())  # the only reference to this copy is the network's
    gc.collect()
    junk = [np.full((6, 5), 7.0) for _ in range(256)]  # reuse any freed memory
    np.testing.assert_array_equal(net.layers[0].input, X)
    G = rng.standard_normal((6, 3))
    ref.forward(X)
    np.testing.assert_allclose(net.backward(G, input_grad=True),
                               ref.backward(G, input_grad=True), rtol=1e-12, atol=1e-14)
    del junk


@pytest.mark.parametrize("cache", ["0.z", "0.output", "1.output"])
def test_forward_on_a_view_of_its_own_cache(make_pair, rng, cache):
    """Regression guard: X = a view of one of the network's caches (here all (64, 64))
    points into a buffer that the same forward overwrites, while forward reads X and
    caches it by reference for backward. The network must refuse such an X with a
    ValueError or compute as if X were a copy; a wrong output or a silently wrong
    dL/dW of layer 0 is the bug."""
    net, ref = make_pair([(64, 64, "tanh"), (64, 64)], "float64", seed=0)
    net.forward(rng.standard_normal((64, 64)))
    layer, name = cache.split(".")
    X = getattr(net.layers[int(layer)], name)
    X_copy = X.copy()
    G = rng.standard_normal((64, 64))
    try:
        out = net.forward(X)
    except ValueError as exc:
        assert str(exc).startswith("[Network.forward] X ")
        return
    np.testing.assert_allclose(out, ref.forward(X_copy), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(net.layers[0].input, X_copy)
    net.backward(G)
    ref.backward(G)
    for i, (L, R) in enumerate(zip(net.layers, ref.layers)):
        np.testing.assert_allclose(L.grad_weight, R.grad_weight, rtol=1e-12, atol=1e-11,
                                   err_msg=f"layer {i}")


def test_assignment_checks_finiteness_in_the_networks_dtype(make_network):
    """Regression guard: 1e39 is a finite float64 but overflows to inf as float32;
    the check must see the value as stored, and refuse it without writing."""
    net = make_network(SPECS, "float32", seed=3)
    L = net.layers[0]
    before = L.weight.copy()
    with pytest.raises(ValueError, match=r"\[Dense\.weight\] must be finite"):
        L.weight = np.full(L.weight.shape, 1e39)
    np.testing.assert_array_equal(L.weight, before)
