#include "bprop/kernels.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "bprop/thread_pool.hpp"

namespace bprop {

namespace {

// sum of the sample weights, or the batch size without them
template <typename T>
double weight_sum(const T* sample_weight, Index batch) {
  if (sample_weight == nullptr) return static_cast<double>(batch);
  double s = 0;
  for (Index i = 0; i < batch; ++i) s += static_cast<double>(sample_weight[i]);
  return s;
}

template <typename T>
T stable_sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

}  // namespace

template <typename T>
double softmax_cross_entropy(const T* logits, Index batch, Index classes,
                             const std::int64_t* labels, const T* target,
                             const T* sample_weight, T* grad) {
  if (labels != nullptr) {
    for (Index i = 0; i < batch; ++i) {
      if (labels[i] < 0 || labels[i] >= classes) {
        throw std::invalid_argument(
            "[softmax_cross_entropy] target labels must lie in [0, " + std::to_string(classes) +
            "), but target[" + std::to_string(i) + "] = " + std::to_string(labels[i]));
      }
    }
  }
  const double wsum = weight_sum(sample_weight, batch);
  double total = 0;
  for (Index i = 0; i < batch; ++i) {
    const T* z = logits + i * classes;
    T* g = grad + i * classes;
    const T m = *std::max_element(z, z + classes);
    double s = 0;
    for (Index j = 0; j < classes; ++j) {
      const T e = std::exp(z[j] - m);
      g[j] = e;
      s += static_cast<double>(e);
    }
    const double lse = static_cast<double>(m) + std::log(s);  // log-sum-exp of the row
    const double w = sample_weight == nullptr ? 1.0 : static_cast<double>(sample_weight[i]);
    const T scale = static_cast<T>(w / wsum);
    const T inv_s = static_cast<T>(1.0 / s);
    double loss = 0;
    if (labels != nullptr) {
      const Index k = static_cast<Index>(labels[i]);
      loss = lse - static_cast<double>(z[k]);
      for (Index j = 0; j < classes; ++j) g[j] = scale * (g[j] * inv_s);
      g[k] -= scale;
    } else {
      const T* y = target + i * classes;
      for (Index j = 0; j < classes; ++j) {
        loss += static_cast<double>(y[j]) * (lse - static_cast<double>(z[j]));
        g[j] = scale * (g[j] * inv_s - y[j]);
      }
    }
    total += w * loss;
  }
  return total / wsum;
}

template <typename T>
double binary_cross_entropy_with_logits(const T* logits, const T* target, Index batch,
                                        Index k, const T* sample_weight, T* grad) {
  const double denom = weight_sum(sample_weight, batch) * static_cast<double>(k);
  double total = 0;
  for (Index i = 0; i < batch; ++i) {
    const double w = sample_weight == nullptr ? 1.0 : static_cast<double>(sample_weight[i]);
    const T scale = static_cast<T>(w / denom);
    double row = 0;
    for (Index j = 0; j < k; ++j) {
      const T x = logits[i * k + j];
      const T y = target[i * k + j];
      // max(x, 0) - x y + log(1 + exp(-|x|)): finite for any x
      row += static_cast<double>(std::max(x, T(0)) - x * y + std::log1p(std::exp(-std::abs(x))));
      grad[i * k + j] = scale * (stable_sigmoid(x) - y);
    }
    total += w * row;
  }
  return total / denom;
}

template <typename T>
double mean_squared_error(const T* output, const T* target, Index batch, Index k,
                          const T* sample_weight, T* grad) {
  const double denom = weight_sum(sample_weight, batch) * static_cast<double>(k);
  double total = 0;
  for (Index i = 0; i < batch; ++i) {
    const double w = sample_weight == nullptr ? 1.0 : static_cast<double>(sample_weight[i]);
    const T scale = static_cast<T>(2.0 * w / denom);
    double row = 0;
    for (Index j = 0; j < k; ++j) {
      const T r = output[i * k + j] - target[i * k + j];
      row += static_cast<double>(r) * static_cast<double>(r);
      grad[i * k + j] = scale * r;
    }
    total += w * row;
  }
  return total / denom;
}

template <typename T>
double huber(const T* output, const T* target, Index batch, Index k, const T* sample_weight,
             T* grad, T delta) {
  const double denom = weight_sum(sample_weight, batch) * static_cast<double>(k);
  double total = 0;
  for (Index i = 0; i < batch; ++i) {
    const double w = sample_weight == nullptr ? 1.0 : static_cast<double>(sample_weight[i]);
    const T scale = static_cast<T>(w / denom);
    double row = 0;
    for (Index j = 0; j < k; ++j) {
      const T r = output[i * k + j] - target[i * k + j];
      const T a = std::abs(r);
      // quadratic inside |r| < delta, linear outside (torch's branch order)
      row += a < delta ? 0.5 * static_cast<double>(r) * static_cast<double>(r)
                       : static_cast<double>(delta) * (static_cast<double>(a) -
                                                      0.5 * static_cast<double>(delta));
      grad[i * k + j] = scale * (r < -delta ? -delta : (r > delta ? delta : r));
    }
    total += w * row;
  }
  return total / denom;
}

template <typename T>
double mean_absolute_error(const T* output, const T* target, Index batch, Index k,
                           const T* sample_weight, T* grad) {
  const double denom = weight_sum(sample_weight, batch) * static_cast<double>(k);
  double total = 0;
  for (Index i = 0; i < batch; ++i) {
    const double w = sample_weight == nullptr ? 1.0 : static_cast<double>(sample_weight[i]);
    const T scale = static_cast<T>(w / denom);
    double row = 0;
    for (Index j = 0; j < k; ++j) {
      const T r = output[i * k + j] - target[i * k + j];
      row += static_cast<double>(std::abs(r));
      // sign(r), 0 at r == 0 as torch's sgn
      grad[i * k + j] = r > T(0) ? scale : (r < T(0) ? -scale : T(0));
    }
    total += w * row;
  }
  return total / denom;
}

template <typename T>
double poisson_nll(const T* output, const T* target, Index batch, Index k,
                   const T* sample_weight, T* grad) {
  const double denom = weight_sum(sample_weight, batch) * static_cast<double>(k);
  double total = 0;
  for (Index i = 0; i < batch; ++i) {
    const double w = sample_weight == nullptr ? 1.0 : static_cast<double>(sample_weight[i]);
    const T scale = static_cast<T>(w / denom);
    double row = 0;
    for (Index j = 0; j < k; ++j) {
      const T z = output[i * k + j];
      const T y = target[i * k + j];
      const T mu = std::exp(z);  // the rate: the network's output is its log
      row += static_cast<double>(mu) - static_cast<double>(y) * static_cast<double>(z);
      grad[i * k + j] = scale * (mu - y);
    }
    total += w * row;
  }
  return total / denom;
}

Loss parse_loss(const std::string& name, const char* where) {
  std::string names;
  for (const LossEntry& entry : kLosses) {
    if (name == entry.name) return entry.loss;
    names += std::string(names.empty() ? "" : ", ") + "'" + entry.name + "'";
  }
  throw std::invalid_argument(std::string("[") + where + "] loss must be one of " + names +
                              ", but got '" + name + "'");
}

template <typename T>
void sgd_update(T* param, const T* grad, T* buf, Index n, T lr, T momentum, T dampening,
                bool nesterov, T weight_decay, bool first) {
  if (momentum == T(0)) {  // plain SGD: the same arithmetic, one loop the compiler vectorises
    for (Index i = 0; i < n; ++i) param[i] -= lr * (grad[i] + weight_decay * param[i]);
    return;
  }
  for (Index i = 0; i < n; ++i) {
    T g = grad[i] + weight_decay * param[i];
    if (momentum != T(0)) {
      buf[i] = first ? g : momentum * buf[i] + (T(1) - dampening) * g;
      g = nesterov ? g + momentum * buf[i] : buf[i];
    }
    param[i] -= lr * g;
  }
}

template <typename T>
void adam_update(T* param, const T* grad, T* m, T* v, Index n, T lr, T beta1, T beta2,
                 T eps, T weight_decay, std::int64_t t, bool decoupled) {
  const T bias_correction1 = T(1) - std::pow(beta1, static_cast<T>(t));
  const T bias_correction2 = T(1) - std::pow(beta2, static_cast<T>(t));
  const T step_size = lr / bias_correction1;
  const T inv_sqrt_bc2 = T(1) / std::sqrt(bias_correction2);
  const T decay = decoupled ? T(1) - lr * weight_decay : T(1);
  const T l2 = decoupled ? T(0) : weight_decay;
  for (Index i = 0; i < n; ++i) {
    const T g = grad[i] + l2 * param[i];
    m[i] = beta1 * m[i] + (T(1) - beta1) * g;
    v[i] = beta2 * v[i] + (T(1) - beta2) * g * g;
    // p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
    param[i] = decay * param[i] - step_size * m[i] / (std::sqrt(v[i]) * inv_sqrt_bc2 + eps);
  }
}

template <typename T>
void rmsprop_update(T* param, const T* grad, T* square_avg, T* grad_avg, T* buf, Index n,
                    T lr, T alpha, T eps, T weight_decay, T momentum, bool centered) {
  for (Index i = 0; i < n; ++i) {
    const T g = grad[i] + weight_decay * param[i];
    square_avg[i] = alpha * square_avg[i] + (T(1) - alpha) * g * g;
    T var = square_avg[i];
    if (centered) {
      grad_avg[i] = alpha * grad_avg[i] + (T(1) - alpha) * g;
      var -= grad_avg[i] * grad_avg[i];
    }
    const T avg = std::sqrt(var) + eps;
    if (momentum > T(0)) {
      buf[i] = momentum * buf[i] + g / avg;
      param[i] -= lr * buf[i];
    } else {
      param[i] -= lr * g / avg;
    }
  }
}

namespace {

template <typename T>
void apply_update_serial(const UpdateSpec& s, std::int64_t t, T* param, const T* grad,
                         const UpdateState<T>& state, Index n) {
  switch (s.rule) {
    case UpdateRule::sgd:
      sgd_update<T>(param, grad, state.momentum_buffer, n, T(s.lr), T(s.momentum), T(s.dampening), s.nesterov,
                    T(s.weight_decay), t == 1);
      return;
    case UpdateRule::adam:
      adam_update<T>(param, grad, state.exp_avg, state.exp_avg_sq, n, T(s.lr), T(s.beta1), T(s.beta2), T(s.eps),
                     T(s.weight_decay), t, s.decoupled);
      return;
    case UpdateRule::rmsprop:
      rmsprop_update<T>(param, grad, state.square_avg, state.grad_avg, state.momentum_buffer, n, T(s.lr), T(s.alpha), T(s.eps),
                        T(s.weight_decay), T(s.momentum), s.centered);
      return;
  }
}

// Updates are elementwise: cut into blocks of this many values (by n alone, so each
// value goes through the same code path whatever the thread count) and run on the
// pool. 16384 float32 values with Adam's two state arrays are ~256 KB of traffic.
constexpr Index kUpdateBlock = Index(1) << 14;

}  // namespace

template <typename T>
void apply_update(const UpdateSpec& s, std::int64_t t, T* param, const T* grad,
                  const UpdateState<T>& state, Index n) {
  auto block = [&](Index b) {
    const Index i0 = b * kUpdateBlock;
    apply_update_serial<T>(s, t, param + i0, grad + i0, state.offset(i0),
                           std::min(kUpdateBlock, n - i0));
  };
  parallel_for((n + kUpdateBlock - 1) / kUpdateBlock, block);
}

template <typename T>
double sum_squares(const T* a, Index n) {
  // Cut by n alone into at most kMaxBlocks blocks of a multiple of 8 values; each
  // block summed in 8 float64 lanes (which the compiler vectorises), the lanes and
  // then the blocks added in order: the same bits for any thread count.
  constexpr Index kMaxBlocks = 256;
  if (n <= 0) return 0.0;
  Index blocks = std::min<Index>(kMaxBlocks, (n + kUpdateBlock - 1) / kUpdateBlock);
  const Index len = ((n + blocks - 1) / blocks + 7) & ~Index(7);
  blocks = (n + len - 1) / len;
  double partial[kMaxBlocks];
  auto block = [&](Index b) {
    const Index i0 = b * len;
    const Index m = std::min(len, n - i0);
    const T* x = a + i0;
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    Index i = 0;
    for (; i + 8 <= m; i += 8) {
      for (int k = 0; k < 8; ++k) {
        const double v = static_cast<double>(x[i + k]);
        lane[k] += v * v;
      }
    }
    for (int k = 0; i < m; ++i, ++k) {
      const double v = static_cast<double>(x[i]);
      lane[k] += v * v;
    }
    partial[b] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) +
                 ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  };
  parallel_for(blocks, block);
  double sum = 0;
  for (Index b = 0; b < blocks; ++b) sum += partial[b];
  return sum;
}

