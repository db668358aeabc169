"""bprop.optim: every optimizer against its update written in NumPy from the
paper's equations (and against torch.optim where PyTorch is installed), state
dicts, hyperparameter checks and learning-rate schedules."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest

import bprop
from bprop import optim

SPECS = [(3, 4, "tanh"), (4, 2)]
STEPS = 6


# ---- the updates from the papers, in NumPy ----------------------------------------------

class NumpySGD:
    """SGD with momentum (Polyak; Nesterov as in Sutskever et al. 2013) and L2
    decay, in the form torch.optim.SGD documents."""

    def __init__(self, lr, momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0.0):
        self.lr, self.mu, self.nesterov = lr, momentum, nesterov
        self.wd, self.damp = weight_decay, dampening
        self.buf = {}

    def update(self, key, p, g):
        g = g + self.wd * p
        if self.mu:
            b = self.buf.get(key)
            b = g.copy() if b is None else self.mu * b + (1 - self.damp) * g
            self.buf[key] = b
            g = g + self.mu * b if self.nesterov else b
        return p - self.lr * g


class NumpyAdam:
    """Algorithm 1 of Kingma & Ba (2015): bias-corrected moments; decoupled decay
    (Loshchilov & Hutter 2019) for AdamW."""

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled=False):
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.wd, self.decoupled = weight_decay, decoupled
        self.m, self.v, self.t = {}, {}, {}

    def update(self, key, p, g):
        if self.decoupled:
            p = p * (1 - self.lr * self.wd)
        else:
            g = g + self.wd * p
        t = self.t[key] = self.t.get(key, 0) + 1
        m = self.m[key] = self.b1 * self.m.get(key, 0) + (1 - self.b1) * g
        v = self.v[key] = self.b2 * self.v.get(key, 0) + (1 - self.b2) * g * g
        m_hat = m / (1 - self.b1 ** t)
        v_hat = v / (1 - self.b2 ** t)
        return p - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


class NumpyRMSprop:
    """Hinton's RMSprop (lecture 6e), centered as in Graves (2013), with momentum."""

    def __init__(self, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False):
        self.lr, self.alpha, self.eps, self.wd = lr, alpha, eps, weight_decay
        self.mu, self.centered = momentum, centered
        self.s, self.a, self.buf = {}, {}, {}

    def update(self, key, p, g):
        g = g + self.wd * p
        s = self.s[key] = self.alpha * self.s.get(key, 0) + (1 - self.alpha) * g * g
        if self.centered:
            a = self.a[key] = self.alpha * self.a.get(key, 0) + (1 - self.alpha) * g
            denom = np.sqrt(s - a * a) + self.eps
        else:
            denom = np.sqrt(s) + self.eps
        if self.mu > 0:
            b = self.buf[key] = self.mu * self.buf.get(key, 0) + g / denom
            return p - self.lr * b
        return p - self.lr * g / denom


CONFIGS = [
    ("SGD", dict(lr=0.1), NumpySGD),
    ("SGD", dict(lr=0.1, momentum=0.9), NumpySGD),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3), NumpySGD),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True), NumpySGD),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1), NumpySGD),
    ("SGD", dict(lr=0.1, weight_decay=0.01), NumpySGD),
    ("Adam", dict(lr=1e-2), NumpyAdam),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1), NumpyAdam),
    ("AdamW", dict(lr=1e-2), NumpyAdam),
    ("AdamW", dict(lr=1e-2, betas=(0.5, 0.99), weight_decay=0.3), NumpyAdam),
    ("RMSprop", dict(lr=1e-2), NumpyRMSprop),
    ("RMSprop", dict(lr=1e-2, alpha=0.9, weight_decay=0.05), NumpyRMSprop),
    ("RMSprop", dict(lr=1e-2, centered=True), NumpyRMSprop),
    ("RMSprop", dict(lr=1e-2, momentum=0.9), NumpyRMSprop),
    ("RMSprop", dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01), NumpyRMSprop),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, kw, _ in CONFIGS]


def _reference(name, kwargs, cls):
    kw = dict(kwargs)
    if name == "AdamW":
        kw.setdefault("weight_decay", 1e-2)
        return cls(decoupled=True, **kw)
    return cls(**kw)


def _net_with_gradients(make_network, dtype="float64"):
    """A network whose gradient buffers are live (one backward has run)."""
    net = make_network(SPECS, dtype=dtype, seed=4)
    X = np.ones((2, 3), dtype=net.dtype)
    net.backward(np.zeros_like(net.forward(X)))
    return net


