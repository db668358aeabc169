"""Ctrl-C (issue 10, item 5).

A KeyboardInterrupt leaves a network and its optimizer as a consistent pair: the
interrupted step was made and counted, or not made at all. fit attaches the
History of the completed epochs to the exception and can be called again to go
on. A long call looks for the signal between layers.

The interrupts are placed deterministically, without timers: inside a core call
before its n-th look for signals (``_core._signal_at_poll`` raises SIGINT there,
as Ctrl-C would, and the installed handler runs; polling is forced on for every
call here, interval 0 and min_work 0), and in Python code at the n-th point where
the interpreter looks for signals (a trace function raises KeyboardInterrupt
there: entering a function, after a call, at a backward jump; Python 3.10 and
later look nowhere else). A test with real SIGINTs from timer threads
at random moments, and one bounding the latency of a long step, complete them.
"""

from __future__ import annotations

import _thread
import contextlib
import dis
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

import bprop
from bprop import _core, losses, optim

SPECS = [(6, 16, "tanh"), (16, 16, "relu"), (16, 3)]
ROWS, BATCH = 48, 8
STEPS_PER_EPOCH = ROWS // BATCH


@pytest.fixture
def polling_everywhere():
    """Every forward, backward and train_step looks for signals between layers."""
    previous = _core.interrupt_polling(0.0, 0)
    _core._signal_at_poll(0)
    yield
    _core._signal_at_poll(0)
    _core.interrupt_polling(*previous)


def _polling_off():
    return _core.interrupt_polling(min_work=2**62)


@contextlib.contextmanager
def _ctrl_c_at_poll(n):
    """SIGINT arrives just before the n-th look for signals of the core calls made
    inside the block (the handler then raises KeyboardInterrupt in that call)."""
    _core._signal_at_poll(n)
    try:
        yield
    finally:
        _core._signal_at_poll(0)


def _polls(call):
    """How many times `call` looks for signals."""
    _core._signal_at_poll(0)
    call()
    return _core._signal_at_poll(0)


_CHECK_POINTS = {}


def _check_points(code):
    """Offsets of `code` before which the interpreter (3.10 and later) looks for
    pending signals: the function's start, the instruction after a call, a
    backward jump."""
    points = _CHECK_POINTS.get(code)
    if points is None:
        instructions = list(dis.get_instructions(code))
        points = {instructions[0].offset} if instructions else set()
        for before, after in zip(instructions, instructions[1:]):
            if before.opname.startswith("CALL"):
                points.add(after.offset)
        for ins in instructions:
            if ins.opname == "JUMP_BACKWARD" or (
                    "JUMP" in ins.opname and isinstance(ins.argval, int)
                    and ins.argval < ins.offset and "NO_INTERRUPT" not in ins.opname):
                points.add(ins.offset)
        _CHECK_POINTS[code] = points
    return points


class _CtrlCAtCheck:
    """Inside the block, KeyboardInterrupt is raised at the n-th point of the Python
    code it runs where a real signal could be raised (None: never; ``count`` then
    says how many there were): a trace function looks at every bytecode."""

    def __init__(self, n=None):
        self.n = n
        self.count = 0

    def _call(self, frame, event, arg):
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return self._opcode

    def _opcode(self, frame, event, arg):
        if event == "opcode" and frame.f_lasti in _check_points(frame.f_code):
            self.count += 1
            if self.count == self.n:
                raise KeyboardInterrupt(f"at check {self.n}, {frame.f_code.co_name} "
                                        f"offset {frame.f_lasti}")
        return self._opcode

    def __enter__(self):
        self.previous = sys.gettrace()
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc):
        sys.settrace(self.previous)
        return False


def _data(dtype="float32"):
    rng = np.random.default_rng(7)
    X = rng.standard_normal((ROWS, 6)).astype(dtype)
    y = rng.integers(0, 3, ROWS)
    return X, y


