#include "bprop/gemm.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "bprop/thread_pool.hpp"

#ifdef BPROP_WITH_OPENBLAS
extern "C" {
// From scipy-openblas32's cblas.h (symbols carry the scipy_ prefix); declared
// here so that the core needs only the shared library at link time.
enum BpropCblasOrder { kRowMajor = 101 };
enum BpropCblasTranspose { kNoTrans = 111, kTrans = 112 };
void scipy_cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                       const float* A, int lda, const float* B, int ldb, float beta, float* C,
                       int ldc);
void scipy_cblas_dgemm(int order, int trans_a, int trans_b, int m, int n, int k, double alpha,
                       const double* A, int lda, const double* B, int ldb, double beta,
                       double* C, int ldc);
void scipy_openblas_set_num_threads(int num_threads);
int scipy_openblas_get_num_threads(void);
}
#endif

namespace bprop {

namespace {

template <typename T>
void eigen_gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, T alpha, const T* A,
                Index lda, const T* B, Index ldb, T beta, T* C, Index ldc) {
  using Stride = Eigen::OuterStride<>;
  using ConstMap = Eigen::Map<const RowMatrix<T>, 0, Stride>;
  Eigen::Map<RowMatrix<T>, 0, Stride> Cm(C, m, n, Stride(ldc));
  auto product = [&](const auto& opA, const auto& opB) {
    if (beta == T(0)) {
      Cm.noalias() = alpha * opA * opB;
    } else {
      if (beta != T(1)) Cm *= beta;
      Cm.noalias() += alpha * opA * opB;
    }
  };
  // op(A) is (m, k): stored (m, k) or, transposed, (k, m); likewise op(B).
  if (!trans_a && !trans_b) {
    product(ConstMap(A, m, k, Stride(lda)), ConstMap(B, k, n, Stride(ldb)));
  } else if (trans_a && !trans_b) {
    product(ConstMap(A, k, m, Stride(lda)).transpose(), ConstMap(B, k, n, Stride(ldb)));
  } else if (!trans_a && trans_b) {
    product(ConstMap(A, m, k, Stride(lda)), ConstMap(B, n, k, Stride(ldb)).transpose());
  } else {
    product(ConstMap(A, k, m, Stride(lda)).transpose(),
            ConstMap(B, n, k, Stride(ldb)).transpose());
  }
}

#ifdef BPROP_WITH_OPENBLAS
// OpenBLAS runs on one thread, from load on: bprop's pool runs the tiles. (This is
// the scipy-openblas32 copy, whose symbols are prefixed; NumPy's OpenBLAS is
// another library and keeps its own setting.)
[[maybe_unused]] const bool g_openblas_single_threaded = [] {
  scipy_openblas_set_num_threads(1);
  return true;
}();

// If something raised it since (threadpoolctl's threadpool_limits sets every
// OpenBLAS it finds), a tile would start OpenBLAS's own threads inside bprop's.
inline void keep_openblas_single_threaded() {
  if (scipy_openblas_get_num_threads() != 1) scipy_openblas_set_num_threads(1);
}

bool fits_blasint(Index m, Index n, Index k, Index lda, Index ldb, Index ldc) {
  const Index limit = std::numeric_limits<int>::max();
  return m <= limit && n <= limit && k <= limit && lda <= limit && ldb <= limit && ldc <= limit;
}

inline void blas(bool trans_a, bool trans_b, Index m, Index n, Index k, float alpha,
                 const float* A, Index lda, const float* B, Index ldb, float beta, float* C,
                 Index ldc) {
  scipy_cblas_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, int(m),
                    int(n), int(k), alpha, A, int(lda), B, int(ldb), beta, C, int(ldc));
}
inline void blas(bool trans_a, bool trans_b, Index m, Index n, Index k, double alpha,
                 const double* A, Index lda, const double* B, Index ldb, double beta, double* C,
                 Index ldc) {
  scipy_cblas_dgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, int(m),
                    int(n), int(k), alpha, A, int(lda), B, int(ldb), beta, C, int(ldc));
}
#endif

