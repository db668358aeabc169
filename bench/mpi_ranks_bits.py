"""How far apart data-parallel training ends for different rank counts.

    python bench/mpi_ranks_bits.py                # 1, 2, 3 and 4 ranks
    python bench/mpi_ranks_bits.py --ranks 1 2

The issue-11 workload: 784-256-256-10 (ReLU), Adam lr 1e-3, 2 epochs over 4096
random samples, batch 128, seed 0, in float32 and float64. Each rank count runs as
``mpiexec -n R python -m mpi4py bench/mpi_ranks_bits.py --worker``, every rank with
one bprop thread; rank 0 saves the weights, and this script compares them with the
run on one process without MPI (bprop.fit without comm, one thread): the largest
absolute difference over all weights, and whether the bits are the same. One
process with comm and one without take the same steps on the same rows; more ranks
sum each minibatch's gradient from per-rank partial sums (in rank order), which
rounds differently, and training then carries the difference along.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def train(dtype: str, comm=None):
    import bprop
    bprop.set_num_threads(1)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4096, 784))
    y = rng.integers(0, 10, 4096)
    net = bprop.Network([bprop.Dense(784, 256, "relu"), bprop.Dense(256, 256, "relu"),
                         bprop.Dense(256, 10)], dtype=dtype, seed=0)
    opt = bprop.optim.Adam(net, lr=1e-3)
    bprop.fit(net, X, y, optimizer=opt, epochs=2, batch_size=128, seed=0, comm=comm)
    return np.concatenate([p.astype(np.float64).ravel() for _, p, _ in net.parameters()])


def worker(out: str) -> None:
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    result = {dtype: train(dtype, comm) for dtype in ("float32", "float64")}
    if comm.rank == 0:
        np.savez(out, **result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--worker", metavar="OUT")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    mpiexec = Path(sys.executable).with_name("mpiexec")
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    reference = {dtype: train(dtype) for dtype in ("float32", "float64")}
    print("| ranks | float32 max abs diff | float32 bitwise | float64 max abs diff | "
          "float64 bitwise |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            out = str(Path(tmp) / f"r{ranks}.npz")
            subprocess.run([mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py",
                            __file__, "--worker", out], check=True)
            got = np.load(out)
            cells = []
            for dtype in ("float32", "float64"):
                diff = np.max(np.abs(got[dtype] - reference[dtype]))
                same = got[dtype].tobytes() == reference[dtype].tobytes()
                cells += [f"{diff:.2e}", "yes" if same else "no"]
            print(f"| {ranks} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
