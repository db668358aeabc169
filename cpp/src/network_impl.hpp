// Template definitions of Dense and Network, instantiated in network_f32.cpp
// and network_f64.cpp so that the two scalar types compile in parallel.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "bprop/gemm.hpp"
#include "bprop/kernels.hpp"
#include "bprop/network.hpp"

namespace bprop {

namespace detail {

inline std::string shape_str(Index rows, Index cols) {
  return "(" + std::to_string(rows) + ", " + std::to_string(cols) + ")";
}

// The largest element count a layer may have: its byte size must fit in a
// signed 64-bit integer with room to spare.
template <typename T>
constexpr Index max_elements() {
  return std::numeric_limits<Index>::max() / static_cast<Index>(sizeof(T)) / 4;
}

}  // namespace detail

template <typename T>
Dense<T>::Dense(const LayerSpec& s)
    : spec(s),
      weight(make_storage<T>(static_cast<std::size_t>(s.in_features * s.out_features))),
      bias(make_storage<T>(static_cast<std::size_t>(s.out_features))),
      grad_weight(make_storage<T>(static_cast<std::size_t>(s.in_features * s.out_features))),
      grad_bias(make_storage<T>(static_cast<std::size_t>(s.out_features))),
      z(make_storage<T>(0)),
      output(z),
      delta(make_storage<T>(0)) {}

template <typename T>
Network<T>::Network(const std::vector<LayerSpec>& specs) {
  if (specs.empty()) {
    throw std::invalid_argument("[Network] layers must hold at least one Dense layer, but got none");
  }
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const LayerSpec& s = specs[i];
    const std::string tag = "[Network] layer " + std::to_string(i);
    if (s.in_features <= 0 || s.out_features <= 0) {
      throw std::invalid_argument(tag + " must have positive sizes, but has in_features=" +
                                  std::to_string(s.in_features) + ", out_features=" +
                                  std::to_string(s.out_features));
    }
    if (s.in_features > detail::max_elements<T>() / s.out_features) {
      throw std::invalid_argument(tag + " is too large: in_features * out_features = " +
                                  std::to_string(s.in_features) + " * " +
                                  std::to_string(s.out_features) + " overflows");
    }
    if (!std::isfinite(s.negative_slope)) {
      throw std::invalid_argument(tag + " negative_slope must be finite");
    }
    if (i > 0 && specs[i - 1].out_features != s.in_features) {
      throw std::invalid_argument(tag + " expects " + std::to_string(s.in_features) +
                                  " input features, but layer " + std::to_string(i - 1) +
                                  " produces " + std::to_string(specs[i - 1].out_features));
    }
  }
  layers_.reserve(specs.size());
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const LayerSpec& s = specs[i];
    with_context("[Network] layer " + std::to_string(i) + ", weight " +
                     detail::shape_str(s.in_features, s.out_features) + " and its gradient",
                 [&] { layers_.emplace_back(s); });
  }
}

template <typename T>
Index Network<T>::num_parameters() const {
  Index n = 0;
  for (const Dense<T>& L : layers_) n += L.in() * L.out() + L.out();
  return n;
}

template <typename T>
void Network<T>::reserve(Index batch) {
  if (batch <= capacity_) return;
  for (const Dense<T>& L : layers_) {
    if (batch > detail::max_elements<T>() / L.out()) {
      throw std::invalid_argument("[Network.forward] a batch of " + std::to_string(batch) +
                                  " rows is too large for layer widths this size");
    }
  }
  // Allocate everything first so that a failed allocation changes nothing.
  std::vector<StoragePtr<T>> fresh;
  fresh.reserve(layers_.size() * 3);
  with_context("[Network.forward] the caches (z, output, delta) for a batch of " +
                   std::to_string(batch) + " rows",
               [&] {
                 for (const Dense<T>& L : layers_) {
                   const auto n = static_cast<std::size_t>(batch * L.out());
                   fresh.push_back(make_storage<T>(n));
                   fresh.push_back(L.spec.activation == Activation::identity
                                       ? fresh.back()
                                       : make_storage<T>(n));
                   fresh.push_back(make_storage<T>(n));
                 }
               });
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    layers_[i].z = std::move(fresh[3 * i]);
    layers_[i].output = std::move(fresh[3 * i + 1]);
    layers_[i].delta = std::move(fresh[3 * i + 2]);
  }
  capacity_ = batch;
}

