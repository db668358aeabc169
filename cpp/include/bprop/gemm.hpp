// The one matrix product of the core, row-major:
//   C = alpha * op(A) * op(B) + beta * C,  op(X) = X or X^T,
// with op(A) (m, k), op(B) (k, n), C (m, n). It goes to OpenBLAS (the
// scipy-openblas32 wheel, runtime-dispatched kernels) when the core is built
// with it, and to Eigen's own product otherwise.
#pragma once

#include "bprop/types.hpp"

namespace bprop {

template <typename T>
void gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, T alpha, const T* A, Index lda,
          const T* B, Index ldb, T beta, T* C, Index ldc);

/// Products with m * n * k below this run on one thread, larger ones on all the
/// threads set by set_gemm_threads (default 2^20). Set it at start-up.
void set_serial_threshold(Index work);
Index serial_threshold();

/// Name of the backend in use: "openblas" or "eigen".
const char* gemm_backend();

/// Threads used by matrix products (OpenBLAS's pool, or Eigen's OpenMP).
void set_gemm_threads(int n);
int get_gemm_threads();

}  // namespace bprop
