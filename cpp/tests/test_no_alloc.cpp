// Shows that a steady-state training step allocates nothing: every malloc-family
// call in the process is counted (this executable interposes glibc's allocator),
// a few warm-up steps size the workspaces, and then steps must allocate zero times.
//
// With 1, 2 and 4 threads the whole step, OpenBLAS included, must allocate
// nothing: bprop's pool runs the tiles of a product on threads started once, and
// each tile is a single-threaded OpenBLAS call (OpenBLAS's threaded driver, which
// allocates a job array per call, is never used). The pool's back-off on a busy
// machine is switched off here, so that the workers do run tiles (counted).
//
// The sparse runs feed the first Dense layer a CSR batch (int32 indices in
// float32, int64 in float64): z = X W and dL/dW = X^T delta from the CSR arrays
// must allocate nothing either.
//
// One exception, not bprop's: on AVX-512 CPUs OpenBLAS runs products with
// M N K <= 10^6 through its SkylakeX "small matrix" kernels, and the float64 one
// (dgemm_small_kernel_nn_skylakex.c) mallocs and frees a scratch copy of A's last
// 1-4 rows for some shapes (a 10-wide output layer, say) on every call. Each
// allocation's caller is looked up (dladdr): those made inside the OpenBLAS
// library are counted and printed apart; any other fails the test.
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "bprop/gemm.hpp"
#include "bprop/thread_pool.hpp"
#include "bprop/network.hpp"
#include "bprop/kernels.hpp"

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);

static volatile bool g_counting = false;
static volatile long g_allocations = 0;       // every other caller: must stay 0
static volatile long g_blas_allocations = 0;  // made inside the OpenBLAS library
static bool g_abort = false;  // BPROP_ABORT_ON_ALLOC=1: abort at the first one (for gdb)
static thread_local bool g_in_count = false;

// True if `caller` lies in the OpenBLAS shared library.
static bool in_openblas(void* caller) {
  Dl_info info;
  return dladdr(caller, &info) != 0 && info.dli_fname != nullptr &&
         std::strstr(info.dli_fname, "openblas") != nullptr;
}

static void count(void* caller) {
  if (g_counting && !g_in_count) {
    g_in_count = true;  // dladdr must not count itself
    if (in_openblas(caller)) {
      g_blas_allocations = g_blas_allocations + 1;
    } else {
      g_allocations = g_allocations + 1;
      if (g_abort) std::abort();
    }
    g_in_count = false;
  }
}
#define CALLER __builtin_return_address(0)
void* malloc(std::size_t n) { count(CALLER); return __libc_malloc(n); }
void* calloc(std::size_t n, std::size_t m) { count(CALLER); return __libc_calloc(n, m); }
void* realloc(void* p, std::size_t n) { count(CALLER); return __libc_realloc(p, n); }
void* memalign(std::size_t a, std::size_t n) { count(CALLER); return __libc_memalign(a, n); }
void* aligned_alloc(std::size_t a, std::size_t n) {
  count(CALLER);
  return __libc_memalign(a, n);
}
int posix_memalign(void** p, std::size_t a, std::size_t n) {
  count(CALLER);
  *p = __libc_memalign(a, n);
  return *p ? 0 : 12;
}
void free(void* p) { __libc_free(p); }
}

