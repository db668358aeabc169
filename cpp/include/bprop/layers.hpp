// The layers: Dense (a W + b and an activation, fused), Activation, Dropout,
// BatchNorm, LayerNorm and Residual. Each implements the protocol of layer.hpp;
// the arithmetic of each is written out in cpp/src/layers_impl.hpp and in the
// NumPy reference (python/bprop/reference.py), which is its oracle.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "bprop/layer.hpp"
#include "bprop/sparse.hpp"

namespace bprop {

/// z = a W + b, output = sigma(z). weight (in, out), bias (out) unless spec.bias
/// is false. Caches the lecture's quantities: input a (a reference to the layer
/// below's output, or to the network's input), z, output and delta = dL/dz, which
/// receives dL/d(output) and becomes dL/dz in place; grad_weight = a^T delta.
///
/// As the network's first layer it also takes a sparse batch (forward_sparse):
/// z = X W + b as a CSR x dense product, and dL/dW = X^T delta straight from the
/// CSR arrays (sparse.hpp). Its cached input is then the CSR batch (input() is
/// null, sparse_input() the batch), and it forms no dL/dX.
template <typename T>
class Dense final : public Layer<T> {
 public:
  explicit Dense(const LayerSpec& spec);

  std::vector<Parameter<T>*> parameters() override;
  void allocate(Index batch, std::vector<StoragePtr<T>>& fresh) const override;
  void adopt(typename std::vector<StoragePtr<T>>::iterator& next) override;
  const T* forward(const T* in, Index batch, const ForwardContext& ctx) override;
  T* grad_output() override { return delta_->data(); }
  void backward(T* grad_input, Index batch, const BackwardContext<T>& ctx) override;
  bool apply_fused_sgd(T lr, T l2, Index batch) override;
  void predict(const T* in, T* out, Index batch, T* workspace) const override;

  /// forward() over a CSR batch (batch, in_features), checked by the network
  /// (check_csr), cached by reference until the next forward.
  const T* forward_sparse(const CsrBatch<T>& X, const ForwardContext& ctx);
  /// predict() over a CSR batch.
  void predict_sparse(const CsrBatch<T>& X, T* out) const;

  const Parameter<T>& weight() const { return weight_; }
  const Parameter<T>* bias() const { return this->spec_.bias ? &bias_ : nullptr; }
  const T* input() const { return input_; }
  /// The last forward's CSR batch, or null if it was dense.
  const CsrBatch<T>* sparse_input() const { return sparse_ ? &csr_ : nullptr; }
  const StoragePtr<T>& z() const { return z_; }
  const StoragePtr<T>& output() const override { return output_; }
  const StoragePtr<T>& delta() const { return delta_; }

 private:
  Parameter<T> weight_, bias_;
  StoragePtr<T> z_, output_, delta_;  // output_ is z_ for identity
  const T* input_ = nullptr;
  CsrBatch<T> csr_;      // the sparse input a, by reference, when sparse_
  bool sparse_ = false;
  RowSet present_;       // the columns csr_ stores: the rows of dL/dW that can be non-zero
  void bias_activation(Index batch);
};

/// output = sigma(input), any activation of the registry as a layer of its own.
template <typename T>
class ActivationLayer final : public Layer<T> {
 public:
  ActivationLayer(const LayerSpec& spec, Index features);

  void allocate(Index batch, std::vector<StoragePtr<T>>& fresh) const override;
  void adopt(typename std::vector<StoragePtr<T>>::iterator& next) override;
  const T* forward(const T* in, Index batch, const ForwardContext& ctx) override;
  T* grad_output() override { return grad_->data(); }
  void backward(T* grad_input, Index batch, const BackwardContext<T>& ctx) override;
  void predict(const T* in, T* out, Index batch, T* workspace) const override;

  const StoragePtr<T>& output() const override { return output_; }

