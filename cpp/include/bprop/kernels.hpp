// Fused kernels of the training layer: losses and optimizer updates.
//
// Each optimizer update is one pass over a parameter and its gradient, with no
// temporaries; the formulas follow the papers as implemented by torch.optim.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bprop/sparse.hpp"
#include "bprop/types.hpp"

namespace bprop {

/// The losses the one-call training step knows.
enum class Loss {
  softmax_cross_entropy,
  binary_cross_entropy_with_logits,
  mean_squared_error,
  huber,
  mean_absolute_error,
  poisson_nll,
};

/// The core's half of the loss registry: each fused loss by the name Python
/// gives it (python/bprop/losses.py's LOSSES, checked against this table by a
/// test). The binding parses train_step's loss name here and nowhere else.
struct LossEntry {
  Loss loss;
  const char* name;
};
inline constexpr LossEntry kLosses[] = {
    {Loss::softmax_cross_entropy, "softmax_cross_entropy"},
    {Loss::binary_cross_entropy_with_logits, "binary_cross_entropy_with_logits"},
    {Loss::mean_squared_error, "mean_squared_error"},
    {Loss::huber, "huber"},
    {Loss::mean_absolute_error, "mean_absolute_error"},
    {Loss::poisson_nll, "poisson_nll"},
};

/// The loss of a name in kLosses; throws std::invalid_argument naming `where`
/// and the accepted names otherwise.
Loss parse_loss(const std::string& name, const char* where);

// ---- losses: mean reduction, return the loss and write dL/d(output) ------

/// Softmax cross-entropy fused through log-sum-exp, for logits (batch, classes).
/// Targets are integer labels (batch) when `labels` is not null, otherwise
/// probability rows `target` (batch, classes). With sample weights w (batch)
/// the mean is sum(w_i l_i) / sum(w_i). grad = w_i (softmax(z_i) - y_i) / sum(w).
/// Labels must lie in [0, classes); throws std::invalid_argument otherwise.
template <typename T>
double softmax_cross_entropy(const T* logits, Index batch, Index classes,
                             const std::int64_t* labels, const T* target,
                             const T* sample_weight, T* grad);

/// Binary cross-entropy on logits, elementwise over (batch, k), stable for any
/// logit: l = max(x, 0) - x y + log1p(exp(-|x|)).
template <typename T>
double binary_cross_entropy_with_logits(const T* logits, const T* target, Index batch,
                                        Index k, const T* sample_weight, T* grad);

/// Mean squared error over all elements of (batch, k).
template <typename T>
double mean_squared_error(const T* output, const T* target, Index batch, Index k,
                          const T* sample_weight, T* grad);

/// Huber loss over all elements of (batch, k), as torch.nn.HuberLoss: with
/// r = output - target, l = r^2 / 2 where |r| < delta, else delta (|r| - delta / 2);
/// dl/dr = clamp(r, -delta, delta). Mean reduction (weighted as above).
template <typename T>
double huber(const T* output, const T* target, Index batch, Index k, const T* sample_weight,
             T* grad, T delta);

/// Mean absolute error over all elements of (batch, k), as torch.nn.L1Loss:
/// l = |output - target|, dl/d(output) = sign(output - target) (0 at 0).
template <typename T>
double mean_absolute_error(const T* output, const T* target, Index batch, Index k,
                           const T* sample_weight, T* grad);

/// Poisson negative log-likelihood of log-rates z over (batch, k), as
/// torch.nn.PoissonNLLLoss(log_input=True, full=False): l = exp(z) - y z,
/// dl/dz = exp(z) - y.
template <typename T>
double poisson_nll(const T* output, const T* target, Index batch, Index k,
                   const T* sample_weight, T* grad);

// ---- optimizer updates: one fused pass over n parameters --------------------

/// SGD with optional momentum (Nesterov) and L2 weight decay.
/// `buf` is the momentum buffer (n); `first` says it holds nothing yet.
template <typename T>
void sgd_update(T* param, const T* grad, T* buf, Index n, T lr, T momentum, T dampening,
                bool nesterov, T weight_decay, bool first);

/// Adam (Kingma & Ba) at step t >= 1; AdamW's decoupled decay if `decoupled`.
template <typename T>
void adam_update(T* param, const T* grad, T* m, T* v, Index n, T lr, T beta1, T beta2,
                 T eps, T weight_decay, std::int64_t t, bool decoupled);

/// RMSprop (Hinton), optionally centered and with momentum. `grad_avg` is used
/// only if centered, `buf` only if momentum > 0.
template <typename T>
void rmsprop_update(T* param, const T* grad, T* square_avg, T* grad_avg, T* buf, Index n,
                    T lr, T alpha, T eps, T weight_decay, T momentum, bool centered);

// ---- an optimizer as the core applies it inside the backward sweep ----------

enum class UpdateRule { sgd, adam, rmsprop };

/// Hyperparameters of one optimizer; which fields matter depends on the rule.
struct UpdateSpec {
  UpdateRule rule = UpdateRule::sgd;
  double lr = 0, weight_decay = 0;
  double momentum = 0, dampening = 0;  // sgd (momentum also rmsprop)
  bool nesterov = false;               // sgd
  double beta1 = 0.9, beta2 = 0.999;   // adam
  double eps = 1e-8;                   // adam, rmsprop
  bool decoupled = false;              // adam: AdamW
  double alpha = 0.99;                 // rmsprop
  bool centered = false;               // rmsprop
  /// adam only: where a parameter's gradient is row-sparse (the first Dense
  /// layer's W after a sparse batch: rows outside the batch's columns are zero),
  /// update only the batch's rows; the others keep their value and state, as
  /// torch.optim.SparseAdam does (the bias correction uses the optimizer's step t).
  bool lazy = false;
};

/// The state arrays of one parameter, owned by the caller, by the names
/// torch.optim gives them; null where the rule (or its settings) keeps none:
/// sgd: momentum_buffer (momentum > 0); adam: exp_avg, exp_avg_sq; rmsprop:
/// square_avg, grad_avg (centered), momentum_buffer (momentum > 0).
template <typename T>
struct UpdateState {
  T* momentum_buffer = nullptr;
  T* exp_avg = nullptr;
  T* exp_avg_sq = nullptr;
  T* square_avg = nullptr;
  T* grad_avg = nullptr;

