#include "bprop/activation.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace bprop {

namespace {

template <typename T>
using ArrayMap = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
template <typename T>
using ConstArrayMap = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
// SELU's constants (Klambauer et al. 2017), as torch.nn.SELU
constexpr double kSeluAlpha = 1.6732632423543772848170429916717;
constexpr double kSeluScale = 1.0507009873554804934193349852946;
// torch.nn.Softplus's default: softplus(z) = z above it (log1p(exp(z)) - z < 2.1e-9)
constexpr double kSoftplusThreshold = 20.0;

// sigma(z) = 1 / (1 + exp(-z)) and 1 - sigma(z), both from exp(-|z|) <= 1, so that
// neither overflows nor loses its relative accuracy to a cancellation.
template <typename T>
inline void sigmoid_pair(T x, T& s, T& one_minus_s) {
  const T e = std::exp(-std::abs(x));
  const T inv = T(1) / (T(1) + e);
  if (x >= T(0)) {
    s = inv;
    one_minus_s = e * inv;
  } else {
    s = e * inv;
    one_minus_s = inv;
  }
}

// Applies a packet function to n values, every value through the packet path
// (the tail in a zero-padded packet). Eigen's own array assignment would send
// the unaligned head and the tail through the scalar function instead, whose
// last bit can differ from the packet one: results would then depend on where
// an array happens to start in memory (predict's output, a row's offset).
template <typename T, typename PacketOp, typename ScalarOp>
void map_values(const T* in, T* out, Index n, PacketOp packet_op, ScalarOp scalar_op,
                bool vectorized) {
  namespace ei = Eigen::internal;
  using Packet = typename ei::packet_traits<T>::type;
  constexpr Index W = ei::unpacket_traits<Packet>::size;
  if (!vectorized || W == 1) {
    for (Index i = 0; i < n; ++i) out[i] = scalar_op(in[i]);
    return;
  }
  Index i = 0;
  for (; i + W <= n; i += W) ei::pstoreu(out + i, packet_op(ei::ploadu<Packet>(in + i)));
  if (i < n) {
    alignas(64) T buf[W] = {};
    for (Index j = i; j < n; ++j) buf[j - i] = in[j];
    ei::pstore(buf, packet_op(ei::pload<Packet>(buf)));
    for (Index j = i; j < n; ++j) out[j] = buf[j - i];
  }
}

template <typename T>
void sigmoid(const T* z, T* a, Index n) {
  namespace ei = Eigen::internal;
  using Packet = typename ei::packet_traits<T>::type;
  const Packet one = ei::pset1<Packet>(T(1));
  // exp(-z) overflows to inf for z << 0, giving exactly 0 without a trap.
  map_values<T>(
      z, a, n, [&](const Packet& p) { return ei::pdiv(one, ei::padd(one, ei::pexp(ei::pnegate(p)))); },
      [](T x) { return T(1) / (T(1) + std::exp(-x)); }, ei::packet_traits<T>::HasExp);
}

template <typename T>
void tanh_values(const T* z, T* a, Index n) {
  namespace ei = Eigen::internal;
  using Packet = typename ei::packet_traits<T>::type;
  if constexpr (ei::packet_traits<T>::HasTanh) {
    map_values<T>(z, a, n, [](const Packet& p) { return ei::ptanh(p); },
                  [](T x) { return std::tanh(x); }, true);
  } else {
    for (Index i = 0; i < n; ++i) a[i] = std::tanh(z[i]);
  }
}

// a = exp(z - shift)
template <typename T>
void exp_shifted(const T* z, T shift, T* a, Index n) {
  namespace ei = Eigen::internal;
  using Packet = typename ei::packet_traits<T>::type;
  const Packet s = ei::pset1<Packet>(shift);
  map_values<T>(
      z, a, n, [&](const Packet& p) { return ei::pexp(ei::psub(p, s)); },
      [shift](T x) { return std::exp(x - shift); }, ei::packet_traits<T>::HasExp);
}

}  // namespace

