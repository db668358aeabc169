"""Issue 14's parity with PyTorch (torch 2.13), float64: the largest differences.

    python bench/parity14.py

Prints, for each capability the tests check against torch, the largest absolute
difference seen on random data (seeded): the new activations (a Dense layer's
output and its gradients), the new losses and cross-entropy's options (value and
gradient), clipped training over 20 steps (SGD, SGD with momentum and weight
decay, Adam; every parameter), and the schedules' learning rates over 50 steps.
The tests (tests/test_activations_torch.py, test_losses14.py, test_clip.py,
test_schedules14.py) assert the bounds; this prints the figures.
"""

from __future__ import annotations

import numpy as np
import torch

import bprop
from bprop import losses, optim

torch.set_num_threads(1)
rng = np.random.default_rng(0)


def t(a):
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def report(what, err):
    print(f"{what:55} {err:.2e}")


# ---- activations: Dense(8, 6, activation) forward and backward -----------------------
modules = {"elu": torch.nn.ELU(), "selu": torch.nn.SELU(), "silu": torch.nn.SiLU(),
           "softplus": torch.nn.Softplus()}
for name, module in modules.items():
    net = bprop.Network([bprop.Dense(8, 6, activation=name)], dtype="float64", seed=1)
    X = rng.standard_normal((64, 8)) * 3
    G = rng.standard_normal((64, 6))
    out = net.forward(X).copy()
    dX = net.backward(G, input_grad=True).copy()
    Xt = t(X).requires_grad_(True)
    W, b = t(net[0].weight).requires_grad_(True), t(net[0].bias).requires_grad_(True)
    ot = module(Xt @ W + b)
    ot.backward(t(G))
    err = max(np.abs(out - ot.detach().numpy()).max(), np.abs(dX - Xt.grad.numpy()).max(),
              np.abs(net[0].grad_weight - W.grad.numpy()).max(),
              np.abs(net[0].grad_bias - b.grad.numpy()).max())
    report(f"activation {name}: output, dL/dX, dL/dW, dL/db", err)

# ---- losses --------------------------------------------------------------------------
z = rng.standard_normal((32, 4)) * 2
yr = rng.standard_normal((32, 4)) * 2
cases = [("huber (delta=1)", lambda o, y: losses.huber(o, y), torch.nn.HuberLoss(), yr),
         ("huber (delta=0.3)", lambda o, y: losses.huber(o, y, delta=0.3),
          torch.nn.HuberLoss(delta=0.3), yr),
         ("mean_absolute_error", losses.mean_absolute_error, torch.nn.L1Loss(), yr),
         ("poisson_nll", losses.poisson_nll,
          torch.nn.PoissonNLLLoss(log_input=True, full=False), np.abs(yr).round())]
labels = rng.integers(0, 4, 32)
weights = [0.5, 2.0, 1.0, 3.0]
cases.append(("softmax_cross_entropy label_smoothing=0.1, class_weight",
              lambda o, y: losses.softmax_cross_entropy(o, y, label_smoothing=0.1,
                                                        class_weight=weights),
              torch.nn.CrossEntropyLoss(weight=t(weights), label_smoothing=0.1), labels))
for name, ours, module, y in cases:
    value, grad = ours(z, y)
    zt = t(z).requires_grad_(True)
    yt = torch.tensor(y) if y is labels else t(y)
    vt = module(zt, yt)
    vt.backward()
    report(f"loss {name}: value, gradient",
           max(abs(value - float(vt.detach())), np.abs(grad - zt.grad.numpy()).max()))

# ---- clipped training, 20 steps ------------------------------------------------------
X = rng.standard_normal((160, 10))
y = rng.integers(0, 3, 160)
makers = {
    "SGD": (lambda n: optim.SGD(n, lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "SGD momentum, weight_decay": (
        lambda n: optim.SGD(n, lr=0.05, momentum=0.9, weight_decay=1e-3),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "Adam": (lambda n: optim.Adam(n, lr=1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
}
for name, (ours, theirs) in makers.items():
    net = bprop.Network([bprop.Dense(10, 16, activation="tanh"), bprop.Dense(16, 3)],
                        dtype="float64", seed=0)
    model = net.to_torch()
    opt, topt = ours(net), theirs(model.parameters())
    for i in range(20):
        Xb, yb = X[8 * i:8 * i + 8], y[8 * i:8 * i + 8]
        net.train_step(Xb, yb, optimizer=opt, clip_grad_norm=0.3)
        topt.zero_grad()
        torch.nn.functional.cross_entropy(model(t(Xb)), torch.tensor(yb)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        topt.step()
    theirs_params = [p.detach().numpy() for p in model.parameters()]
    ours_params = [p.T if p.ndim == 2 else p for _, p, _ in net.parameters()]
    report(f"clip_grad_norm=0.3, 20 steps, {name}: every parameter",
           max(np.abs(a - b).max() for a, b in zip(ours_params, theirs_params)))

# ---- schedules, 50 steps -------------------------------------------------------------
net = bprop.Network([bprop.Dense(2, 2)], dtype="float64", seed=0)
p = torch.nn.Parameter(torch.zeros(1))
pairs = {
    "LinearLR(start_factor=0.1, total_iters=20)": (
        lambda o: optim.LinearLR(o, start_factor=0.1, total_iters=20),
        lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=20)),
    "OneCycleLR(max_lr=0.1, total_steps=50)": (
        lambda o: optim.OneCycleLR(o, max_lr=0.1, total_steps=50),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=50)),
}
for name, (ours, theirs) in pairs.items():
    opt = optim.SGD(net, lr=0.05, momentum=0.9)
    topt = torch.optim.SGD([p], lr=0.05, momentum=0.9)
    s, ts = ours(opt), theirs(topt)
    err = 0.0
    for _ in range(49):
        s.step()
        topt.step()  # (no gradient: changes nothing; torch wants it before the schedule's)
        ts.step()
        err = max(err, abs(opt.lr - topt.param_groups[0]["lr"]))
    report(f"schedule {name}: lr over 50 steps", err)
