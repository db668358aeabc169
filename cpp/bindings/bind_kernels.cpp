// Losses and optimizer updates. The Python layer (bprop.losses, bprop.optim)
// validates and converts user input; these bindings still check every array so
// that a wrong call is an exception, never a crash.
#include <cmath>
#include <cstdint>
#include <string>

#include "bprop/kernels.hpp"
#include "common.hpp"

namespace bprop::python {

namespace {

bool is_float64(py::handle a) {
  return py::isinstance<py::array>(a) &&
         py::reinterpret_borrow<py::array>(a).dtype().equal(py::dtype::of<double>());
}

template <typename T>
void require_same_size(const py::array& a, const py::array& b, const char* where,
                       const char* name_a, const char* name_b) {
  if (a.size() != b.size()) {
    throw py::value_error(std::string("[") + where + "] " + name_b + " has shape " + shape_of(b) +
                          ", but " + name_a + " has shape " + shape_of(a));
  }
}

template <typename T>
const T* optional_weights(py::handle w, Index batch, const char* where) {
  if (w.is_none()) return nullptr;
  auto arr = strict_array<T>(w, where, "sample_weight", 1);
  if (arr.shape(0) != batch) {
    throw py::value_error(std::string("[") + where + "] sample_weight has " +
                          std::to_string(arr.shape(0)) + " entries, but the batch has " +
                          std::to_string(batch));
  }
  return arr.data();
}

template <typename T>
py::tuple softmax_ce(py::handle logits_obj, py::handle target_obj, py::handle w) {
  const char* where = "softmax_cross_entropy";
  auto z = strict_array<T>(logits_obj, where, "logits", 2);
  const Index B = z.shape(0), C = z.shape(1);
  const T* sw = optional_weights<T>(w, B, where);
  py::array_t<T> grad({B, C});
  double loss = 0;
  auto target = py::reinterpret_borrow<py::array>(target_obj);
  if (py::isinstance<py::array>(target_obj) && target.ndim() == 1) {
    auto labels = strict_array<std::int64_t>(target_obj, where, "target labels", 1);
    if (labels.shape(0) != B) {
      throw py::value_error(std::string("[") + where + "] target has " +
                            std::to_string(labels.shape(0)) + " labels, but logits has " +
                            std::to_string(B) + " rows");
    }
    py::gil_scoped_release nogil;
    loss = softmax_cross_entropy<T>(z.data(), B, C, labels.data(), nullptr, sw,
                                    grad.mutable_data());
  } else {
    auto y = strict_array<T>(target_obj, where, "target", 2);
    require_same_size<T>(z, y, where, "logits", "target");
    py::gil_scoped_release nogil;
    loss = softmax_cross_entropy<T>(z.data(), B, C, nullptr, y.data(), sw, grad.mutable_data());
  }
  return py::make_tuple(loss, grad);
}

template <typename T, typename Kernel>
py::tuple elementwise_loss(py::handle out_obj, py::handle target_obj, py::handle w,
                           const char* where, const char* out_name, Kernel kernel) {
  auto o = strict_array<T>(out_obj, where, out_name, 2);
  auto y = strict_array<T>(target_obj, where, "target", 2);
  require_same_size<T>(o, y, where, out_name, "target");
  const Index B = o.shape(0), K = o.shape(1);
  const T* sw = optional_weights<T>(w, B, where);
  py::array_t<T> grad({B, K});
  double loss = 0;
  {
    py::gil_scoped_release nogil;
    loss = kernel(o.data(), y.data(), B, K, sw, grad.mutable_data());
  }
  return py::make_tuple(loss, grad);
}

/// param, grad and each state array: same dtype, same size, contiguous; param
/// and state writeable.
template <typename T>
py::array_t<T> param_array(py::handle obj, const char* where, const char* name,
                           py::ssize_t size) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string("[") + where + "] " + name + " must be a numpy.ndarray");
  }
  auto a = py::reinterpret_borrow<py::array>(obj);
  auto arr = strict_array<T>(obj, where, name, static_cast<int>(a.ndim()));
  if (size >= 0 && arr.size() != size) {
    throw py::value_error(std::string("[") + where + "] " + name + " has " +
                          std::to_string(arr.size()) + " elements, expected " +
                          std::to_string(size));
  }
  return arr;
}

}  // namespace

