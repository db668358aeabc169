"""Threads (issue 5, item 3; issue 10, item 5).

The core serializes calls on one network with a shared_mutex: predict takes it
shared, every other call (forward, backward, train_step, step) exclusively, and
all of them release the GIL. So predict from many threads runs in parallel and
gives exactly the sequential results; predict during fit sees the weights of
one training step or the next, never a mixture; separate networks train in
parallel. While fit trains a network, the other calls from other threads raise
RuntimeError (checked under the lock). The speed-up is measured by
bench/threads_speedup.py, not asserted here (it depends on what else the machine
runs).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import bprop
from bprop import _core, losses, optim

SPECS = [(16, 32, "tanh"), (32, 32, "relu"), (32, 4)]


def _network(dtype="float32", seed=0, specs=SPECS):
    return bprop.Network([bprop.Dense(*s) for s in specs], dtype=dtype, seed=seed)


def _run_threads(targets):
    """Runs the callables in threads started together; re-raises the first error."""
    errors = []
    barrier = threading.Barrier(len(targets))

    def wrap(fn):
        def run():
            try:
                barrier.wait()
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported in the main thread
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# Products of one tile each (run on the calling thread), and products of many tiles
# (the pool runs one thread's product at a time, the others run theirs alone).
WIDE = [(16, 256, "tanh"), (256, 256, "relu"), (256, 4)]


@pytest.mark.parametrize("specs,repeats", [(SPECS, 25), (WIDE, 3)], ids=["narrow", "wide"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_eight_threads_predicting_on_one_network_match_sequential_calls(dtype, specs, repeats):
    net = _network(dtype, specs=specs)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((rows, 16)).astype(dtype) for rows in
              (1, 7, 64, 200, 333, 64, 1000, 5)]
    expected = [net.predict(X).tobytes() for X in inputs]
    expected_chunked = [net.predict(X, batch_size=50).tobytes() for X in inputs]
    results = [[] for _ in inputs]

    def worker(i):
        def run():
            for _ in range(repeats):
                results[i].append(net.predict(inputs[i]).tobytes())
                results[i].append(net.predict(inputs[i], batch_size=50).tobytes())
        return run

    _run_threads([worker(i) for i in range(8)])
    # Bitwise: a product's tiles and each tile's OpenBLAS call are the same whichever
    # thread runs them, and whether the pool is free or busy with another thread's
    # product (then the tiles run on the calling thread). Regression guard: with
    # OpenBLAS's process-wide thread count dropped to 1 around small products, a
    # product beside them could be split differently (float32 last bits, issue 11).
    for i in range(8):
        assert all(r == expected[i] for r in results[i][0::2]), f"thread {i}"
        assert all(r == expected_chunked[i] for r in results[i][1::2]), f"thread {i}"


def _recording(net, opt, monkeypatch):
    """The weights before the first step and after every step that fit makes with
    `opt`: fit takes its steps through the function its strategy makes
    (bprop.train.Local.step_function), wrapped here."""
    snapshots = [[p.copy() for _, p, _ in net.parameters()]]
    make = bprop.train.Local.step_function

    def step_function(self, *args):
        step = make(self, *args)

        def recorded(*step_args):
            count = opt.step_count
            value = step(*step_args)
            if opt.step_count != count:
                snapshots.append([p.copy() for _, p, _ in net.parameters()])
            return value
        return recorded

    monkeypatch.setattr(bprop.train.Local, "step_function", step_function)
    return snapshots


def _user_cross_entropy(output, target, sample_weight=None):
    return losses.softmax_cross_entropy(output, target, sample_weight)


CONCURRENT = {
    "adam": (lambda n: optim.Adam(n, lr=1e-2), "softmax_cross_entropy"),
    "sgd-fused": (lambda n: optim.SGD(n, lr=0.05), "softmax_cross_entropy"),
    "sgd-momentum": (lambda n: optim.SGD(n, lr=0.05, momentum=0.9), "softmax_cross_entropy"),
    # a user loss: fit calls forward, backward and then optimizer.step() itself
    "adam-user-loss": (lambda n: optim.Adam(n, lr=1e-2), _user_cross_entropy),
}


EPOCHS = 6


@pytest.mark.parametrize("case", list(CONCURRENT))
def test_predict_during_fit_sees_whole_training_steps_and_leaves_fit_alone(case,
                                                                           monkeypatch):
    make_optimizer, loss = CONCURRENT[case]
    rng = np.random.default_rng(1)
    X = rng.standard_normal((512, 16))
    y = rng.integers(0, 4, 512)
    Xq = rng.standard_normal((96, 16)).astype(np.float32)

    # the same fit alone, for comparison
    alone = _network()
    bprop.fit(alone, X, y, loss=loss, optimizer=make_optimizer(alone), epochs=EPOCHS,
              batch_size=8, seed=3)

    net = _network()
    opt = make_optimizer(net)
    snapshots = _recording(net, opt, monkeypatch)
    done = threading.Event()
    seen = [[], []]

    def train():
        try:
            bprop.fit(net, X, y, loss=loss, optimizer=opt, epochs=EPOCHS, batch_size=8,
                      seed=3)
        finally:
            done.set()

    def watch(i):
        def run():
            while not done.is_set():
                seen[i].append(net.predict(Xq).tobytes())
        return run

    _run_threads([train, watch(0), watch(1)])
    # fit's result does not depend on the predictions made meanwhile
    for (name, a, _), (_, b, _) in zip(net.parameters(), alone.parameters()):
        assert a.tobytes() == b.tobytes(), name
    # every prediction is that of the weights after some step (or before the first)
    twin = _network()
    outputs = set()
    for weights in snapshots:
        for (_, p, _), w in zip(twin.parameters(), weights):
            p[...] = w
        outputs.add(twin.predict(Xq).tobytes())
    assert len(snapshots) == EPOCHS * 64 + 1
    observed = seen[0] + seen[1]
    assert len(observed) > 0
    torn = sum(o not in outputs for o in observed)
    assert torn == 0, (f"{torn} of {len(observed)} predictions during fit match no weights "
                       "that a training step left")


# ---- fit's claim on its network (issue 10, item 5) ----------------------------------
# A user's forward/backward from another thread during fit silently used fit's
# cached batch or raised a shape error; two fits without an optimizer each made
# their own Adam over the same weights. Now fit claims the network: the other
# threads' calls raise RuntimeError; predict and fit's own thread are not affected.

CLAIM_X = np.random.default_rng(6).standard_normal((64, 16))
CLAIM_Y = np.random.default_rng(7).integers(0, 4, 64)


class _PausedFit:
    """fit on `net` in a thread, held inside its first epoch's callback (so it
    surely runs) until the block ends; then it finishes and re-raises its error."""

    def __init__(self, net, **kwargs):
        self.net, self.kwargs = net, kwargs
        self.inside, self.release = threading.Event(), threading.Event()
        self.errors = []

    def on_epoch_end(self, epoch, logs):
        if epoch == 0:
            self.inside.set()
            assert self.release.wait(120)

    def _run(self):
        try:
            self.history = bprop.fit(self.net, CLAIM_X, CLAIM_Y, callbacks=[self],
                                     **self.kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            self.errors.append(exc)
        finally:
            self.inside.set()

    def __enter__(self):
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.inside.wait(120)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join()
        if self.errors and exc[0] is None:
            raise self.errors[0]
        return False


def _user_loss_f64(output, target, sample_weight=None):
    return losses.softmax_cross_entropy(output, target, sample_weight)


REFUSED = {
    "forward": lambda net, opt: net.forward(CLAIM_X[:8]),
    "backward": lambda net, opt: net.backward(np.ones((8, 4))),
    "step": lambda net, opt: net.step(0.1),
    "train_step": lambda net, opt: net.train_step(CLAIM_X[:8], CLAIM_Y[:8], optimizer=opt),
    "train_step-user-loss": lambda net, opt: net.train_step(CLAIM_X[:8], CLAIM_Y[:8],
                                                            _user_loss_f64, opt),
    "fit's optimizer step": lambda net, opt: opt.step(),
    "another optimizer's step": lambda net, opt: optim.SGD(net, lr=0.1, momentum=0.9).step(),
    "fit": lambda net, opt: bprop.fit(net, CLAIM_X, CLAIM_Y, epochs=1),
    "core forward": lambda net, opt: net._core.forward(CLAIM_X[:8]),
    "core clear_cache": lambda net, opt: net._core.clear_cache(),
}


def test_calls_from_another_thread_while_fit_trains_raise_and_change_nothing():
    alone = _network("float64")
    bprop.fit(alone, CLAIM_X, CLAIM_Y, optimizer=optim.Adam(alone, lr=1e-2), epochs=3,
              batch_size=8, seed=1)

    net = _network("float64")
    opt = optim.Adam(net, lr=1e-2)
    with _PausedFit(net, optimizer=opt, epochs=3, batch_size=8, seed=1):
        for name, call in REFUSED.items():
            with pytest.raises(RuntimeError, match=r"\] the network is being trained by fit "
                                                   r"in another thread") as info:
                call(net, opt)
            where = {"fit's optimizer step": "Optimizer.step",
                     "another optimizer's step": "Optimizer.step", "fit": "fit",
                     "core clear_cache": "Network.clear_cache"}.get(name)
            if where is None:
                where = "Network." + name.split("-")[0].replace("core ", "")
                if name == "train_step-user-loss":
                    where = "Network.forward"  # its first call
            assert str(info.value).startswith(f"[{where}]"), (name, str(info.value))
        assert np.isfinite(net.predict(CLAIM_X)).all()  # predict keeps working
    # the refused calls changed nothing: fit's result is that of fit alone
    for (name, a, _), (_, b, _) in zip(net.parameters(), alone.parameters()):
        assert a.tobytes() == b.tobytes(), name
    assert net._fit_optimizer is opt and opt.step_count == 3 * 8
    # and once fit has returned, every call works again from any thread
    net.forward(CLAIM_X[:8])
    net.backward(np.ones((8, 4)))
    net.step(0.0)


def test_fits_own_thread_may_call_everything_on_the_network():
    net = _network("float64")
    opt = optim.Adam(net, lr=1e-2)
    done = []

    class Callback:
        def on_epoch_end(self, epoch, logs):
            if epoch == 0:
                out = net.forward(CLAIM_X[:8])
                net.backward(np.ones_like(out))
                net.step(0.0)
                opt.step()
                net.predict(CLAIM_X)
                net.train_step(CLAIM_X[:8], CLAIM_Y[:8], optimizer=opt)
                bprop.fit(net, CLAIM_X, CLAIM_Y, epochs=1, batch_size=8)  # nested: same claim
                done.append(epoch)

    def user_loss(output, target, sample_weight=None):
        net.predict(CLAIM_X[:2])
        return losses.softmax_cross_entropy(output, target, sample_weight)

    history = bprop.fit(net, CLAIM_X, CLAIM_Y, loss=user_loss, optimizer=opt, epochs=2,
                        batch_size=8, callbacks=[Callback()])
    assert done == [0] and len(history) == 2
    assert opt.step_count == 2 * 8 + 2 + 8  # fit's steps, the callback's two, nested fit's
    # the claims are all released: another thread may call forward now
    _run_threads([lambda: net.forward(CLAIM_X[:8])])


@pytest.mark.parametrize("failure", [KeyboardInterrupt, ValueError])
def test_fit_releases_its_claim_when_it_fails(failure):
    net = _network("float64")

    class Fail:
        def on_epoch_end(self, epoch, logs):
            raise failure("from a callback")

    with pytest.raises(failure) as info:
        bprop.fit(net, CLAIM_X, CLAIM_Y, epochs=3, batch_size=8, callbacks=[Fail()])
    if failure is KeyboardInterrupt:
        assert len(info.value.history) == 1  # recorded before its callbacks ran
    _run_threads([lambda: net.forward(CLAIM_X[:8])])


def test_a_second_fit_on_a_network_being_trained_raises_and_changes_nothing():
    """Two fits at once without an optimizer each made their own Adam over the same
    weights; now the second one raises before it changes anything."""
    net = _network("float64")
    with _PausedFit(net, epochs=2, batch_size=8, seed=0) as first:
        opt = net._fit_optimizer
        with pytest.raises(RuntimeError, match=r"^\[fit\] the network is being trained by "
                                               "fit in another thread"):
            bprop.fit(net, CLAIM_X, CLAIM_Y, epochs=2, batch_size=8, seed=0)
        assert net._fit_optimizer is opt
    assert len(first.history) == 2 and opt.step_count == 2 * 8
    alone = _network("float64")
    bprop.fit(alone, CLAIM_X, CLAIM_Y, epochs=2, batch_size=8, seed=0)
    for (name, a, _), (_, b, _) in zip(net.parameters(), alone.parameters()):
        assert a.tobytes() == b.tobytes(), name


def test_separate_networks_on_separate_threads_match_sequential_fits():
    rng = np.random.default_rng(3)
    data = [(rng.standard_normal((300, 16)), rng.integers(0, 4, 300)) for _ in range(3)]

    def train(i):
        net = _network("float64", seed=i)
        bprop.fit(net, *data[i], epochs=2, batch_size=16, seed=i)
        return [p.copy() for _, p, _ in net.parameters()]

    sequential = [train(i) for i in range(3)]
    parallel = [None] * 3

    def worker(i):
        def run():
            parallel[i] = train(i)
        return run

    _run_threads([worker(i) for i in range(3)])
    for s, p in zip(sequential, parallel):
        assert all(a.tobytes() == b.tobytes() for a, b in zip(s, p))


def test_the_gil_is_released_during_core_calls():
    """Python code keeps running in another thread while the core works."""
    net = _network(specs=[(256, 512, "relu"), (512, 512, "relu"), (512, 4)])
    X = np.random.default_rng(4).standard_normal((20000, 256)).astype(np.float32)
    y = np.random.default_rng(5).integers(0, 4, 20000)
    Xb = X[:4000]
    opt = optim.SGD(net, lr=0.0)
    started = threading.Event()
    finished = threading.Event()

    for call in (lambda: net.predict(X), lambda: net.train_step(Xb, y[:4000], optimizer=opt)):
        started.clear()
        finished.clear()
        counts = []

        def work(call=call):
            started.set()
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.3:
                call()
            finished.set()

        def count(counts=counts):
            started.wait()
            n = 0
            while not finished.is_set():
                n += 1
            counts.append(n)

        _run_threads([work, count])
        # with the GIL held by the core the counter would only move between calls
        assert counts[0] > 10000, counts


def test_every_task_of_a_parallel_loop_runs_once_on_an_oversubscribed_pool():
    """The pool's loops, many and short, with more threads than cores and the back-off
    off (so the workers keep competing): every task of every loop runs exactly once
    before the loop returns. A worker that woke late once claimed an index of the next
    loop with that loop's values and ran a task twice (issue 11; found as a rare
    thread-count difference in test_determinism)."""
    threads, backoff = bprop.get_num_threads(), _core._contention_backoff()
    try:
        bprop.set_num_threads(min(16, 2 * (os.cpu_count() or 1)))  # oversubscribed up to 8 cores
        _core._set_contention_backoff(False)
        assert _core._check_loops(100_000, 8) == 0
    finally:
        _core._set_contention_backoff(backoff)
        bprop.set_num_threads(threads)
