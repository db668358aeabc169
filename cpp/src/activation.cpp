#include "bprop/activation.hpp"

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

}  // namespace

Activation parse_activation(const std::string& name, const char* where) {
  if (name == "identity" || name == "linear") return Activation::identity;
  if (name == "sigmoid" || name == "logistic") return Activation::sigmoid;
  if (name == "tanh") return Activation::tanh;
  if (name == "relu") return Activation::relu;
  if (name == "leaky_relu") return Activation::leaky_relu;
  if (name == "gelu") return Activation::gelu;
  if (name == "softmax") return Activation::softmax;
  throw std::invalid_argument(std::string("[") + where + "] activation must be one of "
                              "'identity', 'sigmoid', 'tanh', 'relu', 'leaky_relu', "
                              "'gelu', 'softmax', but got '" + name + "'");
}

const char* activation_name(Activation act) {
  switch (act) {
    case Activation::identity: return "identity";
    case Activation::sigmoid: return "sigmoid";
    case Activation::tanh: return "tanh";
    case Activation::relu: return "relu";
    case Activation::leaky_relu: return "leaky_relu";
    case Activation::gelu: return "gelu";
    case Activation::softmax: return "softmax";
  }
  return "unknown";
}

bool is_relu_family(Activation act) {
  return act == Activation::relu || act == Activation::leaky_relu || act == Activation::gelu;
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
      // exp(-z) overflows to inf for z << 0, giving exactly 0 without a trap.
      a = T(1) / (T(1) + (-z).exp());
      return;
    case Activation::tanh:
      a = z.tanh();
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
      Eigen::Map<const RowMatrix<T>> Z(z_ptr, rows, cols);
      Eigen::Map<RowMatrix<T>> A(a_ptr, rows, cols);
      for (Index r = 0; r < rows; ++r) {
        const T m = Z.row(r).maxCoeff();
        A.row(r) = (Z.row(r).array() - m).exp().matrix();
        A.row(r) /= A.row(r).sum();
      }
      return;
    }
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
      Eigen::Map<const RowMatrix<T>> A(a_ptr, rows, cols);
      Eigen::Map<const RowMatrix<T>> G(g_ptr, rows, cols);
      Eigen::Map<RowMatrix<T>> D(d_ptr, rows, cols);
      for (Index r = 0; r < rows; ++r) {
        const T dot = G.row(r).dot(A.row(r));
        D.row(r) = (A.row(r).array() * (G.row(r).array() - dot)).matrix();
      }
      return;
    }
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
