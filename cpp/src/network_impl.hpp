// Template definitions of Network, instantiated in network_f32.cpp and
// network_f64.cpp so that the two scalar types compile in parallel.
#pragma once

#include <algorithm>
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

// The largest element count a cache may have: its byte size must fit in a
// signed 64-bit integer with room to spare.
template <typename T>
constexpr Index max_elements() {
  return std::numeric_limits<Index>::max() / static_cast<Index>(sizeof(T)) / 4;
}

}  // namespace detail

template <typename T>
Network<T>::Network(const std::vector<LayerSpec>& specs) {
  if (specs.empty()) {
    throw std::invalid_argument("[Network] layers must hold at least one layer, but got none");
  }
  Index width = -1;
  for (const LayerSpec& s : specs) {
    width = declared_in_features(s);
    if (width >= 0) break;
  }
  if (width < 0) {
    throw std::invalid_argument("[Network] layers must include a layer with a width (Dense, "
                                "BatchNorm or LayerNorm), but got only Activation and Dropout "
                                "layers");
  }
  in_features_ = width;
  layers_.reserve(specs.size());
  for (std::size_t i = 0; i < specs.size(); ++i) {
    layers_.push_back(make_layer<T>(specs[i], width, "[Network] layers." + std::to_string(i)));
    width = layers_.back()->out_features();
  }
  // The index of every layer, parameter and buffer, depth first; the dropout
  // layers numbered in that order.
  std::int64_t dropouts = 0;
  auto visit = [&](auto&& self, Layer<T>& layer, const std::string& prefix) -> void {
    all_.push_back(&layer);
    layer.first_parameter = static_cast<Index>(params_.size());
    for (Parameter<T>* p : layer.parameters()) params_.push_back({prefix + p->name, p, &layer});
    layer.parameter_count = static_cast<Index>(params_.size()) - layer.first_parameter;
    for (Buffer<T>* b : layer.buffers()) buffers_.push_back({prefix + b->name, b, &layer});
    if (layer.kind() == LayerSpec::Kind::dropout) {
      static_cast<Dropout<T>&>(layer).set_index(dropouts++);
    }
    const std::vector<Layer<T>*> children = layer.children();
    for (std::size_t j = 0; j < children.size(); ++j) {
      self(self, *children[j], prefix + "layers." + std::to_string(j) + ".");
    }
  };
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    visit(visit, *layers_[i], "layers." + std::to_string(i) + ".");
  }
  sweep_.held.reserve(all_.size());
  sweep_.grad_squares.assign(params_.size(), 0.0);
}

template <typename T>
Index Network<T>::num_parameters() const {
  Index n = 0;
  for (const NamedParameter<T>& p : params_) n += p.parameter->size();
  return n;
}

template <typename T>
void Network<T>::set_dropout_step(std::int64_t step) {
  if (step < 0) {
    throw std::invalid_argument("[Network] dropout_step must be >= 0, but got " +
                                std::to_string(step));
  }
  dropout_step_ = step;
}

template <typename T>
void Network<T>::reserve(Index batch) {
  if (batch <= capacity_) return;
  for (const Layer<T>* L : all_) {
    if (batch > detail::max_elements<T>() / std::max(L->out_features(), L->in_features())) {
      throw std::invalid_argument("[Network.forward] a batch of " + std::to_string(batch) +
                                  " rows is too large for layer widths this size");
    }
  }
  // Allocate everything first so that a failed allocation changes nothing.
  std::vector<StoragePtr<T>> fresh;
  fresh.reserve(all_.size() * 4);
  with_context("[Network.forward] the caches for a batch of " + std::to_string(batch) + " rows",
               [&] {
                 for (const auto& L : layers_) L->allocate(batch, fresh);
               });
  auto next = fresh.begin();
  for (auto& L : layers_) L->adopt(next);
  caches_ = std::move(fresh);
  capacity_ = batch;
}

template <typename T>
bool Network<T>::aliases_cache(const T* data, Index size) const {
  const auto lo = reinterpret_cast<std::uintptr_t>(data);
  const auto hi = reinterpret_cast<std::uintptr_t>(data + size);
  for (const StoragePtr<T>& s : caches_) {
    const auto b = reinterpret_cast<std::uintptr_t>(s->data());
    const auto e = reinterpret_cast<std::uintptr_t>(s->data() + s->size());
    if (lo < e && b < hi) return true;
  }
  return false;
}

template <typename T>
void Network<T>::clear_cache() {
  input_ = nullptr;
  sparse_input_ = false;
  batch_ = 0;
}

