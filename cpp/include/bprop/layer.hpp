// The layer protocol: what the network asks of every layer.
//
// A layer maps its input (batch, in_features) to its output (batch, out_features).
// forward caches what backward needs; backward receives dL/d(output) in the
// layer's own gradient buffer and writes dL/d(input) into the buffer the network
// gives it (the gradient buffer of the layer below), forming its parameters'
// gradients on the way. The network runs forward from the first layer to the last
// and backward in one sweep from the last to the first, each layer visited once:
// the lecture's "reverse network". A Dense layer keeps the lecture's names
// (input a, z, delta = dL/dz, grad_weight = a^T delta).
//
// Parameters (trained: value and gradient) and buffers (state that is not trained,
// such as BatchNorm's running statistics) are named as PyTorch names them, and
// listed in PyTorch's order; the network indexes them in layer order, whatever
// layers own them, and the optimizer's state follows that index.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bprop/activation.hpp"
#include "bprop/sparse.hpp"
#include "bprop/types.hpp"

namespace bprop {

/// A trained array: its value and dL/d(value), of the same shape.
template <typename T>
struct Parameter {
  std::string name;  // "weight", "bias"
  std::vector<Index> shape;
  StoragePtr<T> value, grad;
  bool decays = false;  // scikit-learn's L2 term applies (a Dense layer's weight)
  /// Not null while the gradient is row-sparse: the rows of a (rows, cols) parameter
  /// outside this set have a zero gradient (the first Dense layer's W after a
  /// sparse batch). A lazy update (UpdateSpec::lazy) touches only these rows.
  const RowSet* present_rows = nullptr;

  Index size() const {
    Index n = 1;
    for (Index d : shape) n *= d;
    return n;
  }
};

/// State a layer keeps that is not trained.
template <typename T>
struct Buffer {
  std::string name;  // "running_mean", "running_var"
  std::vector<Index> shape;
  StoragePtr<T> value;
};

/// What the network tells a layer about the forward pass besides its input.
struct ForwardContext {
  bool training = true;
  std::uint64_t seed = 0;  // the network's key for dropout masks
  std::int64_t step = 0;   // training forward passes the network made before this one
};

template <typename T>
class Layer;

/// What the network tells a layer about the backward sweep. A layer calls
/// `gradients_ready(*this)` once its parameters' gradients are complete and it no
/// longer reads its parameters' values in this sweep: the network applies the
/// optimizer's update there, while the gradient is still in cache (or holds it
/// back to the end of the sweep; see Network::train_step).
template <typename T>
struct BackwardContext {
  bool accumulate = false;  // add to the stored gradients
  T sgd_lr = T(-1);         // >= 0: plain SGD fused into the sweep (no gradient stored)
  T l2 = T(0);              // added as l2 * value to the gradient of parameters that decay
  bool lazy = false;        // the update is lazy: a row-sparse gradient is needed in its rows only
  void (*on_ready)(void* network, Layer<T>& layer) = nullptr;
  void* network = nullptr;
  void (*poll)(void* network) = nullptr;  // between products; may throw

  void gradients_ready(Layer<T>& layer) const {
    if (on_ready != nullptr) on_ready(network, layer);
  }
  void check_poll() const {
    if (poll != nullptr) poll(network);
  }
};

/// The description a layer is built from (a tree: Residual holds its layers).
struct LayerSpec {
  enum class Kind { dense, activation, dropout, batch_norm, layer_norm, residual };
  Kind kind = Kind::dense;
  Index in_features = 0;   // dense; features of batch_norm and layer_norm
  Index out_features = 0;  // dense
  Activation activation = Activation::identity;  // dense, activation
  double negative_slope = 0.01;                  // leaky_relu
  bool bias = true;                              // dense
  double p = 0.5;                                // dropout
  double momentum = 0.1;                         // batch_norm
  double eps = 1e-5;                             // batch_norm, layer_norm
  bool affine = true;                            // batch_norm, layer_norm
  std::vector<LayerSpec> layers;                 // residual

