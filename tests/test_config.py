"""show_config, config, set_num_threads and the choice of core at import.

A portable install holds three builds of the core (baseline, x86-64-v3, x86-64-v4)
and loads the best one the CPU runs; BPROP_ISA forces one. These tests hold on any
x86-64 CPU and on a native (BPROP_NATIVE=ON) build: each expects what this install
and this CPU should do, as bprop._isa reports them, and that report is checked
against /proc/cpuinfo.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import bprop
from bprop import _isa
from bprop._loader import LEVELS, MODULES, choose_level

NO_LACKS = {"baseline": [], "v3": [], "v4": []}
AVX2_ONLY = {"baseline": [], "v3": [], "v4": ["AVX512F", "AVX512BW"]}


def test_config_names_the_core_in_use(capsys):
    info = bprop.config()
    assert info["isa"] in LEVELS + ("native",)
    assert info["module"] == MODULES[info["isa"]]
    assert info["eigen_version"].startswith("3.4")
    assert info["gemm"] in ("openblas", "eigen")
    assert info["num_threads"] == bprop.get_num_threads() >= 1
    bprop.show_config()
    out = capsys.readouterr().out
    assert info["module"] in out and info["arch_flags"] in out and "threads" in out
    assert f"isa {info['isa']}" in out


def test_default_loads_the_best_build_this_cpu_runs():
    info = bprop.config()
    runs = [level for level in LEVELS if not _isa.cpu_lacks(level)]
    assert info["cpu_levels"] == runs
    assert "baseline" in runs  # every x86-64 CPU
    if _isa.BUILD == "native":
        assert info["isa"] == "native" and info["isa_loadable"] == []
    else:
        assert info["isa_loadable"] == [lv for lv in _isa.BUILT_LEVELS if lv in runs]
        # BPROP_ISA (as .ci/run sets it to test every loadable build) forces a level
        forced = os.environ.get("BPROP_ISA")
        assert info["isa"] == (forced if forced else info["isa_loadable"][-1])


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="Linux only")
def test_cpu_check_agrees_with_proc_cpuinfo():
    # The features of each level as Linux names them (OSXSAVE is not listed there).
    v3 = {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2",
          "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    assert (not _isa.cpu_lacks("v3")) == v3.issubset(flags), sorted(v3 - set(flags))
    assert (not _isa.cpu_lacks("v4")) == v4.issubset(flags), sorted(v4 - set(flags))
    assert _isa.cpu_lacks("baseline") == []


def test_isa_stub_matches_module(tmp_path):
    pytest.importorskip("mypy.stubtest")
    result = subprocess.run([sys.executable, "-m", "mypy.stubtest", "bprop._isa"],
                            cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _import_with(isa: str) -> subprocess.CompletedProcess:
    code = ("import json, numpy as np, bprop; info = bprop.config(); "
            "net = bprop.Network([bprop.Dense(8, 4, activation='tanh'), bprop.Dense(4, 2)], "
            "dtype='float64', seed=0); "
            "X = np.random.default_rng(0).standard_normal((5, 8)); "
            "print(json.dumps({k: info[k] for k in ('module', 'isa', 'arch_flags')} | "
            "{'out': net.predict(X).tolist()}))")
    env = dict(os.environ, BPROP_ISA=isa)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize("level", LEVELS)
def test_forcing_a_level_loads_it_or_says_why_not(level):
    result = _import_with(level)
    lacks = _isa.cpu_lacks(level)
    if _isa.BUILD == "native":
        assert result.returncode != 0
        assert (f"ImportError: BPROP_ISA={level} asks for" in result.stderr
                and "BPROP_NATIVE=ON" in result.stderr
                and "holds only bprop._core" in result.stderr), result.stderr
    elif level not in _isa.BUILT_LEVELS:
        assert result.returncode != 0
        assert f"this install holds only: {', '.join(_isa.BUILT_LEVELS)}" in result.stderr
    elif lacks:  # e.g. v4 on an AVX2 machine
        runs = [lv for lv in _isa.BUILT_LEVELS if not _isa.cpu_lacks(lv)]
        assert result.returncode != 0
        assert (f"ImportError: BPROP_ISA={level} asks for" in result.stderr
                and f"this CPU lacks {', '.join(lacks)}" in result.stderr
                and f"it runs: {', '.join(runs)}" in result.stderr), result.stderr
    else:
        assert result.returncode == 0, result.stderr
        got = json.loads(result.stdout.strip().splitlines()[-1])
        assert got["isa"] == level and got["module"] == MODULES[level]
        assert got["arch_flags"].startswith("-march=x86-64")
        # and it computes what this process's core computes
        net = bprop.Network([bprop.Dense(8, 4, activation="tanh"), bprop.Dense(4, 2)],
                            dtype="float64", seed=0)
        X = np.random.default_rng(0).standard_normal((5, 8))
        np.testing.assert_allclose(got["out"], net.predict(X), rtol=1e-13, atol=1e-15)


def test_an_unknown_level_names_the_allowed_values():
    result = _import_with("avx2")
    assert result.returncode != 0
    assert ("ImportError: BPROP_ISA='avx2' is not a level of bprop's core; allowed values: "
            "baseline, v3, v4" in result.stderr), result.stderr


# ---- the choice itself, for CPUs and builds this machine is not ----------------------

def test_choice_is_the_best_level_the_cpu_runs():
    assert choose_level("", "portable", LEVELS, NO_LACKS) == "v4"
    assert choose_level("", "portable", LEVELS, AVX2_ONLY) == "v3"
    assert choose_level("", "portable", ("baseline",), NO_LACKS) == "baseline"
    assert choose_level(" V3 ", "portable", LEVELS, NO_LACKS) == "v3"
    assert choose_level("baseline", "portable", LEVELS, AVX2_ONLY) == "baseline"
    assert choose_level("", "native", (), NO_LACKS) == "native"


def test_choice_of_a_level_the_cpu_lacks_says_what_it_lacks_and_what_it_runs():
    with pytest.raises(ImportError, match=r"^BPROP_ISA=v4 asks for the x86-64-v4 \(AVX-512\) "
                       r"build of bprop's core, but this CPU lacks AVX512F, AVX512BW; "
                       r"it runs: baseline, v3\. Unset BPROP_ISA"):
        choose_level("v4", "portable", LEVELS, AVX2_ONLY)


def test_choice_of_a_level_the_build_lacks_says_what_it_holds():
    with pytest.raises(ImportError, match=r"BPROP_ISA=v3 .* this bprop was built with "
                       r"BPROP_NATIVE=ON and holds only bprop._core, tuned for the build "
                       r"machine \(-march=native\)"):
        choose_level("v3", "native", (), NO_LACKS)
    with pytest.raises(ImportError, match=r"BPROP_ISA=baseline .* BPROP_NATIVE=ON"):
        choose_level("baseline", "native", (), NO_LACKS)
    with pytest.raises(ImportError, match=r"BPROP_ISA=v4 .* this install holds only: "
                       r"baseline, v3\."):
        choose_level("v4", "portable", ("baseline", "v3"), NO_LACKS)


@pytest.mark.parametrize("value", ["avx2", "v2", "native", "x86-64-v3"])
def test_choice_of_an_unknown_level_names_the_allowed_values(value):
    with pytest.raises(ImportError, match=rf"^BPROP_ISA='{value}' is not a level of bprop's "
                       r"core; allowed values: baseline, v3, v4 \(or unset it"):
        choose_level(value, "portable", LEVELS, NO_LACKS)


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
