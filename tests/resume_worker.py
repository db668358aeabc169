"""A fit of a few thousand steps that tests/test_resume.py kills and reruns.

    python tests/resume_worker.py OPTIMIZER CHECKPOINT_OR_- RESULT_DIR [mpi]

OPTIMIZER is "sgd" (momentum 0.9, StepLR per epoch) or "adam" (OneCycleLR per
minibatch step); both train with validation_split, EarlyStopping (patience large
enough to run every epoch; it restores the best weights at the end) and a
CSVLogger. CHECKPOINT "-" trains without a checkpoint (the uninterrupted run).
With "mpi" it runs under mpiexec (comm=MPI.COMM_WORLD; rank 0 writes the results).

Rank 0 prints "start" once the data are ready and "W" as each checkpoint write
begins; with BPROP_TEST_PAUSE=1 in the environment each write then pauses 20 ms
between writing the temporary file and renaming it, so that the test can kill
the process inside a write. When fit
returns, the final weights, optimizer state and History go to RESULT_DIR/result.npz
(atomically), and the worker prints "done".
"""

import json
import os
import sys
import time

import numpy as np

import bprop
from bprop import _resume
from bprop.optim import SGD, Adam, OneCycleLR, StepLR

kind, checkpoint, out = sys.argv[1], sys.argv[2], sys.argv[3]
comm = None
if len(sys.argv) > 4 and sys.argv[4] == "mpi":
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
rank = 0 if comm is None else comm.rank

rng = np.random.default_rng(7)
X = rng.standard_normal((1600, 20))
y = (X[:, :4] @ rng.standard_normal((4, 4)) + 0.5 * rng.standard_normal((1600, 4))).argmax(1)
net = bprop.Network([bprop.Dense(20, 32, activation="relu"), bprop.Dropout(0.1),
                     bprop.Dense(32, 32), bprop.BatchNorm(32), bprop.Activation("tanh"),
                     bprop.Dense(32, 4)], seed=3, dtype=np.float64)
epochs, batch_size = 30, 16   # 1280 training rows: 80 steps per epoch, 2400 in all
if kind == "sgd":
    opt = SGD(net, lr=0.05, momentum=0.9)
    schedule = StepLR(opt, step_size=10, gamma=0.5)
else:
    opt = Adam(net, lr=1e-3)
    schedule = OneCycleLR(opt, max_lr=5e-3, epochs=epochs, steps_per_epoch=80)
callbacks = [schedule, bprop.callbacks.EarlyStopping("val_loss", patience=100,
                                                     restore_best_weights=True),
             bprop.callbacks.CSVLogger(os.path.join(out, f"log{rank}.csv"))]

original = _resume._atomic_write
pause = os.environ.get("BPROP_TEST_PAUSE") == "1"


def slow_write(path, write):
    def paused(f):
        write(f)
        if pause:
            f.flush()
            time.sleep(0.02)  # inside the write: the temporary file exists, unrenamed
    print("W", flush=True)
    original(path, paused)


_resume._atomic_write = slow_write
if rank == 0:
    print("start", flush=True)
history = bprop.fit(net, X, y, optimizer=opt, epochs=epochs, batch_size=batch_size, seed=11,
                    validation_split=0.2, callbacks=callbacks, metrics=["accuracy"],
                    checkpoint=None if checkpoint == "-" else checkpoint,
                    checkpoint_every=None if checkpoint == "-" else 25, comm=comm)
if rank == 0:
    arrays = {f"param.{name}": p for name, p, _ in net.parameters()}
    arrays.update({f"buffer.{name}": b for name, b in net.buffers()})
    sd = opt.state_dict()
    for pname, slots in sd["state"].items():
        arrays.update({f"opt.{pname}.{k}": a for k, a in slots.items()})
    record = {k: v for k, v in history.history.items() if k != "time"}
    record.update(step=sd["step"], lr=opt.lr, best_epoch=history.best_epoch,
                  dropout_step=net.dropout_step, stopped_early=history.stopped_early)
    arrays["history"] = np.frombuffer(json.dumps(record).encode(), np.uint8)
    tmp = os.path.join(out, "result.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, os.path.join(out, "result.npz"))
    print("done", flush=True)
