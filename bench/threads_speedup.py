"""Separate networks on separate Python threads: the speed-up from releasing the GIL.

    python bench/threads_speedup.py            # about 30 s
    python bench/threads_speedup.py --quick

bprop.set_num_threads(1) keeps every product on its calling thread (no help from
bprop's own workers), so that any parallelism comes from the Python threads. Two identical workloads run one after
the other (sequential) and on two threads at once (parallel), interleaved round
by round; the best round of each is compared. Also printed: the parallel
rounds' CPU time over wall time (2.0 = both threads busy all the time), which
says how much the other processes on the machine took away.

Workloads: fit (a 128-256-256-10 relu network, batch 128, Adam) and predict
(the same network, 4096 rows in chunks of 256).
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np

import bprop
from bprop import optim


def network():
    return bprop.Network([bprop.Dense(128, 256, "relu"), bprop.Dense(256, 256, "relu"),
                          bprop.Dense(256, 10)], seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 4 if args.quick else 10
    threads_before = bprop.get_num_threads()
    bprop.set_num_threads(1)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4096, 128)).astype(np.float32)
    y = rng.integers(0, 10, 4096)

    def fit_job():
        net = network()
        bprop.fit(net, X, y, optimizer=optim.Adam(net), epochs=3, batch_size=128, seed=0)

    predict_net = network()

    def predict_job():
        for _ in range(20):
            predict_net.predict(X, batch_size=256)

    print(f"bprop {bprop.__version__}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}, bprop.set_num_threads(1)")
    try:
        for name, job in (("fit", fit_job), ("predict", predict_job)):
            job()  # warm up
            seq, par, busy = [], [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                job()
                job()
                seq.append(time.perf_counter() - t0)
                cpu = []

                def timed(job=job, cpu=cpu):
                    c0 = time.thread_time()
                    job()
                    cpu.append(time.thread_time() - c0)

                threads = [threading.Thread(target=timed) for _ in range(2)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                par.append(wall)
                busy.append(sum(cpu) / wall)
            median = np.median(seq) / np.median(par)
            print(f"{name:>8}: sequential {min(seq):.3f} s, parallel {min(par):.3f} s, "
                  f"speed-up {min(seq) / min(par):.2f}x (median {median:.2f}x); "
                  f"CPU/wall in parallel {max(busy):.2f} best, {np.median(busy):.2f} median")
    finally:
        bprop.set_num_threads(threads_before)


if __name__ == "__main__":
    main()
