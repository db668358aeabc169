#include "bprop/thread_pool.hpp"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace bprop {

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

int cpus_available() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

// The loop in progress is named by one 64-bit word: the loop's number in the high
// 32 bits, the next task index in the low 32. A worker claims an index with a
// compare-exchange that also checks the loop number, so a worker that woke late
// can never take an index of a later loop on behalf of an earlier one.
constexpr int kJobShift = 32;
constexpr std::uint64_t kIndexMask = (std::uint64_t(1) << kJobShift) - 1;

class Pool {
 public:
  Pool() : threads_(cpus_available()) {}

  void set_threads(int n) {
    std::lock_guard<std::mutex> job(job_mutex_);
    if (n != threads_.load(std::memory_order_relaxed)) {
      stop_workers();
      threads_.store(n, std::memory_order_relaxed);
    }
    start_failed_ = false;
  }
  int threads() const { return threads_.load(std::memory_order_relaxed); }

  // tuning knobs and counters for tests and benchmarks
  std::atomic<int> spin_us{50};
  std::atomic<bool> backoff_enabled{true};
  std::atomic<std::int64_t> contended_loops_{0};  // loops after which it backed off
  std::atomic<std::int64_t> worker_tasks_{0};     // tasks the workers ran

  void run(Index count, Task task, void* context) {
    if (count <= 0) return;
    if (count == 1 || threads() == 1 || count > Index(kIndexMask) || backing_off()) {
      for (Index i = 0; i < count; ++i) task(context, i);
      return;
    }
    std::unique_lock<std::mutex> job(job_mutex_, std::try_to_lock);
    if (!job.owns_lock()) {  // the pool runs another thread's loop: no waiting for it
      for (Index i = 0; i < count; ++i) task(context, i);
      return;
    }
    start_workers();
    const std::uint32_t id = ++job_id_;
    const std::uint64_t open = std::uint64_t(id) << kJobShift;
    // The loop's number is published closed (its next index past any count) before
    // its task, context and count are written, and opened after them. A worker that
    // reads any of the new values (acquire) therefore also sees the new number, so a
    // worker still holding an earlier loop's number can never claim an index with
    // this loop's values (it did: on an oversubscribed machine a late worker ran a
    // task twice and counted it for the wrong loop).
    word_.store(open | kIndexMask);
    task_.store(task, std::memory_order_release);
    context_.store(context, std::memory_order_release);
    count_.store(count, std::memory_order_release);
    done_.store(0, std::memory_order_relaxed);
    // seq_cst store, then seq_cst load of sleepers_: a worker going to sleep
    // either sees this loop or is seen here (and woken).
    word_.store(open);
    if (sleepers_.load() > 0) {
      { std::lock_guard<std::mutex> lock(sleep_mutex_); }
      wake_.notify_all();
    }
    Index i;
    Index mine = 0;
    const Clock::time_point start = Clock::now();
    while (claim(id, count, &i)) {
      task(context, i);
      ++mine;
    }
    const Clock::time_point own_done = Clock::now();
    // The rest are running on workers: wait for them, giving the core away if a
    // worker holding a task has been descheduled.
    done_.fetch_add(mine, std::memory_order_acq_rel);
    int spins = 0;
    while (done_.load(std::memory_order_acquire) < count) {
      if (++spins < 4096) {
        cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
    // (if this thread ran every task, or none, the loop says nothing about workers)
    if (mine > 0 && mine < count) judge_contention(start, own_done, Clock::now(), mine, count);
  }

  // fork(): the child has only the forking thread, so the workers are stopped
  // before (once any loop in progress has ended) and restart on next use.
  void before_fork() {
    job_mutex_.lock();
    stop_workers();
  }
  void after_fork() { job_mutex_.unlock(); }

 private:
  using Clock = std::chrono::steady_clock;

  // On a busy machine a worker can lose its core while it holds a task, and the
  // loop then waits for the OS to give it back (milliseconds; OpenBLAS's own
  // threads made a small training step 30-140x slower that way). Seen from the
  // calling thread: the loop took much longer than its tasks would have taken on
  // this thread alone (over 3/2 of their count times the time its own tasks took).
  // Then the next loops run on the calling thread alone for a while (2 ms, doubling
  // while it keeps happening, up to 256 ms, halving again with each loop that goes
  // well) before the pool is tried again. Which
  // thread runs a task never changes its result. (A rule that also backed off when
  // the calling thread itself had been descheduled during its tasks did better
  // with both cores taken by other processes, but took away most of the gain of a
  // second thread with one core taken part of the time.)
  static constexpr auto kSlack = std::chrono::microseconds(50);
  static constexpr auto kMinBackoff = std::chrono::milliseconds(2);
  static constexpr auto kMaxBackoff = std::chrono::milliseconds(256);

  bool backing_off() const {
    if (!backoff_enabled.load(std::memory_order_relaxed)) return false;
    const auto until = serial_until_.load(std::memory_order_relaxed);
    return until != 0 && Clock::now().time_since_epoch().count() < until;
  }

  // job_mutex_ held; 0 < mine < count
  void judge_contention(Clock::time_point start, Clock::time_point own_done,
                        Clock::time_point end, Index mine, Index count) {
    const auto alone = (own_done - start) * count / mine;
    if (end - start > alone + alone / 2 + kSlack) {
      backoff_ = backoff_ == Clock::duration::zero()
                     ? Clock::duration(kMinBackoff)
                     : std::min<Clock::duration>(2 * backoff_, kMaxBackoff);
      serial_until_.store((end + backoff_).time_since_epoch().count(),
                          std::memory_order_relaxed);
      ++contended_loops_;
    } else {
      // forget a failure gradually: the OS may have given the worker its core back
      // for a moment only
      backoff_ = backoff_ > Clock::duration(kMinBackoff) ? backoff_ / 2 : Clock::duration::zero();
    }
  }

  Clock::duration backoff_{0};  // job_mutex_ held
  std::atomic<Clock::rep> serial_until_{0};

  bool claim(std::uint32_t id, Index count, Index* i) {
    std::uint64_t w = word_.load(std::memory_order_relaxed);
    for (;;) {
      if (static_cast<std::uint32_t>(w >> kJobShift) != id) return false;
      const auto next = static_cast<Index>(w & kIndexMask);
      if (next >= count) return false;
      if (word_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel,
                                      std::memory_order_relaxed)) {
        *i = next;
        return true;
      }
    }
  }

  // job_mutex_ held. If the OS refuses a thread (a process limit), the pool runs
  // with the workers it got until the thread count is set again.
  void start_workers() {
    const auto want = static_cast<std::size_t>(threads() - 1);
    if (workers_.size() == want || start_failed_) return;
    stop_workers();
    const auto seen = static_cast<std::uint32_t>(word_.load() >> kJobShift);
    try {
      workers_.reserve(want);
      for (std::size_t w = 0; w < want; ++w) workers_.emplace_back([this, seen] { work(seen); });
    } catch (const std::exception&) {
      start_failed_ = true;
    }
  }

  // job_mutex_ held
  void stop_workers() {
    if (workers_.empty()) return;
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      stop_.store(true);
    }
    wake_.notify_all();
    for (std::thread& t : workers_) t.join();
    workers_.clear();
    stop_.store(false);
  }

