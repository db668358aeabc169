"""Memory: networks are freed when their last reference goes, and what cannot fit
is refused before anything is allocated."""

import gc
import weakref

import numpy as np
import pytest

import bprop
from bprop import optim


@pytest.fixture
def no_gc():
    """The cycle collector off: whatever is freed here is freed by reference counting."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _data(n=64, features=8, classes=3):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, features)), rng.integers(0, classes, n)


@pytest.mark.parametrize("how", ["built", "forward", "fit", "fit-own-optimizer",
                                 "train_step", "layer-views-kept"])
def test_a_network_is_freed_when_its_last_reference_goes(no_gc, how):
    # Regression: Dense referred to its Network and the Network to its fit optimizer,
    # which referred back; 300 x (build 784-512-10, fit one epoch) grew RssAnon from
    # 38 MB to 686 MB with 43-91 dead networks alive until gc.collect().
    X, y = _data()
    net = bprop.Network([bprop.Dense(8, 16, activation="relu"), bprop.Dense(16, 3)], seed=0)
    kept = None
    if how == "forward":
        net.forward(X.astype(np.float32))
    elif how == "fit":
        bprop.fit(net, X, y, epochs=1, batch_size=16, seed=0)
    elif how == "fit-own-optimizer":
        opt = optim.SGD(net, lr=0.1, momentum=0.9)
        bprop.fit(net, X, y, optimizer=opt, epochs=1, batch_size=16, seed=0)
        del opt
    elif how == "train_step":
        opt = optim.Adam(net)
        net.train_step(X.astype(np.float32), y, optimizer=opt)
        del opt
    elif how == "layer-views-kept":
        kept = net.layers[0].weight  # a view keeps its storage, not the network
    alive = weakref.ref(net)
    layers = [weakref.ref(layer) for layer in net.layers]
    del net
    assert alive() is None, "the network outlived its last reference"
    assert all(r() is None for r in layers)
    if kept is not None:
        assert kept.shape == (8, 16) and np.isfinite(kept).all()  # still valid memory


def test_an_optimizer_holds_the_parameters_not_the_network(no_gc):
    net = bprop.Network([bprop.Dense(4, 3)], seed=0)
    opt = optim.Adam(net)
    assert opt.net is net
    alive = weakref.ref(net)
    del net
    assert alive() is None
    with pytest.raises(RuntimeError, match=r"\[Adam.net\] the network this optimizer was built "
                                           r"on has been freed"):
        opt.net
    other = bprop.Network([bprop.Dense(4, 3)], seed=0)
    with pytest.raises(ValueError, match="optimizer was built for another network"):
        other.train_step(np.zeros((2, 4), np.float32), np.zeros(2, np.int64), optimizer=opt)
