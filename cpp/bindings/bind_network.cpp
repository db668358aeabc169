// Network<float> and Network<double> as bprop._core.Network32 / Network64.
#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "bprop/kernels.hpp"
#include "bprop/network.hpp"
#include "common.hpp"

namespace bprop::python {

namespace {

using LayerTuple = std::tuple<Index, Index, std::string, double>;

/// The core network plus what the binding must own: a reference to the array
/// that layer 0's cache points into, the lock that serializes calls, and fit's
/// claim on the network.
template <typename T>
struct PyNetwork {
  explicit PyNetwork(const std::vector<LayerSpec>& specs) : net(specs) {}

  Network<T> net;
  py::object input;         // keeps layer 0's cached input alive
  std::shared_mutex mutex;  // predict() shares it; every other call holds it alone
  // The thread whose fit trains the network and how many fits deep (a callback
  // may fit again); written and read under `mutex` held alone.
  std::thread::id trainer;
  int claims = 0;
  // The thread inside a call that holds `mutex` alone: a signal handler that the
  // call's poll runs on that thread and that calls into this network again must
  // raise, not wait for a lock its own thread holds.
  std::atomic<std::thread::id> holder{};
};

/// `mutex` held alone for one call, after the checks that make it a clear error
/// instead of a deadlock or a step interleaved with another thread's fit:
/// RuntimeError if this thread is already inside a call on the network (a
/// signal handler) or if fit trains the network in another thread.
template <typename T>
class Exclusive {
 public:
  Exclusive(PyNetwork<T>& s, const char* where) : s_(s) {
    const std::thread::id me = std::this_thread::get_id();
    if (s.holder.load() == me) {
      throw std::runtime_error(std::string("[") + where + "] called while this thread is "
                               "inside another call on the network (from a signal handler?)");
    }
    lock_ = std::unique_lock<std::shared_mutex>(s.mutex);
    if (s.claims > 0 && s.trainer != me) {
      throw std::runtime_error(std::string("[") + where + "] the network is being trained by "
                               "fit in another thread; call this once fit has returned "
                               "(predict works meanwhile)");
    }
    s.holder.store(me);
  }
  Exclusive(const Exclusive&) = delete;
  Exclusive& operator=(const Exclusive&) = delete;
  ~Exclusive() { s_.holder.store(std::thread::id()); }

 private:
  PyNetwork<T>& s_;
  std::unique_lock<std::shared_mutex> lock_;
};

// ---- Ctrl-C inside long calls ------------------------------------------------
// With the GIL released, Python's SIGINT handler only sets a flag, which the
// interpreter acts on once the call returns. Calls on the main thread (the only
// one Python runs signal handlers on) whose batch * parameters (the multiply-adds
// of one forward pass) is at least `min_work` therefore poll between layers: once
// `interval` seconds have passed since the call began or since the last look, they
// take the GIL and run the handlers; the exception one raises (KeyboardInterrupt)
// abandons the call. Smaller calls do not poll (Python sees the signal when they
// return), and a polling call shorter than `interval` only reads the clock.
// Taking the GIL can wait up to the switch interval (5 ms) while another thread
// runs Python, hence once per `interval` at most.
std::atomic<double> poll_interval{0.1};
std::atomic<long long> poll_min_work{1LL << 26};
unsigned long main_thread = 0;  // threading.main_thread().ident
// Testing aid (_core._signal_at_poll): the looks taken so far, and the one before
// which SIGINT is raised as Ctrl-C would (0: none). Used with the GIL held.
long long polls_made = 0;
long long signal_at = 0;

class SignalPoll {
 public:
  /// Built with the GIL held; `work` is the call's batch * parameters.
  explicit SignalPoll(double work) {
    if (PyThread_get_thread_ident() != main_thread ||
        work < static_cast<double>(poll_min_work.load())) {
      return;
    }
    interval_ = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(poll_interval.load()));
    next_ = Clock::now() + interval_;
    poll_ = [this] { check(); };
  }
  SignalPoll(const SignalPoll&) = delete;
  SignalPoll& operator=(const SignalPoll&) = delete;

  /// Empty when this call does not poll.
  const Poll& poll() const { return poll_; }

 private:
  using Clock = std::chrono::steady_clock;

  void check() {
    if (Clock::now() < next_) return;
    {
      py::gil_scoped_acquire gil;
      if (++polls_made == signal_at) PyErr_SetInterrupt();  // as a SIGINT would
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    }
    next_ = Clock::now() + interval_;
  }

