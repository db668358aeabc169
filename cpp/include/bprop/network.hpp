// The network: an ordered sequence of layers (layer.hpp, layers.hpp).
//
// The method is the lecture's: the forward pass caches what each layer's backward
// needs (a Dense layer its input a and pre-activation z); the backward pass runs
// one sweep from the last layer back to the first through the "reverse network",
// each layer receiving dL/d(its output) and passing dL/d(its input) down, and a
// weight's gradient is the product of the two: dL/dW = a^T delta.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "bprop/kernels.hpp"
#include "bprop/layers.hpp"
#include "bprop/types.hpp"

namespace bprop {

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
/// With max_grad_norm >= 0 the step is clipped as torch.nn.utils.clip_grad_norm_
/// clips it: once every gradient is formed, all of them are scaled by
/// min(1, max_grad_norm / (norm + 1e-6)), norm their global 2-norm, before any update.
struct Objective {
  double loss_scale = 1;
  double grad_scale = 1;
  double l2 = 0;
  double max_grad_norm = -1;  // < 0: no clipping
};

/// A parameter or buffer of the network with its dotted name ("layers.2.weight",
/// "layers.4.layers.0.bias", "layers.1.running_mean") and the layer that owns it.
template <typename T>
struct NamedParameter {
  std::string name;
  Parameter<T>* parameter;
  Layer<T>* layer;
};
template <typename T>
struct NamedBuffer {
  std::string name;
  Buffer<T>* buffer;
  Layer<T>* layer;
};

/// An ordered sequence of layers whose widths chain.
///
/// Not thread-safe: calls on one Network must be serialized by the caller,
/// except predict(), which only reads the parameters and buffers.
template <typename T>
class Network {
 public:
  /// Throws std::invalid_argument if `specs` is empty, holds no layer with a
  /// width, or a layer cannot be built (bad settings, widths that do not chain).
  explicit Network(const std::vector<LayerSpec>& specs);

  Index num_layers() const { return static_cast<Index>(layers_.size()); }
  Index in_features() const { return in_features_; }
  Index out_features() const { return layers_.back()->out_features(); }
  Index num_parameters() const;
  Layer<T>& layer(Index i) { return *layers_.at(static_cast<std::size_t>(i)); }
  const Layer<T>& layer(Index i) const { return *layers_.at(static_cast<std::size_t>(i)); }
  /// Every layer, nested ones included, depth first (a Residual before its layers).
  const std::vector<Layer<T>*>& all_layers() const { return all_; }
  /// Every parameter in layer order (within a layer: weight, then bias), and every
  /// buffer: the index an optimizer's state follows.
  const std::vector<NamedParameter<T>>& parameters() const { return params_; }
  const std::vector<NamedBuffer<T>>& buffers() const { return buffers_; }

  /// Training mode (a new network's) or eval mode: what forward and train_step
  /// do in Dropout and BatchNorm. predict always runs in eval mode.
  bool training() const { return training_; }
  void set_training(bool training) { training_ = training; }
  /// The key of the dropout masks and the number of training forward passes made
  /// so far (the step the next mask is drawn for).
  std::uint64_t dropout_seed() const { return dropout_seed_; }
  void set_dropout_seed(std::uint64_t seed) { dropout_seed_ = seed; }
  std::int64_t dropout_step() const { return dropout_step_; }
  void set_dropout_step(std::int64_t step);

  /// Forward pass over X (batch, in_features) in the current mode, caching what
  /// each layer's backward needs. X itself is layer 0's cached input: it is
  /// referenced, not copied, so the caller keeps it alive and unchanged until the
  /// next forward. In training mode it counts a dropout step and updates
  /// BatchNorm's running statistics (once it has succeeded).
  /// Returns the last layer's output (batch, out_features), valid until the next forward.
  /// Abandoned by `poll`: the cached forward pass is forgotten (as by clear_cache());
  /// parameters and stored gradients are unchanged.
  ConstMatrixMap<T> forward(ConstMatrixMap<T> X, const Poll& poll = {});