def _network(dtype="float32"):
    return bprop.Network([bprop.Dense(*s) for s in SPECS], dtype=dtype, seed=3)


def _weights(net):
    return [p.copy() for _, p, _ in net.parameters()]


def _grads(net):
    return [g.copy() for _, _, g in net.parameters()]


def _same(a, b):
    return len(a) == len(b) and all(x.tobytes() == y.tobytes() for x, y in zip(a, b))


def _same_state(a, b):
    """Two optimizer state_dicts, bitwise."""
    if a["step"] != b["step"] or a["hyperparameters"] != b["hyperparameters"]:
        return False
    return all(a["state"][p][k].tobytes() == b["state"][p][k].tobytes()
               for p in a["state"] for k in a["state"][p])


def _user_cross_entropy(output, target, sample_weight=None):
    return losses.softmax_cross_entropy(output, target, sample_weight)


OPTIMIZERS = {
    "adam": (lambda n: optim.Adam(n, lr=1e-2), "softmax_cross_entropy"),
    "sgd-plain": (lambda n: optim.SGD(n, lr=0.05), "softmax_cross_entropy"),
    "sgd-momentum": (lambda n: optim.SGD(n, lr=0.05, momentum=0.9, weight_decay=1e-3),
                     "softmax_cross_entropy"),
    "rmsprop": (lambda n: optim.RMSprop(n, lr=1e-3, momentum=0.5, centered=True),
                "softmax_cross_entropy"),
    # a user loss: forward, the loss in Python, backward, then optimizer.step()
    "adam-user-loss": (lambda n: optim.Adam(n, lr=1e-2), _user_cross_entropy),
}


def _batch(X, y, i):
    lo = (i % STEPS_PER_EPOCH) * BATCH
    return X[lo:lo + BATCH], y[lo:lo + BATCH]


def _trajectory(make_optimizer, loss, steps):
    """Weights and optimizer state before and after each of `steps` train_steps on
    fit's unshuffled batches, with polling off (the interleaved update order)."""
    X, y = _data()
    net = _network()
    opt = make_optimizer(net)
    out = [(_weights(net), opt.state_dict())]
    previous = _polling_off()
    try:
        for i in range(steps):
            net.train_step(*_batch(X, y, i), loss=loss, optimizer=opt)
            out.append((_weights(net), opt.state_dict()))
    finally:
        _core.interrupt_polling(*previous)
    return out


def _claim_released(net):
    """True if another thread may call forward on the network (fit's claim is gone)."""
    errors = []

    def call():
        try:
            net.forward(np.zeros((1, net.in_features), net.dtype))
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    t.join()
    return not errors


# ---- the core's polls ----------------------------------------------------------------

@pytest.mark.parametrize("case", list(OPTIMIZERS)[:4])
def test_polling_does_not_change_the_bits_of_a_step(case):
    # With a poll the sweep holds the updates back to its end; same arithmetic.
    make_optimizer, loss = OPTIMIZERS[case]
    X, y = _data()
    results = []
    for setting in ((0.0, 0), (0.0, 2**62)):
        previous = _core.interrupt_polling(*setting)
        try:
            net = _network()
            opt = make_optimizer(net)
            for i in range(5):
                net.train_step(*_batch(X, y, i), loss=loss, optimizer=opt)
        finally:
            _core.interrupt_polling(*previous)
        results.append((_weights(net), opt.state_dict()))
    assert _same(results[0][0], results[1][0])
    assert _same_state(results[0][1], results[1][1])