def _random_gradients(net, rng):
    grads = {}
    for name, _, g in net.parameters():
        g[...] = rng.standard_normal(g.shape)
        grads[name] = g.copy()
    return grads


@pytest.mark.parametrize("name,kwargs,cls", CONFIGS, ids=IDS)
def test_optimizer_matches_the_papers_update(name, kwargs, cls, make_network, rng):
    net = _net_with_gradients(make_network)
    opt = getattr(optim, name)(net, **kwargs)
    ref = _reference(name, kwargs, cls)
    expected = {n: p.copy() for n, p, _ in net.parameters()}
    for _ in range(STEPS):
        grads = _random_gradients(net, rng)
        opt.step()
        for n in expected:
            expected[n] = ref.update(n, expected[n], grads[n])
        for n, p, _ in net.parameters():
            np.testing.assert_allclose(p, expected[n], rtol=1e-12, atol=1e-14, err_msg=n)
    assert opt.step_count == STEPS


@pytest.mark.parametrize("name,kwargs,cls", CONFIGS[1::3], ids=IDS[1::3])
def test_optimizer_in_float32_follows_the_float64_update(name, kwargs, cls, make_network,
                                                         rng):
    net = _net_with_gradients(make_network, "float32")
    opt = getattr(optim, name)(net, **kwargs)
    ref = _reference(name, kwargs, cls)
    expected = {n: p.astype(np.float64) for n, p, _ in net.parameters()}
    for _ in range(STEPS):
        grads = _random_gradients(net, rng)
        opt.step()
        for n in expected:
            expected[n] = ref.update(n, expected[n], grads[n].astype(np.float64))
    for n, p, _ in net.parameters():
        assert p.dtype == np.float32
        np.testing.assert_allclose(p, expected[n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_optimizer_updates_the_networks_storage_in_place(make_network, rng):
    net = _net_with_gradients(make_network)
    weight = net[0].weight
    before = weight.copy()
    _random_gradients(net, rng)
    optim.Adam(net).step()
    assert net[0].weight is weight and not np.array_equal(weight, before)


# ---- against torch.optim ------------------------------------------------------------------

def test_optimizers_match_torch(make_network, rng):
    torch = pytest.importorskip("torch")
    for name, kwargs, _ in CONFIGS:
        net = _net_with_gradients(make_network)
        params = [torch.tensor(p.copy()) for _, p, _ in net.parameters()]
        opt = getattr(optim, name)(net, **kwargs)
        topt = getattr(torch.optim, name)(params, **kwargs)
        for _ in range(STEPS):
            grads = _random_gradients(net, rng)
            for tp, g in zip(params, grads.values()):
                tp.grad = torch.tensor(g)
            opt.step()
            topt.step()
        for (n, p, _), tp in zip(net.parameters(), params):
            np.testing.assert_allclose(p, tp.numpy(), rtol=1e-10, atol=1e-13,
                                       err_msg=f"{name} {kwargs} {n}")


def test_schedules_match_torch(make_network):
    torch = pytest.importorskip("torch")
    metrics = [5.0, 4.0, 4.0, 4.0, 3.9999, 3.0, 3.0, 3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0]
    makers = [
        (lambda o: optim.StepLR(o, 3, gamma=0.5),
         lambda o: torch.optim.lr_scheduler.StepLR(o, 3, gamma=0.5)),
        (lambda o: optim.CosineAnnealingLR(o, 10, eta_min=1e-3),
         lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10, eta_min=1e-3)),
        (lambda o: optim.ReduceLROnPlateau(o, factor=0.5, patience=1, cooldown=1),
         lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1,
                                                              cooldown=1)),
    ]
    for mine, theirs in makers:
        net = make_network(SPECS)
        opt = optim.SGD(net, lr=0.1)
        tparam = torch.zeros(1, requires_grad=True)
        topt = torch.optim.SGD([tparam], lr=0.1)
        sched, tsched = mine(opt), theirs(topt)
        for value in metrics:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                topt.step()
                if isinstance(sched, optim.ReduceLROnPlateau):
                    sched.step(value)
                    tsched.step(value)
                else:
                    sched.step()
                    tsched.step()
            assert opt.lr == pytest.approx(topt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)


