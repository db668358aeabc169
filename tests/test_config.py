"""show_config, config, set_num_threads and the choice of core at import."""

import os
import subprocess
import sys

import numpy as np
import pytest

import bprop


def test_config_names_the_core_in_use(capsys):
    info = bprop.config()
    assert info["module"] in ("bprop._core", "bprop._core_avx512")
    assert info["eigen_version"].startswith("3.4")
    assert info["gemm"] in ("openblas", "eigen")
    assert info["num_threads"] == bprop.get_num_threads() >= 1
    bprop.show_config()
    out = capsys.readouterr().out
    assert info["module"] in out and info["arch_flags"] in out and "threads" in out


def test_set_num_threads_round_trips_and_validates():
    before = bprop.get_num_threads()
    try:
        bprop.set_num_threads(1)
        assert bprop.get_num_threads() == 1
        net = bprop.Network([bprop.Dense(300, 300, activation="tanh"), bprop.Dense(300, 3)],
                            dtype="float64", seed=0)
        X = np.random.default_rng(0).standard_normal((64, 300))
        one = net.predict(X)
        bprop.set_num_threads(2)
        np.testing.assert_allclose(net.predict(X), one, rtol=1e-12, atol=1e-13)
    finally:
        bprop.set_num_threads(before)
    with pytest.raises(ValueError, match=r"\[set_num_threads\] n must be >= 1, but got 0"):
        bprop.set_num_threads(0)
    with pytest.raises(TypeError, match=r"\[set_num_threads\] n must be an int"):
        bprop.set_num_threads(1.5)


def test_baseline_core_can_be_forced():
    """BPROP_ISA=baseline loads bprop._core whatever the CPU (a native build has
    only that one; a portable wheel also has _core_avx512)."""
    env = dict(os.environ, BPROP_ISA="baseline")
    out = subprocess.run([sys.executable, "-c", "import bprop; print(bprop.config()['module'])"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "bprop._core"