def test_interrupted_forward_forgets_the_cache_and_changes_nothing_else(polling_everywhere):
    X, _ = _data()
    net = _network()
    out = net.forward(X)
    net.backward(np.ones_like(out))
    weights, grads = _weights(net), _grads(net)
    expected = net.predict(X)
    n_polls = _polls(lambda: net.forward(X))
    assert n_polls == len(SPECS) - 1  # between layers
    for n in range(1, n_polls + 1):
        net.forward(X)
        with pytest.raises(KeyboardInterrupt), _ctrl_c_at_poll(n):
            net.forward(X[:5])
        assert not net._core.has_forward
        assert all(layer.z is None and layer.input is None for layer in net.layers)
        assert _same(_weights(net), weights) and _same(_grads(net), grads)
        assert net._core.has_backward  # the stored gradients are intact: step() may use them
        np.testing.assert_array_equal(net.predict(X), expected)
        with pytest.raises(RuntimeError, match="before forward"):
            net.backward(np.ones((5, 3), np.float32))
    assert net.forward(X).tobytes() == expected.tobytes()


@pytest.mark.parametrize("accumulate", [False, True])
def test_interrupted_backward_drops_the_gradients_and_keeps_the_forward_cache(
        polling_everywhere, accumulate):
    X, _ = _data()
    net = _network()
    grad = np.random.default_rng(1).standard_normal((ROWS, 3)).astype(np.float32)
    net.forward(X)
    net.backward(grad)
    weights = _weights(net)
    cache = [(layer.z.copy(), layer.output.copy()) for layer in net.layers]
    expected = _grads(net)
    n_polls = _polls(lambda: net.backward(grad, input_grad=True))
    assert n_polls == 2 * len(SPECS)  # before each layer and between its two products
    for n in range(1, n_polls + 1):
        with pytest.raises(KeyboardInterrupt), _ctrl_c_at_poll(n):
            net.backward(grad, accumulate=accumulate, input_grad=True)
        assert not net._core.has_backward and net.layers[0].delta is None
        assert net._core.has_forward
        assert all(L.z.tobytes() == z.tobytes() and L.output.tobytes() == a.tobytes()
                   for L, (z, a) in zip(net.layers, cache))
        assert _same(_weights(net), weights)
        with pytest.raises(RuntimeError, match="no gradients"):
            optim.SGD(net, lr=0.1).step()
        net.backward(grad)  # the cache still serves a backward
        assert _same(_grads(net), expected)


@pytest.mark.parametrize("case", list(OPTIMIZERS)[:4])
def test_interrupted_train_step_did_not_happen(polling_everywhere, case):
    make_optimizer, loss = OPTIMIZERS[case]
    X, y = _data()
    net = _network()
    opt = make_optimizer(net)
    net.train_step(*_batch(X, y, 0), loss=loss, optimizer=opt)
    before = (_weights(net), opt.state_dict())
    twin = _network()
    twin_opt = make_optimizer(twin)
    for i in range(2):
        twin.train_step(*_batch(X, y, i), loss=loss, optimizer=twin_opt)
    probe = _network()
    probe_opt = make_optimizer(probe)
    n_polls = _polls(lambda: probe.train_step(*_batch(X, y, 1), loss=loss, optimizer=probe_opt))
    # forward between layers; backward before each layer and between its two
    # products (plain SGD makes its products into W after the sweep, unpolled)
    per_layer = 1 if case == "sgd-plain" else 2
    assert n_polls == (len(SPECS) - 1) + per_layer * len(SPECS) - (per_layer - 1)
    for n in range(1, n_polls + 1):
        with pytest.raises(KeyboardInterrupt), _ctrl_c_at_poll(n):
            net.train_step(*_batch(X, y, 1), loss=loss, optimizer=opt)
        assert _same(_weights(net), before[0]), f"poll {n}: a parameter changed"
        assert _same_state(opt.state_dict(), before[1]), f"poll {n}: the optimizer changed"
        assert opt.step_count == 1
        assert not net._core.has_forward and not net._core.has_backward
    # and the step, made now, is the one it would have been
    net.train_step(*_batch(X, y, 1), loss=loss, optimizer=opt)
    assert _same(_weights(net), _weights(twin))
    assert _same_state(opt.state_dict(), twin_opt.state_dict())


