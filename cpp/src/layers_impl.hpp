// Template definitions of the layers, instantiated in layers_f32.cpp and
// layers_f64.cpp. Each layer's arithmetic is the derivation written in
// python/bprop/reference.py; the comments give it in the same names.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <limits>
#include <stdexcept>
#include <string>

#include "bprop/gemm.hpp"
#include "bprop/layers.hpp"
#include "bprop/thread_pool.hpp"

namespace bprop {

namespace detail {

template <typename T>
Parameter<T> make_parameter(const char* name, std::vector<Index> shape, bool decays) {
  Index n = 1;
  for (Index d : shape) n *= d;
  const auto size = static_cast<std::size_t>(n);
  return Parameter<T>{name, std::move(shape), make_storage<T>(size), make_storage<T>(size),
                      decays};
}

template <typename T>
void fill(const StoragePtr<T>& s, T value) {
  std::fill(s->begin(), s->end(), value);
}

// (batch, features) caches of a width-preserving layer
template <typename T>
void push_caches(std::vector<StoragePtr<T>>& fresh, Index batch, Index features, int count) {
  for (int i = 0; i < count; ++i) {
    fresh.push_back(make_storage<T>(static_cast<std::size_t>(batch * features)));
  }
}

}  // namespace detail

// ---- Dense ----------------------------------------------------------------------

template <typename T>
Dense<T>::Dense(const LayerSpec& spec)
    : Layer<T>(spec),
      weight_(detail::make_parameter<T>("weight", {spec.in_features, spec.out_features}, true)),
      z_(make_storage<T>(0)),
      output_(z_),
      delta_(make_storage<T>(0)) {
  this->in_ = spec.in_features;
  this->out_ = spec.out_features;
  if (spec.bias) bias_ = detail::make_parameter<T>("bias", {spec.out_features}, false);
  present_.resize(spec.in_features);  // in_features / 8 bytes
}

template <typename T>
std::vector<Parameter<T>*> Dense<T>::parameters() {
  if (this->spec_.bias) return {&weight_, &bias_};
  return {&weight_};
}

template <typename T>
void Dense<T>::allocate(Index batch, std::vector<StoragePtr<T>>& fresh) const {
  const auto n = static_cast<std::size_t>(batch * this->out_);
  fresh.push_back(make_storage<T>(n));  // z
  fresh.push_back(this->spec_.activation == Activation::identity ? fresh.back()
                                                                  : make_storage<T>(n));
  fresh.push_back(make_storage<T>(n));  // delta
}

template <typename T>
void Dense<T>::adopt(typename std::vector<StoragePtr<T>>::iterator& next) {
  z_ = *next++;
  output_ = *next++;
  delta_ = *next++;
}

template <typename T>
const T* Dense<T>::forward(const T* in, Index batch, const ForwardContext&) {
  const Index I = this->in_, O = this->out_;
  input_ = in;  // a, by reference
  sparse_ = false;
  weight_.present_rows = nullptr;
  // z = a W + b, output = sigma(z)
  gemm<T>(false, false, batch, O, I, T(1), in, I, weight_.value->data(), O, T(0), z_->data(), O);
  bias_activation(batch);
  return output_->data();
}

template <typename T>
const T* Dense<T>::forward_sparse(const CsrBatch<T>& X, const ForwardContext&) {
  input_ = nullptr;
  csr_ = X;  // a, by reference
  sparse_ = true;
  mark_columns<T>(X, present_);  // dL/dW = X^T delta is zero outside these rows
  weight_.present_rows = &present_;
  // z = X W + b, output = sigma(z), X sparse
  csr_matmul<T>(X, weight_.value->data(), this->out_, z_->data());
  bias_activation(X.rows);
  return output_->data();
}

template <typename T>
void Dense<T>::bias_activation(Index batch) {
  const T slope = static_cast<T>(this->spec_.negative_slope);
  if (this->spec_.bias) {
    bias_activation_forward<T>(this->spec_.activation, slope, bias_.value->data(), z_->data(),
                               output_->data(), batch, this->out_);
  } else {
    activation_forward<T>(this->spec_.activation, slope, z_->data(), output_->data(), batch,
                          this->out_);
  }
}

template <typename T>
void Dense<T>::backward(T* grad_input, Index batch, const BackwardContext<T>& ctx) {
  const Index I = this->in_, O = this->out_;
  if (grad_input != nullptr && sparse_) {  // Network::backward refuses it first
    throw std::logic_error("[Dense.backward] dL/dX is not formed for a sparse input");
  }
  T* delta = delta_->data();
  // delta = sigma'(z) * dL/d(output), in place (softmax: its Jacobian-vector product)
  activation_backward<T>(this->spec_.activation, static_cast<T>(this->spec_.negative_slope),
                         z_->data(), output_->data(), delta, delta, batch, O);
  ctx.check_poll();
  if (grad_input != nullptr) {
    // dL/da of the layer below = delta W^T, formed while W is unchanged
    gemm<T>(false, true, batch, I, O, T(1), delta, O, weight_.value->data(), O, T(0),
            grad_input, I);
  }
  if (ctx.sgd_lr < T(0)) {
    if (grad_input != nullptr) ctx.check_poll();
    // dL/dW = a^T delta (+ l2 W), dL/db = column sums of delta
    if (sparse_) {  // X^T delta from the CSR arrays, no transposed copy
      // a lazy update reads the batch's rows only: the others are not formed
      const bool rows_only = ctx.lazy && !ctx.accumulate;
      csr_t_matmul<T>(csr_, delta, O, T(1), ctx.accumulate ? T(1) : T(0), weight_.grad->data(),
                      rows_only ? &present_ : nullptr);
    } else {
      gemm<T>(true, false, I, O, batch, T(1), input_, I, delta, O, ctx.accumulate ? T(1) : T(0),
              weight_.grad->data(), O);
    }
    if (ctx.l2 != T(0)) {
      VectorMap<T>(weight_.grad->data(), I * O).noalias() +=
          ctx.l2 * ConstVectorMap<T>(weight_.value->data(), I * O);
    }
    if (this->spec_.bias) {
      VectorMap<T> gb(bias_.grad->data(), O);
      ConstMatrixMap<T> D(delta, batch, O);
      if (ctx.accumulate) {
        gb.noalias() += D.colwise().sum();
      } else {
        gb.noalias() = D.colwise().sum();
      }
    }
  }
  ctx.gradients_ready(*this);
}

template <typename T>
bool Dense<T>::apply_fused_sgd(T lr, T l2, Index batch) {
  const Index I = this->in_, O = this->out_;
  // W -= lr (a^T delta + l2 W) as one product into W, b -= lr colsum(delta)
  if (l2 != T(0)) VectorMap<T>(weight_.value->data(), I * O) *= T(1) - lr * l2;
  if (sparse_) {
    csr_t_matmul<T>(csr_, delta_->data(), O, -lr, T(1), weight_.value->data());
  } else {
    gemm<T>(true, false, I, O, batch, -lr, input_, I, delta_->data(), O, T(1),
            weight_.value->data(), O);
  }
  if (this->spec_.bias) {
    VectorMap<T>(bias_.value->data(), O).noalias() -=
        lr * ConstMatrixMap<T>(delta_->data(), batch, O).colwise().sum();
  }
  return true;
}

template <typename T>
void Dense<T>::predict(const T* in, T* out, Index batch, T*) const {
  const Index I = this->in_, O = this->out_;
  gemm<T>(false, false, batch, O, I, T(1), in, I, weight_.value->data(), O, T(0), out, O);
  const T slope = static_cast<T>(this->spec_.negative_slope);
  if (this->spec_.bias) {
    bias_activation_forward<T>(this->spec_.activation, slope, bias_.value->data(), out, out,
                               batch, O);
  } else {
    activation_forward<T>(this->spec_.activation, slope, out, out, batch, O);
  }
}

template <typename T>
void Dense<T>::predict_sparse(const CsrBatch<T>& X, T* out) const {
  const Index O = this->out_;
  csr_matmul<T>(X, weight_.value->data(), O, out);
  const T slope = static_cast<T>(this->spec_.negative_slope);
  if (this->spec_.bias) {
    bias_activation_forward<T>(this->spec_.activation, slope, bias_.value->data(), out, out,
                               X.rows, O);
  } else {
    activation_forward<T>(this->spec_.activation, slope, out, out, X.rows, O);
  }
}

// ---- Activation -------------------------------------------------------------------

template <typename T>
ActivationLayer<T>::ActivationLayer(const LayerSpec& spec, Index features)
    : Layer<T>(spec), output_(make_storage<T>(0)), grad_(make_storage<T>(0)) {
  this->in_ = this->out_ = features;
}

template <typename T>
void ActivationLayer<T>::allocate(Index batch, std::vector<StoragePtr<T>>& fresh) const {
  detail::push_caches(fresh, batch, this->out_, 2);
}

template <typename T>
void ActivationLayer<T>::adopt(typename std::vector<StoragePtr<T>>::iterator& next) {
  output_ = *next++;
  grad_ = *next++;
}

template <typename T>
const T* ActivationLayer<T>::forward(const T* in, Index batch, const ForwardContext&) {
  input_ = in;  // z of the activation
  activation_forward<T>(this->spec_.activation, static_cast<T>(this->spec_.negative_slope), in,
                        output_->data(), batch, this->out_);
  return output_->data();
}

template <typename T>
void ActivationLayer<T>::backward(T* grad_input, Index batch, const BackwardContext<T>& ctx) {
  (void)ctx;
  if (grad_input == nullptr) return;
  // dL/dz = sigma'(z) * dL/d(output)
  activation_backward<T>(this->spec_.activation, static_cast<T>(this->spec_.negative_slope),
                         input_, output_->data(), grad_->data(), grad_input, batch, this->out_);
}

template <typename T>
void ActivationLayer<T>::predict(const T* in, T* out, Index batch, T*) const {
  activation_forward<T>(this->spec_.activation, static_cast<T>(this->spec_.negative_slope), in,
                        out, batch, this->out_);
}

// ---- Dropout ------------------------------------------------------------------------

// Elements per task when a dropout mask is drawn on the thread pool.
constexpr Index kDropoutBlock = Index(1) << 14;

template <typename T>
Dropout<T>::Dropout(const LayerSpec& spec, Index features)
    : Layer<T>(spec),
      mask_(make_storage<T>(0)),
      output_(make_storage<T>(0)),
      grad_(make_storage<T>(0)) {
  this->in_ = this->out_ = features;
}

template <typename T>
void Dropout<T>::allocate(Index batch, std::vector<StoragePtr<T>>& fresh) const {
  detail::push_caches(fresh, batch, this->out_, 3);
}

template <typename T>
void Dropout<T>::adopt(typename std::vector<StoragePtr<T>>::iterator& next) {
  mask_ = *next++;
  output_ = *next++;
  grad_ = *next++;
}

/// Elements [begin, end) of a dropout forward: the mask and the output. Without a
/// branch on the random keep (a mispredicted branch per few elements cost more than
/// the draw): the scaled input's bits are and-ed with all ones or zeros, so that a
/// dropped element is exactly 0 even where the input is inf or NaN.
template <typename T>
void dropout_block(const T* __restrict in, T* __restrict out, T* __restrict mask,
                   std::uint64_t key, std::uint64_t threshold, T scale, Index begin, Index end) {
  using Bits = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  for (Index e = begin; e < end; ++e) {
    const Bits keep = (splitmix64(key + static_cast<std::uint64_t>(e)) >> 11) >= threshold;
    mask[e] = static_cast<T>(keep);
    const T scaled = in[e] * scale;
    Bits bits;
    std::memcpy(&bits, &scaled, sizeof bits);
    bits &= Bits(0) - keep;
    std::memcpy(&out[e], &bits, sizeof bits);
  }
}

template <typename T>
const T* Dropout<T>::forward(const T* in, Index batch, const ForwardContext& ctx) {
  const Index n = batch * this->out_;
  T* out = output_->data();
  T* mask = mask_->data();
  trained_ = ctx.training;
  if (!ctx.training) {
    std::copy(in, in + n, out);
    return out;
  }
  // keep element e when u_e >= p, u_e = (splitmix64(key + e) >> 11) 2^-53, exactly as
  // the reference draws it; kept elements are scaled by 1 / (1 - p)
  const double p = this->spec_.p;
  const T scale = static_cast<T>(1.0 / (1.0 - p));
  const std::uint64_t key = dropout_key(ctx.seed, ctx.step, index_);
  // u = k 2^-53 with k = bits >> 11 an integer, so u >= p exactly when
  // k >= ceil(p 2^53) (p 2^53 is exact: a power-of-two scaling): the comparison in
  // integers, without a conversion per element
  const auto threshold = static_cast<std::uint64_t>(std::ceil(std::ldexp(p, 53)));
  // in fixed blocks on the pool: each element's draw depends on its index alone
  auto block = [=](Index b) {
    dropout_block(in, out, mask, key, threshold, scale, b * kDropoutBlock,
                  std::min(n, (b + 1) * kDropoutBlock));
  };
  parallel_for((n + kDropoutBlock - 1) / kDropoutBlock, block);
  return out;
}

template <typename T>
void Dropout<T>::backward(T* grad_input, Index batch, const BackwardContext<T>&) {
  if (grad_input == nullptr) return;
  const Index n = batch * this->out_;
  const T* g = grad_->data();
  if (!trained_) {
    std::copy(g, g + n, grad_input);
    return;
  }
  const T scale = static_cast<T>(1.0 / (1.0 - this->spec_.p));
  const T* mask = mask_->data();
  for (Index e = 0; e < n; ++e) grad_input[e] = mask[e] != T(0) ? g[e] * scale : T(0);
}

template <typename T>
void Dropout<T>::predict(const T* in, T* out, Index batch, T*) const {
  std::copy(in, in + batch * this->out_, out);
}

// ---- BatchNorm ----------------------------------------------------------------------

template <typename T>
BatchNorm<T>::BatchNorm(const LayerSpec& spec)
    : Layer<T>(spec),
      xhat_(make_storage<T>(0)),
      output_(make_storage<T>(0)),
      grad_(make_storage<T>(0)) {
  const Index F = spec.in_features;
  this->in_ = this->out_ = F;
  if (spec.affine) {
    weight_ = detail::make_parameter<T>("weight", {F}, false);
    bias_ = detail::make_parameter<T>("bias", {F}, false);
    detail::fill(weight_.value, T(1));
  }
  running_mean_ = {"running_mean", {F}, make_storage<T>(static_cast<std::size_t>(F))};
  running_var_ = {"running_var", {F}, make_storage<T>(static_cast<std::size_t>(F))};
  detail::fill(running_var_.value, T(1));
  const auto f = static_cast<std::size_t>(F);
  mean_ = allocate_storage<double>(f);
  var_ = allocate_storage<double>(f);
  invstd_ = allocate_storage<T>(f);
  shift_ = allocate_storage<T>(f);
  sum_g_ = allocate_storage<T>(f);
  sum_gh_ = allocate_storage<T>(f);
}

template <typename T>
std::vector<Parameter<T>*> BatchNorm<T>::parameters() {
  if (this->spec_.affine) return {&weight_, &bias_};
  return {};
}

template <typename T>
std::vector<Buffer<T>*> BatchNorm<T>::buffers() {
  return {&running_mean_, &running_var_};
}

template <typename T>
void BatchNorm<T>::allocate(Index batch, std::vector<StoragePtr<T>>& fresh) const {
  detail::push_caches(fresh, batch, this->out_, 3);
}

template <typename T>
void BatchNorm<T>::adopt(typename std::vector<StoragePtr<T>>::iterator& next) {
  xhat_ = *next++;
  output_ = *next++;
  grad_ = *next++;
}

template <typename T>
const T* BatchNorm<T>::forward(const T* in, Index batch, const ForwardContext& ctx) {
  const Index F = this->out_;
  if (ctx.training && batch < 2) {
    throw std::invalid_argument(
        "[BatchNorm] training needs more than one row per batch (the batch variance of one "
        "row is 0), but got " + std::to_string(batch) + "; use a larger batch, or eval mode");
  }
  const double eps = this->spec_.eps;
  double* mean = mean_.data();
  double* var = var_.data();
  T* s = invstd_.data();
  T* shift = shift_.data();
  if (ctx.training) {
    // batch mean and biased variance per feature, in float64, two passes
    std::fill(mean, mean + F, 0.0);
    std::fill(var, var + F, 0.0);
    for (Index r = 0; r < batch; ++r) {
      const T* x = in + r * F;
      for (Index j = 0; j < F; ++j) mean[j] += static_cast<double>(x[j]);
    }
    for (Index j = 0; j < F; ++j) mean[j] /= static_cast<double>(batch);
    for (Index r = 0; r < batch; ++r) {
      const T* x = in + r * F;
      for (Index j = 0; j < F; ++j) {
        const double d = static_cast<double>(x[j]) - mean[j];
        var[j] += d * d;
      }
    }
    for (Index j = 0; j < F; ++j) {
      var[j] /= static_cast<double>(batch);
      s[j] = static_cast<T>(1.0 / std::sqrt(var[j] + eps));
      shift[j] = static_cast<T>(mean[j]);
    }
  } else {
    const T* rm = running_mean_.value->data();
    const T* rv = running_var_.value->data();
    for (Index j = 0; j < F; ++j) {
      s[j] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(rv[j]) + eps));
      shift[j] = rm[j];
    }
  }
  // xhat = (x - mean) invstd, y = gamma xhat + beta
  const T* gamma = this->spec_.affine ? weight_.value->data() : nullptr;
  const T* beta = this->spec_.affine ? bias_.value->data() : nullptr;
  for (Index r = 0; r < batch; ++r) {
    const T* x = in + r * F;
    T* h = xhat_->data() + r * F;
    T* y = output_->data() + r * F;
    for (Index j = 0; j < F; ++j) {
      h[j] = (x[j] - shift[j]) * s[j];
      y[j] = gamma != nullptr ? h[j] * gamma[j] + beta[j] : h[j];
    }
  }
  trained_ = ctx.training;
  pending_ = ctx.training;
  batch_ = batch;
  return output_->data();
}

