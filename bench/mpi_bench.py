"""Data-parallel fit over MPI: time per step and the allreduce's share, 1 and 2 ranks.

    python bench/mpi_bench.py            # about 50 s on 2 cores
    python bench/mpi_bench.py --quick    # one round, fewer steps
    python bench/mpi_bench.py --hosts 2  # ranks on 2 hosts over TCP (root, iproute2)

The workloads of bench/run.py, float32, ReLU, softmax cross-entropy, Adam, with
the same global minibatch however many ranks train on it:

* small:  784-256-256-10,    batch 128 (0.27 M parameters, 1.1 MB of gradients)
* medium: 1024-1024-1024-10, batch 256 (2.1 M parameters, 8.4 MB of gradients)

Each configuration runs as its own ``mpiexec -n R python bench/mpi_bench.py
--worker``: one process without comm (plain fit), one rank with comm, and two
ranks with comm; with 2 ranks on a 2-core machine each rank gets one BLAS thread,
so compare them with the 1-process runs at 1 and at 2 threads.

What is timed, in rank 0. ms/step: the epoch's time (History.time, the slowest
rank's) over its steps, median over the epochs after the first. Under comm, fit
runs with the communicator wrapped in a proxy that times every ``Allreduce``: a
step lasts from the end of one step's last allreduce (the loss) to the next
one's, and its communication time is the time spent inside that step's
allreduces (one per parameter, one for the loss), waiting for the other rank
included; reported are the medians over steps of that time and of its share of
the step. "raw allreduce" is the same allreduces alone, back to back, with no
training around them (median of 30).

``--hosts N`` compares N ranks on one host (shared memory) with N hosts x 1 rank
over TCP: the hosts are network namespaces on a bridge (tools/netns_hosts.py,
as in tests/test_multihost.py), mpiexec reaches them through
tools/netns_launch.py, and UCX is held to TCP on their interface. The bytes
that crossed each host's link are printed with the table. A veth pair is a
real TCP/IP stack but no wire: copies and protocol processing are counted, the
latency and bandwidth of a physical network are not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bprop

TOOLS = Path(__file__).resolve().parent.parent / "tools"

WORKLOADS = {
    "small": ([784, 256, 256, 10], 128),
    "medium": ([1024, 1024, 1024, 10], 256),
}


class TimedComm:
    """A communicator that forwards everything and times ``Allreduce``: per step
    (``calls_per_step`` SUM allreduces) it records (step seconds, comm seconds)."""

    def __init__(self, comm, calls_per_step: int) -> None:
        from mpi4py import MPI

        self._comm = comm
        self._sum = MPI.SUM
        self._per_step = calls_per_step
        self._calls = 0
        self._comm_time = 0.0
        self._last_end = None
        self.steps = []

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def Allreduce(self, sendbuf, recvbuf, op=None):
        start = time.perf_counter()
        self._comm.Allreduce(sendbuf, recvbuf, op=op)
        end = time.perf_counter()
        if op is not self._sum:
            return  # the per-epoch ones (slowest time, stop)
        self._comm_time += end - start
        self._calls += 1
        if self._calls == self._per_step:
            if self._last_end is not None:
                self.steps.append((end - self._last_end, self._comm_time))
            self._last_end = end
            self._calls = 0
            self._comm_time = 0.0


def network(sizes):
    layers = [bprop.Dense(a, b, "relu") for a, b in zip(sizes[:-2], sizes[1:-1])]
    layers.append(bprop.Dense(sizes[-2], sizes[-1]))
    return bprop.Network(layers, dtype="float32", seed=0)


def worker(args) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    bprop.set_num_threads(args.threads)
    results = {}
    for name, (sizes, batch) in WORKLOADS.items():
        steps_per_epoch = 12 if args.quick else 25
        epochs = 2 if args.quick else 4
        rng = np.random.default_rng(0)
        X = rng.standard_normal((batch * steps_per_epoch, sizes[0])).astype(np.float32)
        y = rng.integers(0, sizes[-1], batch * steps_per_epoch)
        net = network(sizes)
        opt = bprop.optim.Adam(net, lr=1e-4)
        out = {"parameters": net.num_parameters, "batch": batch}
        timed = None if args.no_comm else TimedComm(comm, 2 * (len(sizes) - 1) + 1)
        history = bprop.fit(net, X, y, optimizer=opt, batch_size=batch, epochs=epochs + 1,
                            seed=0, comm=timed)
        # the first epoch warms up
        out["step_ms"] = statistics.median(history.time[1:]) / steps_per_epoch * 1e3
        if timed is not None:
            steps = timed.steps[steps_per_epoch:]
            out["comm_ms"] = statistics.median(c for _, c in steps) * 1e3
            out["comm_share"] = statistics.median(c / s for s, c in steps)
            grads = [np.zeros_like(g) for _, _, g in net.parameters()]
            raw = []
            for _ in range(30):
                comm.Barrier()
                start = time.perf_counter()
                for g in grads:
                    comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)
                raw.append(time.perf_counter() - start)
            out["raw_allreduce_ms"] = statistics.median(raw) * 1e3
        out["samples_per_s"] = batch / out["step_ms"] * 1e3
        results[name] = out
    if comm.Get_rank() == 0:
        results["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
        import mpi4py

        results["mpi4py"] = mpi4py.__version__
        print("RESULT " + json.dumps(results), flush=True)


def run(ranks: int, threads: int, quick: bool, no_comm: bool = False,
        hostfile: Path | None = None) -> dict:
    mpiexec = Path(sys.executable).with_name("mpiexec")
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    if mpiexec is None:
        sys.exit("no mpiexec: pip install mpi4py mpich")
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    hosts = []
    if hostfile is not None:  # one rank per host; the launcher enters the host's namespace
        hosts = [mpiexec, "-launcher-exec", str(TOOLS / "netns_launch.py"), "-f",
                 str(hostfile), "-ppn", "1"]
        # UCX would move the data through shared memory across namespaces
        env.update(UCX_TLS="tcp", UCX_NET_DEVICES="eth0")
    cmd = (hosts or [mpiexec]) + ["-n", str(ranks), sys.executable, "-m", "mpi4py", __file__,
                                  "--worker", "--threads", str(threads)] + \
        (["--quick"] if quick else []) + (["--no-comm"] if no_comm else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env,
                          check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[0][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, one round")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of all configurations (default 3, 1 with --quick)")
    parser.add_argument("--hosts", type=int, default=None, metavar="N",
                        help="N ranks on one host against N hosts x 1 rank over TCP "
                             "(network namespaces: needs root and iproute2)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-comm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    cores = os.cpu_count() or 1
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    configs = [
        ("1 process, no comm", 1, cores, True, False),
        ("1 process, no comm", 1, 1, True, False),
        ("1 rank, comm", 1, 1, False, False),
        ("2 ranks, comm", 2, max(1, cores // 2), False, False),
    ]
    with contextlib.ExitStack() as stack:
        hostfile = None
        if args.hosts is not None:
            sys.path.insert(0, str(TOOLS))
            import netns_hosts

            reason = netns_hosts.unavailable()
            if reason:
                sys.exit(f"--hosts: {reason}")
            n = args.hosts
            hosts = stack.enter_context(netns_hosts.hosts(n))
            hostfile = netns_hosts.write_hostfile(
                Path(stack.enter_context(tempfile.TemporaryDirectory())) / "hosts", hosts)
            configs = [
                ("1 process, no comm", 1, 1, True, False),
                (f"{n} ranks on 1 host, comm (shared memory)", n, 1, False, False),
                (f"{n} hosts x 1 rank, comm (TCP)", n, 1, False, True),
            ]
            before = [netns_hosts.counters(h) for h in hosts]
        # Rounds of all configurations, one after the other: on a shared machine the
        # least disturbed round of each (the fastest) is reported, with the median.
        rounds = {i: [] for i in range(len(configs))}
        info = {}
        for _ in range(args.rounds):
            for i, (_, ranks, threads, no_comm, over_hosts) in enumerate(configs):
                res = run(ranks, threads, args.quick, no_comm,
                          hostfile if over_hosts else None)
                info = {k: res.pop(k) for k in ("mpi", "mpi4py")}
                rounds[i].append(res)
        crossed = ""
        if hostfile is not None:
            crossed = "; bytes out/in of each host's link over the TCP runs: " + ", ".join(
                f"{h.name} {a['sent_bytes'] - b['sent_bytes']:,}/"
                f"{a['received_bytes'] - b['received_bytes']:,}"
                for h, b, a in zip(hosts, before, (netns_hosts.counters(h) for h in hosts)))
    print("| workload | run | threads/rank | ms/step best (median) | samples/s "
          "| allreduce ms/step | allreduce / step | raw allreduce ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (sizes, batch) in WORKLOADS.items():
        for i, (label, _, threads, _, _) in enumerate(configs):
            runs = [res[name] for res in rounds[i]]
            r = min(runs, key=lambda x: x["step_ms"])
            median = statistics.median(x["step_ms"] for x in runs)
            comm_cols = ("| - | - | -" if "comm_ms" not in r else
                         f"| {r['comm_ms']:.2f} | {100 * r['comm_share']:.1f} % "
                         f"| {r['raw_allreduce_ms']:.2f}")
            print(f"| {name} {'-'.join(map(str, sizes))}, batch {batch} | {label} | {threads} "
                  f"| {r['step_ms']:.2f} ({median:.2f}) | {r['samples_per_s']:.0f} "
                  f"{comm_cols} |")
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")),
                       cpu)
    print(f"\n{cpu}, {cores} logical CPUs; Python {platform.python_version()}, NumPy "
          f"{np.__version__}, bprop {bprop.__version__}, mpi4py {info['mpi4py']}, "
          f"{info['mpi']}; float32, Adam; the fastest of {args.rounds} round(s), "
          f"{'quick' if args.quick else 'full'} run; load average before the run "
          f"{load}{crossed}")
    print("bprop: ", end="")
    bprop.show_config()


if __name__ == "__main__":
    main()