void bind_kernels(py::module_& m) {
  m.def(
      "softmax_cross_entropy",
      [](py::handle z, py::handle y, py::handle w) {
        return is_float64(z) ? softmax_ce<double>(z, y, w) : softmax_ce<float>(z, y, w);
      },
      py::arg("logits"), py::arg("target"), py::arg("sample_weight") = py::none());
  m.def(
      "binary_cross_entropy_with_logits",
      [](py::handle z, py::handle y, py::handle w) {
        const char* where = "binary_cross_entropy_with_logits";
        return is_float64(z) ? elementwise_loss<double>(z, y, w, where, "logits",
                                                        binary_cross_entropy_with_logits<double>)
                             : elementwise_loss<float>(z, y, w, where, "logits",
                                                       binary_cross_entropy_with_logits<float>);
      },
      py::arg("logits"), py::arg("target"), py::arg("sample_weight") = py::none());
  m.def(
      "mean_squared_error",
      [](py::handle o, py::handle y, py::handle w) {
        const char* where = "mean_squared_error";
        return is_float64(o)
                   ? elementwise_loss<double>(o, y, w, where, "output", mean_squared_error<double>)
                   : elementwise_loss<float>(o, y, w, where, "output", mean_squared_error<float>);
      },
      py::arg("output"), py::arg("target"), py::arg("sample_weight") = py::none());
  m.def(
      "huber",
      [](py::handle o, py::handle y, py::handle w, double delta) {
        const char* where = "huber";
        if (!(delta > 0) || !std::isfinite(delta)) {
          throw py::value_error("[huber] delta must be a finite number > 0, but got " +
                                std::to_string(delta));
        }
        if (is_float64(o)) {
          return elementwise_loss<double>(
              o, y, w, where, "output",
              [delta](const double* a, const double* b, Index B, Index K, const double* sw,
                      double* g) { return huber<double>(a, b, B, K, sw, g, delta); });
        }
        const float d = static_cast<float>(delta);
        return elementwise_loss<float>(
            o, y, w, where, "output",
            [d](const float* a, const float* b, Index B, Index K, const float* sw, float* g) {
              return huber<float>(a, b, B, K, sw, g, d);
            });
      },
      py::arg("output"), py::arg("target"), py::arg("sample_weight") = py::none(),
      py::arg("delta") = 1.0);
  m.def(
      "mean_absolute_error",
      [](py::handle o, py::handle y, py::handle w) {
        const char* where = "mean_absolute_error";
        return is_float64(o) ? elementwise_loss<double>(o, y, w, where, "output",
                                                        mean_absolute_error<double>)
                             : elementwise_loss<float>(o, y, w, where, "output",
                                                       mean_absolute_error<float>);
      },
      py::arg("output"), py::arg("target"), py::arg("sample_weight") = py::none());
  m.def(
      "poisson_nll",
      [](py::handle o, py::handle y, py::handle w) {
        const char* where = "poisson_nll";
        return is_float64(o)
                   ? elementwise_loss<double>(o, y, w, where, "output", poisson_nll<double>)
                   : elementwise_loss<float>(o, y, w, where, "output", poisson_nll<float>);
      },
      py::arg("output"), py::arg("target"), py::arg("sample_weight") = py::none());
  m.def(
      "loss_names",
      [] {
        py::list names;
        for (const LossEntry& entry : kLosses) names.append(entry.name);
        return names;
      },
      "The losses the core's train_step fuses (its half of the registry, kernels.hpp).");
  m.def(
      "all_finite",
      [](py::handle a) {
        if (is_float64(a)) {
          auto arr = param_array<double>(a, "all_finite", "a", -1);
          return all_finite<double>(arr.data(), arr.size());
        }
        auto arr = param_array<float>(a, "all_finite", "a", -1);
        return all_finite<float>(arr.data(), arr.size());
      },
      py::arg("a"));
}

}  // namespace bprop::python
