"""Fits the same network again and again with 1, 2, 3 and 4 threads and reports any
run whose bits differ from the first (issue 11's determinism, under oversubscription
and a shifting heap):

    python bench/determinism_stress.py [--seconds 120]

Each trial is tests/test_determinism.py's batch-size-1 case (64-384-10 gelu/tanh
network, float32, Adam, 2 epochs of 480 one-row steps, validation and metrics) at
each thread count, with random-sized arrays allocated and dropped between fits. Before
the pool's loop publication was fixed (a worker that woke late could claim an index
of the next loop with that loop's values and run a task twice), 5 of 183 trials
differed in 100 s on a 2-vCPU machine; this is how that was found and checked.
"""

import argparse
import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import bprop  # noqa: E402
import test_determinism as T  # noqa: E402


def bits(net, opt, history):
    out = [p.tobytes() for _, p, _ in net.parameters()]
    sd = opt.state_dict()
    out += [sd["state"][p][k].tobytes() for p in sorted(sd["state"]) for k in sorted(sd["state"][p])]
    return out + [repr(sd["step"]), repr(history.loss), repr(history.val_loss)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    args = parser.parse_args()
    X, y = T._data()
    first, keep, trials, bad = None, [], 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        trials += 1
        for n in (1, 2, 3, 4):
            keep.append(np.empty(random.randint(1, 400_000), dtype=np.uint8))
            if len(keep) > 50:
                keep.pop(random.randrange(len(keep)))
            bprop.set_num_threads(n)
            net, opt, history = T._fit("float32", T.OPTIMIZERS["adam"], X, y, batch_size=1)
            result = bits(net, opt, history) + T._predictions(net, X)
            if first is None:
                first = result
            elif result != first:
                bad += 1
                print(f"trial {trials}, {n} threads: differs", flush=True)
    print(f"{trials} trials x 4 thread counts in {args.seconds:.0f} s: {bad} differed "
          f"({os.cpu_count()} CPUs, bprop {bprop.__version__})")


if __name__ == "__main__":
    main()