  /// The same state from element i on (a block of the parameter).
  UpdateState offset(Index i) const {
    auto at = [i](T* p) { return p != nullptr ? p + i : nullptr; };
    return {at(momentum_buffer), at(exp_avg), at(exp_avg_sq), at(square_avg), at(grad_avg)};
  }
};

/// The state names a rule keeps, in this order, given its settings: what an
/// optimizer's state_dict holds per parameter.
std::vector<const char*> state_names(const UpdateSpec& spec);

/// An optimizer as the core applies it: the rule, the number of steps taken so
/// far and one state per parameter, in the order W0, b0, W1, b1, ... The next
/// step is number t = steps + 1 (Adam's bias correction; SGD's first momentum
/// step). The call that makes a step counts it (++steps) once every parameter
/// is updated, so the count and the parameters never disagree.
template <typename T>
struct Update {
  UpdateSpec spec;
  std::int64_t steps = 0;
  std::vector<UpdateState<T>> states;
};

/// True for SGD without momentum and weight decay, W -= lr dL/dW, which the
/// training step makes as one product accumulating into W.
inline bool is_plain_sgd(const UpdateSpec& spec) {
  return spec.rule == UpdateRule::sgd && spec.momentum == 0 && spec.weight_decay == 0;
}

/// Applies `spec` at step t to the n values of one parameter with its state, in
/// fixed blocks of values run on the thread pool (the update is elementwise, so
/// the thread count changes no bit).
/// The sum of a[i]^2 over n values in float64, in blocks on bprop's pool, cut by n
/// alone and added in a fixed order (the same bits for any thread count).
template <typename T>
double sum_squares(const T* a, Index n);

/// a *= c over n values, in blocks on bprop's pool (elementwise: the same bits for
/// any thread count).
template <typename T>
void scale_values(T* a, Index n, T c);

template <typename T>
void apply_update(const UpdateSpec& spec, std::int64_t t, T* param, const T* grad,
                  const UpdateState<T>& state, Index n);

/// apply_update restricted to the rows in `rows` of a parameter of rows.rows rows
/// of row_size values (and its state, shaped alike): the others are not touched.
/// Fixed blocks of rows run on the pool, so the thread count changes no bit.
template <typename T>
void apply_update_rows(const UpdateSpec& spec, std::int64_t t, T* param, const T* grad,
                       const UpdateState<T>& state, const RowSet& rows, Index row_size);

/// True if all n values are finite.
template <typename T>
bool all_finite(const T* x, Index n);

}  // namespace bprop