template <typename T>
void scale_values(T* a, Index n, T c) {
  auto block = [&](Index b) {
    const Index i0 = b * kUpdateBlock;
    VectorMap<T>(a + i0, std::min(kUpdateBlock, n - i0)) *= c;
  };
  parallel_for((n + kUpdateBlock - 1) / kUpdateBlock, block);
}

template <typename T>
void apply_update_rows(const UpdateSpec& s, std::int64_t t, T* param, const T* grad,
                       const UpdateState<T>& state, const RowSet& rows, Index row_size) {
  const Index per = std::max<Index>(64, (kUpdateBlock / std::max<Index>(row_size, 1)) & ~Index(63));
  // The rows are scattered: each row's arrays are asked for from memory one row
  // ahead of its update, so that the waits overlap the previous row's arithmetic.
  auto prefetch = [&](Index j) {
    const Index i0 = j * row_size;
    for (const T* a : {static_cast<const T*>(param), grad, static_cast<const T*>(state.exp_avg),
                       static_cast<const T*>(state.exp_avg_sq),
                       static_cast<const T*>(state.momentum_buffer),
                       static_cast<const T*>(state.square_avg),
                       static_cast<const T*>(state.grad_avg)}) {
      if (a == nullptr) continue;
      for (Index e = 0; e < row_size; e += 64 / static_cast<Index>(sizeof(T))) {
        __builtin_prefetch(a + i0 + e, 1);
      }
    }
  };
  auto block = [&](Index b) {
    const Index r0 = b * per;
    Index pending = -1;
    rows.for_each(r0, std::min(rows.rows, r0 + per), [&](Index j) {
      prefetch(j);
      if (pending >= 0) {
        const Index i0 = pending * row_size;
        apply_update_serial<T>(s, t, param + i0, grad + i0, state.offset(i0), row_size);
      }
      pending = j;
    });
    if (pending >= 0) {
      const Index i0 = pending * row_size;
      apply_update_serial<T>(s, t, param + i0, grad + i0, state.offset(i0), row_size);
    }
  };
  parallel_for((rows.rows + per - 1) / per, block);
}

