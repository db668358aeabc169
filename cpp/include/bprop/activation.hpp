// Activation functions sigma(z) and the backward rule delta = sigma'(z) * dL/da.
#pragma once

#include <string>

#include "bprop/types.hpp"

namespace bprop {

enum class Activation {
  identity,
  sigmoid,
  tanh,
  relu,
  leaky_relu,
  gelu,
  softmax,
  elu,
  selu,
  silu,
  softplus,
};

/// The registry's C++ half: each activation's name, as Python knows it. The rest of
/// its row (initialisation gain, the NumPy oracle, ONNX and PyTorch mappings) is in
/// python/bprop/activations.py, whose names a test checks against this table.
struct ActivationEntry {
  Activation activation;
  const char* name;
};
inline constexpr ActivationEntry kActivations[] = {
    {Activation::identity, "identity"}, {Activation::sigmoid, "sigmoid"},
    {Activation::tanh, "tanh"},         {Activation::relu, "relu"},
    {Activation::leaky_relu, "leaky_relu"}, {Activation::gelu, "gelu"},
    {Activation::softmax, "softmax"},   {Activation::elu, "elu"},
    {Activation::selu, "selu"},         {Activation::silu, "silu"},
    {Activation::softplus, "softplus"},
};

/// The activation of a name in kActivations; throws std::invalid_argument naming
/// `where` and the accepted names otherwise.
Activation parse_activation(const std::string& name, const char* where);

/// The name of an activation in kActivations.
const char* activation_name(Activation act);

/// a = sigma(z), row-wise for softmax. z and a are (batch, features); a may be z.
template <typename T>
void activation_forward(Activation act, T negative_slope, const T* z, T* a, Index rows,
                        Index cols);

/// z += b row by row, then a = sigma(z), in one pass over the rows so that each
/// row is still in cache when the activation reads it. a may be z.
template <typename T>
void bias_activation_forward(Activation act, T negative_slope, const T* bias, T* z, T* a,
                             Index rows, Index cols);

/// delta = dL/dz from dL/da, given the cached z and a = sigma(z):
/// elementwise delta = sigma'(z) * dL/da; softmax uses its Jacobian-vector product
/// delta = a * (dL/da - rowsum(dL/da * a)). delta may alias grad_a.
template <typename T>
void activation_backward(Activation act, T negative_slope, const T* z, const T* a,
                         const T* grad_a, T* delta, Index rows, Index cols);

}  // namespace bprop