// One single-threaded product over a block of C: OpenBLAS, or Eigen when the core
// is built without it or a size does not fit OpenBLAS's 32-bit integers.
template <typename T>
void serial_gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, T alpha, const T* A,
                 Index lda, const T* B, Index ldb, T beta, T* C, Index ldc) {
#ifdef BPROP_WITH_OPENBLAS
  if (fits_blasint(m, n, k, lda, ldb, ldc)) {
    blas(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
#endif
  eigen_gemm<T>(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

// The rule's parameters, chosen by measurement (bench/gemm_tiles.py,
// bench/pool_steps.py: paired one-thread runs of whole training steps;
// bench/RESULTS.md). A tile is one OpenBLAS call, which packs its rows of op(A) and
// its columns of op(B) again: cutting C into rb x cb tiles packs (cb - 1)/n +
// (rb - 1)/m more elements per multiply-add than one call. On one thread (AVX2, 2
// cores), against one call per product: 64 x 64 tiles cost 13-20%; with sides of at
// least 128 but no limit on the repacking a whole training step cost 7.6% more on
// the small workload and 12% on medium, with the limit 25 (per 10^4 multiply-adds)
// 0.6% and 2.5%, with 42 2.7% and 7.8%. Two tiles are what a second thread needs,
// so the first cut may repack up to 80 (the tiny workload's 32 x 128 x 784 forward
// product is cut in two: its step then costs 2.8% more on one thread, and runs 12%
// faster on two), any further cut only up to 25. Each tile keeps at least 2^20
// multiply-adds and sides of at least 64; at most 8 tiles.
std::atomic<Index> g_min_work{Index(1) << 20};
std::atomic<Index> g_max_tiles{8};
std::atomic<Index> g_min_side{64};
std::atomic<Index> g_max_repack_two{80};
std::atomic<Index> g_max_repack{25};
std::atomic<Index> g_align{16};

Index round_up(Index x, Index multiple) { return (x + multiple - 1) / multiple * multiple; }

// Side length of `blocks` equal blocks over `size`, rounded up to `align`.
Index block_side(Index size, Index blocks, Index align) {
  return std::min(size, round_up((size + blocks - 1) / blocks, align));
}

template <typename T>
struct TiledProduct {
  bool trans_a, trans_b;
  Index m, n, k;
  T alpha;
  const T* A;
  Index lda;
  const T* B;
  Index ldb;
  T beta;
  T* C;
  Index ldc;
  GemmTiles tiles;

  // C[i0:i0+rows, j0:j0+cols] = alpha op(A)[i0:, :] op(B)[:, j0:] + beta C[...]
  void operator()(Index t) const {
    const Index i0 = (t / tiles.col_blocks) * tiles.rows;
    const Index j0 = (t % tiles.col_blocks) * tiles.cols;
    const Index rows = std::min(tiles.rows, m - i0);
    const Index cols = std::min(tiles.cols, n - j0);
    // op(A) rows i0...: A (m, k) from row i0, or A (k, m) from column i0
    const T* a = trans_a ? A + i0 : A + i0 * lda;
    // op(B) columns j0...: B (k, n) from column j0, or B (n, k) from row j0
    const T* b = trans_b ? B + j0 * ldb : B + j0;
    serial_gemm<T>(trans_a, trans_b, rows, cols, k, alpha, a, lda, b, ldb, beta,
                   C + i0 * ldc + j0, ldc);
  }
};

template <typename T>
void run_tiles(const GemmTiles& tiles, bool trans_a, bool trans_b, Index m, Index n, Index k,
               T alpha, const T* A, Index lda, const T* B, Index ldb, T beta, T* C, Index ldc) {
  if (m <= 0 || n <= 0) return;
#ifdef BPROP_WITH_OPENBLAS
  keep_openblas_single_threaded();
#endif
  if (tiles.count() == 1) {
    serial_gemm<T>(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  TiledProduct<T> product{trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, tiles};
  parallel_for(tiles.count(), product);
}

}  // namespace

GemmTiles gemm_tiles(Index m, Index n, Index k, std::size_t element_size, bool trans_a,
                     bool trans_b) {
  const Index align = std::max<Index>(1, g_align.load(std::memory_order_relaxed));
  const Index max_tiles = std::max<Index>(1, g_max_tiles.load(std::memory_order_relaxed));
  const Index min_side = g_min_side.load(std::memory_order_relaxed);
  const double max_repack_two =
      static_cast<double>(g_max_repack_two.load(std::memory_order_relaxed)) * 1e-4;
  const double max_repack =
      static_cast<double>(g_max_repack.load(std::memory_order_relaxed)) * 1e-4;
  const double md = static_cast<double>(std::max<Index>(m, 1));
  const double nd = static_cast<double>(std::max<Index>(n, 1));
  // elements packed per multiply-add beyond what one call packs
  auto extra_packing = [&](Index rows, Index cols) {
    const double rb = std::ceil(md / static_cast<double>(rows));
    const double cb = std::ceil(nd / static_cast<double>(cols));
    return (cb - 1) / nd + (rb - 1) / md;
  };
  // work in float32 multiply-adds: a float64 one costs about two
  const double min_work = static_cast<double>(g_min_work.load(std::memory_order_relaxed)) /
                          (static_cast<double>(element_size) / 4.0);
  GemmTiles t;
  t.rows = std::max<Index>(m, 1);
  t.cols = std::max<Index>(n, 1);
  Index row_blocks = 1, col_blocks = 1;
  // Halve the tiles while each half keeps at least min_work: the longer side
  // first, since cutting it repacks the smaller operand (cutting C's columns
  // repeats op(A), (rows, k), in every tile; cutting its rows repeats op(B));
  // on a tie, the rows if op(A) is transposed (repacking it reads columns of A;
  // measured on dL/dW = a^T delta), else the columns.
  for (;;) {
    if (2 * row_blocks * col_blocks > max_tiles) break;
    const double work = static_cast<double>(t.rows) * static_cast<double>(t.cols) *
                        static_cast<double>(k);
    if (work < 2 * min_work) break;
    const Index half_cols = block_side(n, 2 * col_blocks, align);
    const Index half_rows = block_side(m, 2 * row_blocks, align);
    const double limit = row_blocks * col_blocks == 1 ? max_repack_two : max_repack;
    const bool can_cols = half_cols < t.cols && half_cols >= min_side &&
                          extra_packing(t.rows, half_cols) <= limit;
    const bool can_rows = half_rows < t.rows && half_rows >= min_side &&
                          extra_packing(half_rows, t.cols) <= limit;
    const bool cols_first = t.cols > t.rows || (t.cols == t.rows && !trans_a);
    if (can_cols && (cols_first || !can_rows)) {
      col_blocks *= 2;
      t.cols = half_cols;
    } else if (can_rows) {
      row_blocks *= 2;
      t.rows = half_rows;
    } else {
      break;
    }
  }
  t.row_blocks = (std::max<Index>(m, 1) + t.rows - 1) / t.rows;
  t.col_blocks = (std::max<Index>(n, 1) + t.cols - 1) / t.cols;
  return t;
}

void set_tile_params(const TileParams& p) {
  g_min_work.store(p.min_work, std::memory_order_relaxed);
  g_max_tiles.store(p.max_tiles, std::memory_order_relaxed);
  g_min_side.store(p.min_side, std::memory_order_relaxed);
  g_max_repack_two.store(p.max_repack_two, std::memory_order_relaxed);
  g_max_repack.store(p.max_repack, std::memory_order_relaxed);
  g_align.store(p.align, std::memory_order_relaxed);
}

TileParams tile_params() {
  return {g_min_work.load(std::memory_order_relaxed), g_max_tiles.load(std::memory_order_relaxed),
          g_min_side.load(std::memory_order_relaxed),
          g_max_repack_two.load(std::memory_order_relaxed),
          g_max_repack.load(std::memory_order_relaxed), g_align.load(std::memory_order_relaxed)};
}

template <>
void gemm<float>(bool trans_a, bool trans_b, Index m, Index n, Index k, float alpha,
                 const float* A, Index lda, const float* B, Index ldb, float beta, float* C,
                 Index ldc) {
  run_tiles<float>(gemm_tiles(m, n, k, sizeof(float), trans_a, trans_b), trans_a, trans_b, m, n, k, alpha, A, lda,
                   B, ldb, beta, C, ldc);
}

template <>
void gemm<double>(bool trans_a, bool trans_b, Index m, Index n, Index k, double alpha,
                  const double* A, Index lda, const double* B, Index ldb, double beta,
                  double* C, Index ldc) {
  run_tiles<double>(gemm_tiles(m, n, k, sizeof(double), trans_a, trans_b), trans_a, trans_b, m, n, k, alpha, A,
                    lda, B, ldb, beta, C, ldc);
}

template <typename T>
void gemm_with_tiles(GemmTiles tiles, bool trans_a, bool trans_b, Index m, Index n, Index k,
                     T alpha, const T* A, Index lda, const T* B, Index ldb, T beta, T* C,
                     Index ldc) {
  tiles.rows = std::min(std::max<Index>(tiles.rows, 1), std::max<Index>(m, 1));
  tiles.cols = std::min(std::max<Index>(tiles.cols, 1), std::max<Index>(n, 1));
  tiles.row_blocks = (std::max<Index>(m, 1) + tiles.rows - 1) / tiles.rows;
  tiles.col_blocks = (std::max<Index>(n, 1) + tiles.cols - 1) / tiles.cols;
  run_tiles<T>(tiles, trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

template void gemm_with_tiles<float>(GemmTiles, bool, bool, Index, Index, Index, float,
                                     const float*, Index, const float*, Index, float, float*,
                                     Index);
template void gemm_with_tiles<double>(GemmTiles, bool, bool, Index, Index, Index, double,
                                      const double*, Index, const double*, Index, double,
                                      double*, Index);

template <typename T>
void gemm_untiled(int threads, bool trans_a, bool trans_b, Index m, Index n, Index k, T alpha,
                  const T* A, Index lda, const T* B, Index ldb, T beta, T* C, Index ldc) {
#ifdef BPROP_WITH_OPENBLAS
  if (threads > 1) scipy_openblas_set_num_threads(threads);
#else
  (void)threads;
#endif
  serial_gemm<T>(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
#ifdef BPROP_WITH_OPENBLAS
  if (threads > 1) scipy_openblas_set_num_threads(1);
#endif
}

template void gemm_untiled<float>(int, bool, bool, Index, Index, Index, float, const float*,
                                  Index, const float*, Index, float, float*, Index);
template void gemm_untiled<double>(int, bool, bool, Index, Index, Index, double, const double*,
                                   Index, const double*, Index, double, double*, Index);

const char* gemm_backend() {
#ifdef BPROP_WITH_OPENBLAS
  return "openblas";
#else
  return "eigen";
#endif
}

}  // namespace bprop
