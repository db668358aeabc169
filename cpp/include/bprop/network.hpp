// Dense layers and the network that chains them.
//
// The method is the lecture's: the forward pass caches each layer's input a and
// pre-activation z; the backward pass runs one sweep from the output layer back
// to the input through the "reverse network", forming delta = dL/dz per layer,
// and the gradient of a weight is the product of the two: dL/dW = a^T delta.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "bprop/activation.hpp"
#include "bprop/kernels.hpp"
#include "bprop/types.hpp"

namespace bprop {

/// The shape of one dense layer: z = a W + b, output = sigma(z).
struct LayerSpec {
  Index in_features = 0;
  Index out_features = 0;
  Activation activation = Activation::identity;
  double negative_slope = 0.01;  // leaky_relu only
};

/// One dense layer's parameters, gradients and training caches.
/// weight is (in_features, out_features), bias (out_features).
template <typename T>
struct Dense {
  explicit Dense(const LayerSpec& spec);

  LayerSpec spec;
  StoragePtr<T> weight, bias;            // parameters
  StoragePtr<T> grad_weight, grad_bias;  // dL/dW = a^T delta, dL/db = colsum(delta)
  // Training caches, (capacity, out_features); the first `batch` rows are live.
  StoragePtr<T> z;       // pre-activation
  StoragePtr<T> output;  // a = sigma(z); the same storage as z for identity
  StoragePtr<T> delta;   // dL/dz

  Index in() const { return spec.in_features; }
  Index out() const { return spec.out_features; }
};

/// Called by forward, backward and train_step between layers (and between the
/// two products of a layer's backward step) when not empty. It may throw to
/// abandon the call; the exception propagates to the caller. Each call says what
/// an abandoned call leaves; no call abandoned this way changes a parameter or an
/// optimizer's state. (The binding polls Python's signal handlers with it, so
/// that Ctrl-C stops a long step.)
using Poll = std::function<void()>;

/// An objective built on a built-in loss, as scikit-learn's MLP defines it:
///   loss_scale * loss + 0.5 * l2 * (sum over layers of ||W||^2),
/// stepped along grad_scale * dL/d(output) and, for each weight (not the biases),
/// l2 * W added to dL/dW. (scikit-learn's regressor steps along a gradient that is
/// not its reported loss's, hence two scales.) The L2 term is measured on the
/// weights before the step, summed in float64 layer by layer in a fixed order.
struct Objective {
  double loss_scale = 1;
  double grad_scale = 1;
  double l2 = 0;
};

/// An ordered stack of dense layers whose widths chain.
///
/// Not thread-safe: calls on one Network must be serialized by the caller,
/// except predict(), which only reads the parameters.
template <typename T>
class Network {
 public:
  /// Throws std::invalid_argument if `specs` is empty, a size is not positive,
  /// a layer is too large to address, or the widths do not chain.
  explicit Network(const std::vector<LayerSpec>& specs);

  Index num_layers() const { return static_cast<Index>(layers_.size()); }
  Index in_features() const { return layers_.front().in(); }
  Index out_features() const { return layers_.back().out(); }
  Index num_parameters() const;
  Dense<T>& layer(Index i) { return layers_.at(static_cast<std::size_t>(i)); }
  const Dense<T>& layer(Index i) const { return layers_.at(static_cast<std::size_t>(i)); }

  /// Forward pass over X (batch, in_features), caching each layer's z and output.
  /// X itself is layer 0's cached input: it is referenced, not copied, so the
  /// caller keeps it alive and unchanged until the next forward.
  /// Returns the last layer's output (batch, out_features), valid until the next forward.
  /// Abandoned by `poll`: the cached forward pass is forgotten (as by clear_cache());
  /// parameters and stored gradients are unchanged.
  ConstMatrixMap<T> forward(ConstMatrixMap<T> X, const Poll& poll = {});

  /// Backward sweep from grad_output = dL/d(output) (batch, out_features), one
  /// visit per layer from the last to the first. Stores dL/dW and dL/db in each
  /// layer (added to the previous ones if `accumulate`). If grad_input is not
  /// null, writes dL/dX (batch, in_features) there.
  /// Throws std::logic_error before any forward pass, std::invalid_argument if
  /// the shape does not match the last forward.
  /// Abandoned by `poll`: the stored gradients are partly overwritten, so they are
  /// dropped (has_backward() becomes false); the forward cache and the parameters
  /// are unchanged.
  void backward(ConstMatrixMap<T> grad_output, bool accumulate, MatrixMap<T>* grad_input,
                const Poll& poll = {});