  void work(std::uint32_t seen) {
    for (;;) {
      std::uint32_t id = wait_for_job(seen);
      if (stop_.load(std::memory_order_acquire)) return;
      seen = id;
      // The loop's values are being written while its number is closed.
      const std::uint64_t closed = (std::uint64_t(id) << kJobShift) | kIndexMask;
      while (word_.load(std::memory_order_acquire) == closed) cpu_relax();
      // Read after the loop opened (acquire): these are that loop's values, or a
      // later loop's, and then claim() fails since the number has moved on.
      const Task task = task_.load(std::memory_order_acquire);
      void* const context = context_.load(std::memory_order_acquire);
      const Index count = count_.load(std::memory_order_acquire);
      Index i;
      while (claim(id, count, &i)) {
        task(context, i);
        done_.fetch_add(1, std::memory_order_release);
        worker_tasks_.fetch_add(1, std::memory_order_relaxed);
      }
    }
  }

  // Returns the number of a loop other than `seen` (or anything once stop_ is set):
  // polls for spin_us, then sleeps.
  std::uint32_t wait_for_job(std::uint32_t seen) {
    auto current = [this] {
      return static_cast<std::uint32_t>(word_.load(std::memory_order_acquire) >> kJobShift);
    };
    const auto spin = std::chrono::microseconds(spin_us.load(std::memory_order_relaxed));
    const auto start = std::chrono::steady_clock::now();
    for (int n = 0;; ++n) {
      if (current() != seen || stop_.load(std::memory_order_relaxed)) return current();
      if ((n & 15) == 0 && std::chrono::steady_clock::now() - start >= spin) break;
      cpu_relax();
    }
    std::unique_lock<std::mutex> lock(sleep_mutex_);
    sleepers_.fetch_add(1);
    while (static_cast<std::uint32_t>(word_.load() >> kJobShift) == seen && !stop_.load()) {
      wake_.wait(lock);
    }
    sleepers_.fetch_sub(1);
    return current();
  }