template <typename T>
long run(const char* name, std::vector<bprop::LayerSpec> specs, bprop::Index batch,
         bool sparse = false) {
  bprop::Network<T> net(specs);
  std::mt19937 gen(0);
  std::normal_distribution<double> normal(0.0, 0.05);
  for (const auto& p : net.parameters()) {
    if (p.parameter->decays) {
      for (T& w : *p.parameter->value) w = static_cast<T>(normal(gen));
    }
  }
  std::vector<T> X(static_cast<std::size_t>(batch * net.in_features()));
  for (T& x : X) x = static_cast<T>(normal(gen) * 20);
  std::vector<std::int64_t> y(static_cast<std::size_t>(batch));
  for (std::size_t i = 0; i < y.size(); ++i) y[i] = static_cast<std::int64_t>(i % net.out_features());
  std::vector<T> grad(static_cast<std::size_t>(batch * net.out_features()));
  bprop::ConstMatrixMap<T> Xm(X.data(), batch, net.in_features());
  // the same batch in CSR form, about one entry in ten kept
  using I = std::conditional_t<sizeof(T) == 4, std::int32_t, std::int64_t>;
  std::vector<T> values;
  std::vector<I> indices, indptr{0};
  for (bprop::Index i = 0; i < batch; ++i) {
    for (bprop::Index j = 0; j < net.in_features(); ++j) {
      if ((i * 7 + j * 3) % 10 == 0) {
        values.push_back(X[static_cast<std::size_t>(i * net.in_features() + j)]);
        indices.push_back(static_cast<I>(j));
      }
    }
    indptr.push_back(static_cast<I>(values.size()));
  }
  bprop::CsrBatch<T> Xs;
  Xs.rows = batch;
  Xs.cols = net.in_features();
  Xs.nnz = static_cast<bprop::Index>(values.size());
  Xs.values = values.data();
  Xs.indices = indices.data();
  Xs.indptr = indptr.data();
  Xs.index64 = sizeof(I) == 8;

  // Adam's state, owned by the caller as bprop.optim owns it
  std::vector<std::vector<T>> adam_state;
  bprop::Update<T> adam;
  adam.spec.rule = bprop::UpdateRule::adam;
  adam.spec.lr = 1e-3;
  adam_state.reserve(2 * net.parameters().size());
  for (const auto& p : net.parameters()) {
    const auto n = static_cast<std::size_t>(p.parameter->size());
    adam_state.emplace_back(n);
    adam_state.emplace_back(n);
    bprop::UpdateState<T> st;
    st.exp_avg = adam_state[adam_state.size() - 2].data();
    st.exp_avg_sq = adam_state.back().data();
    adam.states.push_back(st);
  }
  // a poll between layers (as the binding's signal check), built once
  long polls = 0;
  const bprop::Poll poll = [&polls] { ++polls; };
  auto steps_on = [&](const auto& Xm, int n) {
    for (int i = 0; i < n; ++i) {
      // the one-call step with Adam inside the backward sweep (it counts its steps)
      net.train_step(Xm, bprop::Loss::softmax_cross_entropy, y.data(), nullptr, nullptr, T(-1),
                     &adam);
      // the same with a poll: the updates held back to the end of the sweep
      net.train_step(Xm, bprop::Loss::softmax_cross_entropy, y.data(), nullptr, nullptr, T(-1),
                     &adam, poll);
      // lazy Adam (the batch's rows of a sparse batch), in the sweep and from stored gradients
      adam.spec.lazy = true;
      net.train_step(Xm, bprop::Loss::softmax_cross_entropy, y.data(), nullptr, nullptr, T(-1),
                     &adam);
      auto lazy_out = net.forward(Xm);
      bprop::softmax_cross_entropy<T>(lazy_out.data(), batch, net.out_features(), y.data(),
                                      nullptr, nullptr, grad.data());
      net.backward(bprop::ConstMatrixMap<T>(grad.data(), batch, net.out_features()), false,
                   nullptr);
      net.apply_optimizer(adam);
      adam.spec.lazy = false;
      // the one-call step with fused SGD (with and without a poll), then the separate calls
      net.train_step(Xm, bprop::Loss::softmax_cross_entropy, y.data(), nullptr, nullptr, T(0.01));
      net.train_step(Xm, bprop::Loss::softmax_cross_entropy, y.data(), nullptr, nullptr, T(0.01),
                     nullptr, poll);
      auto out = net.forward(Xm);
      bprop::softmax_cross_entropy<T>(out.data(), batch, net.out_features(), y.data(), nullptr,
                                      nullptr, grad.data());
      net.backward(bprop::ConstMatrixMap<T>(grad.data(), batch, net.out_features()), false,
                   nullptr);
      net.step(T(0.01));
    }
  };
  auto steps = [&](int n) {
    if (sparse) {
      steps_on(Xs, n);
    } else {
      steps_on(Xm, n);
    }
  };
  steps(3);  // warm-up: workspaces are sized here
  g_allocations = 0;
  g_blas_allocations = 0;
  g_counting = true;
  steps(50);
  g_counting = false;
  std::printf("  %-28s %ld allocations in 50 steady-state steps", name, g_allocations);
  if (g_blas_allocations != 0) {
    std::printf(" (and %ld inside OpenBLAS's small-matrix kernels)", g_blas_allocations);
  }
  std::printf("\n");
  if (adam.steps != 4 * 53 || polls == 0) {
    std::printf("  %-28s wrong step count %lld or no polls\n", name,
                static_cast<long long>(adam.steps));
    return 1;
  }
  return g_allocations;
}

