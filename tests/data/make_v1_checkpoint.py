"""How tests/data/v1_3-4-2_adam.safetensors and v1_3-4-2_adam_expected.npz were made.

Run once, with the version-1 writer of bprop (commit a03f599, before checkpoints
described layer trees), from the repository root:

    python tests/data/make_v1_checkpoint.py

The .safetensors file is a format_version "1" checkpoint of a 3-4-2 network
(float64, seed 3) trained three Adam steps; the .npz holds the same parameters
and Adam state arrays, written by NumPy, for tests/test_io_layers.py to compare
against. Running it with a later bprop writes a later format: do not.
"""

import os

import bprop
import numpy as np
from bprop import optim

HERE = os.path.dirname(os.path.abspath(__file__))

net = bprop.Network([bprop.Dense(3, 4, "tanh"), bprop.Dense(4, 2)], dtype="float64", seed=3)
opt = optim.Adam(net, lr=1e-2, betas=(0.8, 0.95))
X = np.linspace(-1.0, 1.0, 5 * 3).reshape(5, 3)
y = np.array([0, 1, 1, 0, 1], dtype=np.int64)
for _ in range(3):
    net.train_step(X, y, "softmax_cross_entropy", opt)
net.save(os.path.join(HERE, "v1_3-4-2_adam.safetensors"), optimizer=opt)
expected = {name: p.copy() for name, p, _ in net.parameters()}
for pname, arrays in opt.state_dict()["state"].items():
    for slot, a in arrays.items():
        expected[f"optimizer.{pname}.{slot}"] = np.asarray(a).copy()
np.savez(os.path.join(HERE, "v1_3-4-2_adam_expected.npz"), **expected)
print(opt.state_dict()["step"], sorted(expected))