  std::mutex job_mutex_;  // held by the thread whose loop the pool runs
  std::atomic<int> threads_;
  std::vector<std::thread> workers_;
  bool start_failed_ = false;  // job_mutex_ held
  std::uint32_t job_id_ = 0;   // job_mutex_ held

  std::atomic<std::uint64_t> word_{0};
  std::atomic<Task> task_{nullptr};
  std::atomic<void*> context_{nullptr};
  std::atomic<Index> count_{0};
  std::atomic<Index> done_{0};

  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
};

// Never destroyed: a worker may still be asleep in it at exit, and a thread left
// running in the interpreter (a daemon thread) may still be using it.
Pool& pool() {
  static Pool* const p = [] {
    auto* created = new Pool();
    pthread_atfork([] { pool().before_fork(); }, [] { pool().after_fork(); },
                   [] { pool().after_fork(); });
    return created;
  }();
  return *p;
}

}  // namespace

void set_num_threads(int n) {
  if (n < 1) {
    throw std::invalid_argument("[set_num_threads] n must be >= 1, but got " + std::to_string(n));
  }
  pool().set_threads(n);
}

int get_num_threads() { return pool().threads(); }

void set_spin_microseconds(int us) {
  if (us < 0) {
    throw std::invalid_argument("[set_spin_microseconds] us must be >= 0, but got " +
                                std::to_string(us));
  }
  pool().spin_us.store(us, std::memory_order_relaxed);
}

int spin_microseconds() { return pool().spin_us.load(std::memory_order_relaxed); }

void set_contention_backoff(bool on) { pool().backoff_enabled.store(on); }
bool contention_backoff() { return pool().backoff_enabled.load(); }
std::int64_t contended_loops() { return pool().contended_loops_.load(); }
std::int64_t worker_tasks() { return pool().worker_tasks_.load(); }

std::int64_t check_loops(Index loops, Index max_count) {
  if (loops < 0 || max_count < 2) {
    throw std::invalid_argument("[check_loops] loops must be >= 0 and max_count >= 2");
  }
  std::vector<std::atomic<int>> marks(static_cast<std::size_t>(max_count));
  for (auto& m : marks) m.store(0);
  std::int64_t bad = 0;
  for (Index l = 0; l < loops; ++l) {
    const Index count = 2 + l % (max_count - 1);
    auto task = [&marks](Index i) {
      for (int k = 0; k < 64; ++k) cpu_relax();  // a little work, as a tile has
      marks[static_cast<std::size_t>(i)].fetch_add(1, std::memory_order_relaxed);
    };
    parallel_for(count, task);
    bool ok = true;
    for (Index i = 0; i < max_count; ++i) {
      const int ran = marks[static_cast<std::size_t>(i)].exchange(0);  // reset every mark
      if (ran != (i < count ? 1 : 0)) ok = false;
    }
    bad += ok ? 0 : 1;
  }
  return bad;
}

void parallel_for(Index count, Task task, void* context) { pool().run(count, task, context); }

}  // namespace bprop
