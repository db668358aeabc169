// Network<float> and Network<double> as bprop._core.Network32 / Network64.
#include <cstring>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <tuple>
#include <vector>

#include "bprop/kernels.hpp"
#include "bprop/network.hpp"
#include "common.hpp"

namespace bprop::python {

namespace {

using LayerTuple = std::tuple<Index, Index, std::string, double>;

/// The core network plus what the binding must own: a reference to the array
/// that layer 0's cache points into, and the lock that serializes calls.
template <typename T>
struct PyNetwork {
  explicit PyNetwork(const std::vector<LayerSpec>& specs) : net(specs) {}

  Network<T> net;
  py::object input;         // keeps layer 0's cached input alive
  std::shared_mutex mutex;  // predict() shares it; every other call holds it alone
};

/// An optimizer's hyperparameters and state arrays, prepared once (when the
/// optimizer binds or its hyperparameters change) so that a training step passes
/// one object. Holds references to the state arrays.
template <typename T>
struct UpdatePlan {
  Update<T> update;
  std::vector<Index> sizes;  // elements per parameter, checked against the network
  std::vector<py::object> keep;
};

template <typename T>
T* optional_state(py::handle obj, Index size, const char* name) {
  if (obj.is_none()) return nullptr;
  auto a = strict_array<T>(obj, "UpdatePlan", name,
                           static_cast<int>(py::reinterpret_borrow<py::array>(obj).ndim()));
  require_writeable(a, "UpdatePlan", name);
  if (a.size() != size) {
    throw py::value_error(std::string("[UpdatePlan] ") + name + " has " +
                          std::to_string(a.size()) + " elements, expected " +
                          std::to_string(size));
  }
  return a.mutable_data();
}

template <typename T>
void bind_update_plan(py::module_& m, const char* name) {
  using Plan = UpdatePlan<T>;
  py::class_<Plan>(m, name, py::module_local())
      .def(py::init([](const std::string& rule, py::dict h, const std::vector<Index>& sizes,
                       const std::vector<py::tuple>& states) {
             auto plan = std::make_unique<Plan>();
             UpdateSpec& s = plan->update.spec;
             if (rule == "sgd") {
               s.rule = UpdateRule::sgd;
             } else if (rule == "adam") {
               s.rule = UpdateRule::adam;
             } else if (rule == "rmsprop") {
               s.rule = UpdateRule::rmsprop;
             } else {
               throw py::value_error("[UpdatePlan] rule must be 'sgd', 'adam' or 'rmsprop', "
                                     "but got '" + rule + "'");
             }
             auto get = [&](const char* key, double fallback) {
               return h.contains(key) ? h[key].cast<double>() : fallback;
             };
             auto flag = [&](const char* key) {
               return h.contains(key) ? h[key].cast<bool>() : false;
             };
             s.lr = get("lr", 0);
             s.weight_decay = get("weight_decay", 0);
             s.momentum = get("momentum", 0);
             s.dampening = get("dampening", 0);
             s.nesterov = flag("nesterov");
             s.beta1 = get("beta1", 0.9);
             s.beta2 = get("beta2", 0.999);
             s.eps = get("eps", 1e-8);
             s.decoupled = flag("decoupled");
             s.alpha = get("alpha", 0.99);
             s.centered = flag("centered");
             if (states.size() != sizes.size()) {
               throw py::value_error("[UpdatePlan] states and sizes differ in length");
             }
             for (std::size_t i = 0; i < states.size(); ++i) {
               const py::tuple& st = states[i];
               if (st.size() != 3) throw py::value_error("[UpdatePlan] each state is (a, b, c)");
               UpdateState<T> u;
               u.a = optional_state<T>(st[0], sizes[i], "state a");
               u.b = optional_state<T>(st[1], sizes[i], "state b");
               u.c = optional_state<T>(st[2], sizes[i], "state c");
               const bool needs_a = s.rule != UpdateRule::sgd || s.momentum != 0;
               const bool needs_b = s.rule == UpdateRule::adam ||
                                    (s.rule == UpdateRule::rmsprop && s.centered);
               const bool needs_c = s.rule == UpdateRule::rmsprop && s.momentum > 0;
               if ((needs_a && !u.a) || (needs_b && !u.b) || (needs_c && !u.c)) {
                 throw py::value_error("[UpdatePlan] a state array this rule needs is missing");
               }
               plan->update.states.push_back(u);
               for (int k = 0; k < 3; ++k) plan->keep.push_back(st[k]);
             }
             plan->sizes = sizes;
             return plan;
           }),
           py::arg("rule"), py::arg("hyperparameters"), py::arg("sizes"), py::arg("states"));
}

std::vector<LayerSpec> to_specs(const std::vector<LayerTuple>& layers) {
  std::vector<LayerSpec> specs;
  specs.reserve(layers.size());
  for (const auto& [in, out, activation, slope] : layers) {
    specs.push_back({in, out, parse_activation(activation, "Dense"), slope});
  }
  return specs;
}

template <typename T>
const Dense<T>& layer_at(const PyNetwork<T>& self, Index i) {
  if (i < 0 || i >= self.net.num_layers()) {
    throw py::index_error("layer index " + std::to_string(i) + " out of range for a network of " +
                          std::to_string(self.net.num_layers()) + " layers");
  }
  return self.net.layer(i);
}

/// The update of an UpdatePlan, after checking that it was built for this
/// network's parameter sizes; sets its step number t.
template <typename T>
Update<T>& checked_plan(PyNetwork<T>& s, py::handle plan_obj, std::int64_t t,
                        const char* where) {
  if (!py::isinstance<UpdatePlan<T>>(plan_obj)) {
    throw py::type_error(std::string("[") + where + "] the optimizer's plan is for another "
                         "dtype than this " + dtype_name<T>() + " network");
  }
  auto& plan = plan_obj.cast<UpdatePlan<T>&>();
  std::size_t i = 0;
  bool match = true;
  for (Index l = 0; l < s.net.num_layers() && match; ++l) {
    const Dense<T>& L = s.net.layer(l);
    for (Index n : {L.in() * L.out(), L.out()}) {
      match = match && i < plan.sizes.size() && plan.sizes[i] == n;
      ++i;
    }
  }
  if (!match || i != plan.sizes.size()) {
    throw py::value_error(std::string("[") + where + "] the optimizer was built for a "
                          "different network");
  }
  if (t < 1) throw py::value_error(std::string("[") + where + "] the step number must be >= 1");
  plan.update.t = t;
  return plan.update;
}

template <typename T>
void bind_network_type(py::module_& m, const char* name) {
  using Self = PyNetwork<T>;
  // module_local: a portable install holds two builds of this module (baseline and
  // AVX-512); their types must not collide in pybind11's registry if both load.
  py::class_<Self>(m, name, py::module_local())
      .def(py::init([](const std::vector<LayerTuple>& layers) {
             return std::make_unique<Self>(to_specs(layers));
           }),
           py::arg("layers"),
           "layers: list of (in_features, out_features, activation, negative_slope)")
      .def_property_readonly("num_layers", [](const Self& s) { return s.net.num_layers(); })
      .def_property_readonly("num_parameters",
                             [](const Self& s) { return s.net.num_parameters(); })
      .def_property_readonly("in_features", [](const Self& s) { return s.net.in_features(); })
      .def_property_readonly("out_features", [](const Self& s) { return s.net.out_features(); })
      .def_property_readonly("has_forward", [](const Self& s) { return s.net.has_forward(); })
      .def_property_readonly("has_backward", [](const Self& s) { return s.net.has_backward(); })
      .def_property_readonly("batch", [](const Self& s) { return s.net.batch(); })
      .def("layer_spec",
           [](const Self& s, Index i) {
             const LayerSpec& spec = layer_at(s, i).spec;
             return LayerTuple{spec.in_features, spec.out_features,
                               activation_name(spec.activation), spec.negative_slope};
           })
      .def(
          "forward",
          [](Self& s, py::handle X_obj) {
            auto X = strict_array<T>(X_obj, "Network.forward", "X", 2);
            const Index rows = X.shape(0), cols = X.shape(1);
            py::array_t<T> out({static_cast<py::ssize_t>(rows),
                                static_cast<py::ssize_t>(s.net.out_features())});
            {
              py::gil_scoped_release nogil;
              std::unique_lock lock(s.mutex);
              auto result = s.net.forward(ConstMatrixMap<T>(X.data(), rows, cols));
              std::memcpy(out.mutable_data(), result.data(),
                          sizeof(T) * static_cast<std::size_t>(result.size()));
              py::gil_scoped_acquire gil;  // lock order: mutex, then GIL
              s.input = X;
            }
            return out;
          },
          py::arg("X"), "Forward pass; caches a, z per layer. Returns (batch, out_features).")
      .def(
          "backward",
          [](Self& s, py::handle G_obj, bool accumulate, bool input_grad) -> py::object {
            auto G = strict_array<T>(G_obj, "Network.backward", "grad_output", 2);
            const Index rows = G.shape(0), cols = G.shape(1);
            py::array_t<T> dX;
            if (input_grad) {
              dX = py::array_t<T>({static_cast<py::ssize_t>(std::max<Index>(rows, 0)),
                                   static_cast<py::ssize_t>(s.net.in_features())});
            }
            {
              py::gil_scoped_release nogil;
              std::unique_lock lock(s.mutex);
              ConstMatrixMap<T> Gm(G.data(), rows, cols);
              if (input_grad) {
                MatrixMap<T> dXm(dX.mutable_data(), rows, s.net.in_features());
                s.net.backward(Gm, accumulate, &dXm);
              } else {
                s.net.backward(Gm, accumulate, nullptr);
              }
            }
            if (input_grad) return std::move(dX);
            return py::none();
          },
          py::arg("grad_output"), py::arg("accumulate") = false, py::arg("input_grad") = false)
      .def(
          "train_step",
          [](Self& s, py::handle X_obj, py::handle y_obj, const std::string& loss_name,
             py::handle w_obj, double sgd_lr, py::handle plan_obj, std::int64_t t) {
            const char* where = "Network.train_step";
            Update<T>* update = nullptr;
            if (!plan_obj.is_none()) update = &checked_plan(s, plan_obj, t, where);
            auto X = strict_array<T>(X_obj, where, "X", 2);
            const Index rows = X.shape(0), cols = X.shape(1);
            Loss loss;
            if (loss_name == "softmax_cross_entropy") {
              loss = Loss::softmax_cross_entropy;
            } else if (loss_name == "binary_cross_entropy_with_logits") {
              loss = Loss::binary_cross_entropy_with_logits;
            } else if (loss_name == "mean_squared_error") {
              loss = Loss::mean_squared_error;
            } else {
              throw py::value_error(std::string("[") + where + "] loss must be one of "
                                    "'softmax_cross_entropy', 'binary_cross_entropy_with_logits', "
                                    "'mean_squared_error', but got '" + loss_name + "'");
            }
            const std::int64_t* labels = nullptr;
            const T* target = nullptr;
            py::array y_arr;
            if (loss == Loss::softmax_cross_entropy && py::isinstance<py::array>(y_obj) &&
                py::reinterpret_borrow<py::array>(y_obj).ndim() == 1) {
              auto y = strict_array<std::int64_t>(y_obj, where, "y", 1);
              if (y.shape(0) != rows) {
                throw py::value_error(std::string("[") + where + "] y has " +
                                      std::to_string(y.shape(0)) + " labels, but X has " +
                                      std::to_string(rows) + " rows");
              }
              labels = y.data();
              y_arr = y;
            } else {
              auto y = strict_array<T>(y_obj, where, "y", 2);
              if (y.shape(0) != rows || y.shape(1) != s.net.out_features()) {
                throw py::value_error(std::string("[") + where + "] y has shape " +
                                      shape_of(y) + ", but the network maps X to (" +
                                      std::to_string(rows) + ", " +
                                      std::to_string(s.net.out_features()) + ")");
              }
              target = y.data();
              y_arr = y;
            }
            const T* sw = nullptr;
            if (!w_obj.is_none()) {
              auto w = strict_array<T>(w_obj, where, "sample_weight", 1);
              if (w.shape(0) != rows) {
                throw py::value_error(std::string("[") + where + "] sample_weight has " +
                                      std::to_string(w.shape(0)) + " entries, but X has " +
                                      std::to_string(rows) + " rows");
              }
              sw = w.data();
            }
            double value = 0;
            {
              py::gil_scoped_release nogil;
              std::unique_lock lock(s.mutex);
              value = s.net.train_step(ConstMatrixMap<T>(X.data(), rows, cols), loss, labels,
                                       target, sw, static_cast<T>(sgd_lr), update);
              py::gil_scoped_acquire gil;
              s.input = X;
            }
            return value;
          },
          py::arg("X"), py::arg("y"), py::arg("loss"), py::arg("sample_weight") = py::none(),
          py::arg("sgd_lr") = -1.0, py::arg("plan") = py::none(), py::arg("t") = 1,
          "forward + loss + backward (+ update) in one call: with sgd_lr >= 0 plain SGD is "
          "fused into the backward sweep; else with an UpdatePlan the optimizer steps each "
          "layer inside the sweep (step number t). Returns the loss.")
      .def(
          "apply_plan",
          [](Self& s, py::handle plan_obj, std::int64_t t) {
            Update<T>& update = checked_plan(s, plan_obj, t, "Optimizer.step");
            py::gil_scoped_release nogil;
            std::unique_lock lock(s.mutex);
            s.net.apply_optimizer(update);
          },
          py::arg("plan"), py::arg("t"),
          "One optimizer step on every parameter from the stored gradients, under the "
          "network's lock (Optimizer.step).")
      .def(
          "step",
          [](Self& s, double lr) {
            py::gil_scoped_release nogil;
            std::unique_lock lock(s.mutex);
            s.net.step(static_cast<T>(lr));
          },
          py::arg("lr"))
      .def(
          "predict",
          [](Self& s, py::handle X_obj, Index batch_size) {
            auto X = strict_array<T>(X_obj, "Network.predict", "X", 2);
            const Index rows = X.shape(0), cols = X.shape(1);
            py::array_t<T> out({static_cast<py::ssize_t>(rows),
                                static_cast<py::ssize_t>(s.net.out_features())});
            {
              py::gil_scoped_release nogil;
              std::shared_lock lock(s.mutex);
              s.net.predict(ConstMatrixMap<T>(X.data(), rows, cols), batch_size,
                            MatrixMap<T>(out.mutable_data(), rows, s.net.out_features()));
            }
            return out;
          },
          py::arg("X"), py::arg("batch_size") = 0)
      .def("clear_cache",
           [](Self& s) {
             {
               py::gil_scoped_release nogil;
               std::unique_lock lock(s.mutex);
               s.net.clear_cache();
             }
             s.input = py::none();
           })
      // ---- views of the C++ storage ----------------------------------------
      .def("weight", [](const Self& s, Index i) {
        const Dense<T>& L = layer_at(s, i);
        return view_of<T>(L.weight, {L.in(), L.out()}, true);
      })
      .def("bias", [](const Self& s, Index i) {
        const Dense<T>& L = layer_at(s, i);
        return view_of<T>(L.bias, {L.out()}, true);
      })
      .def("grad_weight", [](const Self& s, Index i) {
        const Dense<T>& L = layer_at(s, i);
        return view_of<T>(L.grad_weight, {L.in(), L.out()}, true);
      })
      .def("grad_bias", [](const Self& s, Index i) {
        const Dense<T>& L = layer_at(s, i);
        return view_of<T>(L.grad_bias, {L.out()}, true);
      })
      .def("input", [](const Self& s, Index i) -> py::object {
        const Dense<T>& L = layer_at(s, i);
        if (!s.net.has_forward()) return py::none();
        if (i == 0) {
          auto X = py::reinterpret_borrow<py::array>(s.input);
          py::array v(X.dtype(), {X.shape(0), X.shape(1)}, {X.strides(0), X.strides(1)},
                      X.data(), X);
          mark_readonly(v);
          return std::move(v);
        }
        const Dense<T>& P = layer_at(s, i - 1);
        return view_of<T>(P.output, {s.net.batch(), L.in()}, false);
      })
      .def("z", [](const Self& s, Index i) -> py::object {
        const Dense<T>& L = layer_at(s, i);
        if (!s.net.has_forward()) return py::none();
        return view_of<T>(L.z, {s.net.batch(), L.out()}, false);
      })
      .def("output", [](const Self& s, Index i) -> py::object {
        const Dense<T>& L = layer_at(s, i);
        if (!s.net.has_forward()) return py::none();
        return view_of<T>(L.output, {s.net.batch(), L.out()}, false);
      })
      .def("delta", [](const Self& s, Index i) -> py::object {
        const Dense<T>& L = layer_at(s, i);
        if (!s.net.has_backward() || !s.net.has_forward()) return py::none();
        return view_of<T>(L.delta, {s.net.batch(), L.out()}, false);
      });
}

}  // namespace

void bind_network(py::module_& m) {
  bind_update_plan<float>(m, "UpdatePlan32");
  bind_update_plan<double>(m, "UpdatePlan64");
  bind_network_type<float>(m, "Network32");
  bind_network_type<double>(m, "Network64");
}

}  // namespace bprop::python