template <typename T>
void Network<T>::check_input(ConstMatrixMap<T> X, const char* where) const {
  check_rows(X.rows(), X.cols(), where);
  if (aliases_cache(X.data(), X.size())) {
    throw std::invalid_argument(std::string("[") + where +
                                "] X is a view of this network's own cache (a layer's input, "
                                "output or gradient buffer), which this call overwrites; pass "
                                "a copy (X.copy())");
  }
}

template <typename T>
void Network<T>::check_input(const CsrBatch<T>& X, const char* where) const {
  if (layers_[0]->kind() != LayerSpec::Kind::dense) {
    throw std::invalid_argument(
        std::string("[") + where + "] X is sparse, which only a Dense first layer takes, but "
        "layer 0 is " + kind_name(layers_[0]->kind()) + "; densify X (X.toarray()) or start "
        "the network with a Dense layer");
  }
  check_rows(X.rows, X.cols, where);
  check_csr(X, where);
  if (aliases_cache(X.values, X.nnz)) {
    throw std::invalid_argument(std::string("[") + where +
                                "] X's values are a view of this network's own cache, which "
                                "this call overwrites; pass a copy (X.copy())");
  }
}

template <typename T>
void Network<T>::check_rows(Index rows, Index cols, const char* where) const {
  if (cols != in_features()) {
    throw std::invalid_argument(std::string("[") + where + "] X has " +
                                std::to_string(cols) + " features, but layer 0 expects " +
                                std::to_string(in_features()));
  }
  if (rows <= 0) {
    throw std::invalid_argument(std::string("[") + where +
                                "] X has 0 rows; expected at least one sample");
  }
  if (training_ && rows < 2) {
    for (const Layer<T>* L : all_) {
      if (L->kind() == LayerSpec::Kind::batch_norm) {
        throw std::invalid_argument(
            std::string("[") + where + "] X has 1 row, but BatchNorm in training mode needs "
            "more than one row per batch (the variance of one row is 0); use a larger "
            "batch, or eval mode (net.eval())");
      }
    }
  }
}

template <typename T>
const T* Network<T>::run_forward(const T* X, const CsrBatch<T>* csr, Index batch,
                                 const Poll& poll) {
  const ForwardContext ctx{training_, dropout_seed_, dropout_step_};
  const T* a = X;
  try {
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      if (poll && l > 0) poll();  // between layers
      if (l == 0 && X == nullptr) {  // checked: layer 0 is Dense
        a = static_cast<Dense<T>&>(*layers_[0]).forward_sparse(*csr, ctx);
      } else {
        a = layers_[l]->forward(a, batch, ctx);
      }
    }
  } catch (...) {
    clear_cache();  // the caches now mix this batch's first layers with the last batch
    throw;
  }
  input_ = X;
  sparse_input_ = X == nullptr;
  batch_ = batch;
  return a;
}

template <typename T>
void Network<T>::commit_forward() {
  for (Layer<T>* L : all_) L->commit();
  if (training_) ++dropout_step_;
}

template <typename T>
ConstMatrixMap<T> Network<T>::forward(ConstMatrixMap<T> X, const Poll& poll) {
  check_input(X, "Network.forward");
  reserve(X.rows());
  const T* out = run_forward(X.data(), nullptr, X.rows(), poll);
  commit_forward();
  return ConstMatrixMap<T>(out, batch_, out_features());
}

template <typename T>
ConstMatrixMap<T> Network<T>::forward(const CsrBatch<T>& X, const Poll& poll) {
  check_input(X, "Network.forward");
  reserve(X.rows);
  const T* out = run_forward(nullptr, &X, X.rows, poll);
  commit_forward();
  return ConstMatrixMap<T>(out, batch_, out_features());
}

