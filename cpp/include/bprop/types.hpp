// Shared types of the bprop core.
//
// Batches are rows: a batch of activations is a (batch, features) row-major
// matrix, so a C-contiguous NumPy array maps onto it without a copy.
#pragma once

#include <Eigen/Core>

#include <cstddef>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
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

/// An allocation the core could not make: a std::bad_alloc (MemoryError in Python)
/// that says how many bytes were asked for, and for what when `context` is given.
class OutOfMemory : public std::bad_alloc {
 public:
  OutOfMemory(std::size_t bytes, const std::string& context)
      : bytes_(bytes),
        message_((context.empty() ? std::string() : context + ": ") +
                 (bytes ? "could not allocate " + std::to_string(bytes) + " bytes"
                        : std::string("out of memory"))) {}
  const char* what() const noexcept override { return message_.c_str(); }
  std::size_t bytes() const { return bytes_; }

 private:
  std::size_t bytes_;
  std::string message_;
};

/// Zero-filled storage of n elements; throws OutOfMemory (with the size) on failure.
template <typename T>
Storage<T> allocate_storage(std::size_t n) {
  try {
    return Storage<T>(n, T(0));
  } catch (const std::bad_alloc&) {
    throw OutOfMemory(n * sizeof(T), "");
  } catch (const std::length_error&) {
    throw OutOfMemory(n * sizeof(T), "");
  }
}

/// allocate_storage, shared with the NumPy views of it.
template <typename T>
StoragePtr<T> make_storage(std::size_t n) {
  return std::make_shared<Storage<T>>(allocate_storage<T>(n));
}

/// Runs `allocate`, prefixing any OutOfMemory with `context` (the call and what
/// the memory was for), so the message says where and how much.
template <typename F>
auto with_context(const std::string& context, F&& allocate) {
  try {
    return allocate();
  } catch (const OutOfMemory& e) {
    throw OutOfMemory(e.bytes(), context);
  } catch (const std::bad_alloc&) {
    throw OutOfMemory(0, context);
  }
}

}  // namespace bprop