template <typename T>
void BatchNorm<T>::commit() {
  if (!pending_) return;
  pending_ = false;
  const Index F = this->out_;
  const double m = this->spec_.momentum;
  const double unbias = static_cast<double>(batch_) / static_cast<double>(batch_ - 1);
  T* rm = running_mean_.value->data();
  T* rv = running_var_.value->data();
  for (Index j = 0; j < F; ++j) {
    const auto i = static_cast<std::size_t>(j);
    rm[j] = static_cast<T>((1.0 - m) * static_cast<double>(rm[j]) + m * mean_[i]);
    rv[j] = static_cast<T>((1.0 - m) * static_cast<double>(rv[j]) + m * var_[i] * unbias);
  }
}

template <typename T>
void BatchNorm<T>::backward(T* grad_input, Index batch, const BackwardContext<T>& ctx) {
  const Index F = this->out_;
  const T* G = grad_->data();  // dL/dy
  const T* H = xhat_->data();
  // dL/dbeta = column sums of dL/dy, dL/dgamma = column sums of dL/dy * xhat
  T* sum_g = sum_g_.data();
  T* sum_gh = sum_gh_.data();
  std::fill(sum_g, sum_g + F, T(0));
  std::fill(sum_gh, sum_gh + F, T(0));
  for (Index r = 0; r < batch; ++r) {
    const T* g = G + r * F;
    const T* h = H + r * F;
    for (Index j = 0; j < F; ++j) {
      sum_g[j] += g[j];
      sum_gh[j] += g[j] * h[j];
    }
  }
  if (this->spec_.affine) {
    T* gw = weight_.grad->data();
    T* gb = bias_.grad->data();
    for (Index j = 0; j < F; ++j) {
      gw[j] = ctx.accumulate ? gw[j] + sum_gh[j] : sum_gh[j];
      gb[j] = ctx.accumulate ? gb[j] + sum_g[j] : sum_g[j];
    }
  }
  if (grad_input != nullptr) {
    const T* s = invstd_.data();
    const T* gamma = this->spec_.affine ? weight_.value->data() : nullptr;
    const T n = static_cast<T>(batch);
    for (Index r = 0; r < batch; ++r) {
      const T* g = G + r * F;
      const T* h = H + r * F;
      T* dx = grad_input + r * F;
      for (Index j = 0; j < F; ++j) {
        const T c = gamma != nullptr ? gamma[j] : T(1);
        if (trained_) {
          // dxhat = gamma dL/dy; dL/dx = invstd / n (n dxhat - sum dxhat - xhat sum(dxhat xhat))
          dx[j] = s[j] / n * (n * c * g[j] - c * sum_g[j] - h[j] * c * sum_gh[j]);
        } else {
          dx[j] = c * s[j] * g[j];  // eval: y is affine in x
        }
      }
    }
  }
  if (this->spec_.affine) ctx.gradients_ready(*this);
}

