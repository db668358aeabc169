"""Build and threading configuration of the core."""

from __future__ import annotations

from . import _core
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
    """How this core was built and how it runs, as a dict."""
    info = dict(_core.build_info())
    info["module"] = _core.__name__
    info["num_threads"] = get_num_threads()
    return info


def show_config() -> None:
    """Prints the kernel level, thread count, Eigen version and build flags in use."""
    info = config()
    print(f"bprop {info['version']}: core {info['module']} built with {info['arch_flags']}; "
          f"matrix products {info['gemm']}, "
          f"{info['num_threads']} threads; Eigen {info['eigen_version']} "
          f"(SIMD {info['simd']}); {info['build_type']}, "
          f"gcc {info['compiler']}")