template <typename T>
bool Network<T>::aliases_cache(const T* data, Index size) const {
  const auto lo = reinterpret_cast<std::uintptr_t>(data);
  const auto hi = reinterpret_cast<std::uintptr_t>(data + size);
  for (const Dense<T>& L : layers_) {
    for (const StoragePtr<T>* s : {&L.z, &L.output, &L.delta}) {
      const auto b = reinterpret_cast<std::uintptr_t>((*s)->data());
      const auto e = reinterpret_cast<std::uintptr_t>((*s)->data() + (*s)->size());
      if (lo < e && b < hi) return true;
    }
  }
  return false;
}

template <typename T>
void Network<T>::clear_cache() {
  input_ = nullptr;
  batch_ = 0;
}

template <typename T>
void Network<T>::check_input(ConstMatrixMap<T> X, const char* where) const {
  if (X.cols() != in_features()) {
    throw std::invalid_argument(std::string("[") + where + "] X has " +
                                std::to_string(X.cols()) + " features, but layer 0 expects " +
                                std::to_string(in_features()));
  }
  if (X.rows() <= 0) {
    throw std::invalid_argument(std::string("[") + where +
                                "] X has 0 rows; expected at least one sample");
  }
  if (aliases_cache(X.data(), X.size())) {
    throw std::invalid_argument(std::string("[") + where +
                                "] X is a view of this network's own cache (a layer's z, "
                                "output or delta), which this call overwrites; pass a copy "
                                "(X.copy())");
  }
}

template <typename T>
ConstMatrixMap<T> Network<T>::forward(ConstMatrixMap<T> X, const Poll& poll) {
  check_input(X, "Network.forward");
  reserve(X.rows());
  const Index B = X.rows();
  const T* a = X.data();
  try {
    for (Dense<T>& L : layers_) {
      if (poll && &L != &layers_.front()) poll();  // between layers
      // z = a W + b, a = sigma(z)
      gemm<T>(false, false, B, L.out(), L.in(), T(1), a, L.in(), L.weight->data(), L.out(),
              T(0), L.z->data(), L.out());
      bias_activation_forward<T>(L.spec.activation, static_cast<T>(L.spec.negative_slope),
                                 L.bias->data(), L.z->data(), L.output->data(), B, L.out());
      a = L.output->data();
    }
  } catch (...) {
    clear_cache();  // the caches now mix this batch's first layers with the last batch
    throw;
  }
  input_ = X.data();
  batch_ = B;
  return ConstMatrixMap<T>(layers_.back().output->data(), B, out_features());
}

template <typename T>
void Network<T>::backward(ConstMatrixMap<T> grad_output, bool accumulate,
                          MatrixMap<T>* grad_input, const Poll& poll) {
  if (input_ == nullptr) {
    throw std::logic_error("[Network.backward] called before forward: run forward(X) first");
  }
  if (grad_output.rows() != batch_ || grad_output.cols() != out_features()) {
    throw std::invalid_argument("[Network.backward] grad_output has shape " +
                                detail::shape_str(grad_output.rows(), grad_output.cols()) +
                                ", but the last forward produced an output of shape " +
                                detail::shape_str(batch_, out_features()));
  }
  if (grad_input != nullptr &&
      (grad_input->rows() != batch_ || grad_input->cols() != in_features())) {
    throw std::invalid_argument("[Network.backward] grad_input has shape " +
                                detail::shape_str(grad_input->rows(), grad_input->cols()) +
                                ", expected " + detail::shape_str(batch_, in_features()));
  }
  // delta of the output layer: sigma'(z) * dL/da (softmax: its Jacobian-vector product)
  Dense<T>& last = layers_.back();
  activation_backward<T>(last.spec.activation, static_cast<T>(last.spec.negative_slope),
                         last.z->data(), last.output->data(), grad_output.data(),
                         last.delta->data(), batch_, last.out());
  try {
    sweep(accumulate, grad_input, T(-1), nullptr, poll);
  } catch (...) {
    has_grad_ = false;  // some layers' gradients are new, others old (or half-accumulated)
    throw;
  }
  has_grad_ = true;
}