template <typename T>
Index BatchNorm<T>::predict_workspace(Index) const {
  return this->out_;
}

template <typename T>
void BatchNorm<T>::predict(const T* in, T* out, Index batch, T* workspace) const {
  const Index F = this->out_;
  const T* rm = running_mean_.value->data();
  const T* rv = running_var_.value->data();
  const T* gamma = this->spec_.affine ? weight_.value->data() : nullptr;
  const T* beta = this->spec_.affine ? bias_.value->data() : nullptr;
  // 1 / sqrt(running_var + eps) per feature, as the eval-mode forward computes it
  T* s = workspace;
  for (Index j = 0; j < F; ++j) {
    s[j] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(rv[j]) + this->spec_.eps));
  }
  for (Index r = 0; r < batch; ++r) {
    const T* x = in + r * F;
    T* y = out + r * F;
    for (Index j = 0; j < F; ++j) {
      const T h = (x[j] - rm[j]) * s[j];
      y[j] = gamma != nullptr ? h * gamma[j] + beta[j] : h;
    }
  }
}

// ---- LayerNorm ----------------------------------------------------------------------

template <typename T>
LayerNorm<T>::LayerNorm(const LayerSpec& spec)
    : Layer<T>(spec),
      xhat_(make_storage<T>(0)),
      invstd_(make_storage<T>(0)),
      output_(make_storage<T>(0)),
      grad_(make_storage<T>(0)) {
  const Index F = spec.in_features;
  this->in_ = this->out_ = F;
  if (spec.affine) {
    weight_ = detail::make_parameter<T>("weight", {F}, false);
    bias_ = detail::make_parameter<T>("bias", {F}, false);
    detail::fill(weight_.value, T(1));
  }
}