# ---- state dicts ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs,cls", CONFIGS, ids=IDS)
def test_state_dict_round_trip_continues_identically(name, kwargs, cls, make_network, rng):
    nets = [_net_with_gradients(make_network) for _ in range(2)]
    opts = [getattr(optim, name)(n, **kwargs) for n in nets]
    for _ in range(3):
        grads = _random_gradients(nets[0], rng)
        opts[0].step()
    state = opts[0].state_dict()
    assert state["optimizer"] == name and state["step"] == 3
    # the state is a copy: changing it does not change the optimizer
    for arrays in state["state"].values():
        for a in arrays.values():
            a += 1.0
    state = opts[0].state_dict()
    for (_, src, _), (_, dst, _) in zip(nets[0].parameters(), nets[1].parameters()):
        dst[...] = src
    fresh = getattr(optim, name)(nets[1], lr=123.0)  # hyperparameters come from the state
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.hyperparameters == opts[0].hyperparameters and fresh.step_count == 3
    for _ in range(3):
        grads = _random_gradients(nets[0], rng)
        for (_, _, g), value in zip(nets[1].parameters(), grads.values()):
            g[...] = value
        opts[0].step()
        fresh.step()
    for (n, a, _), (_, b, _) in zip(nets[0].parameters(), nets[1].parameters()):
        np.testing.assert_array_equal(a, b, err_msg=n)


def _corruptions(state):
    def edit(fn):
        s = copy.deepcopy(state)
        fn(s)
        return s

    first = next(iter(state["state"]))
    return [
        ("expected a dict", [1, 2]),
        ("expected the keys", edit(lambda s: s.pop("step"))),
        ("is of optimizer 'SGD', not 'Adam'", edit(lambda s: s.update(optimizer="SGD"))),
        ("step must be an int >= 0", edit(lambda s: s.update(step=-1))),
        ("step must be an int >= 0", edit(lambda s: s.update(step=1.5))),
        ("hyperparameters must be a dict", edit(lambda s: s["hyperparameters"].pop("eps"))),
        (r"lr must be >= 0.0", edit(lambda s: s["hyperparameters"].update(lr=-1.0))),
        (r"betas must be a pair", edit(lambda s: s["hyperparameters"].update(betas=0.9))),
        ("state must be a dict keyed by", edit(lambda s: s["state"].pop(first))),
        (r"must hold \['exp_avg', 'exp_avg_sq'\]",
         edit(lambda s: s["state"][first].pop("exp_avg"))),
        ("has shape", edit(lambda s: s["state"][first].update(exp_avg=np.zeros(2)))),
        ("must be a floating numpy array",
         edit(lambda s: s["state"][first].update(exp_avg=s["state"][first]["exp_avg"].tolist()))),
        ("holds NaN or inf",
         edit(lambda s: s["state"][first]["exp_avg"].__setitem__((0, 0), np.nan))),
    ]


def test_load_state_dict_refuses_bad_state_and_changes_nothing(make_network, rng):
    net = _net_with_gradients(make_network)
    opt = optim.Adam(net, lr=0.01)
    _random_gradients(net, rng)
    opt.step()
    state = opt.state_dict()
    for match, bad in _corruptions(state):
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
        after = opt.state_dict()
        assert after["hyperparameters"] == state["hyperparameters"]
        assert after["step"] == state["step"]
        for n in state["state"]:
            for k in state["state"][n]:
                np.testing.assert_array_equal(after["state"][n][k], state["state"][n][k])


def test_load_state_dict_refuses_another_network(make_network):
    small = optim.SGD(make_network(SPECS), lr=0.1, momentum=0.9)
    other = optim.SGD(make_network([(3, 5)]), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="state must be a dict keyed by the network's"):
        other.load_state_dict(small.state_dict())


def test_state_follows_the_hyperparameters(make_network):
    net = make_network(SPECS)
    assert optim.SGD(net, lr=0.1).state_dict()["state"]["layers.0.weight"] == {}
    sgd = optim.SGD(net, lr=0.1, momentum=0.5)
    assert set(sgd.state_dict()["state"]["layers.0.weight"]) == {"momentum_buffer"}
    rms = optim.RMSprop(net, centered=True, momentum=0.5)
    assert set(rms.state_dict()["state"]["layers.1.bias"]) == {"square_avg", "grad_avg",
                                                               "momentum_buffer"}
    # loading a state with momentum into an SGD without it brings the buffers along
    plain = optim.SGD(net, lr=0.1)
    plain.load_state_dict(sgd.state_dict())
    assert plain.hyperparameters["momentum"] == 0.5


# ---- hyperparameters --------------------------------------------------------------------

