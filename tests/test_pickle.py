"""Pickling and copying networks, optimizers, schedules and estimators (issue 10).

Before, ``pickle.dumps(net)`` and ``copy.deepcopy(net)`` raised "cannot pickle
'bprop._core.Network32'", and ``copy.copy(net)`` silently returned a network
sharing its storage. Now networks and optimizers pickle through the checkpoint
format (bprop.io), and ``copy.copy`` is refused.
"""

from __future__ import annotations

import copy
import gc
import io as io_module
import pickle
import weakref

import bprop
import numpy as np
import pytest
from bprop import io, optim
from bprop.io import CheckpointError

SPECS = [(5, 7, "leaky_relu", 0.2), (7, 6, "gelu"), (6, 3, "softmax")]

OPTIMIZERS = {
    "SGD": lambda n: optim.SGD(n, lr=0.1),
    "SGD-nesterov": lambda n: optim.SGD(n, lr=0.1, momentum=0.9, nesterov=True),
    "Adam": lambda n: optim.Adam(n, lr=1e-2, betas=(0.8, 0.95)),
    "AdamW": lambda n: optim.AdamW(n, lr=1e-2),
    "RMSprop": lambda n: optim.RMSprop(n, lr=1e-3, centered=True, momentum=0.5),
}


def bits(net):
    return [p.tobytes() for _, p, _ in net.parameters()]


def data(net, rng, n=16):
    return rng.standard_normal((n, net.in_features)), rng.integers(0, net.out_features, n)


def train(net, X, y, optimizer=None, epochs=2):
    bprop.fit(net, X, y, optimizer=optimizer, epochs=epochs, batch_size=8, seed=0)


def assert_same_network(a, b):
    assert type(b) is bprop.Network and b.dtype == a.dtype
    assert [L._description() for L in b.layers] == [L._description() for L in a.layers]
    assert bits(b) == bits(a)
    for (_, p, g), (_, q, h) in zip(a.parameters(), b.parameters()):
        assert not np.shares_memory(p, q) and not np.shares_memory(g, h)


# ---- networks ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copy_is_the_same_network_with_its_own_storage(how, dtype, make_network, rng):
    net = make_network(SPECS, dtype=dtype, seed=1)
    train(net, *data(net, rng), optimizer=optim.Adam(net, lr=1e-2))
    clone = pickle.loads(pickle.dumps(net)) if how == "pickle" else copy.deepcopy(net)
    assert_same_network(net, clone)
    X = rng.standard_normal((9, 5))
    np.testing.assert_array_equal(clone.predict(X).view(np.uint8),
                                  net.predict(X).view(np.uint8))
    # training the copy leaves the original as it was
    before = bits(net)
    train(clone, *data(net, rng), optimizer=optim.SGD(clone, lr=0.5))
    assert bits(net) == before and bits(clone) != before


def test_every_pickle_protocol(make_network):
    net = make_network(SPECS)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert_same_network(net, pickle.loads(pickle.dumps(net, protocol=protocol)))


def test_a_copy_has_no_caches_or_gradients(make_network, rng):
    net = make_network(SPECS)
    X = rng.standard_normal((4, 5))
    net.forward(X)
    net.backward(np.ones((4, 3)))
    clone = copy.deepcopy(net)
    assert all(L.input is None and L.delta is None for L in clone.layers)
    assert all(not g.any() for _, _, g in clone.parameters())


def test_copy_copy_is_refused(make_network):
    """copy.copy returned a second Network object over the same C++ storage."""
    net = make_network(SPECS)
    with pytest.raises(TypeError, match=r"\[Network.__copy__\] copy.copy would share the "
                                        r"network's storage; use copy.deepcopy"):
        copy.copy(net)
    opt = optim.Adam(net)
    with pytest.raises(TypeError, match=r"\[Adam.__copy__\] copy.copy would share the "
                                        r"optimizer's state; use copy.deepcopy"):
        copy.copy(opt)