  /// forward() over a sparse X (batch, in_features) in CSR form, which layer 0
  /// must be a Dense layer to take (z = X W + b as a sparse x dense product).
  /// Throws std::invalid_argument, before anything changes, if layer 0 is not
  /// Dense or X is not well-formed (check_csr: valid indptr, column indices in
  /// range, sorted, no duplicates; finite values). The CSR arrays are referenced,
  /// not copied, until the next forward. A backward sweep after it forms dL/dW =
  /// X^T delta from the CSR arrays, and no dL/dX (backward refuses grad_input).
  ConstMatrixMap<T> forward(const CsrBatch<T>& X, const Poll& poll = {});

  /// Backward sweep from grad_output = dL/d(output) (batch, out_features), one
  /// visit per layer from the last to the first. Stores every parameter's
  /// gradient (added to the previous ones if `accumulate`). If grad_input is not
  /// null, writes dL/dX (batch, in_features) there.
  /// Throws std::logic_error before any forward pass, std::invalid_argument if
  /// the shape does not match the last forward.
  /// Abandoned by `poll`: the stored gradients are partly overwritten, so they are
  /// dropped (has_backward() becomes false); the forward cache and the parameters
  /// are unchanged.
  void backward(ConstMatrixMap<T> grad_output, bool accumulate, MatrixMap<T>* grad_input,
                const Poll& poll = {});

  /// Plain SGD on every parameter, p -= lr dL/dp. Throws std::logic_error before any
  /// backward pass, std::invalid_argument for a negative or non-finite lr.
  void step(T lr);

  /// One training step in one call: forward, loss, backward, update.
  ///
  /// The loss gradient is written straight into the last layer's gradient buffer
  /// (a Dense layer's delta). The update, if any, is made inside the backward
  /// sweep, layer by layer, once the layer's dL/da for the layer below has been
  /// formed from the old parameters:
  ///  - plain SGD (`update` with is_plain_sgd(), or no `update` and `sgd_lr` >= 0):
  ///    a Dense layer's W -= lr a^T delta as one matrix product accumulating into
  ///    W, so dL/dW is never stored, and p -= lr dL/dp for other layers'
  ///    parameters (has_backward() then becomes false: the gradient buffers do
  ///    not hold the step's gradients);
  ///  - else `update` not null: dL/dW and dL/db are stored, then the optimizer's
  ///    fused kernel updates the parameter while they are still in cache (a lazy
  ///    update over a sparse X forms and updates the first layer's W in the
  ///    batch's rows only, so has_backward() then becomes false);
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
  /// train_step() over a sparse X in CSR form, checked as by forward(CsrBatch).
  double train_step(const CsrBatch<T>& X, Loss loss, const std::int64_t* labels,
                    const T* target, const T* sample_weight, T sgd_lr,
                    Update<T>* update = nullptr, const Poll& poll = {},
                    const Objective* objective = nullptr);

  /// Scales every stored gradient by min(1, max_norm / (norm + 1e-6)), norm the
  /// global 2-norm of all of them (summed in float64, parameter by parameter in a
  /// fixed order), as torch.nn.utils.clip_grad_norm_. Returns norm (before
  /// clipping). Throws std::logic_error before any backward pass,
  /// std::invalid_argument for a max_norm that is negative or not finite.
  double clip_grad_norm(double max_norm);
  /// Clamps every stored gradient to [-clip, clip] (torch.nn.utils.clip_grad_value_).
  void clip_grad_value(double clip);

  /// Applies an optimizer's update to every parameter from the stored gradients
  /// (the path of Optimizer.step()) and counts the step (++update.steps). Throws
  /// std::logic_error before any backward pass, std::invalid_argument if `update`
  /// holds state for another number of parameters.
  void apply_optimizer(Update<T>& update);

  /// Forward pass in eval mode that leaves the training caches and the buffers
  /// alone, batch_size rows at a time (0: all at once). Writes (batch,
  /// out_features) to `out`. Safe to call from several threads at once as long as
  /// no thread changes the parameters or buffers.
  void predict(ConstMatrixMap<T> X, Index batch_size, MatrixMap<T> out) const;
  /// predict() over a sparse X in CSR form, checked as by forward(CsrBatch); each
  /// chunk of rows is a slice of the CSR arrays (no copy).
  void predict(const CsrBatch<T>& X, Index batch_size, MatrixMap<T> out) const;