  Clock::duration interval_{};
  Clock::time_point next_{};
  Poll poll_;
};

template <typename T>
double work_of(const PyNetwork<T>& s, Index rows) {
  return static_cast<double>(rows) * static_cast<double>(s.net.num_parameters());
}

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
T* state_array(py::handle obj, Index size, const char* name) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string("[UpdatePlan] state ") + name + " must be an array");
  }
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

/// An update rule and its settings from the Python optimizer's description.
UpdateSpec update_spec(const std::string& rule, const py::dict& h) {
  UpdateSpec s;
  if (rule == "sgd") {
    s.rule = UpdateRule::sgd;
  } else if (rule == "adam") {
    s.rule = UpdateRule::adam;
  } else if (rule == "rmsprop") {
    s.rule = UpdateRule::rmsprop;
  } else {
    throw py::value_error("[UpdatePlan] rule must be 'sgd', 'adam' or 'rmsprop', but got '" +
                          rule + "'");
  }
  auto get = [&](const char* key, double fallback) {
    return h.contains(key) ? h[key].cast<double>() : fallback;
  };
  auto flag = [&](const char* key) { return h.contains(key) ? h[key].cast<bool>() : false; };
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
  s.lazy = flag("lazy");
  if (s.lazy && s.rule != UpdateRule::adam) {
    throw py::value_error("[UpdatePlan] lazy updates are Adam's only, but the rule is '" + rule +
                          "'");
  }
  return s;
}

/// The UpdateState member a state name (of state_names) refers to.
template <typename T>
T* UpdateState<T>::*state_slot(const std::string& name) {
  if (name == "momentum_buffer") return &UpdateState<T>::momentum_buffer;
  if (name == "exp_avg") return &UpdateState<T>::exp_avg;
  if (name == "exp_avg_sq") return &UpdateState<T>::exp_avg_sq;
  if (name == "square_avg") return &UpdateState<T>::square_avg;
  if (name == "grad_avg") return &UpdateState<T>::grad_avg;
  throw py::value_error("[UpdatePlan] unknown state '" + name + "'");
}

template <typename T>
void bind_update_plan(py::module_& m, const char* name) {
  using Plan = UpdatePlan<T>;
  py::class_<Plan>(m, name, py::module_local())
      .def(py::init([](const std::string& rule, py::dict h, const std::vector<Index>& sizes,
                       const std::vector<py::dict>& states, std::int64_t step_count) {
             if (step_count < 0) {
               throw py::value_error("[UpdatePlan] step_count must be >= 0, but got " +
                                     std::to_string(step_count));
             }
             auto plan = std::make_unique<Plan>();
             plan->update.steps = step_count;
             plan->update.spec = update_spec(rule, h);
             if (states.size() != sizes.size()) {
               throw py::value_error("[UpdatePlan] states and sizes differ in length");
             }
             const std::vector<const char*> names = state_names(plan->update.spec);
             for (std::size_t i = 0; i < states.size(); ++i) {
               const py::dict& st = states[i];
               UpdateState<T> u;
               for (const char* name : names) {
                 if (!st.contains(name)) {
                   throw py::value_error(std::string("[UpdatePlan] parameter ") +
                                         std::to_string(i) + " has no state '" + name +
                                         "', which this rule needs");
                 }
                 u.*state_slot<T>(name) = state_array<T>(st[name], sizes[i], name);
                 plan->keep.push_back(st[name]);
               }
               if (st.size() != names.size()) {
                 throw py::value_error("[UpdatePlan] parameter " + std::to_string(i) +
                                       " has state this rule does not keep");
               }
               plan->update.states.push_back(u);
             }
             plan->sizes = sizes;
             return plan;
           }),
           py::arg("rule"), py::arg("hyperparameters"), py::arg("sizes"), py::arg("states"),
           py::arg("step_count") = 0,
           "rule: 'sgd', 'adam' or 'rmsprop'; states: per parameter, a dict of its state "
           "arrays by name (update_state_names(rule, hyperparameters)).")
      .def_property(
          "step_count", [](const Plan& p) { return p.update.steps; },
          [](Plan& p, std::int64_t n) {
            if (n < 0) {
              throw py::value_error("[UpdatePlan] step_count must be >= 0, but got " +
                                    std::to_string(n));
            }
            p.update.steps = n;
          },
          "Steps taken; the call that makes a step counts it, in C++, once every "
          "parameter is updated.");
}