std::vector<const char*> state_names(const UpdateSpec& s) {
  switch (s.rule) {
    case UpdateRule::sgd:
      if (s.momentum != 0) return {"momentum_buffer"};
      return {};
    case UpdateRule::adam:
      return {"exp_avg", "exp_avg_sq"};
    case UpdateRule::rmsprop: {
      std::vector<const char*> names = {"square_avg"};
      if (s.centered) names.push_back("grad_avg");
      if (s.momentum > 0) names.push_back("momentum_buffer");
      return names;
    }
  }
  return {};
}

template <typename T>
bool all_finite(const T* x, Index n) {
  return Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(x, n).allFinite();
}

#define BPROP_INSTANTIATE(T)                                                                 \
  template double softmax_cross_entropy<T>(const T*, Index, Index, const std::int64_t*,      \
                                           const T*, const T*, T*);                          \
  template double binary_cross_entropy_with_logits<T>(const T*, const T*, Index, Index,      \
                                                      const T*, T*);                         \
  template double mean_squared_error<T>(const T*, const T*, Index, Index, const T*, T*);     \
  template double huber<T>(const T*, const T*, Index, Index, const T*, T*, T);               \
  template double mean_absolute_error<T>(const T*, const T*, Index, Index, const T*, T*);    \
  template double poisson_nll<T>(const T*, const T*, Index, Index, const T*, T*);            \
  template void sgd_update<T>(T*, const T*, T*, Index, T, T, T, bool, T, bool);              \
  template void adam_update<T>(T*, const T*, T*, T*, Index, T, T, T, T, T, std::int64_t,     \
                               bool);                                                        \
  template void rmsprop_update<T>(T*, const T*, T*, T*, T*, Index, T, T, T, T, T, bool);     \
  template bool all_finite<T>(const T*, Index);                                               \
  template void scale_values<T>(T*, Index, T);                                               \
  template double sum_squares<T>(const T*, Index);                                           \
  template void apply_update<T>(const UpdateSpec&, std::int64_t, T*, const T*,               \
                                const UpdateState<T>&, Index);                               \
  template void apply_update_rows<T>(const UpdateSpec&, std::int64_t, T*, const T*,          \
                                     const UpdateState<T>&, const RowSet&, Index);

BPROP_INSTANTIATE(float)
BPROP_INSTANTIATE(double)
#undef BPROP_INSTANTIATE

}  // namespace bprop