template <typename T>
void Network<T>::backward(ConstMatrixMap<T> grad_output, bool accumulate,
                          MatrixMap<T>* grad_input, const Poll& poll) {
  if (!has_forward()) {
    throw std::logic_error("[Network.backward] called before forward: run forward(X) first");
  }
  if (sparse_input_ && grad_input != nullptr) {
    throw std::invalid_argument(
        "[Network.backward] input_grad=True asks for dL/dX, but the last forward's X was "
        "sparse, for which bprop forms no dL/dX (it would be dense); pass a dense X "
        "(X.toarray()) to get dL/dX, or input_grad=False");
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
  // dL/d(output) into the last layer's gradient buffer, where its backward starts
  std::copy(grad_output.data(), grad_output.data() + grad_output.size(),
            layers_.back()->grad_output());
  try {
    sweep(accumulate, grad_input, T(-1), nullptr, poll);
  } catch (...) {
    has_grad_ = false;  // some layers' gradients are new, others old (or half-accumulated)
    throw;
  }
  has_grad_ = true;
}

template <typename T>
double Network<T>::weight_squares() const {
  double sum = 0;
  for (const NamedParameter<T>& np : params_) {
    const Parameter<T>& p = *np.parameter;
    if (!p.decays) continue;
    sum += ConstVectorMap<T>(p.value->data(), p.size()).template cast<double>().squaredNorm();
  }
  return sum;
}

template <typename T>
double Network<T>::train_step(ConstMatrixMap<T> X, Loss loss, const std::int64_t* labels,
                              const T* target, const T* sample_weight, T sgd_lr,
                              Update<T>* update, const Poll& poll, const Objective* objective) {
  return train_step_impl(X.data(), nullptr, X.rows(), X.cols(), loss, labels, target,
                         sample_weight, sgd_lr, update, poll, objective);
}

template <typename T>
double Network<T>::train_step(const CsrBatch<T>& X, Loss loss, const std::int64_t* labels,
                              const T* target, const T* sample_weight, T sgd_lr,
                              Update<T>* update, const Poll& poll, const Objective* objective) {
  return train_step_impl(nullptr, &X, X.rows, X.cols, loss, labels, target, sample_weight,
                         sgd_lr, update, poll, objective);
}

template <typename T>
double Network<T>::train_step_impl(const T* X, const CsrBatch<T>* csr, Index rows, Index cols,
                                   Loss loss,
                                   const std::int64_t* labels, const T* target,
                                   const T* sample_weight, T sgd_lr, Update<T>* update,
                                   const Poll& poll, const Objective* objective) {
  if (objective != nullptr &&
      !(std::isfinite(objective->loss_scale) && std::isfinite(objective->grad_scale) &&
        std::isfinite(objective->l2) && objective->l2 >= 0 &&
        std::isfinite(objective->max_grad_norm))) {
    throw std::invalid_argument(
        "[Network.train_step] the objective's loss_scale and grad_scale must be finite and "
        "its l2 finite and >= 0, but got loss_scale=" + std::to_string(objective->loss_scale) +
        ", grad_scale=" + std::to_string(objective->grad_scale) +
        ", l2=" + std::to_string(objective->l2));
  }
  if (update != nullptr) {
    if (update->states.size() != params_.size()) {
      throw std::invalid_argument("[Network.train_step] the optimizer holds state for " +
                                  std::to_string(update->states.size()) +
                                  " parameters, but the network has " +
                                  std::to_string(params_.size()));
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
    for (Index i = 0; i < rows; ++i) {
      if (labels[i] < 0 || labels[i] >= out_features()) {
        throw std::invalid_argument(
            "[Network.train_step] labels must lie in [0, " + std::to_string(out_features()) +
            "), but y[" + std::to_string(i) + "] = " + std::to_string(labels[i]));
      }
    }
  }
  if (X != nullptr) {
    check_input(ConstMatrixMap<T>(X, rows, cols), "Network.train_step");
  } else {
    check_input(*csr, "Network.train_step");
  }
  const Index n_target = labels != nullptr ? 0 : rows * out_features();
  if ((target != nullptr && aliases_cache(target, n_target)) ||
      (sample_weight != nullptr && aliases_cache(sample_weight, rows))) {
    throw std::invalid_argument("[Network.train_step] y or sample_weight is a view of this "
                                "network's own cache, which the step overwrites; pass a copy");
  }
  reserve(rows);  // a failed allocation changes nothing: before the try below
  double value = 0;
  try {
    const T* output = run_forward(X, csr, rows, poll);
    const Index B = batch_, K = out_features();
    T* grad = layers_.back()->grad_output();  // dL/d(output)
    switch (loss) {
      case Loss::softmax_cross_entropy:
        value = softmax_cross_entropy<T>(output, B, K, labels, target, sample_weight, grad);
        break;
      case Loss::binary_cross_entropy_with_logits:
        value = binary_cross_entropy_with_logits<T>(output, target, B, K, sample_weight, grad);
        break;
      case Loss::mean_squared_error:
        value = mean_squared_error<T>(output, target, B, K, sample_weight, grad);
        break;
      case Loss::huber:
        value = huber<T>(output, target, B, K, sample_weight, grad, T(1));
        break;
      case Loss::mean_absolute_error:
        value = mean_absolute_error<T>(output, target, B, K, sample_weight, grad);
        break;
      case Loss::poisson_nll:
        value = poisson_nll<T>(output, target, B, K, sample_weight, grad);
        break;
    }
    T l2 = T(0);
    const double clip = objective != nullptr ? objective->max_grad_norm : -1;
    if (objective != nullptr) {
      if (objective->grad_scale != 1) {
        MatrixMap<T>(grad, B, K) *= static_cast<T>(objective->grad_scale);
      }
      l2 = static_cast<T>(objective->l2);
      value *= objective->loss_scale;
      if (l2 != T(0)) value += 0.5 * objective->l2 * weight_squares();
    }
    if (std::isfinite(value)) {
      sweep(false, nullptr, sgd_lr, sgd_lr >= T(0) ? nullptr : update, poll, l2, clip);
    } else {
      sweep(false, nullptr, T(-1), nullptr, poll, l2);  // gradients for inspection, no update
    }
  } catch (...) {
    // Abandoned by the poll before any parameter changed (the sweep holds the
    // updates back while it polls): the step did not happen, and no buffer changed.
    has_grad_ = false;
    clear_cache();
    throw;
  }
  commit_forward();
  const bool finite = std::isfinite(value);
  // fused SGD stores no gradient; a lazy update over a sparse batch stores dL/dW of
  // the first layer in the batch's rows only
  // (clipping needs every gradient whole: neither is used then)
  const bool clipped = objective != nullptr && objective->max_grad_norm >= 0;
  const bool lazy_rows = update != nullptr && update->spec.lazy && csr != nullptr && !clipped;
  has_grad_ = !finite || ((sgd_lr < T(0) || clipped) && !lazy_rows);
  if (finite && update != nullptr) ++update->steps;
  return value;
}

template <typename T>
void Network<T>::on_ready(void* self, Layer<T>& layer) {
  auto& net = *static_cast<Network<T>*>(self);
  if (net.sweep_.hold_back) {
    net.sweep_.held.push_back(&layer);  // capacity reserved: no allocation
    if (net.sweep_.clip >= 0) {  // the norm's terms, while the gradients are in cache
      const auto first = static_cast<std::size_t>(layer.first_parameter);
      for (std::size_t i = first; i < first + static_cast<std::size_t>(layer.parameter_count);
           ++i) {
        net.sweep_.grad_squares[i] = net.grad_square(i);
      }
    }
  } else {
    net.update_layer(layer);
  }
}

template <typename T>
void Network<T>::on_poll(void* self) {
  const Poll* poll = static_cast<Network<T>*>(self)->sweep_.poll;
  if (poll != nullptr && *poll) (*poll)();
}

template <typename T>
void Network<T>::update_layer(Layer<T>& layer) {
  const auto first = static_cast<std::size_t>(layer.first_parameter);
  const auto end = first + static_cast<std::size_t>(layer.parameter_count);
  if (sweep_.sgd_lr >= T(0)) {
    const bool clipping = sweep_.clip >= 0;  // then every gradient is stored, l2 included
    if (!clipping && layer.apply_fused_sgd(sweep_.sgd_lr, sweep_.l2, batch_)) return;
    // p -= lr (dL/dp + l2 p for a parameter that decays), from the stored gradient:
    // the optimizers' blocked, vectorised kernel, as plain SGD (no state)
    UpdateSpec spec;
    spec.rule = UpdateRule::sgd;
    spec.lr = static_cast<double>(sweep_.sgd_lr);
    for (std::size_t i = first; i < end; ++i) {
      const Parameter<T>& p = *params_[i].parameter;
      spec.weight_decay = p.decays && !clipping ? static_cast<double>(sweep_.l2) : 0.0;
      apply_update<T>(spec, 1, p.value->data(), p.grad->data(), UpdateState<T>{}, p.size());
    }
    return;
  }
  // the optimizer's step for this layer's parameters, while their gradients are in cache
  const Update<T>& update = *sweep_.update;
  for (std::size_t i = first; i < end; ++i) {
    update_parameter(update, update.steps + 1, i);
  }
}

template <typename T>
void Network<T>::update_parameter(const Update<T>& update, std::int64_t t, std::size_t i) {
  const Parameter<T>& p = *params_[i].parameter;
  if (update.spec.lazy && p.present_rows != nullptr) {  // the rows of a row-sparse gradient
    apply_update_rows<T>(update.spec, t, p.value->data(), p.grad->data(), update.states[i],
                         *p.present_rows, p.shape.back());
  } else {
    apply_update<T>(update.spec, t, p.value->data(), p.grad->data(), update.states[i], p.size());
  }
}

template <typename T>
void Network<T>::sweep(bool accumulate, MatrixMap<T>* grad_input, T sgd_lr,
                       const Update<T>* update, const Poll& poll, T l2, double max_grad_norm) {
  const bool updating = sgd_lr >= T(0) || update != nullptr;
  const bool clipping = max_grad_norm >= 0 && updating;
  sweep_.sgd_lr = sgd_lr;
  sweep_.l2 = l2;
  sweep_.clip = clipping ? max_grad_norm : -1;
  sweep_.update = update;
  sweep_.poll = poll ? &poll : nullptr;
  // With a poll, the sweep may be abandoned between any two products, so no
  // parameter may change before the last product that reads the old ones: the
  // updates are held back to the end. Each is the same arithmetic on the same
  // operands as in the interleaved order, so the result is bitwise the same.
  // Clipping needs every gradient before any update, so it holds them back too,
  // and the plain SGD step is made from the stored (clipped) gradient.
  sweep_.hold_back = (static_cast<bool>(poll) || clipping) && updating;
  sweep_.held.clear();
  BackwardContext<T> ctx;
  ctx.accumulate = accumulate;
  ctx.sgd_lr = clipping ? T(-1) : sgd_lr;
  ctx.l2 = l2;
  ctx.lazy = update != nullptr && update->spec.lazy && !clipping;
  ctx.network = this;
  ctx.on_ready = updating ? &Network<T>::on_ready : nullptr;
  ctx.poll = poll ? &Network<T>::on_poll : nullptr;
  // The reverse network: one visit per layer, from the output back to the input.
  for (std::size_t l = layers_.size(); l-- > 0;) {
    T* below = l > 0 ? layers_[l - 1]->grad_output()
                     : (grad_input != nullptr ? grad_input->data() : nullptr);
    layers_[l]->backward(below, batch_, ctx);
  }
  if (sweep_.hold_back) {
    // Every gradient is formed from the old parameters: now the updates, no more polls.
    if (clipping) {
      // the terms in parameter order, as grad_norm() sums them: the same bits
      double sum = 0;
      for (double sq : sweep_.grad_squares) sum += sq;
      scale_grads(max_grad_norm, std::sqrt(sum));
    }
    for (Layer<T>* L : sweep_.held) update_layer(*L);
  }
  sweep_.held.clear();
  sweep_.poll = nullptr;
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
  for (const NamedParameter<T>& np : params_) {
    const Parameter<T>& p = *np.parameter;
    VectorMap<T>(p.value->data(), p.size()).noalias() -=
        lr * ConstVectorMap<T>(p.grad->data(), p.size());
  }
}

template <typename T>
double Network<T>::grad_square(std::size_t i) const {
  const Parameter<T>& p = *params_[i].parameter;
  return sum_squares<T>(p.grad->data(), p.size());
}

template <typename T>
double Network<T>::grad_norm() const {
  double sum = 0;
  for (std::size_t i = 0; i < params_.size(); ++i) sum += grad_square(i);
  return std::sqrt(sum);
}

template <typename T>
void Network<T>::scale_grads(double max_norm, double norm) {
  // torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), at most 1
  const double coef = max_norm / (norm + 1e-6);
  if (coef >= 1.0) return;  // torch multiplies by 1: the same values (a NaN norm scales by NaN)
  const T c = static_cast<T>(coef);
  for (const NamedParameter<T>& np : params_) {
    const Parameter<T>& p = *np.parameter;
    scale_values<T>(p.grad->data(), p.size(), c);
  }
}

template <typename T>
double Network<T>::clip_grad_norm(double max_norm) {
  if (!has_grad_) {
    throw std::logic_error("[clip_grad_norm] the network has no gradients yet: call "
                           "net.forward and net.backward first");
  }
  if (!std::isfinite(max_norm) || max_norm < 0) {
    throw std::invalid_argument("[clip_grad_norm] max_norm must be a finite number >= 0, but "
                                "got " + std::to_string(max_norm));
  }
  const double norm = grad_norm();
  scale_grads(max_norm, norm);
  return norm;
}

template <typename T>
void Network<T>::clip_grad_value(double clip) {
  if (!has_grad_) {
    throw std::logic_error("[clip_grad_value] the network has no gradients yet: call "
                           "net.forward and net.backward first");
  }
  if (!std::isfinite(clip) || clip < 0) {
    throw std::invalid_argument("[clip_grad_value] clip_value must be a finite number >= 0, "
                                "but got " + std::to_string(clip));
  }
  const T c = static_cast<T>(clip);
  for (const NamedParameter<T>& np : params_) {
    const Parameter<T>& p = *np.parameter;
    T* g = p.grad->data();
    for (Index j = 0; j < p.size(); ++j) {
      // clamp as torch's clamp_: NaN stays NaN
      if (g[j] > c) {
        g[j] = c;
      } else if (g[j] < -c) {
        g[j] = -c;
      }
    }
  }
}

template <typename T>
void Network<T>::apply_optimizer(Update<T>& update) {
  if (!has_grad_) {
    throw std::logic_error("[Optimizer.step] the network has no gradients yet: call "
                           "net.forward and net.backward before step()");
  }
  if (update.states.size() != params_.size() || update.steps < 0) {
    throw std::invalid_argument("[Optimizer.step] the optimizer was built for another network");
  }
  const std::int64_t t = update.steps + 1;
  for (std::size_t i = 0; i < params_.size(); ++i) update_parameter(update, t, i);
  update.steps = t;
}

template <typename T>
void Network<T>::predict(ConstMatrixMap<T> X, Index batch_size, MatrixMap<T> out) const {
  if (X.cols() != in_features()) {
    throw std::invalid_argument("[Network.predict] X has " + std::to_string(X.cols()) +
                                " features, but layer 0 expects " +
                                std::to_string(in_features()));
  }
  predict_impl(X.data(), nullptr, X.rows(), batch_size, out);
}

template <typename T>
void Network<T>::predict(const CsrBatch<T>& X, Index batch_size, MatrixMap<T> out) const {
  if (layers_[0]->kind() != LayerSpec::Kind::dense) {
    throw std::invalid_argument(
        std::string("[Network.predict] X is sparse, which only a Dense first layer takes, but "
                    "layer 0 is ") + kind_name(layers_[0]->kind()) + "; densify X "
        "(X.toarray()) or start the network with a Dense layer");
  }
  if (X.cols != in_features()) {
    throw std::invalid_argument("[Network.predict] X has " + std::to_string(X.cols) +
                                " features, but layer 0 expects " +
                                std::to_string(in_features()));
  }
  check_csr(X, "Network.predict");
  predict_impl(nullptr, &X, X.rows, batch_size, out);
}

template <typename T>
void Network<T>::predict_impl(const T* X, const CsrBatch<T>* csr, Index N, Index batch_size,
                              MatrixMap<T> out) const {
  if (out.rows() != N || out.cols() != out_features()) {
    throw std::invalid_argument("[Network.predict] out has shape " +
                                detail::shape_str(out.rows(), out.cols()) + ", expected " +
                                detail::shape_str(N, out_features()));
  }
  if (N == 0) return;
  const Index chunk = batch_size <= 0 ? N : std::min(batch_size, N);
  Index width = 0, inner = 0;
  for (const auto& L : layers_) {
    width = std::max(width, L->out_features());
    inner = std::max(inner, L->predict_workspace(chunk));
  }
  // Ping-pong workspaces of this call's own (and the layers' scratch space): the
  // training caches stay untouched.
  const std::string what = "[Network.predict] a workspace of " + std::to_string(chunk) +
                           " rows (pass a smaller batch_size)";
  auto allocate = [&](Index n) {
    return with_context(what, [&] { return allocate_storage<T>(static_cast<std::size_t>(n)); });
  };
  Storage<T> ping = allocate(chunk * width);
  Storage<T> pong = allocate(chunk * width);
  Storage<T> scratch_storage = allocate(inner);
  T* buffers[2] = {ping.data(), pong.data()};
  T* scratch = scratch_storage.data();
  for (Index start = 0; start < N; start += chunk) {
    const Index B = std::min(chunk, N - start);
    const T* a = X != nullptr ? X + start * in_features() : nullptr;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      T* dst = l + 1 == layers_.size() ? out.data() + start * out_features() : buffers[l % 2];
      if (a == nullptr) {  // a sparse X: rows [start, start + B) of its CSR arrays
        static_cast<const Dense<T>&>(*layers_[0]).predict_sparse(csr->slice(start, B), dst);
      } else {
        layers_[l]->predict(a, dst, B, scratch);
      }
      a = dst;
    }
  }
}

}  // namespace bprop
