"""The README's train.py, shaped for tests/test_multihost.py and bench runs.

    mpiexec -f hosts -n 2 python -m mpi4py tests/multihost_train.py OUT.npz [options]
    python tests/multihost_train.py --single OUT.npz [options]   # one process, no comm

As the README's script: every rank builds the same float64 network and Adam,
loads the whole dataset and calls ``fit(..., comm=MPI.COMM_WORLD)``; rank 0
saves the weights (to OUT.npz, atomically). ``--single`` trains in one process
without a communicator (the reference).

Options: ``--epochs E`` (default 3), ``--checkpoint PATH`` with
``--checkpoint-every N`` (fit's checkpoint and resume), ``--step-seconds S``
(every rank sleeps S after each step, so that a test can act in the middle of
training). Rank 0 prints "step K" after each step and "saved" at the end.
"""

import argparse
import os
import time

import numpy as np

import bprop

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--single", action="store_true")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--checkpoint")
parser.add_argument("--checkpoint-every", type=int)
parser.add_argument("--step-seconds", type=float, default=0.0)
args = parser.parse_args()

comm = None
if not args.single:
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
rank = 0 if comm is None else comm.rank


class Progress(bprop.callbacks.Callback):
    """Prints rank 0's step count and paces every rank."""

    def __init__(self):
        self.steps = 0

    def on_batch_end(self, batch, logs):
        self.steps += 1
        if rank == 0:
            print(f"step {self.steps}", flush=True)
        if args.step_seconds:
            time.sleep(args.step_seconds)


rng = np.random.default_rng(5)
X = rng.standard_normal((600, 20))          # every rank loads the whole dataset
y = (X[:, :5] @ rng.standard_normal((5, 4))).argmax(1)
net = bprop.Network([bprop.Dense(20, 32, activation="relu"), bprop.Dense(32, 32, activation="tanh"),
                     bprop.Dense(32, 4)], dtype=np.float64, seed=0)
opt = bprop.optim.Adam(net, lr=1e-2)
bprop.fit(net, X, y, optimizer=opt, epochs=args.epochs, batch_size=64, seed=0,
          callbacks=[Progress()], checkpoint=args.checkpoint,
          checkpoint_every=args.checkpoint_every, comm=comm)
if rank == 0:                               # save once
    tmp = args.out + ".tmp.npz"
    np.savez(tmp, **{name: p for name, p, _ in net.parameters()})
    os.replace(tmp, args.out)
    print("saved", flush=True)
