"""Checkpoints of networks of every layer kind: layer trees, buffers, the
training mode and the dropout clock through save/load, pickling and deep
copies; version-1 files still loading; damaged layer trees raising
CheckpointError."""

from __future__ import annotations

import os

import numpy as np

import bprop
from bprop import optim

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


# ---- version 1 (Dense-only) checkpoints -------------------------------------------------------

def test_version_1_checkpoint_loads_with_its_weights_and_adam_state():
    # written by the version-1 writer (tests/data/make_v1_checkpoint.py)
    expected = dict(np.load(os.path.join(DATA, "v1_3-4-2_adam_expected.npz")))
    net, opt = bprop.load(os.path.join(DATA, "v1_3-4-2_adam.safetensors"), with_optimizer=True)
    assert net.dtype == np.float64
    assert [L._description() for L in net.layers] == [
        bprop.Dense(3, 4, "tanh")._description(), bprop.Dense(4, 2)._description()]
    params = {name: p for name, p, _ in net.parameters()}
    assert sorted(params) == sorted(k for k in expected if not k.startswith("optimizer."))
    for name, p in params.items():
        np.testing.assert_array_equal(p.view(np.uint8), expected[name].view(np.uint8))
    assert isinstance(opt, optim.Adam)
    sd = opt.state_dict()
    assert sd["step"] == 3
    assert sd["hyperparameters"]["betas"] == (0.8, 0.95)
    assert sd["hyperparameters"]["lr"] == 0.01
    slots = {f"optimizer.{pname}.{slot}": a for pname, arrays in sd["state"].items()
             for slot, a in arrays.items()}
    assert sorted(slots) == sorted(k for k in expected if k.startswith("optimizer."))
    for name, a in slots.items():
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), expected[name].view(np.uint8))
