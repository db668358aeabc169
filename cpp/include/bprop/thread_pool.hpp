// bprop's own threads: the calling thread plus a few workers that run the tasks
// of one parallel loop (the tiles of a matrix product) at a time.
//
// Every thread takes the next task index from one shared counter, so a thread
// the OS deschedules delays only the task it holds, and the thread count never
// changes what a task computes: the core's results are the same bits for any
// count. After a loop the workers poll for the next one for a short while
// (spin_microseconds), then sleep on a condition variable, so an idle pool
// takes no core from NumPy or another process.
#pragma once

#include <cstdint>

#include "bprop/types.hpp"

namespace bprop {

/// Sets the number of threads that run parallel loops: the calling thread plus
/// n - 1 workers, started on first use. Waits for a loop in progress to end.
/// Throws std::invalid_argument for n < 1.
void set_num_threads(int n);

/// The thread count; initially the number of CPUs this process may run on
/// (sched_getaffinity).
int get_num_threads();

/// How long an idle worker polls for the next loop before it sleeps, in
/// microseconds (0: sleep at once). A tuning knob for benchmarks.
void set_spin_microseconds(int us);
int spin_microseconds();

/// Whether the pool backs off to the calling thread alone after a loop in which a
/// worker lost its core (see thread_pool.cpp; on by default), and how many loops
/// have triggered it. Tuning knobs for benchmarks.
void set_contention_backoff(bool on);
bool contention_backoff();
std::int64_t contended_loops();

/// How many tasks the workers (not the calling threads) have run, for tests.
std::int64_t worker_tasks();

/// For tests: runs `loops` parallel loops of 2 to max_count tasks (cycling), each
/// task marking its index, and returns how many loops did not run every one of
/// their tasks exactly once by the time parallel_for returned.
std::int64_t check_loops(Index loops, Index max_count);

/// A task of a parallel loop: runs index i with the loop's context. It must not
/// throw, and it must not start a parallel loop itself.
using Task = void (*)(void* context, Index i);

/// Runs task(context, i) for every i in [0, count) and returns once all have
/// finished. The calling thread and the workers take indices from a shared
/// counter. One loop runs on the pool at a time: if another thread's loop holds
/// it, or count is 1, or the thread count is 1, the tasks run here, in order.
/// Allocates nothing once the workers have started.
void parallel_for(Index count, Task task, void* context);

/// parallel_for over a callable f(i) (a lambda), without allocating.
template <typename F>
void parallel_for(Index count, F& f) {
  parallel_for(count, [](void* context, Index i) { (*static_cast<F*>(context))(i); }, &f);
}

}  // namespace bprop