Activation parse_activation(const std::string& name, const char* where) {
  std::string names;
  for (const ActivationEntry& entry : kActivations) {
    if (name == entry.name) return entry.activation;
    names += std::string(names.empty() ? "" : ", ") + "'" + entry.name + "'";
  }
  throw std::invalid_argument(std::string("[") + where + "] activation must be one of " +
                              names + ", but got '" + name + "'");
}

const char* activation_name(Activation act) {
  for (const ActivationEntry& entry : kActivations) {
    if (entry.activation == act) return entry.name;
  }
  return "unknown";
}

template <typename T>
void activation_forward(Activation act, T negative_slope, const T* z_ptr, T* a_ptr,
                        Index rows, Index cols) {
  const Index n = rows * cols;
  ConstArrayMap<T> z(z_ptr, n);
  ArrayMap<T> a(a_ptr, n);
  switch (act) {
    case Activation::identity:
      if (a_ptr != z_ptr) a = z;
      return;
    case Activation::sigmoid:
      sigmoid<T>(z_ptr, a_ptr, n);
      return;
    case Activation::tanh:
      tanh_values<T>(z_ptr, a_ptr, n);
      return;
    case Activation::relu:
      a = z.max(T(0));
      return;
    case Activation::leaky_relu:
      a = (z > T(0)).select(z, negative_slope * z);
      return;
    case Activation::gelu:
      // exact GELU, z * Phi(z), as torch.nn.GELU() by default
      for (Index i = 0; i < n; ++i) {
        a_ptr[i] = T(0.5) * z_ptr[i] * (T(1) + std::erf(z_ptr[i] * T(kInvSqrt2)));
      }
      return;
    case Activation::softmax: {
      // Row sums run in index order so that a row's result does not depend on
      // its offset in memory.
      for (Index r = 0; r < rows; ++r) {
        const T* zr = z_ptr + r * cols;
        T* ar = a_ptr + r * cols;
        const T m = *std::max_element(zr, zr + cols);
        exp_shifted<T>(zr, m, ar, cols);
        T sum = 0;
        for (Index j = 0; j < cols; ++j) sum += ar[j];
        const T inv = T(1) / sum;
        for (Index j = 0; j < cols; ++j) ar[j] *= inv;
      }
      return;
    }
    case Activation::elu:
      // z for z > 0, exp(z) - 1 otherwise (alpha = 1); expm1 keeps small |z| exact
      // and saturates at -1 without an overflow.
      for (Index i = 0; i < n; ++i) {
        const T x = z_ptr[i];
        a_ptr[i] = x > T(0) ? x : std::expm1(x);
      }
      return;
    case Activation::selu: {
      // scale * (z for z > 0, alpha (exp(z) - 1) otherwise)
      const T scale = T(kSeluScale), scale_alpha = T(kSeluScale * kSeluAlpha);
      for (Index i = 0; i < n; ++i) {
        const T x = z_ptr[i];
        a_ptr[i] = x > T(0) ? scale * x : scale_alpha * std::expm1(x);
      }
      return;
    }
    case Activation::silu:
      // z sigma(z)
      for (Index i = 0; i < n; ++i) {
        T s, one_minus_s;
        sigmoid_pair<T>(z_ptr[i], s, one_minus_s);
        a_ptr[i] = z_ptr[i] * s;
      }
      return;
    case Activation::softplus:
      // log(1 + exp(z)), and z above the threshold as torch.nn.Softplus; exp(z)
      // is at most exp(20) where it is formed, and underflows to 0 harmlessly.
      for (Index i = 0; i < n; ++i) {
        const T x = z_ptr[i];
        a_ptr[i] = x > T(kSoftplusThreshold) ? x : std::log1p(std::exp(x));
      }
      return;
  }
}