bprop::LayerSpec layer(bprop::LayerSpec::Kind kind, bprop::Index features = 0) {
  bprop::LayerSpec s;
  s.kind = kind;
  s.in_features = features;
  return s;
}

int run_all() {
  using bprop::Activation;
  using Kind = bprop::LayerSpec::Kind;
  const auto dense = bprop::LayerSpec::dense_layer;
  long n = 0;
  n += run<float>("float32 784-128-10 B=32",
                  {dense(784, 128, Activation::relu, 0.01, true),
                   dense(128, 10, Activation::identity, 0.01, true)},
                  32);
  n += run<float>("float32 784-256-256-10 B=128",
                  {dense(784, 256, Activation::gelu, 0.01, true),
                   dense(256, 256, Activation::tanh, 0.01, true),
                   dense(256, 10, Activation::softmax, 0.01, true)},
                  128);
  n += run<double>("float64 1024-1024-10 B=256",
                   {dense(1024, 1024, Activation::relu, 0.01, true),
                    dense(1024, 10, Activation::identity, 0.01, true)},
                   256);
  // every kind of layer: Dense without bias, BatchNorm, Activation, Dropout,
  // Residual, LayerNorm
  bprop::LayerSpec relu = layer(Kind::activation);
  relu.activation = Activation::relu;
  bprop::LayerSpec dropout = layer(Kind::dropout);
  dropout.p = 0.2;
  bprop::LayerSpec residual = layer(Kind::residual);
  residual.layers = {dense(256, 256, Activation::relu, 0.01, true), dropout,
                     dense(256, 256, Activation::identity, 0.01, true)};
  n += run<float>("float32 every layer B=64",
                  {dense(100, 256, Activation::identity, 0.01, false),
                   layer(Kind::batch_norm, 256), relu, dropout, residual,
                   layer(Kind::layer_norm, 256),
                   dense(256, 10, Activation::identity, 0.01, true)},
                  64);
  n += run<float>("float32 CSR 2000-128-10 B=64",
                  {dense(2000, 128, Activation::relu, 0.01, true),
                   dense(128, 10, Activation::identity, 0.01, true)},
                  64, true);
  n += run<double>("float64 CSR 5000-64-10 B=128",
                   {dense(5000, 64, Activation::tanh, 0.01, true),
                    dense(64, 10, Activation::identity, 0.01, true)},
                   128, true);
  return n;
}

int main() {
  g_abort = std::getenv("BPROP_ABORT_ON_ALLOC") != nullptr;
  bprop::set_contention_backoff(false);
  long total = 0;
  bool workers_ran = true;
  for (int threads : {1, 2, 4}) {
    bprop::set_num_threads(threads);
    std::printf("%d thread%s (%s):\n", threads, threads == 1 ? "" : "s", bprop::gemm_backend());
    const std::int64_t before = bprop::worker_tasks();
    total += run_all();
    const std::int64_t on_workers = bprop::worker_tasks() - before;
    std::printf("  (%lld tiles ran on bprop's workers)\n", static_cast<long long>(on_workers));
    if (threads > 1 && on_workers == 0) workers_ran = false;
  }
  const bool pass = total == 0 && workers_ran;
  std::printf(pass ? "PASS\n" : "FAIL\n");
  return pass ? 0 : 1;
}