template <typename T>
double Network<T>::train_step(ConstMatrixMap<T> X, Loss loss, const std::int64_t* labels,
                              const T* target, const T* sample_weight, T sgd_lr,
                              Update<T>* update, const Poll& poll, const Objective* objective) {
  if (objective != nullptr &&
      !(std::isfinite(objective->loss_scale) && std::isfinite(objective->grad_scale) &&
        std::isfinite(objective->l2) && objective->l2 >= 0)) {
    throw std::invalid_argument(
        "[Network.train_step] the objective's loss_scale and grad_scale must be finite and "
        "its l2 finite and >= 0, but got loss_scale=" + std::to_string(objective->loss_scale) +
        ", grad_scale=" + std::to_string(objective->grad_scale) +
        ", l2=" + std::to_string(objective->l2));
  }
  if (update != nullptr) {
    if (update->states.size() != 2 * layers_.size()) {
      throw std::invalid_argument("[Network.train_step] the optimizer holds state for " +
                                  std::to_string(update->states.size()) +
                                  " parameters, but the network has " +
                                  std::to_string(2 * layers_.size()));
    }
    if (update->steps < 0) {
      throw std::invalid_argument("[Network.train_step] the step count must be >= 0");
    }
    sgd_lr = is_plain_sgd(update->spec) ? static_cast<T>(update->spec.lr) : T(-1);
  }
  if (sgd_lr >= T(0) && !std::isfinite(sgd_lr)) {
    throw std::invalid_argument("[Network.train_step] lr must be finite");
  }
  if (loss == Loss::softmax_cross_entropy && labels != nullptr) {
    for (Index i = 0; i < X.rows(); ++i) {
      if (labels[i] < 0 || labels[i] >= out_features()) {
        throw std::invalid_argument(
            "[Network.train_step] labels must lie in [0, " + std::to_string(out_features()) +
            "), but y[" + std::to_string(i) + "] = " + std::to_string(labels[i]));
      }
    }
  }
  check_input(X, "Network.train_step");
  const Index n_target = labels != nullptr ? 0 : X.rows() * out_features();
  if ((target != nullptr && aliases_cache(target, n_target)) ||
      (sample_weight != nullptr && aliases_cache(sample_weight, X.rows()))) {
    throw std::invalid_argument("[Network.train_step] y or sample_weight is a view of this "
                                "network's own cache, which the step overwrites; pass a copy");
  }
  reserve(X.rows());  // a failed allocation changes nothing: before the try below
  double value = 0;
  try {
    forward(X, poll);
    Dense<T>& last = layers_.back();
    const Index B = batch_, K = last.out();
    T* grad = last.delta->data();  // dL/d(output), turned into delta in place below
    switch (loss) {
      case Loss::softmax_cross_entropy:
        value = softmax_cross_entropy<T>(last.output->data(), B, K, labels, target,
                                         sample_weight, grad);
        break;
      case Loss::binary_cross_entropy_with_logits:
        value = binary_cross_entropy_with_logits<T>(last.output->data(), target, B, K,
                                                    sample_weight, grad);
        break;
      case Loss::mean_squared_error:
        value = mean_squared_error<T>(last.output->data(), target, B, K, sample_weight, grad);
        break;
    }
    T l2 = T(0);
    if (objective != nullptr) {
      if (objective->grad_scale != 1) {
        MatrixMap<T>(grad, B, K) *= static_cast<T>(objective->grad_scale);
      }
      l2 = static_cast<T>(objective->l2);
      value *= objective->loss_scale;
      if (l2 != T(0)) value += 0.5 * objective->l2 * weight_squares();
    }
    activation_backward<T>(last.spec.activation, static_cast<T>(last.spec.negative_slope),
                           last.z->data(), last.output->data(), grad, grad, B, K);
    if (std::isfinite(value)) {
      sweep(false, nullptr, sgd_lr, sgd_lr >= T(0) ? nullptr : update, poll, l2);
    } else {
      sweep(false, nullptr, T(-1), nullptr, poll, l2);  // gradients for inspection, no update
    }
  } catch (...) {
    // Abandoned by the poll before any parameter changed (the sweep holds the
    // updates back while it polls): the step did not happen.
    has_grad_ = false;
    clear_cache();
    throw;
  }
  const bool finite = std::isfinite(value);
  has_grad_ = !finite || sgd_lr < T(0);
  if (finite && update != nullptr) ++update->steps;
  return value;
}