template <typename T>
std::vector<Parameter<T>*> LayerNorm<T>::parameters() {
  if (this->spec_.affine) return {&weight_, &bias_};
  return {};
}

template <typename T>
void LayerNorm<T>::allocate(Index batch, std::vector<StoragePtr<T>>& fresh) const {
  detail::push_caches(fresh, batch, this->out_, 1);  // xhat
  fresh.push_back(make_storage<T>(static_cast<std::size_t>(batch)));  // invstd
  detail::push_caches(fresh, batch, this->out_, 2);  // output, grad
}

template <typename T>
void LayerNorm<T>::adopt(typename std::vector<StoragePtr<T>>::iterator& next) {
  xhat_ = *next++;
  invstd_ = *next++;
  output_ = *next++;
  grad_ = *next++;
}

namespace detail {

// One row of LayerNorm: mean and biased variance in float64, xhat and y.
template <typename T>
T layer_norm_row(const T* x, T* xhat, T* y, Index F, double eps, const T* gamma,
                 const T* beta) {
  double mean = 0;
  for (Index j = 0; j < F; ++j) mean += static_cast<double>(x[j]);
  mean /= static_cast<double>(F);
  double var = 0;
  for (Index j = 0; j < F; ++j) {
    const double d = static_cast<double>(x[j]) - mean;
    var += d * d;
  }
  var /= static_cast<double>(F);
  const T s = static_cast<T>(1.0 / std::sqrt(var + eps));
  const T m = static_cast<T>(mean);
  for (Index j = 0; j < F; ++j) {
    const T h = (x[j] - m) * s;
    if (xhat != nullptr) xhat[j] = h;
    y[j] = gamma != nullptr ? h * gamma[j] + beta[j] : h;
  }
  return s;
}

}  // namespace detail

