"""fit's callback hooks and bprop.callbacks (issue 14): the order of the hooks,
stopping from a batch or an epoch, EarlyStopping (Keras's rule; fit's
early_stopping= is this callback), ModelCheckpoint, CSVLogger, and
Network.summary()."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

import bprop
from bprop import optim
from bprop.callbacks import Callback, CSVLogger, EarlyStopping, ModelCheckpoint

SPECS = [(3, 8, "tanh"), (8, 3)]


@pytest.fixture
def data(rng):
    X = rng.standard_normal((48, 3))
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.5)
    return X, y


def params_of(net):
    return [p.copy() for _, p, _ in net.parameters()]


# ---- hooks ----------------------------------------------------------------------------------

class Recorder:
    """Every hook, recorded with its arguments."""

    def __init__(self):
        self.calls = []
        self.network = None

    def set_network(self, net):
        self.network = net

    def on_train_begin(self, logs):
        self.calls.append(("train_begin", dict(logs)))

    def on_epoch_begin(self, epoch, logs):
        self.calls.append(("epoch_begin", epoch, dict(logs)))

    def on_batch_end(self, batch, logs):
        self.calls.append(("batch_end", batch, dict(logs)))

    def on_epoch_end(self, epoch, logs):
        self.calls.append(("epoch_end", epoch, dict(logs)))

    def on_train_end(self, logs):
        self.calls.append(("train_end", dict(logs)))


def test_fit_calls_every_hook_in_order(make_network, data):
    X, y = data
    net = make_network(SPECS)
    rec = Recorder()
    history = bprop.fit(net, X, y, optimizer=optim.SGD(net, lr=0.1), epochs=2, batch_size=16,
                        validation_split=0.25, metrics=["accuracy"], callbacks=[rec], seed=0)
    assert rec.network is net
    kinds = [c[0] for c in rec.calls]
    # 36 training samples in minibatches of 16: 3 steps per epoch
    assert kinds == (["train_begin"] + (["epoch_begin"] + ["batch_end"] * 3 + ["epoch_end"]) * 2
                     + ["train_end"])
    batches = [c for c in rec.calls if c[0] == "batch_end"]
    assert [b[1] for b in batches] == [0, 1, 2, 0, 1, 2]
    assert all(set(b[2]) == {"loss", "lr"} and b[2]["lr"] == 0.1 for b in batches)
    # the last step's running mean is the epoch's loss
    assert batches[2][2]["loss"] == pytest.approx(history.loss[0], rel=1e-12)
    ends = [c for c in rec.calls if c[0] == "epoch_end"]
    assert set(ends[0][2]) == {"loss", "val_loss", "accuracy", "val_accuracy", "lr", "time"}
    assert rec.calls[-1][1] == ends[-1][2]  # on_train_end gets the last epoch's logs
    assert rec.calls[1] == ("epoch_begin", 0, {"lr": 0.1})


def test_a_callback_stops_training_after_a_batch(make_network, data):
    X, y = data
    net = make_network(SPECS)
    opt = optim.SGD(net, lr=0.1)
    seen = []

    class StopAtBatch(Callback):
        def on_batch_end(self, batch, logs):
            seen.append(batch)
            return len(seen) == 5  # the second step of epoch 1

    rec = Recorder()
    history = bprop.fit(net, X, y, optimizer=opt, epochs=4, batch_size=16,
                        callbacks=[StopAtBatch(), rec])
    assert opt.step_count == 5 and len(history) == 2 and history.stopped_early
    assert [c[1] for c in rec.calls if c[0] == "epoch_end"] == [0, 1]
    assert rec.calls[-1][0] == "train_end"


def test_a_callback_stops_training_after_an_epoch(make_network, data):
    X, y = data
    net = make_network(SPECS)

    class StopAtEpoch(Callback):
        def on_epoch_end(self, epoch, logs):
            return epoch == 1

    history = bprop.fit(net, X, y, epochs=5, batch_size=16, callbacks=[StopAtEpoch()])
    assert len(history) == 2 and history.stopped_early


def test_the_base_callbacks_hooks_do_nothing(make_network, data):
    X, y = data
    net = make_network(SPECS)
    cb = Callback()
    history = bprop.fit(net, X, y, epochs=2, callbacks=[cb])
    assert len(history) == 2 and cb.network is net


def test_callback_hooks_are_checked(make_network, data):
    X, y = data

    class Broken:
        on_batch_end = "later"

    with pytest.raises(TypeError, match=r"\[fit\] callbacks\[1\].on_batch_end must be callable"):
        bprop.fit(make_network(SPECS), X, y, callbacks=[Callback(), Broken()])


# ---- EarlyStopping ------------------------------------------------------------------------

def _drive(stopper, values, net, key="val_loss"):
    stopper.set_network(net)
    stopper.on_train_begin({})
    stops = []
    for epoch, v in enumerate(values):
        net.layers[0].weight[...] = epoch  # a different weight per epoch
        if stopper.on_epoch_end(epoch, {key: v}):
            stops.append(epoch)
            break
    stopper.on_train_end({})
    return stops


def test_early_stopping_follows_keras_rule(make_network):
    net = make_network(SPECS)
    # patience 2: the second epoch in a row without a strict improvement stops
    s = EarlyStopping(patience=2)
    assert _drive(s, [3.0, 2.0, 2.5, 1.9, 1.9, 2.0, 0.1], net) == [5]
    assert (s.best, s.best_epoch, s.stopped_epoch) == (1.9, 3, 5)
    assert net.layers[0].weight[0, 0] == 5  # restore_best_weights=False
    # min_delta: 1.95 is not better than 2.0 by more than 0.1
    s = EarlyStopping(patience=2, min_delta=0.1, restore_best_weights=True)
    assert _drive(s, [2.0, 1.95, 1.91, 1.5], net) == [2]
    assert s.best_epoch == 0 and net.layers[0].weight[0, 0] == 0  # restored
    # "acc" in the monitor: maximised (Keras's auto mode)
    s = EarlyStopping(monitor="val_accuracy", patience=0)
    assert s.mode == "max"
    assert _drive(s, [0.5, 0.6, 0.6], net, "val_accuracy") == [2]
    # patience 0 never stops at the first epoch
    s = EarlyStopping(monitor="loss", patience=0, mode="max")
    assert _drive(s, [math.nan, math.nan, 1.0], net, "loss") == [1]


def test_early_stopping_callback_is_fits_early_stopping(make_network, data):
    X, y = data
    Xv, yv = X[:20], (y[:20] + 1) % 3  # validation labels that the fit unlearns
    runs = []
    for how in ("argument", "callback"):
        net = make_network(SPECS)
        kwargs = (dict(early_stopping=2) if how == "argument" else
                  dict(callbacks=[EarlyStopping("val_loss", patience=2,
                                                restore_best_weights=True)]))
        history = bprop.fit(net, X, y, optimizer=optim.Adam(net, lr=0.05), epochs=40,
                            batch_size=16, seed=0, validation_data=(Xv, yv), **kwargs)
        runs.append((history, params_of(net)))
    (h1, p1), (h2, p2) = runs
    assert h1.val_loss == h2.val_loss and len(h1) < 40 and h1.stopped_early and h2.stopped_early
    assert h1.best_epoch == int(np.argmin(h1.val_loss))
    for a, b in zip(p1, p2):
        np.testing.assert_array_equal(a, b)


def test_early_stopping_names_a_missing_monitor(make_network, data):
    X, y = data
    with pytest.raises(KeyError, match=r"\[EarlyStopping\] monitor 'val_loss' is not among "
                                       r"the fit logs \['loss', 'lr', 'time'\]; give fit "
                                       "validation data"):
        bprop.fit(make_network(SPECS), X, y, epochs=2, callbacks=[EarlyStopping()])


# ---- ModelCheckpoint ----------------------------------------------------------------------

def test_model_checkpoint_saves_the_best_epoch(make_network, data, tmp_path):
    X, y = data
    Xv, yv = X[:20], (y[:20] + 1) % 3
    net = make_network(SPECS)
    snapshots = []

    class Snap(Callback):
        def on_epoch_end(self, epoch, logs):
            snapshots.append(params_of(self.network))

    path = tmp_path / "best.safetensors"
    ckpt = ModelCheckpoint(path)
    history = bprop.fit(net, X, y, optimizer=optim.Adam(net, lr=0.05), epochs=12,
                        batch_size=16, seed=0, validation_data=(Xv, yv),
                        callbacks=[ckpt, Snap()])
    best = int(np.argmin(history.val_loss))
    assert ckpt.best == history.val_loss[best] and ckpt.last_path == str(path)
    saved = bprop.load(path)
    for (_, p, _), q in zip(saved.parameters(), snapshots[best]):
        np.testing.assert_array_equal(p, q)
    assert list(tmp_path.iterdir()) == [path]  # atomic writes leave no temporary behind


def test_model_checkpoint_every_epoch_with_a_formatted_path(make_network, data, tmp_path):
    X, y = data
    net = make_network(SPECS)
    ckpt = ModelCheckpoint(str(tmp_path / "e{epoch:02d}-{loss:.3f}.safetensors"),
                           save_best_only=False)
    history = bprop.fit(net, X, y, epochs=3, callbacks=[ckpt])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"e{k + 1:02d}-{history.loss[k]:.3f}.safetensors" for k in range(3)]
    last = bprop.load(ckpt.last_path)
    for (_, p, _), (_, q, _) in zip(last.parameters(), net.parameters()):
        np.testing.assert_array_equal(p, q)


def test_model_checkpoint_mode_follows_the_monitor(make_network, tmp_path):
    net = make_network(SPECS)
    ckpt = ModelCheckpoint(tmp_path / "m.safetensors", monitor="val_accuracy")
    assert ckpt.mode == "max"
    ckpt.set_network(net)
    saved = []
    for epoch, acc in enumerate([0.5, 0.4, 0.7, 0.7]):
        ckpt.last_path = None
        ckpt.on_epoch_end(epoch, {"val_accuracy": acc})
        saved.append(ckpt.last_path is not None)
    assert saved == [True, False, True, False]  # strict improvements only
    assert ModelCheckpoint(tmp_path / "x", monitor="val_loss").mode == "min"


# ---- CSVLogger ----------------------------------------------------------------------------

def test_csv_logger_writes_keras_columns(make_network, data, tmp_path):
    X, y = data
    path = tmp_path / "log.csv"
    net = make_network(SPECS)
    history = bprop.fit(net, X, y, epochs=3, validation_split=0.25, metrics=["accuracy"],
                        callbacks=[CSVLogger(path)], seed=0)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keys = sorted(["loss", "val_loss", "accuracy", "val_accuracy", "lr", "time"])
    assert rows[0] == ["epoch"] + keys
    assert [r[0] for r in rows[1:]] == ["0", "1", "2"]
    record = history.history
    for k, key in enumerate(keys):
        assert [float(r[k + 1]) for r in rows[1:]] == record[key]  # written in full
    # append: more rows, no second header
    bprop.fit(net, X, y, epochs=2, validation_split=0.25, metrics=["accuracy"],
              callbacks=[CSVLogger(path, append=True)], seed=0)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 6 and rows[0][0] == "epoch" and [r[0] for r in rows[4:]] == ["0", "1"]


def test_csv_logger_separator_and_missing_values(tmp_path):
    path = tmp_path / "log.tsv"
    logger = CSVLogger(path, separator="\t")
    logger.on_train_begin({})
    logger.on_epoch_end(0, {"loss": 0.5, "val_loss": 0.25})
    logger.on_epoch_end(1, {"loss": 0.375})
    logger.on_train_end({})
    assert path.read_text().splitlines() == ["epoch\tloss\tval_loss", "0\t0.5\t0.25",
                                             "1\t0.375\tNA"]


# ---- hostile arguments --------------------------------------------------------------------

def test_callback_arguments_are_checked(tmp_path):
    cases = [
        (lambda: EarlyStopping(patience=-1), ValueError, r"\[EarlyStopping\] patience must be "
                                                         r">= 0"),
        (lambda: EarlyStopping(patience=1.5), TypeError, r"\[EarlyStopping\] patience must be "
                                                         r"an int"),
        (lambda: EarlyStopping(min_delta=-0.1), ValueError, r"\[EarlyStopping\] min_delta "
                                                            r"must be >= 0"),
        (lambda: EarlyStopping(monitor=3), TypeError, r"\[EarlyStopping\] monitor must be the "
                                                      r"name of a fit log"),
        (lambda: EarlyStopping(mode="up"), ValueError, r"\[EarlyStopping\] mode must be 'auto', "
                                                       r"'min' or 'max'"),
        (lambda: EarlyStopping(restore_best_weights="yes"), TypeError,
         r"\[EarlyStopping\] restore_best_weights must be a bool"),
        (lambda: ModelCheckpoint(3), TypeError, r"\[ModelCheckpoint\] path must be a str or "
                                                r"os.PathLike"),
        (lambda: ModelCheckpoint(""), ValueError, r"\[ModelCheckpoint\] path must be a "
                                                  r"non-empty"),
        (lambda: ModelCheckpoint("a", monitor=""), TypeError, r"\[ModelCheckpoint\] monitor "
                                                              r"must be"),
        (lambda: ModelCheckpoint("a", save_best_only=1), TypeError,
         r"\[ModelCheckpoint\] save_best_only must be a bool"),
        (lambda: CSVLogger(None), TypeError, r"\[CSVLogger\] path must be a str"),
        (lambda: CSVLogger("a", separator=",,"), ValueError, r"\[CSVLogger\] separator must be "
                                                             r"one character"),
        (lambda: CSVLogger("a", append="no"), TypeError, r"\[CSVLogger\] append must be a bool"),
    ]
    for make, kind, pattern in cases:
        with pytest.raises(kind, match=pattern):
            make()


def test_callbacks_used_outside_fit_say_so(make_network, tmp_path):
    with pytest.raises(RuntimeError, match=r"\[ModelCheckpoint\] has no network: pass it to "
                                           r"bprop.fit"):
        ModelCheckpoint(tmp_path / "a").on_epoch_end(0, {"val_loss": 1.0})
    with pytest.raises(RuntimeError, match=r"\[CSVLogger\] the file is not open"):
        CSVLogger(tmp_path / "a").on_epoch_end(0, {"loss": 1.0})
    ckpt = ModelCheckpoint(tmp_path / "{nope}", save_best_only=False)
    ckpt.set_network(make_network(SPECS))
    with pytest.raises(ValueError, match=r"\[ModelCheckpoint\] path .* cannot be formatted"):
        ckpt.on_epoch_end(0, {"loss": 1.0})


# ---- summary --------------------------------------------------------------------------------

def test_summary_is_a_keras_like_table():
    net = bprop.Network([
        bprop.Dense(4, 8, activation="relu"), bprop.BatchNorm(8),
        bprop.Residual([bprop.Dense(8, 8, activation="relu"), bprop.Dropout(0.1),
                        bprop.Dense(8, 8)]),
        bprop.Dense(8, 2)], seed=0)
    text = net.summary()
    lines = text.splitlines()
    assert lines[0] == "Network (float32, 4 input features, training mode)"
    assert lines[2].split() == ["Layer", "(type)", "Output", "width", "Param", "#"]
    body = lines[4:lines.index(lines[1], 4)]
    assert [line.split() for line in body] == [
        ["layers.0", "(Dense)", "8", "40"],
        ["layers.1", "(BatchNorm)", "8", "32"],
        ["layers.2", "(Residual)", "8", "144"],
        ["layers.2.layers.0", "(Dense)", "8", "72"],
        ["layers.2.layers.1", "(Dropout)", "8", "0"],
        ["layers.2.layers.2", "(Dense)", "8", "72"],
        ["layers.3", "(Dense)", "2", "18"],
    ]
    assert body[3].startswith("  layers.2.layers.0") and body[2].startswith("layers.2 ")
    trainable = net.num_parameters
    assert trainable == 40 + 16 + 144 + 18
    assert lines[-3:] == [f"Total params: {trainable + 16}", f"Trainable params: {trainable}",
                          "Non-trainable params: 16"]
    assert "eval mode" in net.eval().summary()