template <typename T>
void activation_backward(Activation act, T negative_slope, const T* z_ptr, const T* a_ptr,
                         const T* g_ptr, T* d_ptr, Index rows, Index cols) {
  const Index n = rows * cols;
  ConstArrayMap<T> z(z_ptr, n);
  ConstArrayMap<T> a(a_ptr, n);
  ConstArrayMap<T> g(g_ptr, n);
  ArrayMap<T> d(d_ptr, n);
  switch (act) {
    case Activation::identity:
      if (d_ptr != g_ptr) d = g;
      return;
    case Activation::sigmoid:
      d = g * a * (T(1) - a);
      return;
    case Activation::tanh:
      d = g * (T(1) - a.square());
      return;
    case Activation::relu:
      d = (z > T(0)).select(g, T(0));
      return;
    case Activation::leaky_relu:
      d = (z > T(0)).select(g, negative_slope * g);
      return;
    case Activation::gelu:
      // d/dz [z Phi(z)] = Phi(z) + z phi(z)
      for (Index i = 0; i < n; ++i) {
        const T x = z_ptr[i];
        const T cdf = T(0.5) * (T(1) + std::erf(x * T(kInvSqrt2)));
        const T pdf = T(kInvSqrt2Pi) * std::exp(T(-0.5) * x * x);
        d_ptr[i] = g_ptr[i] * (cdf + x * pdf);
      }
      return;
    case Activation::softmax: {
      // Jacobian-vector product: delta = a * (g - <g, a>) row by row
      for (Index r = 0; r < rows; ++r) {
        const T* ar = a_ptr + r * cols;
        const T* gr = g_ptr + r * cols;
        T* dr = d_ptr + r * cols;
        T dot = 0;
        for (Index j = 0; j < cols; ++j) dot += gr[j] * ar[j];
        for (Index j = 0; j < cols; ++j) dr[j] = ar[j] * (gr[j] - dot);
      }
      return;
    }
    case Activation::elu:
      // elu'(z) = 1 for z > 0, exp(z) otherwise: from z rather than a + 1, which
      // rounds to 0 long before exp(z) does
      for (Index i = 0; i < n; ++i) {
        const T x = z_ptr[i];
        d_ptr[i] = x > T(0) ? g_ptr[i] : g_ptr[i] * std::exp(x);
      }
      return;
    case Activation::selu: {
      const T scale = T(kSeluScale), scale_alpha = T(kSeluScale * kSeluAlpha);
      for (Index i = 0; i < n; ++i) {
        const T x = z_ptr[i];
        d_ptr[i] = x > T(0) ? scale * g_ptr[i] : scale_alpha * std::exp(x) * g_ptr[i];
      }
      return;
    }
    case Activation::silu:
      // d/dz [z sigma(z)] = sigma(z) (1 + z (1 - sigma(z))), with 1 - sigma(z)
      // formed directly (not by subtraction) so that it is exact for large z
      for (Index i = 0; i < n; ++i) {
        const T x = z_ptr[i];
        T s, one_minus_s;
        sigmoid_pair<T>(x, s, one_minus_s);
        d_ptr[i] = g_ptr[i] * (s * (T(1) + x * one_minus_s));
      }
      return;
    case Activation::softplus:
      // softplus'(z) = sigma(z) = exp(z) / (1 + exp(z)) below the threshold, 1 above
      // it (the derivative of the linear branch, as torch)
      for (Index i = 0; i < n; ++i) {
        const T x = z_ptr[i];
        if (x > T(kSoftplusThreshold)) {
          d_ptr[i] = g_ptr[i];
        } else {
          const T e = std::exp(x);
          d_ptr[i] = g_ptr[i] * (e / (e + T(1)));
        }
      }
      return;
  }
}

template <typename T>
void bias_activation_forward(Activation act, T negative_slope, const T* bias, T* z, T* a,
                             Index rows, Index cols) {
  Eigen::Map<const RowVector<T>> b(bias, cols);
  for (Index r = 0; r < rows; ++r) {
    Eigen::Map<RowVector<T>>(z + r * cols, cols) += b;
    activation_forward<T>(act, negative_slope, z + r * cols, a + r * cols, 1, cols);
  }
}

template void bias_activation_forward<float>(Activation, float, const float*, float*, float*,
                                             Index, Index);
template void bias_activation_forward<double>(Activation, double, const double*, double*,
                                              double*, Index, Index);
template void activation_forward<float>(Activation, float, const float*, float*, Index, Index);
template void activation_forward<double>(Activation, double, const double*, double*, Index,
                                         Index);
template void activation_backward<float>(Activation, float, const float*, const float*,
                                         const float*, float*, Index, Index);
template void activation_backward<double>(Activation, double, const double*, const double*,
                                          const double*, double*, Index, Index);

}  // namespace bprop