template <typename T>
const T* LayerNorm<T>::forward(const T* in, Index batch, const ForwardContext&) {
  const Index F = this->out_;
  const T* gamma = this->spec_.affine ? weight_.value->data() : nullptr;
  const T* beta = this->spec_.affine ? bias_.value->data() : nullptr;
  for (Index r = 0; r < batch; ++r) {
    invstd_->data()[r] = detail::layer_norm_row<T>(in + r * F, xhat_->data() + r * F,
                                                   output_->data() + r * F, F,
                                                   this->spec_.eps, gamma, beta);
  }
  return output_->data();
}

template <typename T>
void LayerNorm<T>::backward(T* grad_input, Index batch, const BackwardContext<T>& ctx) {
  const Index F = this->out_;
  const T* G = grad_->data();  // dL/dy
  const T* H = xhat_->data();
  const T* gamma = this->spec_.affine ? weight_.value->data() : nullptr;
  if (this->spec_.affine) {
    // dL/dgamma = column sums of dL/dy * xhat, dL/dbeta = column sums of dL/dy
    T* gw = weight_.grad->data();
    T* gb = bias_.grad->data();
    if (!ctx.accumulate) {
      std::fill(gw, gw + F, T(0));
      std::fill(gb, gb + F, T(0));
    }
    for (Index r = 0; r < batch; ++r) {
      const T* g = G + r * F;
      const T* h = H + r * F;
      for (Index j = 0; j < F; ++j) {
        gw[j] += g[j] * h[j];
        gb[j] += g[j];
      }
    }
  }
  if (grad_input != nullptr) {
    // dxhat = gamma dL/dy; dL/dx = invstd / F (F dxhat - rowsum dxhat - xhat rowsum(dxhat xhat))
    const T n = static_cast<T>(F);
    for (Index r = 0; r < batch; ++r) {
      const T* g = G + r * F;
      const T* h = H + r * F;
      T* dx = grad_input + r * F;
      T sum_d = 0, sum_dh = 0;
      for (Index j = 0; j < F; ++j) {
        const T d = gamma != nullptr ? g[j] * gamma[j] : g[j];
        sum_d += d;
        sum_dh += d * h[j];
      }
      const T k = invstd_->data()[r] / n;
      for (Index j = 0; j < F; ++j) {
        const T d = gamma != nullptr ? g[j] * gamma[j] : g[j];
        dx[j] = k * (n * d - sum_d - h[j] * sum_dh);
      }
    }
  }
  if (this->spec_.affine) ctx.gradients_ready(*this);
}

