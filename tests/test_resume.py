"""fit(..., checkpoint=, checkpoint_every=) survives SIGKILL and resumes bit for bit.

tests/resume_worker.py trains 2400 steps (30 epochs) with a schedule, validation,
EarlyStopping and a CSVLogger. The test kills it with SIGKILL at random moments,
at least 20 times and a third of them inside a checkpoint write, reruns it each
time, and compares what the finished run leaves (weights, buffers, optimizer
state, step count, History without its wall times, the CSV log without its time
column) with an uninterrupted run without a checkpoint: all bitwise equal.
Also under ``mpiexec -n 2`` (rank 0 writes the checkpoint, both ranks read it).
"""

import csv
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

WORKER = str(Path(__file__).with_name("resume_worker.py"))
KILLS = 20
WRITES = 30 * 80 // 25 + 30  # checkpoints in the worker's fit: every 25 steps, each epoch


def _mpiexec():
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else shutil.which("mpiexec")


class Run:
    """The worker in its own process group, its stdout read line by line."""

    def __init__(self, args, mpi, stderr, pause=False):
        cmd = [sys.executable, WORKER, *args]
        if mpi:
            cmd = [_mpiexec(), "-n", "2", *cmd, "mpi"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                   BPROP_TEST_PAUSE="1" if pause else "0")
        self.stderr = stderr
        with open(stderr, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                         start_new_session=True, env=env)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.put(line.strip())
        self.lines.put(None)

    def error(self):
        return Path(self.stderr).read_text()[-3000:]

    def wait_for(self, marker, timeout=120.0):
        """True once the worker printed `marker`; False if it ended first."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                return False
            if line == marker:
                return True

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)

    def finish(self, timeout=300):
        self.proc.wait(timeout=timeout)
        assert self.proc.returncode == 0, self.error()


def _uninterrupted(tmp, name, kind, mpi, checkpoint):
    """A run that nothing interrupts (with or without a checkpoint): its results'
    folder and the seconds it trained."""
    out = tmp / name
    out.mkdir()
    run = Run([kind, str(out / "run.ckpt") if checkpoint else "-", str(out)], mpi,
              tmp / f"{name}.err")
    assert run.wait_for("start"), run.error()
    begun = time.monotonic()
    run.finish()
    return out, time.monotonic() - begun


def _killed_until_done(tmp, kind, mpi, train_seconds):
    """Runs the worker with a checkpoint, killing it KILLS times, then lets it end."""
    out = tmp / "resumed"
    out.mkdir()
    ckpt = str(out / "run.ckpt")
    rnd = random.Random(1234)
    kills = in_write = 0
    positions = []  # where each rerun resumed: (epoch, minibatch) of the checkpoint
    while True:
        if os.path.exists(ckpt):
            with np.load(ckpt) as z:
                fit = json.loads(z["fit"].tobytes())
            positions.append((fit["epoch"], fit["batch"]))
        in_a_write = kills % 3 == 0
        run = Run([kind, ckpt, str(out)], mpi, tmp / f"run{kills}.err", pause=in_a_write)
        if kills >= KILLS:
            run.finish()
            return out, kills, in_write, positions
        assert run.wait_for("start"), run.error()
        # after 1 to 7 checkpoint writes have begun (the run progresses whatever the
        # machine's speed) ...
        for _ in range(rnd.randint(1, 7)):
            if not run.wait_for("W"):
                break
        if in_a_write:  # ... inside that write (each pauses 20 ms before its rename)
            time.sleep(rnd.uniform(0.0, 0.015))
        else:  # ... at a random moment before the next write ends
            time.sleep(rnd.uniform(0.0, train_seconds / WRITES))
        finished = run.proc.poll() is not None
        run.kill()
        if finished:  # it ended before the kill: too few kills, as the test will say
            assert run.proc.returncode == 0, run.error()
            return out, kills, in_write, positions
        in_write += in_a_write
        kills += 1


def _csv_without_time(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.pop("time")
    return rows


@pytest.mark.parametrize("mpi", [False, True], ids=["one-process", "mpiexec-n-2"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_fit_killed_20_times_ends_bitwise_where_an_uninterrupted_one_does(tmp_path, kind,
                                                                             mpi):
    if mpi:
        pytest.importorskip("mpi4py")
        if _mpiexec() is None:
            pytest.skip("no mpiexec: pip install mpich")
    reference, _ = _uninterrupted(tmp_path, "reference", kind, mpi, checkpoint=False)
    checkpointed, seconds = _uninterrupted(tmp_path, "checkpointed", kind, mpi, checkpoint=True)
    resumed, kills, in_write, positions = _killed_until_done(tmp_path, kind, mpi, seconds)
    assert kills >= KILLS and in_write >= KILLS // 4
    # the reruns resumed from many places, each further on (the last: not the start)
    assert len(set(positions)) >= KILLS // 2 and positions == sorted(positions), positions
    print(f"{kills} kills ({in_write} inside a write); resumed from (epoch, batch) {positions}")
    for run in (checkpointed, resumed):
        with np.load(reference / "result.npz") as a, np.load(run / "result.npz") as b:
            assert sorted(a.files) == sorted(b.files)
            record = json.loads(a["history"].tobytes())
            assert json.loads(b["history"].tobytes()) == record
            for name in a.files:
                assert a[name].tobytes() == b[name].tobytes(), name  # bitwise
        assert _csv_without_time(reference / "log0.csv") == _csv_without_time(run / "log0.csv")
    assert record["step"] == 2400 and len(record["loss"]) == 30
    leftovers = [p.name for p in resumed.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) <= 1, leftovers  # a killed write's temporary is removed by the next


# ---- in one process: positions, refusals, interrupts -----------------------------------

import bprop  # noqa: E402
from bprop.optim import SGD, Adam, LinearLR  # noqa: E402


def _problem(n=240, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 6))
    y = (X[:, :3] @ rng.standard_normal((3, 3))).argmax(1)
    return X, y


def _net():
    return bprop.Network([bprop.Dense(6, 12, activation="relu"), bprop.Dropout(0.2),
                          bprop.Dense(12, 3)], seed=5, dtype=np.float64)


class Crash(Exception):
    pass


class CrashAt(bprop.callbacks.Callback):
    """Raises Crash after the step-th minibatch step of the fit (counted over epochs)."""

    def __init__(self, step):
        self.step, self.seen = step, 0

    def on_batch_end(self, batch, logs):
        self.seen += 1
        if self.seen == self.step:
            raise Crash


class Counter(bprop.callbacks.Callback):
    """A user callback with state: the steps it has seen."""

    def __init__(self):
        self.steps = 0

    def on_batch_end(self, batch, logs):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps, "trace": np.arange(3.0) * self.steps}

    def load_state_dict(self, state):
        assert np.array_equal(state["trace"], np.arange(3.0) * state["steps"])
        self.steps = state["steps"]


def _fit(path, crash=None, **kw):
    X, y = _problem()
    net = _net()
    opt = SGD(net, lr=0.1, momentum=0.9)
    counter = Counter()
    callbacks = [LinearLR(opt, start_factor=0.2, total_iters=15, interval="step"), counter]
    if crash is not None:
        callbacks.append(CrashAt(crash))
    args = dict(optimizer=opt, epochs=4, batch_size=32, seed=2, validation_split=0.25,
                early_stopping=10, metrics=["accuracy"], callbacks=callbacks,
                checkpoint=path, checkpoint_every=path and 2)
    args.update(kw)
    history = bprop.fit(net, X, y, **args)
    return net, opt, history, counter


def _same(a, b):
    (n1, o1, h1, c1), (n2, o2, h2, c2) = a, b
    for (_, p, _), (_, q, _) in zip(n1.parameters(), n2.parameters()):
        assert p.tobytes() == q.tobytes()
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["step"] == s2["step"]
    for name in s1["state"]:
        for k in s1["state"][name]:
            assert s1["state"][name][k].tobytes() == s2["state"][name][k].tobytes()
    d1, d2 = h1.history, h2.history
    d1.pop("time"), d2.pop("time")
    assert d1 == d2 and h1.best_epoch == h2.best_epoch
    assert n1.dropout_step == n2.dropout_step and c1.steps == c2.steps


@pytest.mark.parametrize("crash", [1, 2, 3, 6, 7, 8, 14, 15, 16, 23, 24])
def test_a_fit_that_raised_at_any_step_resumes_bitwise(tmp_path, crash):
    """6 steps per epoch (180 rows / 32), a checkpoint every 2 and at each epoch's end:
    crashes before the first checkpoint, on one, between two, and at epoch ends."""
    reference = _fit(None)
    path = str(tmp_path / "run.ckpt")
    with pytest.raises(Crash):
        _fit(path, crash=crash)
    _same(_fit(path), reference)


def test_a_finished_run_returns_its_result_without_training(tmp_path):
    path = str(tmp_path / "run.ckpt")
    first = _fit(path)
    again = _fit(path)
    _same(again, first)
    assert again[1].state_dict()["step"] == 24


def test_a_keyboard_interrupt_leaves_the_last_checkpoint_valid(tmp_path):
    class Interrupt(bprop.callbacks.Callback):
        def on_batch_end(self, batch, logs):
            if batch == 3:
                raise KeyboardInterrupt

    path = str(tmp_path / "run.ckpt")
    with pytest.raises(KeyboardInterrupt):
        _fit_with(path, Interrupt())
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]
    _same(_fit(path), _fit(None))


def _fit_with(path, extra):
    X, y = _problem()
    net = _net()
    opt = SGD(net, lr=0.1, momentum=0.9)
    callbacks = [LinearLR(opt, start_factor=0.2, total_iters=15, interval="step"), Counter(),
                 extra]
    return bprop.fit(net, X, y, optimizer=opt, epochs=4, batch_size=32, seed=2,
                     validation_split=0.25, early_stopping=10, metrics=["accuracy"],
                     callbacks=callbacks, checkpoint=path, checkpoint_every=2)


@pytest.mark.parametrize("change, what", [
    (dict(batch_size=16), "arguments: epochs=4, batch_size=32"),
    (dict(epochs=5), "arguments: epochs=4,"),
    (dict(X_scale=2.0), "data: training"),
    (dict(optimizer="adam"), "optimizer: SGD("),
    (dict(width=13), "network: float64"),
])
def test_a_checkpoint_of_another_configuration_is_refused_naming_the_difference(
        tmp_path, change, what):
    path = str(tmp_path / "run.ckpt")
    with pytest.raises(Crash):
        _fit(path, crash=9)
    X, y = _problem()
    X = X * change.get("X_scale", 1.0)
    net = bprop.Network([bprop.Dense(6, change.get("width", 12), activation="relu"),
                         bprop.Dropout(0.2), bprop.Dense(change.get("width", 12), 3)], seed=5,
                        dtype=np.float64)
    opt = Adam(net) if change.get("optimizer") == "adam" else SGD(net, lr=0.1, momentum=0.9)
    before = [p.copy() for _, p, _ in net.parameters()]
    kw = dict(epochs=4, batch_size=32)
    kw.update({k: v for k, v in change.items() if k in kw})
    with pytest.raises(ValueError, match="different configuration") as info:
        bprop.fit(net, X, y, optimizer=opt, seed=2, validation_split=0.25, early_stopping=10,
                  metrics=["accuracy"], checkpoint=path, checkpoint_every=2,
                  callbacks=[LinearLR(opt, start_factor=0.2, total_iters=15, interval="step"),
                             Counter()], **kw)
    assert what in str(info.value) and "in the file" in str(info.value)
    for b, (_, p, _) in zip(before, net.parameters()):
        assert np.array_equal(b, p)  # refused before anything changed
    assert opt.state_dict()["step"] == 0


def test_a_damaged_checkpoint_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    path.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(bprop.CheckpointError, match="not a readable fit checkpoint"):
        _fit(str(path))


def test_checkpoint_arguments_are_checked():
    X, y = _problem()
    net = _net()
    with pytest.raises(ValueError, match="checkpoint_every=3 needs a checkpoint file"):
        bprop.fit(net, X, y, checkpoint_every=3)
    with pytest.raises(ValueError, match="checkpoint_every"):
        bprop.fit(net, X, y, checkpoint="x.ckpt", checkpoint_every=0)
    with pytest.raises(TypeError, match="path must be a str"):
        bprop.fit(net, X, y, checkpoint=3)


@pytest.mark.parametrize("kind", ["sparse float64", "float32"])
def test_sparse_and_float32_fits_resume_bitwise(tmp_path, kind):
    sparse = pytest.importorskip("scipy.sparse")
    X, y = _problem()
    dtype = np.float32 if kind == "float32" else np.float64
    if kind.startswith("sparse"):
        X[np.abs(X) < 0.7] = 0.0
        X = sparse.csr_matrix(X)

    def run(path, crash=None):
        net = bprop.Network([bprop.Dense(6, 12, activation="relu"), bprop.Dense(12, 3)],
                            seed=5, dtype=dtype)
        opt = Adam(net, lr=1e-2)
        callbacks = [] if crash is None else [CrashAt(crash)]
        h = bprop.fit(net, X, y, optimizer=opt, epochs=3, batch_size=16, seed=4,
                      validation_split=0.2, callbacks=callbacks, checkpoint=path,
                      checkpoint_every=path and 5)
        return [p.copy() for _, p, _ in net.parameters()], opt.state_dict(), h

    reference = run(None)
    path = str(tmp_path / "run.ckpt")
    with pytest.raises(Crash):
        run(path, crash=17)
    params, state, history = run(path)
    for a, b in zip(reference[0], params):
        assert a.tobytes() == b.tobytes()
    assert reference[1]["step"] == state["step"] == 36
    assert reference[2].loss == history.loss and reference[2].val_loss == history.val_loss
