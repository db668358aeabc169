// Sparse input in compressed sparse row form (scipy.sparse's CSR), for the first
// Dense layer: z = X W + b as a sparse x dense product, and dL/dW = X^T delta
// straight from the CSR arrays (no transposed copy).
//
// Both products are deterministic for any thread count: the forward product
// gives each row of z to one task, and the backward product gives each task a
// fixed range of dL/dW's rows, each row summed over the batch's rows in
// ascending order. Neither allocates.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bprop/types.hpp"

namespace bprop {

/// A batch (rows, cols) in CSR form, referenced, not owned: row i's stored
/// entries are values[k] at column indices[k] for k in [indptr[i], indptr[i+1]).
/// indptr (rows + 1) and indices (nnz) are both int32 or both int64 (scipy picks
/// either). A slice of rows is the same arrays with indptr advanced: indptr's
/// entries are offsets into values and indices, which need not start at 0.
template <typename T>
struct CsrBatch {
  Index rows = 0, cols = 0;
  Index nnz = 0;  // the length of values and indices
  const T* values = nullptr;
  const void* indices = nullptr;
  const void* indptr = nullptr;
  bool index64 = false;

  /// indptr[i] as an Index.
  Index row_start(Index i) const {
    return index64 ? static_cast<Index>(static_cast<const std::int64_t*>(indptr)[i])
                   : static_cast<Index>(static_cast<const std::int32_t*>(indptr)[i]);
  }
  /// Rows [start, start + count) of this batch (no copy).
  CsrBatch slice(Index start, Index count) const {
    CsrBatch s = *this;
    s.rows = count;
    s.indptr = index64 ? static_cast<const void*>(static_cast<const std::int64_t*>(indptr) + start)
                       : static_cast<const void*>(static_cast<const std::int32_t*>(indptr) + start);
    return s;
  }
};

/// A set of row numbers in [0, rows) as a bitmap: the rows of the first layer's W
/// that a sparse batch touches (the columns X stores). Sized once (resize
/// allocates); clear, insert and the queries do not allocate.
struct RowSet {
  Index rows = 0;
  std::vector<std::uint64_t> words;  // bit j % 64 of words[j / 64]: row j is in the set

  void resize(Index n) {
    rows = n;
    words.assign(static_cast<std::size_t>((n + 63) / 64), 0);
  }
  void clear() { std::fill(words.begin(), words.end(), std::uint64_t(0)); }
  void insert(Index j) { words[static_cast<std::size_t>(j >> 6)] |= std::uint64_t(1) << (j & 63); }
  bool contains(Index j) const {
    return (words[static_cast<std::size_t>(j >> 6)] >> (j & 63)) & 1U;
  }
  Index count() const;
  /// Calls f(j) for each row j in the set within [begin, end), ascending.
  template <typename F>
  void for_each(Index begin, Index end, F&& f) const {
    for (Index w = begin >> 6; w < ((end + 63) >> 6); ++w) {
      std::uint64_t bits = words[static_cast<std::size_t>(w)];
      while (bits != 0) {
        const Index j = (w << 6) + __builtin_ctzll(bits);
        bits &= bits - 1;
        if (j >= begin && j < end) f(j);
      }
    }
  }
};

/// Throws std::invalid_argument, tagged with `where`, unless X is a well-formed
/// CSR batch whose products are safe and well defined: indptr starts at 0, never
/// decreases and ends at most at nnz; each row's column indices lie in
/// [0, cols) and strictly increase (sorted, no duplicates: scipy's canonical
/// format); every stored value is finite. O(rows + nnz).
template <typename T>
void check_csr(const CsrBatch<T>& X, const char* where);

/// Sets `rows` (resized to X.cols beforehand) to the column indices X stores.
template <typename T>
void mark_columns(const CsrBatch<T>& X, RowSet& rows);

/// out (rows, n) = X W, W (cols, n) row-major: row i of out is the sum of
/// v W[j, :] over row i's stored (j, v), in stored order.
template <typename T>
void csr_matmul(const CsrBatch<T>& X, const T* W, Index n, T* out);

/// C (cols, n) = alpha X^T D + beta C, D (rows, n): for each row i of X and each
/// stored (j, v), C[j, :] += alpha v D[i, :], i ascending. beta is 0 (C is
/// overwritten, never read) or 1 (accumulate). With `only` (X's columns, as
/// mark_columns gives them) and beta 0, just those rows of C are formed: the
/// others, which X^T D leaves zero, are not written. The tasks own fixed ranges of C's
/// rows; each C[j, :] is summed in the same order by one task, so the bits do
/// not depend on the thread count.
template <typename T>
void csr_t_matmul(const CsrBatch<T>& X, const T* D, Index n, T alpha, T beta, T* C,
                  const RowSet* only = nullptr);

}  // namespace bprop