template <typename T>
void LayerNorm<T>::predict(const T* in, T* out, Index batch, T*) const {
  const Index F = this->out_;
  const T* gamma = this->spec_.affine ? weight_.value->data() : nullptr;
  const T* beta = this->spec_.affine ? bias_.value->data() : nullptr;
  for (Index r = 0; r < batch; ++r) {
    detail::layer_norm_row<T>(in + r * F, nullptr, out + r * F, F, this->spec_.eps, gamma,
                              beta);
  }
}

// ---- Residual -----------------------------------------------------------------------

template <typename T>
Residual<T>::Residual(const LayerSpec& spec, Index features, const std::string& where)
    : Layer<T>(spec), output_(make_storage<T>(0)), grad_(make_storage<T>(0)) {
  this->in_ = this->out_ = features;
  if (spec.layers.empty()) {
    throw std::invalid_argument(where + " a Residual must hold at least one layer");
  }
  Index width = features;
  widest_ = features;
  for (std::size_t i = 0; i < spec.layers.size(); ++i) {
    layers_.push_back(make_layer<T>(spec.layers[i], width, where + ".layers." +
                                                           std::to_string(i)));
    width = layers_.back()->out_features();
    widest_ = std::max(widest_, width);
  }
  if (width != features) {
    throw std::invalid_argument(where + " a Residual's layers must map " +
                                std::to_string(features) + " features back to " +
                                std::to_string(features) + ", but they produce " +
                                std::to_string(width));
  }
}

