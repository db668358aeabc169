// The CSR products of sparse.hpp.
#include "bprop/sparse.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "bprop/thread_pool.hpp"

namespace bprop {

namespace {

template <typename I>
const I* as(const void* p) {
  return static_cast<const I*>(p);
}

// The rows of W (forward) and of dL/dW (backward) that a sparse batch visits are
// scattered over a matrix far larger than the caches: each visit waits on memory.
// Asking for the row kPrefetchAhead stored entries ahead overlaps those waits.
constexpr Index kPrefetchAhead = 4;

template <typename T>
inline void prefetch_row(const T* row, Index n, int write) {
  const char* p = reinterpret_cast<const char*>(row);
  const char* end = reinterpret_cast<const char*>(row + n);
  for (; p < end; p += 64) {
    if (write) {
      __builtin_prefetch(p, 1);
    } else {
      __builtin_prefetch(p, 0);
    }
  }
}

template <typename T, typename I>
void check_typed(const CsrBatch<T>& X, const char* where) {
  const I* indptr = as<I>(X.indptr);
  const I* indices = as<I>(X.indices);
  // the message is built only on failure: the check allocates nothing
  auto tag = [where] { return std::string("[") + where + "] X "; };
  if (indptr[0] != 0) {
    throw std::invalid_argument(tag() + "is not a valid CSR matrix: indptr[0] must be 0, but is " +
                                std::to_string(indptr[0]));
  }
  for (Index i = 0; i < X.rows; ++i) {
    const Index begin = indptr[i], end = indptr[i + 1];
    if (end < begin || end > X.nnz) {
      throw std::invalid_argument(
          tag() + "is not a valid CSR matrix: indptr must not decrease and must end at most at "
          "the number of stored values (" + std::to_string(X.nnz) + "), but indptr[" +
          std::to_string(i) + ":" + std::to_string(i + 2) + "] = [" + std::to_string(begin) +
          ", " + std::to_string(end) + "]");
    }
    for (Index k = begin; k < end; ++k) {
      const Index j = indices[k];
      if (j < 0 || j >= X.cols) {
        throw std::invalid_argument(tag() + "has a column index out of range: row " +
                                    std::to_string(i) + " stores column " + std::to_string(j) +
                                    ", but X has " + std::to_string(X.cols) + " columns");
      }
      if (k > begin && j <= static_cast<Index>(indices[k - 1])) {
        throw std::invalid_argument(
            tag() + "has " + (j == static_cast<Index>(indices[k - 1]) ? "duplicate" : "unsorted") +
            " column indices in row " + std::to_string(i) + "; put it in canonical form once "
            "with X.sum_duplicates() (which also sorts), or X.sort_indices()");
      }
      if (!std::isfinite(X.values[k])) {
        throw std::invalid_argument(tag() + "must be finite, but stores " +
                                    std::to_string(X.values[k]) + " at row " +
                                    std::to_string(i) + ", column " + std::to_string(j));
      }
    }
  }
}

template <typename T, typename I>
void matmul_typed(const CsrBatch<T>& X, const T* W, Index n, T* out) {
  const I* indptr = as<I>(X.indptr);
  const I* indices = as<I>(X.indices);
  // Fixed blocks of rows, one task each; each row of out is one task's.
  const Index rows_per_task = std::max<Index>(1, 16384 / std::max<Index>(n, 1));
  const Index tasks = (X.rows + rows_per_task - 1) / rows_per_task;
  auto task = [&](Index t) {
    const Index r0 = t * rows_per_task, r1 = std::min(X.rows, r0 + rows_per_task);
    const Index k_end = indptr[r1];
    for (Index k = indptr[r0]; k < std::min(k_end, indptr[r0] + kPrefetchAhead); ++k) {
      prefetch_row(W + static_cast<Index>(indices[k]) * n, n, 0);
    }
    for (Index i = r0; i < r1; ++i) {
      VectorMap<T> z(out + i * n, n);
      z.setZero();
      // z_i = sum over stored (j, v) of v W[j, :]
      for (Index k = indptr[i]; k < static_cast<Index>(indptr[i + 1]); ++k) {
        if (k + kPrefetchAhead < k_end) {
          prefetch_row(W + static_cast<Index>(indices[k + kPrefetchAhead]) * n, n, 0);
        }
        z.noalias() += X.values[k] * ConstVectorMap<T>(W + static_cast<Index>(indices[k]) * n, n);
      }
    }
  };
  parallel_for(tasks, task);
}

template <typename T, typename I>
void mark_typed(const CsrBatch<T>& X, RowSet& rows) {
  const I* indptr = as<I>(X.indptr);
  const I* indices = as<I>(X.indices);
  rows.clear();
  for (Index k = indptr[0]; k < static_cast<Index>(indptr[X.rows]); ++k) rows.insert(indices[k]);
}

template <typename T, typename I>
void t_matmul_typed(const CsrBatch<T>& X, const T* D, Index n, T alpha, T beta, T* C,
                    const RowSet* only) {
  const I* indptr = as<I>(X.indptr);
  const I* indices = as<I>(X.indices);
  const Index nnz = X.rows > 0 ? static_cast<Index>(indptr[X.rows]) - indptr[0] : 0;
  // Fixed ranges of C's rows (columns of X), one task each, their number set by
  // the work alone. Within a range, C[j, :] gathers row i's contribution for
  // i = 0, 1, ...: the same order whatever the ranges, so the bits are too.
  const Index work = nnz * n + X.cols * n;
  const Index tasks = std::clamp<Index>(work / 65536, 1, std::min<Index>(64, std::max<Index>(X.cols, 1)));
  const Index per = (X.cols + tasks - 1) / tasks;
  auto task = [&](Index t) {
    const Index j0 = t * per, j1 = std::min(X.cols, j0 + per);
    if (j0 >= j1) return;
    MatrixMap<T> Cr(C + j0 * n, j1 - j0, n);
    if (beta == T(0) && only != nullptr) {
      only->for_each(j0, j1, [&](Index j) { VectorMap<T>(C + j * n, n).setZero(); });
    } else if (beta == T(0)) {
      Cr.setZero();
    } else if (beta != T(1)) {
      Cr *= beta;
    }
    for (Index i = 0; i < X.rows; ++i) {
      const I* first = indices + indptr[i];
      const I* last = indices + indptr[i + 1];
      // the row's indices are sorted (check_csr): its entries in [j0, j1) are contiguous
      const I* k = tasks > 1 ? std::lower_bound(first, last, static_cast<I>(j0)) : first;
      const ConstVectorMap<T> d(D + i * n, n);
      for (; k != last && static_cast<Index>(*k) < j1; ++k) {
        if (last - k > kPrefetchAhead && static_cast<Index>(k[kPrefetchAhead]) < j1) {
          prefetch_row(C + static_cast<Index>(k[kPrefetchAhead]) * n, n, 1);
        }
        const T v = alpha * X.values[k - indices];
        // dL/dW[j, :] += v delta[i, :]
        VectorMap<T>(C + static_cast<Index>(*k) * n, n).noalias() += v * d;
      }
    }
  };
  parallel_for(tasks, task);
}

}  // namespace

template <typename T>
void check_csr(const CsrBatch<T>& X, const char* where) {
  if (X.index64) {
    check_typed<T, std::int64_t>(X, where);
  } else {
    check_typed<T, std::int32_t>(X, where);
  }
}

template <typename T>
void csr_matmul(const CsrBatch<T>& X, const T* W, Index n, T* out) {
  if (X.index64) {
    matmul_typed<T, std::int64_t>(X, W, n, out);
  } else {
    matmul_typed<T, std::int32_t>(X, W, n, out);
  }
}

template <typename T>
void mark_columns(const CsrBatch<T>& X, RowSet& rows) {
  if (X.index64) {
    mark_typed<T, std::int64_t>(X, rows);
  } else {
    mark_typed<T, std::int32_t>(X, rows);
  }
}

template <typename T>
void csr_t_matmul(const CsrBatch<T>& X, const T* D, Index n, T alpha, T beta, T* C,
                  const RowSet* only) {
  if (X.index64) {
    t_matmul_typed<T, std::int64_t>(X, D, n, alpha, beta, C, only);
  } else {
    t_matmul_typed<T, std::int32_t>(X, D, n, alpha, beta, C, only);
  }
}

Index RowSet::count() const {
  Index n = 0;
  for (std::uint64_t w : words) n += __builtin_popcountll(w);
  return n;
}

template void check_csr<float>(const CsrBatch<float>&, const char*);
template void check_csr<double>(const CsrBatch<double>&, const char*);
template void csr_matmul<float>(const CsrBatch<float>&, const float*, Index, float*);
template void csr_matmul<double>(const CsrBatch<double>&, const double*, Index, double*);
template void mark_columns<float>(const CsrBatch<float>&, RowSet&);
template void mark_columns<double>(const CsrBatch<double>&, RowSet&);
template void csr_t_matmul<float>(const CsrBatch<float>&, const float*, Index, float, float,
                                  float*, const RowSet*);
template void csr_t_matmul<double>(const CsrBatch<double>&, const double*, Index, double,
                                   double, double*, const RowSet*);

}  // namespace bprop