std::vector<LayerSpec> to_specs(const std::vector<LayerTuple>& layers) {
  std::vector<LayerSpec> specs;
  specs.reserve(layers.size());
  for (const auto& [in, out, activation, slope] : layers) {
    specs.push_back(LayerSpec::dense_layer(in, out, parse_activation(activation, "Dense"), slope));
  }
  return specs;
}

/// A layer's spec from its description, as bprop.network builds it: a dict with
/// "kind" ("Dense", "Activation", "Dropout", "BatchNorm", "LayerNorm", "Residual")
/// and the kind's settings; a Residual's "layers" is a list of such dicts.
LayerSpec spec_from_dict(const py::dict& d, const std::string& where) {
  auto get = [&](const char* key) -> py::object {
    if (!d.contains(key)) {
      throw py::value_error("[Network] " + where + " has no '" + key + "'");
    }
    return d[key];
  };
  const auto kind = get("kind").cast<std::string>();
  LayerSpec s;
  if (kind == "Dense") {
    s = LayerSpec::dense_layer(get("in_features").cast<Index>(), get("out_features").cast<Index>(),
                               parse_activation(get("activation").cast<std::string>(), "Dense"),
                               get("negative_slope").cast<double>(), get("bias").cast<bool>());
  } else if (kind == "Activation") {
    s.kind = LayerSpec::Kind::activation;
    s.activation = parse_activation(get("activation").cast<std::string>(), "Activation");
    s.negative_slope = get("negative_slope").cast<double>();
  } else if (kind == "Dropout") {
    s.kind = LayerSpec::Kind::dropout;
    s.p = get("p").cast<double>();
  } else if (kind == "BatchNorm" || kind == "LayerNorm") {
    s.kind = kind == "BatchNorm" ? LayerSpec::Kind::batch_norm : LayerSpec::Kind::layer_norm;
    s.in_features = get("features").cast<Index>();
    s.eps = get("eps").cast<double>();
    s.affine = get("affine").cast<bool>();
    if (kind == "BatchNorm") s.momentum = get("momentum").cast<double>();
  } else if (kind == "Residual") {
    s.kind = LayerSpec::Kind::residual;
    const py::list inner = get("layers");
    for (std::size_t i = 0; i < inner.size(); ++i) {
      s.layers.push_back(spec_from_dict(inner[i].cast<py::dict>(),
                                        where + ".layers." + std::to_string(i)));
    }
  } else {
    throw py::value_error("[Network] " + where + " has kind '" + kind + "'; expected one of "
                          "'Dense', 'Activation', 'Dropout', 'BatchNorm', 'LayerNorm', "
                          "'Residual'");
  }
  return s;
}

/// X as the Python layer passes a sparse batch: the tuple (data, indices, indptr,
/// n_features) of a CSR matrix (scipy's arrays, not copied), or None for a dense X.
/// data must have dtype T; indices and indptr both int32 or both int64, 1-D and
/// C-contiguous. Only the shapes are checked here; check_csr checks the contents.
template <typename T>
struct CsrArg {
  py::tuple arrays;  // keeps the arrays alive
  CsrBatch<T> batch;
};