template <typename T>
double Network<T>::weight_squares() const {
  double sum = 0;
  for (const Dense<T>& L : layers_) {
    sum += ConstVectorMap<T>(L.weight->data(), L.in() * L.out()).template cast<double>()
               .squaredNorm();
  }
  return sum;
}

template <typename T>
void Network<T>::sweep(bool accumulate, MatrixMap<T>* grad_input, T sgd_lr,
                       const Update<T>* update, const Poll& poll, T l2) {
  const Index B = batch_;
  const bool fused = sgd_lr >= T(0);
  // With a poll, the sweep may be abandoned between any two products, so no
  // parameter may change before the last product that reads the old weights: the
  // updates are held back to the end. Each is the same arithmetic on the same
  // operands as in the interleaved order, so the result is bitwise the same.
  const bool hold_back = static_cast<bool>(poll);
  auto input_of = [&](Index l) {
    return l == 0 ? input_ : layers_[static_cast<std::size_t>(l - 1)].output->data();
  };
  auto sgd_product = [&](Dense<T>& L, Index l) {
    // W -= lr (a^T delta + l2 W) and b -= lr colsum(delta), without storing the gradient
    if (l2 != T(0)) VectorMap<T>(L.weight->data(), L.in() * L.out()) *= T(1) - sgd_lr * l2;
    gemm<T>(true, false, L.in(), L.out(), B, -sgd_lr, input_of(l), L.in(), L.delta->data(),
            L.out(), T(1), L.weight->data(), L.out());
    VectorMap<T>(L.bias->data(), L.out()).noalias() -=
        sgd_lr * ConstMatrixMap<T>(L.delta->data(), B, L.out()).colwise().sum();
  };
  auto optimizer_step = [&](Dense<T>& L, Index l) {
    // the optimizer's step for this layer, from its stored gradients
    const auto i = static_cast<std::size_t>(2 * l);
    apply_update<T>(update->spec, update->steps + 1, L.weight->data(), L.grad_weight->data(),
                    update->states[i], L.in() * L.out());
    apply_update<T>(update->spec, update->steps + 1, L.bias->data(), L.grad_bias->data(),
                    update->states[i + 1], L.out());
  };
  // The reverse network: one visit per layer, from the output back to the input.
  for (Index l = num_layers() - 1; l >= 0; --l) {
    Dense<T>& L = layers_[static_cast<std::size_t>(l)];
    const T* a = input_of(l);
    const T* delta = L.delta->data();
    if (poll) poll();
    // dL/da of the layer below = delta W^T, formed while W is still unchanged
    T* grad_a = l > 0 ? layers_[static_cast<std::size_t>(l - 1)].delta->data()
                      : (grad_input != nullptr ? grad_input->data() : nullptr);
    if (grad_a != nullptr) {
      gemm<T>(false, true, B, L.in(), L.out(), T(1), delta, L.out(), L.weight->data(), L.out(),
              T(0), grad_a, L.in());
    }
    ConstMatrixMap<T> D(delta, B, L.out());
    if (fused) {
      if (!hold_back) sgd_product(L, l);
    } else {
      if (poll && grad_a != nullptr) poll();
      // dL/dW = a^T delta, dL/db = column sums of delta
      gemm<T>(true, false, L.in(), L.out(), B, T(1), a, L.in(), delta, L.out(),
              accumulate ? T(1) : T(0), L.grad_weight->data(), L.out());
      if (l2 != T(0)) {
        VectorMap<T>(L.grad_weight->data(), L.in() * L.out()).noalias() +=
            l2 * ConstVectorMap<T>(L.weight->data(), L.in() * L.out());
      }
      VectorMap<T> gb(L.grad_bias->data(), L.out());
      if (accumulate) {
        gb.noalias() += D.colwise().sum();
      } else {
        gb.noalias() = D.colwise().sum();
      }
      // the optimizer's step, while the layer's gradient is in cache
      if (update != nullptr && !hold_back) optimizer_step(L, l);
    }
    if (l > 0) {
      // delta of the layer below = sigma'(z) * dL/da, in place
      Dense<T>& P = layers_[static_cast<std::size_t>(l - 1)];
      activation_backward<T>(P.spec.activation, static_cast<T>(P.spec.negative_slope),
                             P.z->data(), P.output->data(), grad_a, grad_a, B, P.out());
    }
  }
  if (hold_back && (fused || update != nullptr)) {
    // Every delta is formed from the old weights: now the updates, no more polls.
    for (Index l = num_layers() - 1; l >= 0; --l) {
      Dense<T>& L = layers_[static_cast<std::size_t>(l)];
      if (fused) {
        sgd_product(L, l);
      } else {
        optimizer_step(L, l);
      }
    }
  }
}