def test_a_signal_handler_calling_into_the_network_gets_an_error_not_a_deadlock(
        polling_everywhere):
    # A poll runs Python's signal handlers while its thread holds the network's
    # lock: a handler's call on the same network must raise, not wait for it.
    X, y = _data()
    net = _network()
    opt = optim.Adam(net)
    weights = _weights(net)
    seen = []

    def handler(signum, frame):
        for call in (lambda: net.predict(X), lambda: net.forward(X), lambda: net.step(0.1),
                     lambda: bprop.fit(net, X, y, epochs=1)):
            with pytest.raises(RuntimeError) as info:
                call()
            seen.append(str(info.value))
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with pytest.raises(KeyboardInterrupt), _ctrl_c_at_poll(3):
            net.train_step(X, y, optimizer=opt)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(seen) == 4
    assert all("inside another call on the network" in s for s in seen), seen
    assert _same(_weights(net), weights) and opt.step_count == 0
    assert not hasattr(net, "_fit_optimizer")
    assert _claim_released(net)


# ---- fit -------------------------------------------------------------------------------

EPOCHS = 3


def _check_interrupted_fit(case, interrupt, reference):
    """fit interrupted by `interrupt` (a context manager): the network and the
    optimizer are those after step_count whole steps, the History holds the
    completed epochs, and fit goes on. Returns False if the fit ran out before
    the interrupt came."""
    make_optimizer, loss = OPTIMIZERS[case]
    X, y = _data()
    net = _network()
    opt = make_optimizer(net)
    history = None
    try:
        with interrupt:
            bprop.fit(net, X, y, loss=loss, optimizer=opt, epochs=EPOCHS, batch_size=BATCH,
                      shuffle=False)
        assert opt.step_count == EPOCHS * STEPS_PER_EPOCH
        return False
    except KeyboardInterrupt as exc:
        history = getattr(exc, "history", None)
        where = f"{case}, {exc}"
    k = opt.step_count
    where += f": {k} steps"
    weights, state = reference[k]
    assert _same(_weights(net), weights), where
    assert _same_state(opt.state_dict(), state), where
    if history is not None:  # raised inside fit's loop: the completed epochs
        assert k // STEPS_PER_EPOCH - 1 <= len(history) <= k // STEPS_PER_EPOCH, where
        assert np.isfinite(history.loss).all(), where
    else:  # before fit claimed the network, or as it let it go
        assert k in (0, EPOCHS * STEPS_PER_EPOCH), where
    assert _claim_released(net), where
    # fit goes on from there, with the same optimizer (registered with the claim;
    # an interrupt before the claim changed nothing at all)
    registered = getattr(net, "_fit_optimizer", None)
    assert registered is opt or (k == 0 and history is None and registered is None), where
    again = bprop.fit(net, X, y, loss=loss, optimizer=None if registered else opt, epochs=1,
                      batch_size=BATCH, shuffle=False)
    assert len(again) == 1
    assert net._fit_optimizer is opt and opt.step_count == k + STEPS_PER_EPOCH, where
    twin = _network()
    twin_opt = make_optimizer(twin)
    for (_, p, _), w in zip(twin.parameters(), weights):
        p[...] = w
    twin_opt.load_state_dict(state)
    previous = _polling_off()
    try:
        for i in range(STEPS_PER_EPOCH):
            twin.train_step(*_batch(X, y, i), loss=loss, optimizer=twin_opt)
    finally:
        _core.interrupt_polling(*previous)
    assert _same(_weights(net), _weights(twin)), where
    return True


