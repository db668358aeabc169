// Shared types of the bprop core.
//
// Batches are rows: a batch of activations is a (batch, features) row-major
// matrix, so a C-contiguous NumPy array maps onto it without a copy.
#pragma once

#include <Eigen/Core>

#include <cstddef>
#include <memory>
#include <vector>

namespace bprop {

using Index = Eigen::Index;

template <typename T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using RowVector = Eigen::Matrix<T, 1, Eigen::Dynamic>;

template <typename T>
using MatrixMap = Eigen::Map<RowMatrix<T>>;
template <typename T>
using ConstMatrixMap = Eigen::Map<const RowMatrix<T>>;
template <typename T>
using VectorMap = Eigen::Map<RowVector<T>>;
template <typename T>
using ConstVectorMap = Eigen::Map<const RowVector<T>>;

/// Heap storage owned jointly by the core and by any NumPy view of it: a view
/// holds a reference, so it stays valid memory after the core moves on to a
/// bigger buffer or the network is freed.
template <typename T>
using Storage = std::vector<T, Eigen::aligned_allocator<T>>;
template <typename T>
using StoragePtr = std::shared_ptr<Storage<T>>;

template <typename T>
StoragePtr<T> make_storage(std::size_t n) {
  return std::make_shared<Storage<T>>(n, T(0));
}

}  // namespace bprop