  /// A Dense layer's spec (the form of the core before the layer protocol).
  static LayerSpec dense_layer(Index in, Index out, Activation act = Activation::identity,
                               double negative_slope = 0.01, bool bias = true);
};

/// The name of a kind: "Dense", "Activation", "Dropout", "BatchNorm", "LayerNorm",
/// "Residual" (the Python class names).
const char* kind_name(LayerSpec::Kind kind);

/// A layer of the network. Its widths are fixed when the network is built.
template <typename T>
class Layer {
 public:
  explicit Layer(const LayerSpec& spec) : spec_(spec) {}
  virtual ~Layer() = default;
  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;

  const LayerSpec& spec() const { return spec_; }
  LayerSpec::Kind kind() const { return spec_.kind; }
  Index in_features() const { return in_; }
  Index out_features() const { return out_; }

  /// Parameters and buffers in PyTorch's order (weight, then bias); a Residual's
  /// are its layers' (see children()), not its own.
  virtual std::vector<Parameter<T>*> parameters() { return {}; }
  virtual std::vector<Buffer<T>*> buffers() { return {}; }
  /// The layers a Residual holds, in order; empty for the others.
  virtual std::vector<Layer<T>*> children() { return {}; }

  /// Caches for batches of up to `batch` rows, in two phases so that a failed
  /// allocation changes nothing: allocate() appends every new storage to `fresh`
  /// (and may throw), adopt() takes them in the same order (and does not throw).
  virtual void allocate(Index batch, std::vector<StoragePtr<T>>& fresh) const = 0;
  virtual void adopt(typename std::vector<StoragePtr<T>>::iterator& next) = 0;

  /// Forward over `in` (batch, in_features), which the layer may cache by
  /// reference until the next forward. Returns its output (batch, out_features),
  /// in its own storage, valid until the next forward. Throws std::invalid_argument
  /// for a batch the layer cannot take (BatchNorm training on one row) before it
  /// changes anything.
  virtual const T* forward(const T* in, Index batch, const ForwardContext& ctx) = 0;

  /// The last forward's output (batch, out_features): the storage forward returned.
  virtual const StoragePtr<T>& output() const = 0;

  /// Where the layer above (or the loss) writes dL/d(output), (batch, out_features).
  virtual T* grad_output() = 0;

  /// Backward from grad_output() (which it may overwrite) for the batch of the last
  /// forward: writes dL/d(input) to `grad_input` (batch, in_features) unless it is
  /// null, forms its parameters' gradients (unless ctx fuses SGD), and calls
  /// ctx.gradients_ready(*this) if it has parameters.
  virtual void backward(T* grad_input, Index batch, const BackwardContext<T>& ctx) = 0;

  /// Plain SGD fused into the sweep, made by the network inside (or, held back,
  /// at the end of) the sweep: Dense makes W -= lr (a^T delta + l2 W) one product
  /// into W from its caches, its gradient never stored, and returns true. The
  /// default returns false: the layer formed its gradients, and the network
  /// applies p -= lr dL/dp.
  virtual bool apply_fused_sgd(T lr, T l2, Index batch) {
    (void)lr;
    (void)l2;
    (void)batch;
    return false;
  }

  /// Makes the last forward's effect on the buffers permanent (BatchNorm's running
  /// statistics): the network calls it once the forward pass, or the training
  /// step it belongs to, has succeeded, so that an abandoned call changes no buffer.
  virtual void commit() {}

  /// Eval-mode forward that touches no cache: `in` (batch, in_features) to `out`
  /// (batch, out_features), which does not overlap `in`, with `workspace` of
  /// predict_workspace(batch) elements. Safe from several threads at once.
  virtual void predict(const T* in, T* out, Index batch, T* workspace) const = 0;
  virtual Index predict_workspace(Index batch) const {
    (void)batch;
    return 0;
  }

  /// Where its parameters sit among the network's (set by Network).
  Index first_parameter = 0;
  Index parameter_count = 0;

 protected:
  LayerSpec spec_;
  Index in_ = 0, out_ = 0;
};

/// Builds the layer a spec describes, given the width of its input (the spec's own
/// for Dense, BatchNorm and LayerNorm, which must agree). Throws
/// std::invalid_argument, naming `where`, for a spec that cannot be built.
template <typename T>
std::unique_ptr<Layer<T>> make_layer(const LayerSpec& spec, Index in_features,
                                     const std::string& where);

}  // namespace bprop
