"""What BatchNorm, ReLU as its own layer and Dropout add to a Dense step: one float32
train_step (plain SGD, softmax cross-entropy) of small-bn's widths, 784-512-512-10 at
batch 128, built four ways:

    python bench/layer_overhead.py [--threads N]

dense      Dense(relu) x 2, Dense(10)
bn         [Dense, BatchNorm, Activation("relu"), Dropout(0.2)] x 2, Dense(10) (small-bn)
bn-nodrop  [Dense, BatchNorm, Activation("relu")] x 2, Dense(10)
drop       [Dense(relu), Dropout(0.2)] x 2, Dense(10)

Prints the best of 7 loops of 100 steps (after 50 warm-up steps) for each, in
microseconds per step; the differences from "dense" are the layers' cost.
"""

import argparse
import time

import numpy as np

import bprop

BLOCKS = {
    "dense": lambda a, b: [bprop.Dense(a, b, activation="relu")],
    "bn": lambda a, b: [bprop.Dense(a, b), bprop.BatchNorm(b), bprop.Activation("relu"),
                        bprop.Dropout(0.2)],
    "bn-nodrop": lambda a, b: [bprop.Dense(a, b), bprop.BatchNorm(b), bprop.Activation("relu")],
    "drop": lambda a, b: [bprop.Dense(a, b, activation="relu"), bprop.Dropout(0.2)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="bprop threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        bprop.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((128, 784)).astype(np.float32)
    y = rng.integers(0, 10, 128)
    print(f"bprop {bprop.__version__}, {bprop.get_num_threads()} threads; us per step")
    base = None
    for kind, block in BLOCKS.items():
        layers = block(784, 512) + block(512, 512) + [bprop.Dense(512, 10)]
        net = bprop.Network(layers, seed=0)
        opt = bprop.optim.SGD(net, lr=1e-3)
        for _ in range(50):
            net.train_step(X, y, optimizer=opt)
        best = float("inf")
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(100):
                net.train_step(X, y, optimizer=opt)
            best = min(best, (time.perf_counter() - start) / 100)
        base = best if base is None else base
        print(f"{kind:10s} {best * 1e6:8.1f}  {100 * (best / base - 1):+6.1f}%")


if __name__ == "__main__":
    main()
