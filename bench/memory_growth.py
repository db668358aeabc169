"""Memory over repeated network lifetimes, with the cycle collector off.

    python bench/memory_growth.py [--rounds 300]

Each round builds a 784-512-10 network, fits one epoch of 2048 random samples
(batch 128, Adam) and drops it. Prints RssAnon before, every 50 rounds, and after,
and how many networks are still alive (weak references): a network must be freed
by reference counting when its last reference goes (issue 10, item 4).
"""

from __future__ import annotations

import argparse
import gc
import weakref

import numpy as np

import bprop


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2048, 784)).astype(np.float32)
    y = rng.integers(0, 10, 2048)
    gc.collect()
    gc.disable()
    alive = []
    print(f"before: RssAnon {rss_anon_mb():.0f} MB")
    for i in range(1, args.rounds + 1):
        net = bprop.Network([bprop.Dense(784, 512, activation="relu"), bprop.Dense(512, 10)],
                            seed=i)
        bprop.fit(net, X, y, epochs=1, batch_size=128, seed=i)
        alive.append(weakref.ref(net))
        del net
        if i % 50 == 0:
            print(f"round {i}: RssAnon {rss_anon_mb():.0f} MB, networks alive "
                  f"{sum(r() is not None for r in alive)}")
    gc.enable()


if __name__ == "__main__":
    main()
