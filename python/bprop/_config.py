"""Build and threading configuration of the core."""

from __future__ import annotations

import os
import warnings

from . import _core
from ._loader import DESCRIPTIONS, loaded
from ._validation import check_int


# More threads than this is a typo, not a machine.
MAX_THREADS = 1024


def set_num_threads(n: int) -> None:
    """Sets the number of threads that run the core's matrix products.

    The calling thread works too, with n - 1 threads of bprop's own (started on
    first use; after a product they poll for the next one for ~50 us, then
    sleep). Results are the same bits for any n: each product is cut into tiles
    by its shape alone, and each tile is one single-threaded OpenBLAS call.
    NumPy's thread settings are never touched.

    Args:
        n: threads, >= 1. The default is the number of CPUs this process may run
            on (``os.sched_getaffinity``), or ``BPROP_NUM_THREADS`` if set when
            bprop is imported.
    """
    _core.set_num_threads(check_int("set_num_threads", "n", n, minimum=1,
                                    maximum=MAX_THREADS))


def get_num_threads() -> int:
    """The number of threads that run the core's matrix products (see set_num_threads)."""
    return int(_core.get_num_threads())


def _threads_from_environment() -> None:
    """BPROP_NUM_THREADS, read once at import; a value that is not a whole number in
    [1, MAX_THREADS] is reported and ignored."""
    value = os.environ.get("BPROP_NUM_THREADS", "").strip()
    if not value:
        return
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_THREADS:
        warnings.warn(f"BPROP_NUM_THREADS={value!r} is not a whole number from 1 to "
                      f"{MAX_THREADS}; bprop uses {get_num_threads()} threads (the CPUs "
                      "this process may run on)", RuntimeWarning, stacklevel=2)
        return
    _core.set_num_threads(n)


def _register_threadpoolctl() -> None:
    """Makes bprop's pool visible to threadpoolctl, as user_api "bprop":
    threadpool_info() lists it and threadpool_limits(n) (without user_api, or with
    user_api="bprop") sets its thread count. The controller finds the loaded core
    (a file named _core*) by the two C functions it exports."""
    try:
        import threadpoolctl
    except ImportError:
        return
    if not (hasattr(threadpoolctl, "register") and hasattr(threadpoolctl, "LibController")):
        return  # threadpoolctl < 3.5 takes no custom controllers

    class BpropController(threadpoolctl.LibController):
        user_api = "bprop"
        internal_api = "bprop"
        filename_prefixes = ("_core",)
        check_symbols = ("bprop_get_num_threads", "bprop_set_num_threads")

        def get_num_threads(self):
            get = getattr(self.dynlib, "bprop_get_num_threads", None)
            return get() if get is not None else None

        def set_num_threads(self, num_threads):
            set_ = getattr(self.dynlib, "bprop_set_num_threads", None)
            if set_ is not None:
                set_(min(max(int(num_threads), 1), MAX_THREADS))

        def get_version(self):
            # called before check_symbols is checked: another package's _core* file
            # must not be asked anything
            if getattr(self.dynlib, "bprop_get_num_threads", None) is None:
                return None
            return _core.build_info()["version"]

    threadpoolctl.register(BpropController)


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


_threads_from_environment()
_register_threadpoolctl()