def test_the_payload_is_the_checkpoint_format(make_network, tmp_path):
    """What unpickling runs is bprop.io's decoder, on checkpoint bytes that bprop.load
    reads as a file."""
    net = make_network(SPECS, dtype="float32")
    found = []

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            found.append((module, name))
            return super().find_class(module, name)

    assert_same_network(net, Recording(io_module.BytesIO(pickle.dumps(net))).load())
    assert found == [("bprop.io", "_network_from_checkpoint")]
    restore, (payload,) = net.__reduce__()
    assert restore is io._network_from_checkpoint
    (tmp_path / "m.safetensors").write_bytes(payload)
    assert_same_network(net, bprop.load(tmp_path / "m.safetensors"))


def test_a_damaged_payload_raises_checkpoint_error(make_network):
    net = make_network(SPECS)
    _, (payload,) = net.__reduce__()
    damaged = bytearray(payload)
    damaged[-3] ^= 0x04
    with pytest.raises(CheckpointError, match=r"\[load\] pickled data is not a valid bprop "
                                              r"checkpoint: the sha256 digest"):
        io._network_from_checkpoint(bytes(damaged))
    with pytest.raises(CheckpointError, match=r"pickled data .* too few"):
        io._network_from_checkpoint(b"")


def test_a_network_holding_nan_is_not_pickled(make_network):
    net = make_network(SPECS)
    net[1].bias[0] = np.nan  # through the view, past Dense's own check
    with pytest.raises(ValueError, match=r"\[pickle\] layers.1.bias holds NaN or inf; such a "
                                         r"network cannot be loaded again, so it is not "
                                         r"pickled or copied"):
        copy.deepcopy(net)


def test_a_network_appearing_twice_is_copied_once(make_network):
    net = make_network(SPECS)
    a, b = copy.deepcopy([net, net])
    assert a is b and a is not net
    a, b = pickle.loads(pickle.dumps([net, net]))
    assert a is b


# ---- optimizers -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_net_and_optimizer_restore_together_and_continue_bitwise(how, name, dtype, make_network,
                                                                  rng):
    net = make_network(SPECS, dtype=dtype, seed=2)
    opt = OPTIMIZERS[name](net)
    X, y = data(net, rng)
    train(net, X, y, optimizer=opt)
    pair = (net, opt)
    net2, opt2 = pickle.loads(pickle.dumps(pair)) if how == "pickle" else copy.deepcopy(pair)
    assert opt2.net is net2 and type(opt2) is type(opt)
    assert_same_network(net, net2)
    assert opt2.hyperparameters == opt.hyperparameters
    assert opt2.step_count == opt.step_count
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    for p in sd["state"]:
        for k in sd["state"][p]:
            np.testing.assert_array_equal(sd["state"][p][k], sd2["state"][p][k])
            assert not np.shares_memory(opt._state[p][k], opt2._state[p][k])
    for n, o in ((net, opt), (net2, opt2)):
        train(n, X, y, optimizer=o, epochs=3)
    assert bits(net2) == bits(net)


def test_an_optimizer_pickled_alone_keeps_its_state_not_its_network_object(make_network,
                                                                          rng):
    """An optimizer holds its network's parameters but only a weak reference to the
    Network (Optimizer.net): unpickled alone, the network object that came with it
    is freed, as for any optimizer whose network was dropped. Pickle them together."""
    net = make_network(SPECS)
    opt = optim.Adam(net)
    train(net, *data(net, rng), optimizer=opt)
    opt2 = pickle.loads(pickle.dumps(opt))
    assert opt2.step_count == opt.step_count
    np.testing.assert_array_equal(opt2.state_dict()["state"]["layers.0.weight"]["exp_avg"],
                                  opt.state_dict()["state"]["layers.0.weight"]["exp_avg"])
    with pytest.raises(RuntimeError, match=r"\[Adam.net\] the network this optimizer was built "
                                           r"on has been freed"):
        _ = opt2.net
    net2, opt2 = pickle.loads(pickle.dumps((net, opt)))
    assert opt2.net is net2


def test_an_optimizer_whose_network_is_gone_does_not_pickle(make_network):
    opt = optim.Adam(make_network(SPECS))  # the network is freed at once
    with pytest.raises(RuntimeError, match=r"\[pickle\] the network this Adam was built on has "
                                           r"been freed; an optimizer is pickled with its "
                                           r"network"):
        pickle.dumps(opt)