template <typename T>
std::optional<CsrArg<T>> csr_arg(py::handle X_obj, const char* where) {
  if (!py::isinstance<py::tuple>(X_obj)) return std::nullopt;
  auto t = py::reinterpret_borrow<py::tuple>(X_obj);
  const std::string tag = std::string("[") + where + "] X";
  if (t.size() != 4) {
    throw py::value_error(tag + " as a tuple must be a CSR matrix's (data, indices, indptr, "
                          "n_features), but has " + std::to_string(t.size()) + " items");
  }
  auto data = strict_array<T>(t[0], where, "X.data", 1);
  if (!py::isinstance<py::array>(t[1]) || !py::isinstance<py::array>(t[2])) {
    throw py::type_error(tag + ".indices and X.indptr must be numpy arrays");
  }
  auto indices = py::reinterpret_borrow<py::array>(t[1]);
  auto indptr = py::reinterpret_borrow<py::array>(t[2]);
  const bool i64 = indices.dtype().equal(py::dtype::of<std::int64_t>());
  const bool i32 = indices.dtype().equal(py::dtype::of<std::int32_t>());
  if (!(i32 || i64) || !indptr.dtype().equal(indices.dtype())) {
    throw py::type_error(tag + ".indices and X.indptr must both have dtype int32 or both "
                         "int64, but have " + std::string(py::str(indices.dtype())) + " and " +
                         std::string(py::str(indptr.dtype())));
  }
  if (i64) {
    strict_array<std::int64_t>(indices, where, "X.indices", 1);
    strict_array<std::int64_t>(indptr, where, "X.indptr", 1);
  } else {
    strict_array<std::int32_t>(indices, where, "X.indices", 1);
    strict_array<std::int32_t>(indptr, where, "X.indptr", 1);
  }
  if (indices.shape(0) != data.shape(0) || indptr.shape(0) < 1) {
    throw py::value_error(tag + " is not a valid CSR matrix: data has " +
                          std::to_string(data.shape(0)) + " values and indices " +
                          std::to_string(indices.shape(0)) + ", indptr " +
                          std::to_string(indptr.shape(0)) + " entries");
  }
  CsrArg<T> out;
  out.arrays = t;
  out.batch.rows = indptr.shape(0) - 1;
  out.batch.cols = t[3].cast<Index>();
  out.batch.nnz = data.shape(0);
  out.batch.values = data.data();
  out.batch.indices = indices.data();
  out.batch.indptr = indptr.data();
  out.batch.index64 = i64;
  return out;
}

/// The views of one layer's caches, found by its path from the top of the network
/// (see "layer_caches" below). A layer's input is the output of the layer before it
/// in its sequence, or the input of the Residual it opens, or the network's input.
template <typename T>
py::dict layer_caches(const PyNetwork<T>& s, const std::vector<Index>& path) {
  if (path.empty()) throw py::value_error("[layer_caches] path is empty");
  auto& net = const_cast<Network<T>&>(s.net);
  std::vector<Layer<T>*> level;
  for (Index i = 0; i < net.num_layers(); ++i) level.push_back(&net.layer(i));
  const bool forward = s.net.has_forward();
  const py::ssize_t batch = forward ? static_cast<py::ssize_t>(s.net.batch()) : 0;
  py::object input = py::none();
  if (forward && !s.net.sparse_input()) {  // the network's input, as cached by reference
    // (a sparse input has no dense view: "input" is None for layer 0)
    auto X = py::reinterpret_borrow<py::array>(s.input);
    py::array v(X.dtype(), {X.shape(0), X.shape(1)}, {X.strides(0), X.strides(1)}, X.data(), X);
    mark_readonly(v);
    input = std::move(v);
  }
  Layer<T>* layer = nullptr;
  for (std::size_t d = 0; d < path.size(); ++d) {
    const Index i = path[d];
    if (i < 0 || i >= static_cast<Index>(level.size())) {
      throw py::index_error("[layer_caches] index " + std::to_string(i) + " at depth " +
                            std::to_string(d) + " is out of range for " +
                            std::to_string(level.size()) + " layers");
    }
    if (forward && i > 0) {
      Layer<T>* before = level[static_cast<std::size_t>(i - 1)];
      input = view_of<T>(before->output(), {batch, before->out_features()}, false);
    }
    layer = level[static_cast<std::size_t>(i)];
    if (d + 1 < path.size()) {
      level = layer->children();
      if (level.empty()) throw py::index_error("[layer_caches] the path goes below a leaf layer");
    }
  }
  py::dict out;
  out["input"] = input;
  auto view = [&](const StoragePtr<T>& storage, Index width) -> py::object {
    if (!forward) return py::none();
    return view_of<T>(storage, {batch, static_cast<py::ssize_t>(width)}, false);
  };
  const Index width = layer->out_features();
  out["output"] = view(layer->output(), width);
  switch (layer->kind()) {
    case LayerSpec::Kind::dense: {
      const auto& L = static_cast<const Dense<T>&>(*layer);
      out["z"] = view(L.z(), width);
      out["delta"] = s.net.has_backward() ? view(L.delta(), width) : py::none();
      break;
    }
    case LayerSpec::Kind::dropout:
      out["mask"] = view(static_cast<const Dropout<T>&>(*layer).mask(), width);
      break;
    case LayerSpec::Kind::batch_norm:
      out["normalized"] = view(static_cast<const BatchNorm<T>&>(*layer).normalized(), width);
      break;
    case LayerSpec::Kind::layer_norm:
      out["normalized"] = view(static_cast<const LayerNorm<T>&>(*layer).normalized(), width);
      break;
    default:
      break;
  }
  return out;
}