template <typename T>
std::vector<Layer<T>*> Residual<T>::children() {
  std::vector<Layer<T>*> out;
  for (auto& l : layers_) out.push_back(l.get());
  return out;
}

template <typename T>
void Residual<T>::allocate(Index batch, std::vector<StoragePtr<T>>& fresh) const {
  detail::push_caches(fresh, batch, this->out_, 2);
  for (const auto& l : layers_) l->allocate(batch, fresh);
}

template <typename T>
void Residual<T>::adopt(typename std::vector<StoragePtr<T>>::iterator& next) {
  output_ = *next++;
  grad_ = *next++;
  for (auto& l : layers_) l->adopt(next);
}

template <typename T>
const T* Residual<T>::forward(const T* in, Index batch, const ForwardContext& ctx) {
  const T* a = in;
  for (auto& l : layers_) a = l->forward(a, batch, ctx);
  // y = x + f(x)
  const Index n = batch * this->out_;
  T* y = output_->data();
  for (Index e = 0; e < n; ++e) y[e] = in[e] + a[e];
  return y;
}

template <typename T>
void Residual<T>::backward(T* grad_input, Index batch, const BackwardContext<T>& ctx) {
  const Index n = batch * this->out_;
  const T* g = grad_->data();
  // f's backward from dL/dy, then dL/dx = dL/dy + f's dL/dx
  std::copy(g, g + n, layers_.back()->grad_output());
  for (std::size_t i = layers_.size(); i-- > 0;) {
    T* below = i > 0 ? layers_[i - 1]->grad_output() : grad_input;
    layers_[i]->backward(below, batch, ctx);
  }
  if (grad_input != nullptr) {
    for (Index e = 0; e < n; ++e) grad_input[e] += g[e];
  }
}