 private:
  StoragePtr<T> output_, grad_;
  const T* input_ = nullptr;
};

/// The dropout mask generator, shared with the reference (python/bprop/reference.py
/// writes the same arithmetic in NumPy): SplitMix64's output function. Inline: the
/// mask loop calls it once per element.
inline std::uint64_t splitmix64(std::uint64_t x) {
  std::uint64_t z = x + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

/// The key of one Dropout layer's mask at one training forward pass.
std::uint64_t dropout_key(std::uint64_t seed, std::int64_t step, std::int64_t index);

/// Inverted dropout: in training, each element is kept with probability 1 - p
/// (u >= p, u = (splitmix64(key + e) >> 11) 2^-53 for element e of the row-major
/// (batch, features) input) and scaled by 1 / (1 - p); in eval, the identity.
template <typename T>
class Dropout final : public Layer<T> {
 public:
  Dropout(const LayerSpec& spec, Index features);

  void allocate(Index batch, std::vector<StoragePtr<T>>& fresh) const override;
  void adopt(typename std::vector<StoragePtr<T>>::iterator& next) override;
  const T* forward(const T* in, Index batch, const ForwardContext& ctx) override;
  T* grad_output() override { return grad_->data(); }
  void backward(T* grad_input, Index batch, const BackwardContext<T>& ctx) override;
  void predict(const T* in, T* out, Index batch, T* workspace) const override;

  /// Its position among the network's Dropout layers (depth first), set by Network.
  void set_index(std::int64_t index) { index_ = index; }
  std::int64_t index() const { return index_; }
  const StoragePtr<T>& mask() const { return mask_; }  // 1 kept, 0 dropped
  const StoragePtr<T>& output() const override { return output_; }

 private:
  StoragePtr<T> mask_, output_, grad_;
  std::int64_t index_ = 0;
  bool trained_ = false;  // the last forward was in training mode
};

/// PyTorch's BatchNorm1d over (batch, features): batch statistics in training
/// (biased variance), updating running_mean and running_var (unbiased) with
/// `momentum` when the network commits the forward pass; running statistics in
/// eval. weight (gamma) and bias (beta) when affine.
template <typename T>
class BatchNorm final : public Layer<T> {
 public:
  explicit BatchNorm(const LayerSpec& spec);

  std::vector<Parameter<T>*> parameters() override;
  std::vector<Buffer<T>*> buffers() override;
  void allocate(Index batch, std::vector<StoragePtr<T>>& fresh) const override;
  void adopt(typename std::vector<StoragePtr<T>>::iterator& next) override;
  const T* forward(const T* in, Index batch, const ForwardContext& ctx) override;
  T* grad_output() override { return grad_->data(); }
  void backward(T* grad_input, Index batch, const BackwardContext<T>& ctx) override;
  void predict(const T* in, T* out, Index batch, T* workspace) const override;
  /// Folds the last training forward's statistics into the running ones.
  void commit() override;
  Index predict_workspace(Index batch) const override;

  const StoragePtr<T>& output() const override { return output_; }
  const StoragePtr<T>& normalized() const { return xhat_; }

 private:
  Parameter<T> weight_, bias_;
  Buffer<T> running_mean_, running_var_;
  StoragePtr<T> xhat_, output_, grad_;
  // per feature: the last training forward's mean and variance (float64), the last
  // forward's 1 / sqrt(var + eps) and the mean it subtracted; backward's sums
  Storage<double> mean_, var_;
  Storage<T> invstd_, shift_, sum_g_, sum_gh_;
  bool trained_ = false;        // the last forward was in training mode
  bool pending_ = false;        // its statistics are not yet committed
  Index batch_ = 0;
};

/// PyTorch's LayerNorm over the last dimension: each row normalised by its own
/// mean and biased variance, then weight and bias (elementwise_affine).
template <typename T>
class LayerNorm final : public Layer<T> {
 public:
  explicit LayerNorm(const LayerSpec& spec);

  std::vector<Parameter<T>*> parameters() override;
  void allocate(Index batch, std::vector<StoragePtr<T>>& fresh) const override;
  void adopt(typename std::vector<StoragePtr<T>>::iterator& next) override;
  const T* forward(const T* in, Index batch, const ForwardContext& ctx) override;
  T* grad_output() override { return grad_->data(); }
  void backward(T* grad_input, Index batch, const BackwardContext<T>& ctx) override;
  void predict(const T* in, T* out, Index batch, T* workspace) const override;

  const StoragePtr<T>& output() const override { return output_; }
  const StoragePtr<T>& normalized() const { return xhat_; }

 private:
  Parameter<T> weight_, bias_;
  StoragePtr<T> xhat_, invstd_, output_, grad_;  // invstd_: (batch)
};

/// y = x + f(x), f its layers in sequence; f's output width equals its input width.
template <typename T>
class Residual final : public Layer<T> {
 public:
  Residual(const LayerSpec& spec, Index features, const std::string& where);

  std::vector<Layer<T>*> children() override;
  void allocate(Index batch, std::vector<StoragePtr<T>>& fresh) const override;
  void adopt(typename std::vector<StoragePtr<T>>::iterator& next) override;
  const T* forward(const T* in, Index batch, const ForwardContext& ctx) override;
  T* grad_output() override { return grad_->data(); }
  void backward(T* grad_input, Index batch, const BackwardContext<T>& ctx) override;
  void predict(const T* in, T* out, Index batch, T* workspace) const override;
  Index predict_workspace(Index batch) const override;

  const StoragePtr<T>& output() const override { return output_; }

 private:
  std::vector<std::unique_ptr<Layer<T>>> layers_;
  StoragePtr<T> output_, grad_;
  Index widest_ = 0;  // the widest output among its layers
};

/// The width a spec's input must have, or -1 for a layer that takes any width
/// (Activation, Dropout, and a Residual of such layers only).
Index declared_in_features(const LayerSpec& spec);

}  // namespace bprop