template <typename T>
void Network<T>::step(T lr) {
  if (!has_grad_) {
    throw std::logic_error("[Network.step] called before backward: no gradients to apply");
  }
  if (!std::isfinite(lr) || lr < T(0)) {
    throw std::invalid_argument("[Network.step] lr must be a finite number >= 0, but got " +
                                std::to_string(lr));
  }
  for (Dense<T>& L : layers_) {
    MatrixMap<T> W(L.weight->data(), L.in(), L.out());
    VectorMap<T> b(L.bias->data(), L.out());
    W.noalias() -= lr * ConstMatrixMap<T>(L.grad_weight->data(), L.in(), L.out());
    b.noalias() -= lr * ConstVectorMap<T>(L.grad_bias->data(), L.out());
  }
}

template <typename T>
void Network<T>::apply_optimizer(Update<T>& update) {
  if (!has_grad_) {
    throw std::logic_error("[Optimizer.step] the network has no gradients yet: call "
                           "net.forward and net.backward before step()");
  }
  if (update.states.size() != 2 * layers_.size() || update.steps < 0) {
    throw std::invalid_argument("[Optimizer.step] the optimizer was built for another network");
  }
  const std::int64_t t = update.steps + 1;
  for (std::size_t l = 0; l < layers_.size(); ++l) {
    Dense<T>& L = layers_[l];
    apply_update<T>(update.spec, t, L.weight->data(), L.grad_weight->data(),
                    update.states[2 * l], L.in() * L.out());
    apply_update<T>(update.spec, t, L.bias->data(), L.grad_bias->data(),
                    update.states[2 * l + 1], L.out());
  }
  update.steps = t;
}

template <typename T>
void Network<T>::predict(ConstMatrixMap<T> X, Index batch_size, MatrixMap<T> out) const {
  if (X.cols() != in_features()) {
    throw std::invalid_argument("[Network.predict] X has " + std::to_string(X.cols()) +
                                " features, but layer 0 expects " +
                                std::to_string(in_features()));
  }
  if (out.rows() != X.rows() || out.cols() != out_features()) {
    throw std::invalid_argument("[Network.predict] out has shape " +
                                detail::shape_str(out.rows(), out.cols()) + ", expected " +
                                detail::shape_str(X.rows(), out_features()));
  }
  const Index N = X.rows();
  if (N == 0) return;
  const Index chunk = batch_size <= 0 ? N : std::min(batch_size, N);
  Index width = 0;
  for (const Dense<T>& L : layers_) width = std::max(width, L.out());
  // Two ping-pong workspaces of this call's own: the training caches stay untouched.
  const auto workspace = static_cast<std::size_t>(chunk * width);
  auto allocate = [&] { return allocate_storage<T>(workspace); };
  const std::string what = "[Network.predict] a workspace of " + std::to_string(chunk) +
                           " rows (pass a smaller batch_size)";
  Storage<T> ping = with_context(what, allocate);
  Storage<T> pong = with_context(what, allocate);
  for (Index start = 0; start < N; start += chunk) {
    const Index B = std::min(chunk, N - start);
    const T* a = X.data() + start * in_features();
    T* buffers[2] = {ping.data(), pong.data()};
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Dense<T>& L = layers_[l];
      T* z = l + 1 == layers_.size() ? out.data() + start * out_features() : buffers[l % 2];
      gemm<T>(false, false, B, L.out(), L.in(), T(1), a, L.in(), L.weight->data(), L.out(),
              T(0), z, L.out());
      bias_activation_forward<T>(L.spec.activation, static_cast<T>(L.spec.negative_slope),
                                 L.bias->data(), z, z, B, L.out());
      a = z;
    }
  }
}

}  // namespace bprop