  /// Plain SGD: W -= lr dL/dW, b -= lr dL/db. Throws std::logic_error before any
  /// backward pass, std::invalid_argument for a negative or non-finite lr.
  void step(T lr);

  /// One training step in one call: forward, loss, backward, update.
  ///
  /// The loss gradient is written straight into the output layer's delta. The
  /// update, if any, is made inside the backward sweep, layer by layer, once the
  /// layer's dL/da for the layer below has been formed from the old weights:
  ///  - plain SGD (`update` with is_plain_sgd(), or no `update` and `sgd_lr` >= 0):
  ///    W -= lr a^T delta as one matrix product accumulating into W, so dL/dW is
  ///    never stored (the gradient buffers are left as they were and
  ///    has_backward() becomes false);
  ///  - else `update` not null: dL/dW and dL/db are stored, then the optimizer's
  ///    fused kernel updates the parameter while they are still in cache;
  ///  - else: the gradients are stored as by backward() and nothing is updated.
  /// A step made with `update` is counted in it (++update->steps) in this call.
  /// A non-finite loss stores the gradients, updates and counts nothing.
  ///
  /// With a `poll`, no parameter changes until every product that reads the old
  /// weights is done: the updates are held back to the end of the sweep (for
  /// plain SGD, the products into W follow all the deltas), with the same
  /// arithmetic, so the result is bitwise the same. Abandoned by `poll`, the step
  /// did not happen: parameters, the update's state and its count are unchanged;
  /// the forward cache and the stored gradients are dropped (has_forward() and
  /// has_backward() become false).
  /// Targets: `labels` (batch) for softmax cross-entropy, else `target`
  /// (batch, out_features); `sample_weight` (batch) or null. Returns the loss, or
  /// with an `objective` that objective (its L2 term changes dL/dW, stored or
  /// fused into the update alike). Throws std::invalid_argument for an objective
  /// whose numbers are not finite or whose l2 is negative.
  double train_step(ConstMatrixMap<T> X, Loss loss, const std::int64_t* labels, const T* target,
                    const T* sample_weight, T sgd_lr, Update<T>* update = nullptr,
                    const Poll& poll = {}, const Objective* objective = nullptr);

  /// Applies an optimizer's update to every parameter from the stored gradients
  /// (the path of Optimizer.step()) and counts the step (++update.steps). Throws
  /// std::logic_error before any backward pass, std::invalid_argument if `update`
  /// holds state for another shape.
  void apply_optimizer(Update<T>& update);

  /// Forward pass that leaves the training caches alone, batch_size rows at a
  /// time (0: all at once). Writes (batch, out_features) to `out`. Safe to call
  /// from several threads at once as long as no thread changes the parameters.
  void predict(ConstMatrixMap<T> X, Index batch_size, MatrixMap<T> out) const;

  Index batch() const { return batch_; }
  Index capacity() const { return capacity_; }
  bool has_forward() const { return input_ != nullptr; }
  bool has_backward() const { return has_grad_; }
  const T* input() const { return input_; }

  /// Forgets the cached forward pass (the referenced input included).
  void clear_cache();

 private:
  void reserve(Index batch);
  // Throws std::invalid_argument, tagged with `where`, for a batch forward cannot take.
  void check_input(ConstMatrixMap<T> X, const char* where) const;
  // True if [data, data + size) overlaps a layer's z, output or delta buffer.
  bool aliases_cache(const T* data, Index size) const;
  // The backward sweep proper, from the output layer's delta (already formed).
  // With a poll, the updates wait until every product that reads the old weights is done.
  // l2: add l2 * W to each dL/dW (fused SGD: W *= 1 - lr l2 before its product).
  void sweep(bool accumulate, MatrixMap<T>* grad_input, T sgd_lr, const Update<T>* update,
             const Poll& poll, T l2 = T(0));
  // sum over layers of ||W||^2, in float64, layer by layer
  double weight_squares() const;

  std::vector<Dense<T>> layers_;
  const T* input_ = nullptr;  // layer 0's input a, owned by the caller
  Index batch_ = 0;
  Index capacity_ = 0;
  bool has_grad_ = false;
};

extern template class Network<float>;
extern template class Network<double>;
extern template struct Dense<float>;
extern template struct Dense<double>;

}  // namespace bprop
