// The compiled module bprop._core: only calls the bind_<area> functions.
// A portable build also compiles it as bprop._core_v3 and bprop._core_v4 over the
// x86-64-v3 and x86-64-v4 builds of the core; bprop/_loader.py loads one at import
// and registers it as bprop._core (BPROP_MODULE_NAME says which this is).
#include <Eigen/Core>

#include "bprop/activation.hpp"
#include "bprop/gemm.hpp"
#include "bprop/thread_pool.hpp"
#include "common.hpp"


namespace py = pybind11;

// For threadpoolctl (bprop/_config.py registers a controller that finds this
// module by these symbols): bprop's pool as a C API.
extern "C" {
__attribute__((visibility("default"))) int bprop_get_num_threads() {
  return bprop::get_num_threads();
}
__attribute__((visibility("default"))) void bprop_set_num_threads(int n) {
  if (n >= 1) bprop::set_num_threads(n);
}
}

PYBIND11_MODULE(BPROP_MODULE_NAME, m) {
  m.doc() = "bprop's C++ core (private; import bprop instead)";
  bprop::python::bind_network(m);
  bprop::python::bind_kernels(m);
  m.def(
      "activation_names",
      [] {
        py::list names;
        for (const bprop::ActivationEntry& entry : bprop::kActivations) names.append(entry.name);
        return names;
      },
      "The activations the core computes (its half of the registry, activation.hpp).");

  m.def("set_num_threads", &bprop::set_num_threads, py::arg("n"),
        "Sets the number of threads that run the core's matrix products (the calling "
        "thread plus n - 1 of bprop's own).");
  m.def("get_num_threads", &bprop::get_num_threads,
        "The number of threads that run the core's matrix products.");
  m.def("_set_spin_microseconds", &bprop::set_spin_microseconds, py::arg("us"),
        "How long idle workers poll before sleeping (tuning knob).");
  m.def("_spin_microseconds", &bprop::spin_microseconds);
  m.def("_set_contention_backoff", &bprop::set_contention_backoff, py::arg("on"),
        "Whether the pool falls back to the calling thread after a worker lost its core.");
  m.def("_contention_backoff", &bprop::contention_backoff);
  m.def("_contended_loops", &bprop::contended_loops,
        "How many parallel loops found a worker descheduled (and backed off).");
  m.def("_worker_tasks", &bprop::worker_tasks, "How many tasks bprop's workers have run.");
  m.def("_check_loops", &bprop::check_loops, py::arg("loops"), py::arg("max_count"),
        py::call_guard<py::gil_scoped_release>(),
        "For tests: how many of `loops` parallel loops did not run each task exactly once.");
  m.def("_set_tile_params", [](bprop::Index min_work, bprop::Index max_tiles,
                               bprop::Index min_side, bprop::Index max_repack_two,
                               bprop::Index max_repack, bprop::Index align) {
    if (min_work < 1 || max_tiles < 1 || min_side < 1 || max_repack_two < 0 ||
        max_repack < 0 || align < 1) {
      throw py::value_error("[_set_tile_params] every parameter must be >= 1 (the max_repacks >= 0)");
    }
    bprop::set_tile_params({min_work, max_tiles, min_side, max_repack_two, max_repack, align});
  }, py::arg("min_work"), py::arg("max_tiles"), py::arg("min_side"),
        py::arg("max_repack_two"), py::arg("max_repack"), py::arg("align"),
        "The tiling rule's parameters (tuning knob; see cpp/src/gemm.cpp).");
  m.def("_tile_params", [] {
    const bprop::TileParams p = bprop::tile_params();
    return py::make_tuple(p.min_work, p.max_tiles, p.min_side, p.max_repack_two, p.max_repack,
                          p.align);
  });
  m.def("_gemm_tiles", [](bprop::Index m, bprop::Index n, bprop::Index k, int element_size,
                          bool trans_a, bool trans_b) {
    const bprop::GemmTiles t =
        bprop::gemm_tiles(m, n, k, static_cast<std::size_t>(element_size), trans_a, trans_b);
    return py::make_tuple(t.rows, t.cols, t.row_blocks, t.col_blocks);
  }, py::arg("m"), py::arg("n"), py::arg("k"), py::arg("element_size"),
        py::arg("trans_a") = false, py::arg("trans_b") = false,
        "The tiles (rows, cols, row_blocks, col_blocks) of a product C (m, n) with inner "
        "dimension k.");
  m.def("_gemm", [](py::handle A, py::handle B, py::handle C, bool trans_a, bool trans_b,
                    double alpha, double beta, int untiled_threads,
                    std::pair<bprop::Index, bprop::Index> tile) {
    auto run = [&](auto zero) {
      using T = decltype(zero);
      auto a = bprop::python::strict_array<T>(A, "_gemm", "A", 2);
      auto b = bprop::python::strict_array<T>(B, "_gemm", "B", 2);
      auto c = bprop::python::strict_array<T>(C, "_gemm", "C", 2);
      bprop::python::require_writeable(c, "_gemm", "C");
      const bprop::Index m = c.shape(0), n = c.shape(1);
      const bprop::Index k = trans_a ? a.shape(0) : a.shape(1);
      if ((trans_a ? a.shape(1) : a.shape(0)) != m || (trans_b ? b.shape(1) : b.shape(0)) != k ||
          (trans_b ? b.shape(0) : b.shape(1)) != n) {
        throw py::value_error("[_gemm] the shapes of op(A) " + bprop::python::shape_of(a) +
                              ", op(B) " + bprop::python::shape_of(b) + " and C " +
                              bprop::python::shape_of(c) + " do not chain");
      }
      py::gil_scoped_release nogil;
      if (tile.first > 0 && tile.second > 0) {
        bprop::GemmTiles t;
        t.rows = tile.first;
        t.cols = tile.second;
        bprop::gemm_with_tiles<T>(t, trans_a, trans_b, m, n, k, T(alpha), a.data(), a.shape(1),
                                  b.data(), b.shape(1), T(beta), c.mutable_data(), n);
      } else if (untiled_threads > 0) {
        bprop::gemm_untiled<T>(untiled_threads, trans_a, trans_b, m, n, k, T(alpha), a.data(),
                               a.shape(1), b.data(), b.shape(1), T(beta), c.mutable_data(), n);
      } else {
        bprop::gemm<T>(trans_a, trans_b, m, n, k, T(alpha), a.data(), a.shape(1), b.data(),
                       b.shape(1), T(beta), c.mutable_data(), n);
      }
    };
    if (py::isinstance<py::array>(C) &&
        py::reinterpret_borrow<py::array>(C).dtype().equal(py::dtype::of<double>())) {
      run(double(0));
    } else {
      run(float(0));
    }
  }, py::arg("A"), py::arg("B"), py::arg("C"), py::arg("trans_a") = false,
        py::arg("trans_b") = false, py::arg("alpha") = 1.0, py::arg("beta") = 0.0, py::arg("untiled_threads") = 0,
        py::arg("tile") = std::pair<bprop::Index, bprop::Index>(0, 0),
        "C = alpha op(A) op(B) + beta C through the core's tiled product (tests, benchmarks); "
        "untiled_threads > 0: as one OpenBLAS call on that many of OpenBLAS's threads; "
        "tile=(rows, cols): over tiles of that shape instead of the rule's (benchmarks only).");
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