def test_the_optimizer_fit_remembers_travels_with_the_network(make_network, rng):
    """fit without an optimizer continues with the one it made before (net._fit_optimizer);
    a copy continues the same way."""
    net = make_network(SPECS, seed=3)
    X, y = data(net, rng)
    train(net, X, y)  # fit makes an Adam and remembers it
    opt = net._fit_optimizer
    clone = copy.deepcopy(net)
    assert clone._fit_optimizer is not None and clone._fit_optimizer.net is clone
    assert clone._fit_optimizer.step_count == opt.step_count
    train(net, X, y)
    train(clone, X, y)
    assert bits(clone) == bits(net)
    # pickled with it, that optimizer is the restored network's, not a second one
    net2, opt2 = pickle.loads(pickle.dumps((net, opt)))
    assert opt2 is net2._fit_optimizer
    opt3, net3 = pickle.loads(pickle.dumps((opt, net)))
    assert opt3 is net3._fit_optimizer


def test_an_optimizer_restored_onto_another_architecture_is_refused(make_network):
    net = make_network(SPECS)
    _, (_, payload) = optim.Adam(net).__reduce__()
    other = make_network([(5, 3)])
    with pytest.raises(CheckpointError, match=r"the optimizer's network differs"):
        io._optimizer_from_checkpoint(other, payload)


# ---- schedules and estimators -----------------------------------------------------------

@pytest.mark.parametrize("make_schedule", [
    lambda o: optim.StepLR(o, step_size=2, gamma=0.5),
    lambda o: optim.CosineAnnealingLR(o, T_max=5, eta_min=1e-4),
    lambda o: optim.ReduceLROnPlateau(o, patience=0, factor=0.5),
])
def test_a_schedule_pickles_with_its_optimizer(make_schedule, make_network, rng):
    net = make_network(SPECS)
    opt = optim.Adam(net, lr=1e-2)
    schedule = make_schedule(opt)
    X, y = data(net, rng)
    bprop.fit(net, X, y, optimizer=opt, epochs=3, batch_size=8, seed=0, callbacks=[schedule])
    net2, opt2, schedule2 = pickle.loads(pickle.dumps((net, opt, schedule)))
    assert schedule2.optimizer is opt2 and opt2.net is net2
    assert schedule2.state_dict() == schedule.state_dict()
    assert opt2.lr == opt.lr
    alone = copy.deepcopy(schedule)
    assert alone.optimizer is not opt and alone.optimizer.lr == opt.lr


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("estimator", ["MLPClassifier", "MLPRegressor"])
def test_a_fitted_sklearn_estimator_pickles(estimator, how, rng):
    sklearn = pytest.importorskip("bprop.sklearn")
    X = rng.standard_normal((40, 4))
    y = rng.integers(0, 3, 40) if estimator == "MLPClassifier" else rng.standard_normal(40)
    model = getattr(sklearn, estimator)(hidden_layer_sizes=(8,), max_iter=5, random_state=0)
    with pytest.warns(Warning):  # ConvergenceWarning after 5 iterations
        model.fit(X, y)
    clone = pickle.loads(pickle.dumps(model)) if how == "pickle" else copy.deepcopy(model)
    np.testing.assert_array_equal(clone.predict(X), model.predict(X))
    assert_same_network(model._net, clone._net)


def test_a_copy_is_freed_when_its_last_reference_goes(make_network, rng):
    """A copy of a fitted network (which carries fit's optimizer) makes no reference
    cycle: reference counting frees it, as it frees the original."""
    net = make_network(SPECS)
    train(net, *data(net, rng))
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for how in ("deepcopy", "pickle"):
            clone = copy.deepcopy(net) if how == "deepcopy" else pickle.loads(pickle.dumps(net))
            assert clone._fit_optimizer is not None
            alive = weakref.ref(clone)
            del clone
            assert alive() is None
    finally:
        if was:
            gc.enable()


def test_a_layer_pickles_as_its_description_until_it_joins_a_network():
    layer = bprop.Dense(3, 4, activation="leaky_relu", negative_slope=0.2)
    for twin in (pickle.loads(pickle.dumps(layer)), copy.copy(layer), copy.deepcopy(layer)):
        assert twin is not layer and repr(twin) == repr(layer)
        bprop.Network([twin], seed=0)  # a fresh, unattached layer
    net = bprop.Network([layer], seed=0)
    for how in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match=r"\[Dense\] a layer of a Network cannot be pickled "
                                            "or copied on its own"):
            how(net.layers[0])