@pytest.mark.parametrize("make,exc,match", [
    (lambda n: optim.SGD(n, lr=-0.1), ValueError, r"\[SGD\] lr must be >= 0"),
    (lambda n: optim.SGD(n, lr=0.1, momentum=-1), ValueError, r"momentum must be >= 0"),
    (lambda n: optim.SGD(n, lr=0.1, nesterov=True), ValueError,
     r"Nesterov momentum requires momentum > 0 and dampening == 0"),
    (lambda n: optim.SGD(n, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError,
     r"Nesterov"),
    (lambda n: optim.SGD(n, lr=0.1, weight_decay=-1e-3), ValueError, r"weight_decay must be"),
    (lambda n: optim.SGD(n, lr=float("nan")), ValueError, r"lr must be finite"),
    (lambda n: optim.SGD(n, lr="0.1"), TypeError, r"lr must be a real number"),
    (lambda n: optim.SGD(n, lr=0.1, nesterov=1), TypeError, r"nesterov must be a bool"),
    (lambda n: optim.Adam(n, betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be < 1.0"),
    (lambda n: optim.Adam(n, betas=(-0.1, 0.9)), ValueError, r"betas\[0\] must be >= 0"),
    (lambda n: optim.Adam(n, betas=0.9), TypeError, r"betas must be a pair"),
    (lambda n: optim.Adam(n, eps=-1.0), ValueError, r"\[Adam\] eps must be >= 0"),
    (lambda n: optim.AdamW(n, weight_decay=-1.0), ValueError, r"\[AdamW\] weight_decay"),
    (lambda n: optim.RMSprop(n, alpha=1.5), ValueError, r"\[RMSprop\] alpha must be <= 1"),
    (lambda n: optim.RMSprop(n, centered="yes"), TypeError, r"centered must be a bool"),
    (lambda n: optim.Adam("net"), TypeError, r"\[Adam\] net must be a bprop.Network"),
])
def test_hyperparameters_are_checked(make, exc, match, make_network):
    with pytest.raises(exc, match=match):
        make(make_network(SPECS))


def test_sgd_requires_lr(make_network):
    with pytest.raises(TypeError):
        optim.SGD(make_network(SPECS))


def test_defaults_are_torchs(make_network):
    net = make_network(SPECS)
    assert optim.Adam(net).hyperparameters == dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                                   weight_decay=0.0, lazy=False)
    assert optim.AdamW(net).hyperparameters["weight_decay"] == 1e-2
    assert optim.RMSprop(net).hyperparameters == dict(lr=1e-2, alpha=0.99, eps=1e-8,
                                                      weight_decay=0.0, momentum=0.0,
                                                      centered=False)


def test_lr_is_settable_and_checked(make_network, rng):
    net = _net_with_gradients(make_network)
    opt = optim.SGD(net, lr=0.1)
    opt.lr = 0.5
    grads = _random_gradients(net, rng)
    before = {n: p.copy() for n, p, _ in net.parameters()}
    opt.step()
    for n, p, _ in net.parameters():
        np.testing.assert_allclose(p, before[n] - 0.5 * grads[n], rtol=1e-14)
    with pytest.raises(ValueError, match=r"\[SGD.lr\] lr must be >= 0"):
        opt.lr = -1
    assert opt.lr == 0.5


def test_step_before_backward_is_an_error(make_network):
    opt = optim.Adam(make_network(SPECS))
    with pytest.raises(RuntimeError, match=r"\[Adam.step\] the network has no gradients yet"):
        opt.step()


# ---- schedules ------------------------------------------------------------------------------

def test_step_lr(make_network):
    opt = optim.SGD(make_network(SPECS), lr=1.0)
    sched = optim.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(6):
        sched.step()
        lrs.append(opt.lr)
    assert lrs == [1.0, 0.5, 0.5, 0.25, 0.25, 0.125]


def test_cosine_annealing(make_network):
    opt = optim.Adam(make_network(SPECS), lr=0.1)
    sched = optim.CosineAnnealingLR(opt, T_max=4, eta_min=0.01)
    lrs = []
    for _ in range(4):
        sched.step()
        lrs.append(opt.lr)
    expected = [0.01 + 0.09 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(1, 5)]
    assert lrs == pytest.approx(expected, rel=1e-14)
    assert lrs[-1] == pytest.approx(0.01)


def test_reduce_lr_on_plateau(make_network):
    opt = optim.SGD(make_network(SPECS), lr=1.0)
    sched = optim.ReduceLROnPlateau(opt, factor=0.5, patience=2, min_lr=0.2)
    lrs = []
    for value in [3, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]:
        sched.step(value)
        lrs.append(opt.lr)
    # 3 bad epochs (more than patience=2) halve lr; min_lr bounds it
    assert lrs == [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2, 0.2]
    maximise = optim.ReduceLROnPlateau(optim.SGD(make_network(SPECS), lr=1.0), mode="max",
                                       patience=0)
    maximise.step(1.0)
    maximise.step(2.0)
    assert maximise.lr == 1.0
    maximise.step(2.0)
    assert maximise.lr == pytest.approx(0.1)


@pytest.mark.parametrize("make", [
    lambda o: optim.StepLR(o, 3, gamma=0.5),
    lambda o: optim.CosineAnnealingLR(o, 7, eta_min=1e-4),
    lambda o: optim.ReduceLROnPlateau(o, patience=1),
])
def test_schedule_state_dict_round_trip(make, make_network):
    opt = optim.Adam(make_network(SPECS), lr=0.1)
    sched = make(opt)
    for value in [3.0, 2.0, 2.5, 2.5]:
        sched.step(value) if isinstance(sched, optim.ReduceLROnPlateau) else sched.step()
    state = sched.state_dict()
    opt2 = optim.Adam(make_network(SPECS), lr=opt.lr)
    sched2 = make(opt2)
    sched2.load_state_dict(state)
    assert sched2.state_dict() == state
    for value in [2.5, 2.5, 1.0]:
        for s in (sched, sched2):
            s.step(value) if isinstance(s, optim.ReduceLROnPlateau) else s.step()
    assert opt2.lr == opt.lr
    with pytest.raises(ValueError, match="expected a dict with the keys"):
        sched2.load_state_dict({"scheduler": type(sched).__name__})
    bad = dict(state, last_epoch=-3)
    with pytest.raises(ValueError, match="last_epoch must be >= 0"):
        sched2.load_state_dict(bad)
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]


def test_schedule_arguments_are_checked(make_network):
    opt = optim.SGD(make_network(SPECS), lr=0.1)
    with pytest.raises(ValueError, match=r"\[StepLR\] step_size must be >= 1"):
        optim.StepLR(opt, 0)
    with pytest.raises(ValueError, match=r"\[CosineAnnealingLR\] T_max must be >= 1"):
        optim.CosineAnnealingLR(opt, 0)
    with pytest.raises(ValueError, match=r"\[ReduceLROnPlateau\] factor must be < 1.0"):
        optim.ReduceLROnPlateau(opt, factor=1.0)
    with pytest.raises(ValueError, match=r"mode must be 'min' or 'max'"):
        optim.ReduceLROnPlateau(opt, mode="up")
    with pytest.raises(TypeError, match=r"\[StepLR\] optimizer must be a bprop.optim"):
        optim.StepLR("opt", 3)


def test_schedules_are_fit_callbacks(make_network, rng):
    X = rng.standard_normal((32, 3))
    y = rng.integers(0, 2, size=32)
    net = make_network(SPECS)
    opt = optim.SGD(net, lr=0.1)
    history = bprop.fit(net, X, y, optimizer=opt, epochs=5, callbacks=[optim.StepLR(opt, 2)])
    assert history.lr == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    plateau = optim.ReduceLROnPlateau(opt, patience=0, factor=0.5, threshold=10.0)
    history = bprop.fit(net, X, y, optimizer=opt, epochs=3, callbacks=[plateau],
                        validation_split=0.25, seed=0)
    # threshold=10 makes every epoch after the first a bad one
    assert history.lr == pytest.approx([0.001, 0.001, 0.0005])
    with pytest.raises(KeyError, match="monitor 'val_accuracy' is not among the fit logs"):
        bprop.fit(net, X, y, optimizer=opt, epochs=1,
                  callbacks=[optim.ReduceLROnPlateau(opt, monitor="val_accuracy")])


def test_the_core_names_each_rules_state_and_refuses_a_plan_without_it():
    # the state slots are named once, in the core (cpp/src/kernels.cpp state_names)
    from bprop import _core
    assert _core.update_state_names("adam", {}) == ["exp_avg", "exp_avg_sq"]
    assert _core.update_state_names("sgd", {"momentum": 0.0}) == []
    assert _core.update_state_names("rmsprop", {"momentum": 0.9, "centered": True}) == [
        "square_avg", "grad_avg", "momentum_buffer"]
    n = 3
    with pytest.raises(ValueError, match=r"has no state 'exp_avg_sq'"):
        _core.UpdatePlan64("adam", {"lr": 0.1}, [n], [{"exp_avg": np.zeros(n)}])
    with pytest.raises(ValueError, match=r"state this rule does not keep"):
        _core.UpdatePlan64("sgd", {"lr": 0.1}, [n], [{"momentum_buffer": np.zeros(n)}])
    with pytest.raises(ValueError, match=r"exp_avg has 2 elements, expected 3"):
        _core.UpdatePlan64("adam", {"lr": 0.1}, [n],
                           [{"exp_avg": np.zeros(2), "exp_avg_sq": np.zeros(n)}])
