// The one matrix product of the core, row-major:
//   C = alpha * op(A) * op(B) + beta * C,  op(X) = X or X^T,
// with op(A) (m, k), op(B) (k, n), C (m, n). It goes to OpenBLAS (the
// scipy-openblas32 wheel, runtime-dispatched kernels) when the core is built
// with it, and to Eigen's own product otherwise.
//
// C is cut into tiles whose shape depends only on (m, n, k) and the scalar type,
// never on the thread count; each tile is one single-threaded BLAS call over the
// whole inner dimension k, and bprop's thread pool (thread_pool.hpp) runs the
// tiles. So every element of C is summed in the same order, by the same kernel,
// whatever the number of threads: the results are the same bits. OpenBLAS itself
// is kept at one thread (set at load; restored if something else raises it).
#pragma once

#include <cstddef>

#include "bprop/types.hpp"

namespace bprop {

template <typename T>
void gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, T alpha, const T* A, Index lda,
          const T* B, Index ldb, T beta, T* C, Index ldc);

/// The tiling of one product: C in tiles of (rows, cols), row_blocks x col_blocks
/// of them (the last row and column of tiles may be smaller).
struct GemmTiles {
  Index rows = 0, cols = 0;
  Index row_blocks = 0, col_blocks = 0;
  Index count() const { return row_blocks * col_blocks; }
};

/// The tiles gemm uses for C (m, n) with inner dimension k, elements of
/// `element_size` bytes (4 or 8) and op(A), op(B) transposed or not.
GemmTiles gemm_tiles(Index m, Index n, Index k, std::size_t element_size, bool trans_a = false,
                     bool trans_b = false);

/// The tiling rule's parameters (tuning knobs for benchmarks; see gemm.cpp):
/// a product is split while each tile keeps at least `min_work` multiply-adds
/// (float32; half that for float64) and sides of at least `min_side`, and the
/// operands packed again for the extra tiles stay under `max_repack_two` / 10^4
/// elements per multiply-add for a cut into two tiles, `max_repack` / 10^4 for
/// more, into at most `max_tiles` tiles whose sides are multiples of `align`.
struct TileParams {
  Index min_work;
  Index max_tiles;
  Index min_side;
  Index max_repack_two;
  Index max_repack;
  Index align;
};
void set_tile_params(const TileParams& params);
TileParams tile_params();

/// The product over the given tiles instead of gemm_tiles' (benchmarks of the
/// tiling rule). tiles.rows and tiles.cols must be >= 1; the blocks are recomputed.
template <typename T>
void gemm_with_tiles(GemmTiles tiles, bool trans_a, bool trans_b, Index m, Index n, Index k,
                     T alpha, const T* A, Index lda, const T* B, Index ldb, T beta, T* C,
                     Index ldc);

/// For benchmarks only: the product as one BLAS call, OpenBLAS's own threads
/// raised to `threads` for its duration (the core's path before its own pool).
/// Not safe to run beside other products.
template <typename T>
void gemm_untiled(int threads, bool trans_a, bool trans_b, Index m, Index n, Index k, T alpha,
                  const T* A, Index lda, const T* B, Index ldb, T beta, T* C, Index ldc);

/// Name of the backend in use: "openblas" or "eigen".
const char* gemm_backend();

}  // namespace bprop