@pytest.mark.parametrize("case", list(OPTIMIZERS))
def test_fit_interrupted_anywhere_leaves_network_and_optimizer_consistent(
        polling_everywhere, case):
    """Ctrl-C at points spread over a whole fit, between layers inside the core
    and where the interpreter looks for signals in fit's Python code (regression:
    the weights held one more Adam update than step_count said, when the interrupt
    came between the C++ step and the count in Python). Checked bitwise against
    the same steps made one by one without polling."""
    make_optimizer, loss = OPTIMIZERS[case]
    reference = _trajectory(make_optimizer, loss, EPOCHS * STEPS_PER_EPOCH)
    X, y = _data()

    def dry_fit(counting):
        net = _network()
        opt = make_optimizer(net)
        with counting:
            bprop.fit(net, X, y, loss=loss, optimizer=opt, epochs=EPOCHS, batch_size=BATCH,
                      shuffle=False)

    _core._signal_at_poll(0)
    dry_fit(contextlib.nullcontext())
    n_polls = _core._signal_at_poll(0)
    counter = _CtrlCAtCheck()
    dry_fit(counter)
    n_checks = counter.count
    assert n_polls > 0 and n_checks > 0
    interrupted = {"poll": 0, "python": 0}
    for kind, total, make in (("poll", n_polls, _ctrl_c_at_poll),
                              ("python", n_checks, _CtrlCAtCheck)):
        for n in sorted(set(np.linspace(1, total, 16).astype(int))):
            interrupted[kind] += _check_interrupted_fit(case, make(int(n)), reference)
    assert interrupted["poll"] == 16 and interrupted["python"] >= 14, interrupted


def test_fit_attaches_the_history_of_the_completed_epochs(polling_everywhere):
    X, y = _data()
    net = _network()

    class InterruptEpoch3:
        """Ctrl-C in fit's third epoch, inside its second step."""

        def on_epoch_end(self, epoch, logs):
            if epoch == 1:
                # 7 looks per step (2 in forward, 5 in backward): the 10th is in step 2
                _core._signal_at_poll(10)

    with pytest.raises(KeyboardInterrupt) as info:
        bprop.fit(net, X, y, epochs=10, batch_size=BATCH, shuffle=False,
                  callbacks=[InterruptEpoch3()])
    history = info.value.history
    assert isinstance(history, bprop.History) and len(history) == 2
    assert net._fit_optimizer.step_count == 2 * STEPS_PER_EPOCH + 1