/// The update of an UpdatePlan, after checking that it was built for this
/// network's parameter sizes.
template <typename T>
Update<T>& checked_plan(PyNetwork<T>& s, py::handle plan_obj, const char* where) {
  if (!py::isinstance<UpdatePlan<T>>(plan_obj)) {
    throw py::type_error(std::string("[") + where + "] the optimizer's plan is for another "
                         "dtype than this " + dtype_name<T>() + " network");
  }
  auto& plan = plan_obj.cast<UpdatePlan<T>&>();
  const auto& params = s.net.parameters();
  bool match = params.size() == plan.sizes.size();
  for (std::size_t i = 0; i < params.size() && match; ++i) {
    match = plan.sizes[i] == params[i].parameter->size();
  }
  if (!match) {
    throw py::value_error(std::string("[") + where + "] the optimizer was built for a "
                          "different network");
  }
  return plan.update;
}

template <typename T>
void bind_network_type(py::module_& m, const char* name) {
  using Self = PyNetwork<T>;
  // module_local: a portable install holds two builds of this module (baseline and
  // AVX-512); their types must not collide in pybind11's registry if both load.
  py::class_<Self>(m, name, py::module_local())
      .def(py::init([](const py::list& layers) {
             // a list of layer descriptions (dicts), or of Dense tuples
             std::vector<LayerSpec> specs;
             for (std::size_t i = 0; i < layers.size(); ++i) {
               const py::handle item = layers[i];
               if (py::isinstance<py::dict>(item)) {
                 specs.push_back(spec_from_dict(item.cast<py::dict>(),
                                                "layers." + std::to_string(i)));
               } else {
                 specs.push_back(to_specs({item.cast<LayerTuple>()}).front());
               }
             }
             return std::make_unique<Self>(specs);
           }),
           py::arg("layers"),
           "layers: list of layer descriptions (dicts with 'kind' and its settings; a "
           "Residual's 'layers' nests them) or of Dense tuples (in_features, out_features, "
           "activation, negative_slope)")
      .def(
          "parameter_views",
          [](const Self& s) {
            py::list out;
            for (const NamedParameter<T>& np : s.net.parameters()) {
              const Parameter<T>& p = *np.parameter;
              std::vector<py::ssize_t> shape(p.shape.begin(), p.shape.end());
              out.append(py::make_tuple(np.name, view_of<T>(p.value, shape, true),
                                        view_of<T>(p.grad, shape, true), p.decays));
            }
            return out;
          },
          "(name, value, gradient, decays) for every parameter in layer order: NumPy views "
          "of the C++ storage.")
      .def(
          "buffer_views",
          [](const Self& s) {
            py::list out;
            for (const NamedBuffer<T>& nb : s.net.buffers()) {
              const Buffer<T>& b = *nb.buffer;
              std::vector<py::ssize_t> shape(b.shape.begin(), b.shape.end());
              out.append(py::make_tuple(nb.name, view_of<T>(b.value, shape, true)));
            }
            return out;
          },
          "(name, value) for every buffer (BatchNorm's running statistics): NumPy views.")
      .def_property(
          "training", [](const Self& s) { return s.net.training(); },
          [](Self& s, bool training) {
            py::gil_scoped_release nogil;
            Exclusive<T> lock(s, "Network.train");
            s.net.set_training(training);
          },
          "Training mode (Dropout drops, BatchNorm uses batch statistics) or eval mode.")
      .def_property(
          "dropout_seed", [](const Self& s) { return s.net.dropout_seed(); },
          [](Self& s, std::uint64_t seed) {
            py::gil_scoped_release nogil;
            Exclusive<T> lock(s, "Network.dropout_seed");
            s.net.set_dropout_seed(seed);
          },
          "The key of the dropout masks (a 64-bit unsigned integer).")
      .def_property(
          "dropout_step", [](const Self& s) { return s.net.dropout_step(); },
          [](Self& s, std::int64_t step) {
            py::gil_scoped_release nogil;
            Exclusive<T> lock(s, "Network.dropout_step");
            s.net.set_dropout_step(step);
          },
          "Training forward passes made so far: the step the next dropout mask is drawn for.")
      .def("layer_kind",
           [](const Self& s, Index i) {
             if (i < 0 || i >= s.net.num_layers()) {
               throw py::index_error("layer index " + std::to_string(i) + " out of range");
             }
             return std::string(kind_name(s.net.layer(i).kind()));
           })
      .def_property_readonly("num_layers", [](const Self& s) { return s.net.num_layers(); })
      .def_property_readonly("num_parameters",
                             [](const Self& s) { return s.net.num_parameters(); })
      .def_property_readonly("in_features", [](const Self& s) { return s.net.in_features(); })
      .def_property_readonly("out_features", [](const Self& s) { return s.net.out_features(); })
      .def_property_readonly("has_forward", [](const Self& s) { return s.net.has_forward(); })
      .def_property_readonly("has_backward", [](const Self& s) { return s.net.has_backward(); })
      .def_property_readonly("batch", [](const Self& s) { return s.net.batch(); })
      .def(
          "forward",
          [](Self& s, py::handle X_obj) {
            if (auto csr = csr_arg<T>(X_obj, "Network.forward")) {
              const Index rows = csr->batch.rows;
              py::array_t<T> out({static_cast<py::ssize_t>(rows),
                                  static_cast<py::ssize_t>(s.net.out_features())});
              SignalPoll poll(work_of(s, rows));
              {
                py::gil_scoped_release nogil;
                Exclusive<T> lock(s, "Network.forward");
                auto result = s.net.forward(csr->batch, poll.poll());
                std::memcpy(out.mutable_data(), result.data(),
                            sizeof(T) * static_cast<std::size_t>(result.size()));
                py::gil_scoped_acquire gil;
                s.input = csr->arrays;
              }
              return out;
            }
            auto X = strict_array<T>(X_obj, "Network.forward", "X", 2);
            const Index rows = X.shape(0), cols = X.shape(1);
            py::array_t<T> out({static_cast<py::ssize_t>(rows),
                                static_cast<py::ssize_t>(s.net.out_features())});
            SignalPoll poll(work_of(s, rows));
            {
              py::gil_scoped_release nogil;
              Exclusive<T> lock(s, "Network.forward");
              auto result = s.net.forward(ConstMatrixMap<T>(X.data(), rows, cols), poll.poll());
              std::memcpy(out.mutable_data(), result.data(),
                          sizeof(T) * static_cast<std::size_t>(result.size()));
              py::gil_scoped_acquire gil;  // lock order: mutex, then GIL
              s.input = X;
            }
            return out;
          },
          py::arg("X"),
          "Forward pass; caches a, z per layer. Returns (batch, out_features). Interrupted "
          "(Ctrl-C), it forgets the cache and changes nothing else.")
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
            SignalPoll poll(work_of(s, rows));
            {
              py::gil_scoped_release nogil;
              Exclusive<T> lock(s, "Network.backward");
              ConstMatrixMap<T> Gm(G.data(), rows, cols);
              if (input_grad) {
                MatrixMap<T> dXm(dX.mutable_data(), rows, s.net.in_features());
                s.net.backward(Gm, accumulate, &dXm, poll.poll());
              } else {
                s.net.backward(Gm, accumulate, nullptr, poll.poll());
              }
            }
            if (input_grad) return std::move(dX);
            return py::none();
          },
          py::arg("grad_output"), py::arg("accumulate") = false, py::arg("input_grad") = false)
      .def(
          "train_step",
          [](Self& s, py::handle X_obj, py::handle y_obj, const std::string& loss_name,
             py::handle w_obj, double sgd_lr, py::handle plan_obj, double loss_scale,
             double grad_scale, double l2, double max_grad_norm) {
            const char* where = "Network.train_step";
            const Objective objective{loss_scale, grad_scale, l2, max_grad_norm};
            const bool plain = loss_scale == 1 && grad_scale == 1 && l2 == 0 &&
                               max_grad_norm < 0;
            Update<T>* update = nullptr;
            if (!plan_obj.is_none()) {
              if (sgd_lr >= 0) {
                throw py::value_error(std::string("[") + where + "] give sgd_lr or plan, not "
                                      "both");
              }
              update = &checked_plan(s, plan_obj, where);
            }
            auto csr = csr_arg<T>(X_obj, where);
            py::array_t<T> X;
            if (!csr) X = strict_array<T>(X_obj, where, "X", 2);
            const Index rows = csr ? csr->batch.rows : X.shape(0);
            const Index cols = csr ? csr->batch.cols : X.shape(1);
            Loss loss;
            try {
              loss = parse_loss(loss_name, where);
            } catch (const std::invalid_argument& e) {
              throw py::value_error(e.what());
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
            SignalPoll poll(work_of(s, rows));
            {
              py::gil_scoped_release nogil;
              Exclusive<T> lock(s, where);
              if (csr) {
                value = s.net.train_step(csr->batch, loss, labels, target, sw,
                                         static_cast<T>(sgd_lr), update, poll.poll(),
                                         plain ? nullptr : &objective);
              } else {
                value = s.net.train_step(ConstMatrixMap<T>(X.data(), rows, cols), loss, labels,
                                         target, sw, static_cast<T>(sgd_lr), update,
                                         poll.poll(), plain ? nullptr : &objective);
              }
              py::gil_scoped_acquire gil;
              if (csr) {
                s.input = csr->arrays;
              } else {
                s.input = X;
              }
            }
            return value;
          },
          py::arg("X"), py::arg("y"), py::arg("loss"), py::arg("sample_weight") = py::none(),
          py::arg("sgd_lr") = -1.0, py::arg("plan") = py::none(),
          py::arg("loss_scale") = 1.0, py::arg("grad_scale") = 1.0, py::arg("l2") = 0.0,
          py::arg("max_grad_norm") = -1.0,
          "forward + loss + backward (+ update) in one call (max_grad_norm >= 0: every "
          "gradient formed, clipped to that global 2-norm, then the update): with an UpdatePlan the optimizer "
          "steps each layer inside the sweep (plain SGD fused into one product) and the plan "
          "counts the step; else with sgd_lr >= 0 plain SGD is fused into the sweep. "
          "Returns the loss, or scikit-learn's objective loss_scale * loss + 0.5 * l2 * "
          "sum ||W||^2, stepped along grad_scale * dL/d(output) and l2 * W on each weight "
          "(see Objective in network.hpp). Interrupted (Ctrl-C), the step did not happen: parameters and "
          "plan are unchanged, the cache and gradients are dropped.")
      .def(
          "clip_grad_norm",
          [](Self& s, double max_norm) {
            py::gil_scoped_release nogil;
            Exclusive<T> lock(s, "clip_grad_norm");
            return s.net.clip_grad_norm(max_norm);
          },
          py::arg("max_norm"),
          "Scales the stored gradients to a global 2-norm of at most max_norm; returns the "
          "norm before (torch.nn.utils.clip_grad_norm_).")
      .def(
          "clip_grad_value",
          [](Self& s, double clip) {
            py::gil_scoped_release nogil;
            Exclusive<T> lock(s, "clip_grad_value");
            s.net.clip_grad_value(clip);
          },
          py::arg("clip_value"), "Clamps the stored gradients to [-clip_value, clip_value].")
      .def(
          "apply_plan",
          [](Self& s, py::handle plan_obj) {
            Update<T>& update = checked_plan(s, plan_obj, "Optimizer.step");
            py::gil_scoped_release nogil;
            Exclusive<T> lock(s, "Optimizer.step");
            s.net.apply_optimizer(update);
          },
          py::arg("plan"),
          "One optimizer step on every parameter from the stored gradients, counted in the "
          "plan, under the network's lock (Optimizer.step).")
      .def(
          "step",
          [](Self& s, double lr) {
            py::gil_scoped_release nogil;
            Exclusive<T> lock(s, "Network.step");
            s.net.step(static_cast<T>(lr));
          },
          py::arg("lr"))
      .def(
          "predict",
          [](Self& s, py::handle X_obj, Index batch_size) {
            auto csr = csr_arg<T>(X_obj, "Network.predict");
            py::array_t<T> X;
            if (!csr) X = strict_array<T>(X_obj, "Network.predict", "X", 2);
            const Index rows = csr ? csr->batch.rows : X.shape(0);
            const Index cols = csr ? csr->batch.cols : X.shape(1);
            py::array_t<T> out({static_cast<py::ssize_t>(rows),
                                static_cast<py::ssize_t>(s.net.out_features())});
            {
              py::gil_scoped_release nogil;
              if (s.holder.load() == std::this_thread::get_id()) {
                throw std::runtime_error("[Network.predict] called while this thread is inside "
                                         "another call on the network (from a signal handler?)");
              }
              std::shared_lock lock(s.mutex);
              MatrixMap<T> out_map(out.mutable_data(), rows, s.net.out_features());
              if (csr) {
                s.net.predict(csr->batch, batch_size, out_map);
              } else {
                s.net.predict(ConstMatrixMap<T>(X.data(), rows, cols), batch_size, out_map);
              }
            }
            return out;
          },
          py::arg("X"), py::arg("batch_size") = 0)
      .def("clear_cache",
           [](Self& s) {
             {
               py::gil_scoped_release nogil;
               Exclusive<T> lock(s, "Network.clear_cache");
               s.net.clear_cache();
             }
             s.input = py::none();
           })
      // ---- fit's claim -------------------------------------------------------
      .def(
          "_begin_training",
          [](Self& s, const std::string& where) {
            py::gil_scoped_release nogil;
            Exclusive<T> lock(s, where.c_str());
            s.trainer = std::this_thread::get_id();
            ++s.claims;
          },
          py::arg("where"),
          "fit claims the network for this thread: until _end_training, forward, backward, "
          "step, train_step, apply_plan, clear_cache and _begin_training from other threads "
          "raise RuntimeError (predict does not). Nested claims by one thread count.")
      .def(
          "_end_training",
          [](Self& s) {
            py::gil_scoped_release nogil;
            const std::thread::id me = std::this_thread::get_id();
            // Inside a call on this network (a signal handler's fit, whose
            // _begin_training raised): there is no claim of this fit to release.
            if (s.holder.load() == me) return;
            std::unique_lock lock(s.mutex);
            if (s.claims > 0 && s.trainer == me && --s.claims == 0) s.trainer = std::thread::id();
          },
          "Releases one claim of _begin_training made by this thread (none: does nothing).")
      // ---- views of the caches ------------------------------------------------
      .def(
          "layer_caches",
          [](const Self& s, const std::vector<Index>& path) { return layer_caches(s, path); },
          py::arg("path"),
          "The caches of the layer at `path` (its index, then its index inside each "
          "Residual): read-only views of 'input' and 'output' (and Dense's 'z' and 'delta', "
          "Dropout's 'mask', BatchNorm's and LayerNorm's 'normalized'), None before the "
          "first forward (backward for 'delta').");
}

}  // namespace

