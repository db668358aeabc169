"""show_config, config, set_num_threads and the choice of core at import."""

import json
import os
import subprocess
import sys
import textwrap

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
        assert bprop.get_num_threads() == 2
        assert net.predict(X).tobytes() == one.tobytes()
    finally:
        bprop.set_num_threads(before)
    with pytest.raises(ValueError, match=r"\[set_num_threads\] n must be >= 1, but got 0"):
        bprop.set_num_threads(0)
    with pytest.raises(ValueError, match=r"\[set_num_threads\] n must be <= 1024, but got 5000"):
        bprop.set_num_threads(5000)
    with pytest.raises(TypeError, match=r"\[set_num_threads\] n must be an int"):
        bprop.set_num_threads(1.5)


def test_baseline_core_can_be_forced():
    """BPROP_ISA=baseline loads bprop._core whatever the CPU (a native build has
    only that one; a portable wheel also has _core_avx512)."""
    env = dict(os.environ, BPROP_ISA="baseline")
    out = subprocess.run([sys.executable, "-c", "import bprop; print(bprop.config()['module'])"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "bprop._core"


def _run(code, **env_vars):
    env = {k: v for k, v in os.environ.items() if k != "BPROP_NUM_THREADS"}
    env.update(env_vars)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True)


def test_default_thread_count_is_the_cpus_the_process_may_use_or_the_environment_variable():
    code = "import bprop; print(bprop.get_num_threads())"
    assert int(_run(code).stdout) == len(os.sched_getaffinity(0))
    assert int(_run(code, BPROP_NUM_THREADS="3").stdout) == 3
    # taskset-style affinity: a process confined to one CPU defaults to one thread
    one_cpu = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
               "import bprop; print(bprop.get_num_threads())")
    assert int(_run(one_cpu).stdout) == 1


@pytest.mark.parametrize("value", ["zero", "0", "-2", "1.5", "100000"])
def test_a_bad_thread_count_in_the_environment_is_reported_and_ignored(value):
    out = _run("import warnings; warnings.simplefilter('always'); import bprop; "
               "print(bprop.get_num_threads())", BPROP_NUM_THREADS=value)
    assert int(out.stdout) == len(os.sched_getaffinity(0))
    assert f"BPROP_NUM_THREADS={value!r} is not a whole number from 1 to 1024" in out.stderr


def test_threadpoolctl_sees_the_pool_and_bprop_leaves_numpys_blas_alone():
    """threadpool_info() lists bprop's pool (user_api "bprop") and its OpenBLAS at
    one thread; threadpool_limits sets the pool; NumPy's BLAS keeps its thread count
    through import, set_num_threads and training."""
    pytest.importorskip("threadpoolctl")
    code = textwrap.dedent("""
        import json
        import numpy as np
        from threadpoolctl import threadpool_info, threadpool_limits

        def numpy_blas():
            return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info()
                          if i["user_api"] == "blas" and "scipy_openblas32" not in i["filepath"])

        before = numpy_blas()
        import bprop
        bprop.set_num_threads(1)
        bprop.set_num_threads(3)
        net = bprop.Network([bprop.Dense(64, 256), bprop.Dense(256, 4)], seed=0)
        X = np.random.default_rng(0).standard_normal((128, 64))
        bprop.fit(net, X, np.arange(128) % 4, epochs=1)
        after = numpy_blas()
        info = threadpool_info()
        pool = [i for i in info if i["user_api"] == "bprop"]
        own_blas = [i for i in info if "scipy_openblas32" in i["filepath"]]
        with threadpool_limits(1):
            limited = bprop.get_num_threads()
        with threadpool_limits(1, user_api="blas"):
            blas_limited = bprop.get_num_threads()
        print(json.dumps({"before": before, "after": after, "pool": pool,
                          "own_blas": own_blas, "limited": limited,
                          "blas_limited": blas_limited, "restored": bprop.get_num_threads()}))
    """)
    out = json.loads(_run(code).stdout)
    assert out["before"] == out["after"] and out["before"]
    assert len(out["pool"]) == 1 and out["pool"][0]["num_threads"] == 3
    assert out["pool"][0]["internal_api"] == "bprop"
    assert os.path.basename(out["pool"][0]["filepath"]).startswith("_core")
    assert [i["num_threads"] for i in out["own_blas"]] == [1]
    assert (out["limited"], out["blas_limited"], out["restored"]) == (1, 3, 3)
