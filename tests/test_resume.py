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


def _mpiexec():
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else shutil.which("mpiexec")


class Run:
    """The worker in its own process group, its stdout read line by line."""

    def __init__(self, args, mpi, stderr):
        cmd = [sys.executable, WORKER, *args]
        if mpi:
            cmd = [_mpiexec(), "-n", "2", *cmd, "mpi"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
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


def _uninterrupted(tmp, kind, mpi):
    out = tmp / "reference"
    out.mkdir()
    start = time.monotonic()
    run = Run([kind, "-", str(out)], mpi, tmp / "reference.err")
    assert run.wait_for("start")
    begun = time.monotonic()
    run.finish()
    return out, begun - start, time.monotonic() - begun


def _killed_until_done(tmp, kind, mpi, train_seconds):
    """Runs the worker with a checkpoint, killing it KILLS times, then lets it end."""
    out = tmp / "resumed"
    out.mkdir()
    ckpt = str(out / "run.ckpt")
    rnd = random.Random(1234)
    kills = in_write = 0
    while True:
        run = Run([kind, ckpt, str(out)], mpi, tmp / f"run{kills}.err")
        if kills >= KILLS:
            run.finish()
            return out, kills, in_write
        assert run.wait_for("start"), run.error()
        if kills % 3 == 0:  # inside a checkpoint write (each pauses 20 ms before its rename)
            for _ in range(rnd.randrange(1, 4)):
                if not run.wait_for("W"):
                    break
            time.sleep(rnd.uniform(0.0, 0.015))
            in_write += 1
        else:  # anywhere: a random moment of the first twentieth of the training
            time.sleep(rnd.uniform(0.0, train_seconds / KILLS))
        finished = run.proc.poll() is not None
        run.kill()
        if finished:  # it ended before the kill: it must have ended well
            assert run.proc.returncode == 0, run.error()
            in_write -= kills % 3 == 0
            continue
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
    reference, _, seconds = _uninterrupted(tmp_path, kind, mpi)
    resumed, kills, in_write = _killed_until_done(tmp_path, kind, mpi, seconds)
    assert kills >= KILLS and in_write >= KILLS // 4
    with np.load(reference / "result.npz") as a, np.load(resumed / "result.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        record = json.loads(a["history"].tobytes())
        assert json.loads(b["history"].tobytes()) == record
        for name in a.files:
            assert a[name].tobytes() == b[name].tobytes(), name  # bitwise
    assert record["step"] == 2400 and len(record["loss"]) == 30
    assert _csv_without_time(reference / "log0.csv") == _csv_without_time(resumed / "log0.csv")
    leftovers = [p.name for p in resumed.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) <= 1, leftovers  # a killed write's temporary is removed by the next