void bind_network(py::module_& m) {
  main_thread = py::module_::import("threading").attr("main_thread")().attr("ident")
                    .cast<unsigned long>();
  m.def(
      "interrupt_polling",
      [](std::optional<double> interval, std::optional<long long> min_work) {
        if (interval && !(*interval >= 0 && *interval <= 86400)) {
          throw py::value_error("[interrupt_polling] interval must be a number of seconds in "
                                "[0, 86400], but got " + std::to_string(*interval));
        }
        if (min_work && *min_work < 0) {
          throw py::value_error("[interrupt_polling] min_work must be >= 0");
        }
        const auto previous = std::make_tuple(poll_interval.load(), poll_min_work.load());
        if (interval) poll_interval.store(*interval);
        if (min_work) poll_min_work.store(*min_work);
        return previous;
      },
      py::arg("interval") = py::none(), py::arg("min_work") = py::none(),
      "How calls look for Ctrl-C: forward, backward and train_step with batch * parameters "
      ">= min_work, on the main thread, run Python's signal handlers "
      "between layers, at most every interval seconds. Sets the values given; returns "
      "the previous (interval, min_work).");
  m.def(
      "_signal_at_poll",
      [](long long n) {
        if (n < 0) throw py::value_error("[_signal_at_poll] n must be >= 0");
        const long long made = polls_made;
        polls_made = 0;
        signal_at = n;
        return made;
      },
      py::arg("n"),
      "Testing aid: the n-th look for signals from now (1-based; 0: none) first raises "
      "SIGINT as Ctrl-C would, so that the SIGINT handler runs inside that call, between "
      "two layers. Returns how many looks were taken since the previous call.");
  m.def(
      "update_state_names",
      [](const std::string& rule, py::dict h) {
        py::list names;
        for (const char* name : state_names(update_spec(rule, h))) names.append(name);
        return names;
      },
      py::arg("rule"), py::arg("hyperparameters"),
      "The state arrays an update rule keeps per parameter under these settings.");
  bind_update_plan<float>(m, "UpdatePlan32");
  bind_update_plan<double>(m, "UpdatePlan64");
  bind_network_type<float>(m, "Network32");
  bind_network_type<double>(m, "Network64");
}

}  // namespace bprop::python
