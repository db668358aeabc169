// The compiled module bprop._core: only calls the bind_<area> functions.
// A portable build also compiles it as bprop._core_v3 and bprop._core_v4 over the
// x86-64-v3 and x86-64-v4 builds of the core; bprop/_loader.py loads one at import
// and registers it as bprop._core (BPROP_MODULE_NAME says which this is).
#include <Eigen/Core>

#include "bprop/gemm.hpp"
#include "common.hpp"


namespace py = pybind11;

PYBIND11_MODULE(BPROP_MODULE_NAME, m) {
  m.doc() = "bprop's C++ core (private; import bprop instead)";
  bprop::python::bind_network(m);
  bprop::python::bind_kernels(m);

  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("[set_num_threads] n must be >= 1, but got " + std::to_string(n));
    bprop::set_gemm_threads(n);
  }, py::arg("n"), "Sets the number of threads used inside matrix products.");
  m.def("get_num_threads", [] { return bprop::get_gemm_threads(); },
        "The number of threads used inside matrix products.");
  m.def("_set_serial_threshold", &bprop::set_serial_threshold, py::arg("work"),
        "Products with m*n*k below this run on one thread (tuning knob).");
  m.def("_serial_threshold", &bprop::serial_threshold);
  m.def("build_info", [] {
    py::dict d;
    d["version"] = BPROP_VERSION;
    d["eigen_version"] = std::to_string(EIGEN_WORLD_VERSION) + "." +
                         std::to_string(EIGEN_MAJOR_VERSION) + "." +
                         std::to_string(EIGEN_MINOR_VERSION);
    d["simd"] = Eigen::SimdInstructionSetsInUse();
    d["arch_flags"] = BPROP_ARCH_FLAGS;
    d["build_type"] = BPROP_BUILD_TYPE;
    d["gemm"] = bprop::gemm_backend();
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["compiler"] = __VERSION__;
    return d;
  }, "How this core was built: Eigen version, SIMD instruction sets, flags.");
}