def test_fit_interrupted_by_real_signals_at_random_moments(polling_everywhere):
    """SIGINT from a timer thread (as Ctrl-C), at random moments of a fit that would
    run forever: the assertions hold wherever it lands."""
    X, y = _data()
    delays = np.random.default_rng(0).uniform(0.0, 0.02, 12)
    for delay in delays:
        net = _network()
        opt = optim.Adam(net, lr=1e-2)
        timer = threading.Timer(delay, _thread.interrupt_main)
        history = None
        try:
            timer.start()
            bprop.fit(net, X, y, optimizer=opt, epochs=10**9, batch_size=BATCH, shuffle=False)
        except KeyboardInterrupt as exc:
            history = getattr(exc, "history", None)
        finally:
            timer.join()
        k = opt.step_count
        if history is not None:
            assert len(history) in (k // STEPS_PER_EPOCH - 1, k // STEPS_PER_EPOCH)
        twin = _network()
        twin_opt = optim.Adam(twin, lr=1e-2)
        for i in range(k):
            twin.train_step(*_batch(X, y, i), optimizer=twin_opt)
        assert _same(_weights(net), _weights(twin)), f"after {k} steps"
        assert _same_state(opt.state_dict(), twin_opt.state_dict()), f"after {k} steps"
        assert _claim_released(net)
        bprop.fit(net, X, y, optimizer=opt, epochs=1, batch_size=BATCH, shuffle=False)
        assert opt.step_count == k + STEPS_PER_EPOCH


# ---- latency ---------------------------------------------------------------------------

LONG_STEP = 1.0  # seconds: far above the polling interval (0.1 s) and one product
MAX_BYTES = 1.2e9  # the batch-dependent memory of the latency test stays below this
# (a wide network: a row costs width^2 in time and width in memory, so a long step
# fits the memory budget on fast machines too; at width 1024 a 2-core AVX-512 machine
# could not reach 1.5 s within it)


def _step_seconds(net, opt, X, y):
    """The time of one steady-state train_step (the first call at this batch size
    allocates the caches and is not timed)."""
    net.train_step(X, y, optimizer=opt)
    start = time.perf_counter()
    net.train_step(X, y, optimizer=opt)
    return time.perf_counter() - start


def _ctrl_c_after(delay, sent):
    """A thread that sends SIGINT (as Ctrl-C) `delay` seconds after it starts."""

    def interrupt():
        time.sleep(delay)
        sent.append(time.perf_counter())
        if os.name == "posix":
            os.kill(os.getpid(), signal.SIGINT)
        else:  # Windows' os.kill would end the process; this is how Ctrl-C reaches Python
            _thread.interrupt_main()

    return threading.Thread(target=interrupt)


def test_ctrl_c_stops_a_long_step_between_layers():
    """A real SIGINT a tenth of the way into a long full-batch train_step raises
    KeyboardInterrupt within about one layer's product plus the polling interval,
    not at the end of the step (regression: with a 5-second step the interrupt
    waited 2.6 s). The bound is relative, so that the test means the same on any
    machine: the batch grows until one step takes LONG_STEP seconds or more, and
    the latency must stay under half a step, which a step run to its end (about
    0.9 of a step after the signal) violates, while a poll between the step's ~24
    equal products (8 equal layers, forward and backward) meets it with room. The
    default polling applies (this step is far above min_work)."""
    width, layers = 1536, 8
    net = bprop.Network([bprop.Dense(width, width, "relu") for _ in range(layers - 1)]
                        + [bprop.Dense(width, 10)], seed=0)
    opt = optim.Adam(net, lr=1e-4)
    rng = np.random.default_rng(0)
    # X, and per layer about four (batch, width) caches (input, z, output, delta)
    max_batch = int(MAX_BYTES // (4 * width * (1 + 4 * layers)))
    batch = 512
    for _ in range(4):
        X = rng.standard_normal((batch, width)).astype(np.float32)
        y = rng.integers(0, 10, batch)
        step = _step_seconds(net, opt, X, y)
        if step >= LONG_STEP or batch == max_batch:
            break
        batch = min(max_batch, int(batch * 1.3 * LONG_STEP / step) + 1)
    if step < LONG_STEP:
        pytest.skip(f"a step of {batch} rows takes {step:.2f} s here, under {LONG_STEP} s: "
                    f"the machine is too fast for this test's memory budget")
    assert batch * net.num_parameters >= _core.interrupt_polling()[1]
    weights, state = _weights(net), opt.state_dict()
    sent = []
    timer = _ctrl_c_after(0.1 * step, sent)
    try:
        with pytest.raises(KeyboardInterrupt):
            timer.start()
            net.train_step(X, y, optimizer=opt)
            time.sleep(step)  # without a poll the signal is handled here, at the latest
        raised = time.perf_counter()
    finally:
        timer.join()
    latency = raised - sent[0]
    assert latency < 0.5 * step, f"{latency:.2f} s after Ctrl-C, in a step of {step:.2f} s"
    # the network and the optimizer agree: the interrupted step is made or not
    if opt.step_count == state["step"]:
        assert _same(_weights(net), weights)
        assert _same_state(opt.state_dict(), state)
    else:
        assert opt.step_count == state["step"] + 1
        made = _weights(net)
        for (_, p, _), w in zip(net.parameters(), weights):
            p[...] = w
        opt.load_state_dict(state)
        net.train_step(X, y, optimizer=opt)
        assert _same(_weights(net), made)


def test_interrupt_polling_checks_its_arguments():
    with pytest.raises(ValueError, match="interval"):
        _core.interrupt_polling(-1.0)
    with pytest.raises(ValueError, match="min_work"):
        _core.interrupt_polling(min_work=-1)
    assert _core.interrupt_polling() == _core.interrupt_polling()