template <typename T>
Index Residual<T>::predict_workspace(Index batch) const {
  Index inner = 0;
  for (const auto& l : layers_) inner = std::max(inner, l->predict_workspace(batch));
  return 2 * batch * widest_ + inner;
}

template <typename T>
void Residual<T>::predict(const T* in, T* out, Index batch, T* workspace) const {
  T* buffers[2] = {workspace, workspace + batch * widest_};
  T* inner = workspace + 2 * batch * widest_;
  const T* a = in;
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    T* dst = i + 1 == layers_.size() ? out : buffers[i % 2];
    layers_[i]->predict(a, dst, batch, inner);
    a = dst;
  }
  const Index n = batch * this->out_;
  for (Index e = 0; e < n; ++e) out[e] += in[e];
}

// ---- building -------------------------------------------------------------------------

template <typename T>
std::unique_ptr<Layer<T>> make_layer(const LayerSpec& spec, Index in_features,
                                     const std::string& where) {
  using Kind = LayerSpec::Kind;
  auto require_width = [&](Index declared) {
    if (declared != in_features) {
      throw std::invalid_argument(where + " (" + kind_name(spec.kind) + ") expects " +
                                  std::to_string(declared) + " input features, but the layer "
                                  "before it produces " + std::to_string(in_features));
    }
  };
  auto require_finite = [&](double value, const char* name) {
    if (!std::isfinite(value)) {
      throw std::invalid_argument(where + " (" + kind_name(spec.kind) + ") " + name +
                                  " must be finite");
    }
  };
  switch (spec.kind) {
    case Kind::dense: {
      if (spec.in_features <= 0 || spec.out_features <= 0) {
        throw std::invalid_argument(where + " (Dense) must have positive sizes, but has "
                                    "in_features=" + std::to_string(spec.in_features) +
                                    ", out_features=" + std::to_string(spec.out_features));
      }
      const Index limit = std::numeric_limits<Index>::max() / static_cast<Index>(sizeof(T)) / 4;
      if (spec.in_features > limit / spec.out_features) {
        throw std::invalid_argument(where + " (Dense) is too large: in_features * "
                                    "out_features = " + std::to_string(spec.in_features) +
                                    " * " + std::to_string(spec.out_features) + " overflows");
      }
      require_width(spec.in_features);
      require_finite(spec.negative_slope, "negative_slope");
      return with_context(where + " (Dense), weight (" + std::to_string(spec.in_features) +
                              ", " + std::to_string(spec.out_features) + ") and its gradient",
                          [&] { return std::unique_ptr<Layer<T>>(new Dense<T>(spec)); });
    }
    case Kind::activation:
      require_finite(spec.negative_slope, "negative_slope");
      return std::make_unique<ActivationLayer<T>>(spec, in_features);
    case Kind::dropout:
      if (!(spec.p >= 0 && spec.p < 1)) {
        throw std::invalid_argument(where + " (Dropout) p must be in [0, 1), but got " +
                                    std::to_string(spec.p));
      }
      return std::make_unique<Dropout<T>>(spec, in_features);
    case Kind::batch_norm:
    case Kind::layer_norm: {
      if (spec.in_features <= 0) {
        throw std::invalid_argument(where + " (" + kind_name(spec.kind) + ") features must "
                                    "be >= 1, but got " + std::to_string(spec.in_features));
      }
      require_width(spec.in_features);
      if (!(spec.eps > 0) || !std::isfinite(spec.eps)) {
        throw std::invalid_argument(where + " (" + kind_name(spec.kind) + ") eps must be a "
                                    "finite number > 0, but got " + std::to_string(spec.eps));
      }
      if (spec.kind == Kind::layer_norm) return std::make_unique<LayerNorm<T>>(spec);
      if (!(spec.momentum >= 0 && spec.momentum <= 1)) {
        throw std::invalid_argument(where + " (BatchNorm) momentum must be in [0, 1], but "
                                    "got " + std::to_string(spec.momentum));
      }
      return std::make_unique<BatchNorm<T>>(spec);
    }
    case Kind::residual:
      return std::make_unique<Residual<T>>(spec, in_features, where);
  }
  throw std::invalid_argument(where + " unknown layer kind");
}

}  // namespace bprop