  Index batch() const { return batch_; }
  Index capacity() const { return capacity_; }
  bool has_forward() const { return input_ != nullptr || sparse_input_; }
  /// The last forward's input was sparse (input() is then null).
  bool sparse_input() const { return sparse_input_; }
  bool has_backward() const { return has_grad_; }
  const T* input() const { return input_; }

  /// Forgets the cached forward pass (the referenced input included).
  void clear_cache();

 private:
  void reserve(Index batch);
  // Throws std::invalid_argument, tagged with `where`, for a batch forward cannot take.
  void check_input(ConstMatrixMap<T> X, const char* where) const;
  void check_input(const CsrBatch<T>& X, const char* where) const;
  // The checks common to dense and sparse input.
  void check_rows(Index rows, Index cols, const char* where) const;
  // True if [data, data + size) overlaps a layer's cache.
  bool aliases_cache(const T* data, Index size) const;
  // The forward pass proper: no buffer committed, no dropout step counted.
  // X dense (batch, in_features), or `csr` if X is null.
  const T* run_forward(const T* X, const CsrBatch<T>* csr, Index batch, const Poll& poll);
  double train_step_impl(const T* X, const CsrBatch<T>* csr, Index rows, Index cols, Loss loss,
                         const std::int64_t* labels, const T* target, const T* sample_weight,
                         T sgd_lr, Update<T>* update, const Poll& poll,
                         const Objective* objective);
  void predict_impl(const T* X, const CsrBatch<T>* csr, Index N, Index batch_size,
                    MatrixMap<T> out) const;
  // Makes a successful forward pass's effects permanent: buffers, the dropout step.
  void commit_forward();
  // The backward sweep proper, from the last layer's gradient buffer (already
  // written). With a poll, the updates wait until every product that reads the
  // old parameters is done. l2: add l2 * W to the gradient of each weight that
  // decays (fused SGD: W *= 1 - lr l2 before its product).
  void sweep(bool accumulate, MatrixMap<T>* grad_input, T sgd_lr, const Update<T>* update,
             const Poll& poll, T l2 = T(0), double max_grad_norm = -1);
  // the global 2-norm of the stored gradients, and their scaling (clip_grad_norm)
  double grad_norm() const;
  // ||dL/dp||^2 of parameter i, in float64 (grad_norm's terms)
  double grad_square(std::size_t i) const;
  void scale_grads(double max_norm, double norm);
  // What the sweep does once a layer's gradients are ready: its update, now or
  // held back to the end of the sweep.
  static void on_ready(void* self, Layer<T>& layer);
  static void on_poll(void* self);
  void update_layer(Layer<T>& layer);
  // update's step t on parameter i (lazy: the rows of a row-sparse gradient only)
  void update_parameter(const Update<T>& update, std::int64_t t, std::size_t i);
  // sum of ||W||^2 over the weights that decay, in float64, in parameter order
  double weight_squares() const;

  std::vector<std::unique_ptr<Layer<T>>> layers_;
  std::vector<Layer<T>*> all_;
  std::vector<NamedParameter<T>> params_;
  std::vector<NamedBuffer<T>> buffers_;
  std::vector<StoragePtr<T>> caches_;  // every cache storage, for aliases_cache
  Index in_features_ = 0;
  const T* input_ = nullptr;  // layer 0's input a, owned by the caller
  bool sparse_input_ = false;  // layer 0's input was a CSR batch (Dense::sparse_input())
  Index batch_ = 0;
  Index capacity_ = 0;
  bool has_grad_ = false;
  bool training_ = true;
  std::uint64_t dropout_seed_ = 0;
  std::int64_t dropout_step_ = 0;
  // the sweep in progress
  struct SweepState {
    T sgd_lr = T(-1);
    T l2 = T(0);
    double clip = -1;  // >= 0: every gradient formed, then clipped, then the updates
    const Update<T>* update = nullptr;
    const Poll* poll = nullptr;
    bool hold_back = false;
    std::vector<Layer<T>*> held;  // capacity reserved at construction
    // clipping: ||dL/dp||^2 of each parameter, taken as its layer's gradients are
    // formed (while in cache); sized at construction
    std::vector<double> grad_squares;
  } sweep_;
};

extern template class Network<float>;
extern template class Network<double>;

}  // namespace bprop
