"""Learning-rate schedules stepped per epoch or per minibatch step (issue 14):
LinearLR and OneCycleLR against torch.optim.lr_scheduler step by step, the
existing schedules over 50 steps, fit stepping a schedule per step as a manual
loop and a torch loop do, and the arguments' checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import bprop
from bprop import optim

SPECS = [(3, 4, "tanh"), (4, 2)]


def _momentum(hyper: dict) -> float:
    return hyper["betas"][0] if "betas" in hyper else hyper["momentum"]


def _lr_sequences(torch, mine, theirs, make_opt, make_topt, steps=50, values=None):
    """The (lr, momentum) of both at construction and after each of `steps` - 1
    scheduler steps, each stepped after an optimizer step as torch wants."""
    opt = make_opt()
    tparam = torch.zeros(1, requires_grad=True)
    topt = make_topt([tparam])
    sched, tsched = mine(opt), theirs(topt)
    got, want = [], []
    for k in range(steps):
        group = topt.param_groups[0]
        hyper = opt.hyperparameters
        got.append((opt.lr, _momentum(hyper) if "betas" in hyper or "momentum" in hyper
                    else None))
        want.append((group["lr"], _momentum(group) if "betas" in group or "momentum" in group
                     else None))
        if k == steps - 1:
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: lr_scheduler.step() before optimizer.step()
            topt.step()
            if values is None:
                sched.step()
                tsched.step()
            else:
                sched.step(values[k])
                tsched.step(values[k])
    return got, want


def _assert_same(got, want, rel=1e-15):
    for k, ((lr, m), (tlr, tm)) in enumerate(zip(got, want)):
        assert lr == pytest.approx(tlr, rel=rel, abs=0.0), f"lr of step {k}"
        if tm is not None:
            assert m == pytest.approx(tm, rel=rel, abs=0.0), f"momentum of step {k}"


LINEAR = [dict(), dict(start_factor=0.1, end_factor=0.7, total_iters=20),
          dict(start_factor=1.0, end_factor=0.0, total_iters=30),
          dict(start_factor=0.25, total_iters=1)]


@pytest.mark.parametrize("kwargs", LINEAR)
def test_linear_lr_matches_torch_over_50_steps(make_network, kwargs):
    torch = pytest.importorskip("torch")
    net = make_network(SPECS)
    got, want = _lr_sequences(
        torch, lambda o: optim.LinearLR(o, **kwargs),
        lambda o: torch.optim.lr_scheduler.LinearLR(o, **kwargs),
        lambda: optim.SGD(net, lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05))
    _assert_same(got, want)
    # the defaults are torch's: 1/3 -> 1 in 5 steps
    if not kwargs:
        assert got[0][0] == pytest.approx(0.05 / 3, rel=1e-15)
        assert all(lr == pytest.approx(0.05, rel=1e-15) for lr, _ in got[5:])


ONE_CYCLE = [dict(total_steps=50), dict(epochs=5, steps_per_epoch=10),
             dict(total_steps=50, anneal_strategy="linear"),
             dict(total_steps=50, three_phase=True),
             dict(total_steps=50, three_phase=True, anneal_strategy="linear"),
             dict(total_steps=50, pct_start=0.5, div_factor=10.0, final_div_factor=100.0,
                  base_momentum=0.8, max_momentum=0.9),
             dict(total_steps=50, pct_start=0.0), dict(total_steps=50, pct_start=1.0),
             dict(total_steps=50, cycle_momentum=False)]


@pytest.mark.parametrize("kwargs", ONE_CYCLE)
@pytest.mark.parametrize("which", ["Adam", "AdamW", "SGD", "RMSprop"])
def test_one_cycle_lr_and_momentum_match_torch_over_50_steps(make_network, kwargs, which):
    torch = pytest.importorskip("torch")
    net = make_network(SPECS)
    extra = {"SGD": dict(lr=0.1, momentum=0.9), "RMSprop": dict(momentum=0.5)}.get(which, {})
    got, want = _lr_sequences(
        torch, lambda o: optim.OneCycleLR(o, 0.1, **kwargs),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.1, **kwargs),
        lambda: getattr(optim, which)(net, **extra),
        lambda p: getattr(torch.optim, which)(p, **extra))
    _assert_same(got, want)  # cycle_momentum=False: both keep the optimizer's momentum


def test_one_cycle_defaults_are_torchs(make_network):
    opt = optim.Adam(make_network(SPECS), lr=123.0)
    sched = optim.OneCycleLR(opt, max_lr=0.2, total_steps=100)
    assert (sched.pct_start, sched.anneal_strategy, sched.cycle_momentum, sched.base_momentum,
            sched.max_momentum, sched.div_factor, sched.final_div_factor,
            sched.three_phase) == (0.3, "cos", True, 0.85, 0.95, 25.0, 1e4, False)
    assert sched.interval == "step"
    assert opt.lr == pytest.approx(0.2 / 25, rel=1e-15)  # the optimizer's own lr is not used
    assert opt.hyperparameters["betas"] == (0.95, 0.999)
    lrs = []
    for _ in range(99):
        sched.step()
        lrs.append(opt.lr)
    assert max(lrs) == pytest.approx(0.2, rel=1e-15)
    assert lrs[-1] == pytest.approx(0.2 / 25 / 1e4, rel=1e-12)
    sched.step()  # step total_steps: allowed, as in torch
    with pytest.raises(ValueError, match=r"\[OneCycleLR.step\] tried to step 101 times, but "
                                         r"total_steps is 100"):
        sched.step()


def test_one_cycle_without_momentum_cycling_leaves_the_momentum(make_network):
    opt = optim.SGD(make_network(SPECS), lr=0.1, momentum=0.5)
    sched = optim.OneCycleLR(opt, 1.0, total_steps=10, cycle_momentum=False)
    for _ in range(10):
        sched.step()
        assert opt.hyperparameters["momentum"] == 0.5
    plain = optim.SGD(make_network(SPECS), lr=0.1)  # momentum 0: nothing to cycle
    optim.OneCycleLR(plain, 1.0, total_steps=10, cycle_momentum=False)
    with pytest.raises(ValueError, match=r"\[OneCycleLR\] cycle_momentum=True cycles the "
                                         r"optimizer's beta1 or momentum, but SGD\(.*\) has "
                                         r"momentum 0"):
        optim.OneCycleLR(plain, 1.0, total_steps=10)


@pytest.mark.parametrize("name", ["StepLR", "CosineAnnealingLR", "ReduceLROnPlateau"])
def test_the_existing_schedules_match_torch_over_50_steps(make_network, name, rng):
    torch = pytest.importorskip("torch")
    net = make_network(SPECS)
    kwargs = {"StepLR": dict(step_size=7, gamma=0.5),
              "CosineAnnealingLR": dict(T_max=20, eta_min=1e-3),
              "ReduceLROnPlateau": dict(factor=0.5, patience=2, cooldown=1)}[name]
    values = list(np.repeat(np.arange(10.0, 0.0, -1.0), 5)) if name == "ReduceLROnPlateau" \
        else None
    got, want = _lr_sequences(
        torch, lambda o: getattr(optim, name)(o, **kwargs),
        lambda o: getattr(torch.optim.lr_scheduler, name)(o, **kwargs),
        lambda: optim.Adam(net, lr=0.1), lambda p: torch.optim.Adam(p, lr=0.1), values=values)
    _assert_same(got, want, rel=1e-14 if name == "CosineAnnealingLR" else 1e-15)


# ---- fit steps a schedule per step or per epoch -----------------------------------------

def _data(rng, n=40):
    X = rng.standard_normal((n, 3))
    y = rng.integers(0, 2, size=n)
    return X, y


@pytest.mark.parametrize("make", [
    lambda o: optim.OneCycleLR(o, 0.5, epochs=3, steps_per_epoch=5),
    lambda o: optim.LinearLR(o, 0.2, total_iters=7, interval="step"),
    lambda o: optim.CosineAnnealingLR(o, 15, eta_min=0.01, interval="step"),
    lambda o: optim.StepLR(o, 4, gamma=0.5, interval="step"),
])
def test_fit_steps_a_per_step_schedule_as_a_manual_loop_does(make_network, rng, make):
    X, y = _data(rng)  # 40 samples in minibatches of 8: 5 steps per epoch
    net = make_network(SPECS)
    opt = optim.SGD(net, lr=0.1, momentum=0.9)
    history = bprop.fit(net, X, y, optimizer=opt, epochs=3, batch_size=8, shuffle=False,
                        callbacks=[make(opt)])
    manual = make_network(SPECS)
    mopt = optim.SGD(manual, lr=0.1, momentum=0.9)
    sched = make(mopt)
    lrs = []
    for _ in range(3):
        lrs.append(mopt.lr)
        for lo in range(0, 40, 8):
            manual.train_step(X[lo:lo + 8], y[lo:lo + 8], "softmax_cross_entropy", mopt)
            sched.step()
    for (name, p, _), (_, q, _) in zip(net.parameters(), manual.parameters()):
        np.testing.assert_array_equal(p, q, err_msg=name)
    assert opt.lr == mopt.lr and opt.hyperparameters == mopt.hyperparameters
    assert history.lr == lrs  # the lr each epoch started with


def test_fit_with_one_cycle_matches_a_torch_loop(make_network, rng):
    torch = pytest.importorskip("torch")
    X, y = _data(rng)
    net = make_network(SPECS)
    model = net.to_torch()
    opt = optim.SGD(net, lr=0.1, momentum=0.9, nesterov=True)
    bprop.fit(net, X, y, optimizer=opt, epochs=3, batch_size=8, shuffle=False,
              callbacks=[optim.OneCycleLR(opt, 0.5, epochs=3, steps_per_epoch=5)])
    topt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    tsched = torch.optim.lr_scheduler.OneCycleLR(topt, 0.5, epochs=3, steps_per_epoch=5)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(3):
        for lo in range(0, 40, 8):
            topt.zero_grad()
            torch.nn.functional.cross_entropy(model(Xt[lo:lo + 8]), yt[lo:lo + 8]).backward()
            topt.step()
            tsched.step()
    theirs = [p.detach().numpy() for p in model.parameters()]
    mine = [p for _, p, _ in net.parameters()]
    for p, q in zip(mine, theirs):
        # float64, 15 steps of a tiny well-conditioned network: agreement to rounding
        np.testing.assert_allclose(p, q.T if p.ndim == 2 else q, rtol=1e-10, atol=1e-12)
    assert opt.lr == pytest.approx(topt.param_groups[0]["lr"], rel=1e-15)
    assert opt.hyperparameters["momentum"] == pytest.approx(
        topt.param_groups[0]["momentum"], rel=1e-15)


def test_an_epoch_schedule_is_not_stepped_per_batch(make_network, rng):
    X, y = _data(rng)
    net = make_network(SPECS)
    opt = optim.SGD(net, lr=1.0)
    sched = optim.LinearLR(opt, 0.5, total_iters=4)  # interval="epoch" by default
    history = bprop.fit(net, X, y, optimizer=opt, epochs=3, batch_size=8, callbacks=[sched])
    assert sched.last_epoch == 3
    assert history.lr == pytest.approx([0.5, 0.625, 0.75], rel=1e-15)


def test_a_one_cycle_too_short_for_the_fit_is_reported(make_network, rng):
    X, y = _data(rng)
    net = make_network(SPECS)
    opt = optim.Adam(net)
    with pytest.raises(ValueError, match=r"\[OneCycleLR.step\] tried to step 11 times, but "
                                         r"total_steps is 10"):
        bprop.fit(net, X, y, optimizer=opt, epochs=3, batch_size=8,
                  callbacks=[optim.OneCycleLR(opt, 0.1, total_steps=10)])


# ---- state --------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda o: optim.LinearLR(o, 0.1, 0.9, 6),
    lambda o: optim.OneCycleLR(o, 0.3, total_steps=20, three_phase=True),
])
def test_new_schedules_state_dict_round_trip(make_network, make):
    opt = optim.Adam(make_network(SPECS), lr=0.1)
    sched = make(opt)
    for _ in range(4):
        sched.step()
    state = sched.state_dict()
    opt2 = optim.Adam(make_network(SPECS), lr=0.1)
    sched2 = make(opt2)
    sched2.load_state_dict(state)
    opt2.load_state_dict(opt.state_dict())
    assert sched2.state_dict() == state
    for _ in range(5):
        sched.step()
        sched2.step()
        assert opt2.lr == opt.lr and opt2.hyperparameters == opt.hyperparameters
    with pytest.raises(ValueError, match="last_epoch must be >= 0"):
        sched2.load_state_dict(dict(state, last_epoch=-1))
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]


def test_one_cycle_state_past_its_end_is_refused(make_network):
    sched = optim.OneCycleLR(optim.Adam(make_network(SPECS)), 0.1, total_steps=5)
    with pytest.raises(ValueError, match=r"last_epoch must be <= total_steps=5, but got 6"):
        sched.load_state_dict(dict(sched.state_dict(), last_epoch=6))
    with pytest.raises(ValueError, match=r"anneal_strategy must be 'cos' or 'linear'"):
        sched.load_state_dict(dict(sched.state_dict(), anneal_strategy="exp"))


# ---- hostile arguments --------------------------------------------------------------------

def test_schedule_arguments_are_checked(make_network):
    opt = optim.SGD(make_network(SPECS), lr=0.1, momentum=0.9)
    cases = [
        (lambda: optim.LinearLR(opt, start_factor=0.0), ValueError,
         r"\[LinearLR\] start_factor must be > 0.0"),
        (lambda: optim.LinearLR(opt, start_factor=1.5), ValueError,
         r"\[LinearLR\] start_factor must be <= 1.0"),
        (lambda: optim.LinearLR(opt, end_factor=-0.1), ValueError,
         r"\[LinearLR\] end_factor must be >= 0.0"),
        (lambda: optim.LinearLR(opt, total_iters=0), ValueError,
         r"\[LinearLR\] total_iters must be >= 1"),
        (lambda: optim.LinearLR(opt, total_iters=2.5), TypeError,
         r"\[LinearLR\] total_iters must be an int"),
        (lambda: optim.LinearLR("opt"), TypeError,
         r"\[LinearLR\] optimizer must be a bprop.optim optimizer"),
        (lambda: optim.StepLR(opt, 3, interval="batch"), ValueError,
         r"\[StepLR\] interval must be 'epoch' or 'step', but got 'batch'"),
        (lambda: optim.OneCycleLR(opt, 0.1), ValueError,
         r"\[OneCycleLR\] give total_steps, or epochs and steps_per_epoch"),
        (lambda: optim.OneCycleLR(opt, 0.1, epochs=3), ValueError,
         r"\[OneCycleLR\] give total_steps, or epochs and steps_per_epoch"),
        (lambda: optim.OneCycleLR(opt, 0.0, total_steps=10), ValueError,
         r"\[OneCycleLR\] max_lr must be > 0.0"),
        (lambda: optim.OneCycleLR(opt, "0.1", total_steps=10), TypeError,
         r"\[OneCycleLR\] max_lr must be a real number"),
        (lambda: optim.OneCycleLR(opt, 0.1, total_steps=0), ValueError,
         r"\[OneCycleLR\] total_steps must be >= 1"),
        (lambda: optim.OneCycleLR(opt, 0.1, epochs=0, steps_per_epoch=3), ValueError,
         r"\[OneCycleLR\] epochs must be >= 1"),
        (lambda: optim.OneCycleLR(opt, 0.1, epochs=2, steps_per_epoch=None), ValueError,
         r"\[OneCycleLR\] give total_steps"),
        (lambda: optim.OneCycleLR(opt, 0.1, total_steps=10, pct_start=1.5), ValueError,
         r"\[OneCycleLR\] pct_start must be <= 1.0"),
        (lambda: optim.OneCycleLR(opt, 0.1, total_steps=10, pct_start=0.1), ValueError,
         r"\[OneCycleLR\] pct_start=0.1 of total_steps=10 makes a first phase of no steps"),
        (lambda: optim.OneCycleLR(opt, 0.1, total_steps=10, anneal_strategy="exp"),
         ValueError, r"\[OneCycleLR\] anneal_strategy must be 'cos' or 'linear'"),
        (lambda: optim.OneCycleLR(opt, 0.1, total_steps=10, cycle_momentum=1), TypeError,
         r"\[OneCycleLR\] cycle_momentum must be a bool"),
        (lambda: optim.OneCycleLR(opt, 0.1, total_steps=10, max_momentum=1.0), ValueError,
         r"\[OneCycleLR\] max_momentum must be < 1.0"),
        (lambda: optim.OneCycleLR(opt, 0.1, total_steps=10, div_factor=0), ValueError,
         r"\[OneCycleLR\] div_factor must be > 0.0"),
        (lambda: optim.OneCycleLR(opt, 0.1, total_steps=10, interval="batch"), ValueError,
         r"\[OneCycleLR\] interval must be 'epoch' or 'step'"),
    ]
    for make, kind, pattern in cases:
        before = (opt.lr, opt.hyperparameters)
        with pytest.raises(kind, match=pattern):
            make()
        assert (opt.lr, opt.hyperparameters) == before  # a refused schedule changes nothing
