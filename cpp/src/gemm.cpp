#include "bprop/gemm.hpp"

#include <atomic>
#include <limits>

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

#ifdef _OPENMP
#include <omp.h>
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
// Products smaller than this (m * n * k) run on one OpenBLAS thread: splitting
// them over the thread pool costs more than it saves at this size, and collapses
// when the machine is oversubscribed (the pool's threads wait for a core).
Index g_serial_work = Index(1) << 20;
// The thread count set by set_gemm_threads; 1 while a small product runs.
std::atomic<int> g_threads{0};

bool fits_blasint(Index m, Index n, Index k, Index lda, Index ldb, Index ldc) {
  const Index limit = std::numeric_limits<int>::max();
  return m <= limit && n <= limit && k <= limit && lda <= limit && ldb <= limit && ldc <= limit;
}

// OpenBLAS has no per-call thread count in this build, only a global one: drop it
// to 1 around a small product and restore it after.
class SerialScope {
 public:
  explicit SerialScope(Index work) {
    if (work < g_serial_work) {
      threads_ = g_threads.load(std::memory_order_relaxed);
      if (threads_ == 0) threads_ = scipy_openblas_get_num_threads();
      if (threads_ > 1) scipy_openblas_set_num_threads(1);
    }
  }
  ~SerialScope() {
    if (threads_ > 1) scipy_openblas_set_num_threads(threads_);
  }
  SerialScope(const SerialScope&) = delete;
  SerialScope& operator=(const SerialScope&) = delete;

 private:
  int threads_ = 0;
};
#endif

}  // namespace

template <>
void gemm<float>(bool trans_a, bool trans_b, Index m, Index n, Index k, float alpha,
                 const float* A, Index lda, const float* B, Index ldb, float beta, float* C,
                 Index ldc) {
#ifdef BPROP_WITH_OPENBLAS
  if (fits_blasint(m, n, k, lda, ldb, ldc)) {
    SerialScope serial(m * n * k);
    scipy_cblas_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans,
                      int(m), int(n), int(k), alpha, A, int(lda), B, int(ldb), beta, C,
                      int(ldc));
    return;
  }
#endif
  eigen_gemm<float>(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

template <>
void gemm<double>(bool trans_a, bool trans_b, Index m, Index n, Index k, double alpha,
                  const double* A, Index lda, const double* B, Index ldb, double beta,
                  double* C, Index ldc) {
#ifdef BPROP_WITH_OPENBLAS
  if (fits_blasint(m, n, k, lda, ldb, ldc)) {
    SerialScope serial(m * n * k);
    scipy_cblas_dgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans,
                      int(m), int(n), int(k), alpha, A, int(lda), B, int(ldb), beta, C,
                      int(ldc));
    return;
  }
#endif
  eigen_gemm<double>(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

void set_serial_threshold(Index work) {
#ifdef BPROP_WITH_OPENBLAS
  g_serial_work = work;
#else
  (void)work;
#endif
}

Index serial_threshold() {
#ifdef BPROP_WITH_OPENBLAS
  return g_serial_work;
#else
  return 0;
#endif
}

const char* gemm_backend() {
#ifdef BPROP_WITH_OPENBLAS
  return "openblas";
#else
  return "eigen";
#endif
}

void set_gemm_threads(int n) {
#ifdef BPROP_WITH_OPENBLAS
  g_threads.store(n, std::memory_order_relaxed);
  scipy_openblas_set_num_threads(n);
#endif
#ifdef _OPENMP
  omp_set_num_threads(n);
#endif
  Eigen::setNbThreads(n);
}

int get_gemm_threads() {
#ifdef BPROP_WITH_OPENBLAS
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : scipy_openblas_get_num_threads();
#else
  return Eigen::nbThreads();
#endif
}

}  // namespace bprop
