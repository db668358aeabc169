"""Build and threading configuration of the core."""

from __future__ import annotations

from . import _core
from ._loader import DESCRIPTIONS, loaded
from ._validation import check_int


def set_num_threads(n: int) -> None:
    """Sets the number of threads the core's matrix products use (OpenBLAS's pool).

    Small products stay single-threaded whatever n is: OpenBLAS only splits a
    product when it is large enough to gain from it.
    """
    _core.set_num_threads(check_int("set_num_threads", "n", n, minimum=1))


def get_num_threads() -> int:
    """The number of threads the core's matrix products use."""
    return int(_core.get_num_threads())


def config() -> dict:
    """How this core was built and how it runs, as a dict.

    Besides the build's own record (version, arch_flags, simd, gemm, ...):
    ``module`` and ``isa``, the build of the core in use ("baseline", "v3", "v4", or
    "native" for a BPROP_NATIVE=ON build); ``isa_loadable``, the levels this install
    holds and this CPU runs (what ``BPROP_ISA`` may ask for); ``cpu_levels``, the
    levels this CPU runs; ``num_threads``.
    """
    info = dict(_core.build_info())
    info["module"] = _core.__name__
    info["isa"] = loaded["isa"]
    info["isa_loadable"] = list(loaded["loadable"])
    info["cpu_levels"] = list(loaded["cpu_levels"])
    info["num_threads"] = get_num_threads()
    return info


def show_config() -> None:
    """Prints the build of the core in use (ISA level), the matrix products, thread
    count, Eigen version and build flags."""
    info = config()
    if info["isa"] == "native":
        core = f"core {info['module']} [isa native: {info['arch_flags']}]"
    else:
        core = (f"core {info['module']} [isa {info['isa']}: {DESCRIPTIONS[info['isa']]}, "
                f"{info['arch_flags']}; loadable here: {', '.join(info['isa_loadable'])}]")
    print(f"bprop {info['version']}: {core}; matrix products {info['gemm']}, "
          f"{info['num_threads']} threads; Eigen {info['eigen_version']} "
          f"(SIMD {info['simd']}); {info['build_type']}, gcc {info['compiler']}")
