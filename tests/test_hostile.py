"""Hostile input at every public entry point (issue 5, item 1).

Each case in ERRORS is one bad call: it must raise ValueError or TypeError
(RuntimeError only for a call out of order) whose message names the call, the
argument, what was expected and what arrived, and it must leave every weight,
gradient, cache and optimizer state bitwise as it was (and write no file).
test_errors.py covers forward, backward and step with bad arrays, Dense sizes
and activations and the layer list of Network; this file covers the rest.

Where bad-looking input is accepted, the result is exact and documented here
(the DOCUMENTED tests): the high-level calls (predict, fit, evaluate, the
losses) convert any real array layout and dtype, so a Fortran-ordered, strided,
read-only or zero-stride broadcast array gives bitwise the result of its
C-contiguous copy; forward and predict propagate NaN and inf row by row; the
losses propagate NaN in the logits. fit, evaluate and gradcheck refuse
non-finite X (a ValueError naming the first bad entry).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import bprop
from bprop import losses, optim

SPECS = [(4, 6, "tanh"), (6, 3)]
LOSS_NAMES = r"\['bce_with_logits', 'binary_cross_entropy_with_logits', 'cross_entropy', " \
             r"'huber', 'mae', 'mean_absolute_error', 'mean_squared_error', 'mse', " \
             r"'poisson_nll', 'softmax_cross_entropy'\]"


class World:
    """Two trained networks (float64 and float32) with Adam state, gradients and
    caches, the data they were trained on, and a folder for checkpoints."""

    def __init__(self, folder):
        rng = np.random.default_rng(0)
        self.X = rng.standard_normal((12, 4))
        self.y = rng.integers(0, 3, 12)
        self.folder = folder
        self.net = bprop.Network([bprop.Dense(*s) for s in SPECS], dtype="float64", seed=3)
        self.net32 = bprop.Network([bprop.Dense(*s) for s in SPECS], dtype="float32", seed=3)
        self.opt = optim.Adam(self.net, lr=1e-2)
        self.opt32 = optim.Adam(self.net32, lr=1e-2)
        for net, opt in ((self.net, self.opt), (self.net32, self.opt32)):
            bprop.fit(net, self.X, self.y, optimizer=opt, epochs=2, batch_size=4, seed=0)
            Xc = np.ascontiguousarray(self.X[:5], dtype=net.dtype)
            self._keep = Xc  # forward caches X by reference
            net.forward(Xc)
            net.backward(np.ones((5, 3), net.dtype))
        self.Xc32 = np.ascontiguousarray(self.X, dtype=np.float32)

    def snapshot(self):
        """Bytes of everything a call could change."""
        state = {"files": sorted(os.listdir(self.folder))}
        for tag, net, opt in (("64", self.net, self.opt), ("32", self.net32, self.opt32)):
            for i, L in enumerate(net.layers):
                for name in ("weight", "bias", "grad_weight", "grad_bias", "input", "z",
                             "output", "delta"):
                    a = getattr(L, name)
                    state[f"{tag}.{i}.{name}"] = None if a is None else (a.shape, a.tobytes())
            sd = opt.state_dict()
            state[f"{tag}.opt"] = (sd["step"], repr(sd["hyperparameters"]))
            for pname, arrays in sd["state"].items():
                for k, a in arrays.items():
                    state[f"{tag}.opt.{pname}.{k}"] = a.tobytes()
            state[f"{tag}.fit_optimizer"] = id(getattr(net, "_fit_optimizer", None))
        return state


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def _sd_with(w, fn):
    sd = w.opt.state_dict()
    fn(sd)
    return sd


def _other_net():
    return bprop.Network([bprop.Dense(*s) for s in SPECS], dtype="float64", seed=9)


def _fortran_X(w):
    return np.asfortranarray(w.X)


# (id, call, exception, message regex). The regex starts at the call's tag.
ERRORS = [
    # ---- Network and Dense ---------------------------------------------------------------
    ("Network-dtype-None", lambda w: bprop.Network([bprop.Dense(2, 2)], dtype=None),
     ValueError, r"^\[Network\] dtype must be 'float32' or 'float64', but got None"),
    ("Network-slope-overflows-float32",
     lambda w: bprop.Network([bprop.Dense(2, 2, "leaky_relu", negative_slope=1e39)],
                             dtype="float32"),
     ValueError, r"^\[Network\] layers\[0\]\.negative_slope = 1e\+39 overflows float32"),
    ("Dense-numpy-sizes-overflow-int64",
     lambda w: bprop.Dense(np.int64(2**32), np.int64(2**32)),
     ValueError, r"^\[Dense\] in_features \* out_features = 4294967296 \* 4294967296 exceeds "
                 r"the limit of 1099511627776 weights per layer"),
    ("Dense-size-inf", lambda w: bprop.Dense(float("inf"), 3),
     TypeError, r"^\[Dense\] in_features must be an int, but got float inf"),
    ("Dense-weight-unattached", lambda w: bprop.Dense(3, 3).weight,
     RuntimeError, r"^\[Dense\.weight\] this layer is not part of a Network yet"),
    ("Dense-weight-transposed", lambda w: setattr(w.net[0], "weight", np.ones((6, 4))),
     ValueError, r"^\[Dense\.weight\] must have shape \(4, 6\), but got \(6, 4\)"),
    ("Dense-weight-nan",
     lambda w: setattr(w.net[0], "weight", np.full((4, 6), np.nan)),
     ValueError, r"^\[Dense\.weight\] must be finite in float64, but the array holds NaN or inf"),
    ("Dense-weight-overflows-float32",
     lambda w: setattr(w.net32[1], "weight", np.full((6, 3), 1e39)),
     ValueError, r"^\[Dense\.weight\] must be finite in float32"),
    ("Dense-bias-complex", lambda w: setattr(w.net[1], "bias", np.ones(3, complex)),
     TypeError, r"^\[Dense\.bias\] must be assigned real numbers, but got dtype complex128"),
    ("Dense-bias-str", lambda w: setattr(w.net[1], "bias", ["a", "b", "c"]),
     TypeError, r"^\[Dense\.bias\] must be assigned real numbers, but got dtype <U1"),
    # ---- predict -------------------------------------------------------------------------
    ("predict-batch_size-inf", lambda w: w.net.predict(w.X, batch_size=float("inf")),
     TypeError, r"^\[Network\.predict\] batch_size must be an int, but got float inf"),
    ("predict-ragged", lambda w: w.net.predict([[1.0, 2.0, 3.0, 4.0], [1.0]]),
     ValueError, r"^\[Network\.predict\] X must be a rectangular 2-D array, but got a ragged "
                 r"list"),
    # ---- Network.train_step --------------------------------------------------------------
    ("train_step-X-list", lambda w: w.net.train_step(w.X.tolist(), w.y, optimizer=w.opt),
     TypeError, r"^\[Network\.train_step\] X must be a numpy\.ndarray of dtype float64, but "
                r"got list"),
    ("train_step-X-float32", lambda w: w.net.train_step(w.Xc32, w.y, optimizer=w.opt),
     TypeError, r"^\[Network\.train_step\] X must have dtype float64, but has dtype float32"),
    ("train_step-X-fortran", lambda w: w.net.train_step(_fortran_X(w), w.y, optimizer=w.opt),
     ValueError, r"^\[Network\.train_step\] X must be C-contiguous \(row-major\) and aligned"),
    ("train_step-X-broadcast",
     lambda w: w.net.train_step(np.broadcast_to(w.X[0], (12, 4)), w.y, optimizer=w.opt),
     ValueError, r"^\[Network\.train_step\] X must be C-contiguous"),
    # the core tags this message [Network.forward] (reported; the call is train_step)
    ("train_step-X-features",
     lambda w: w.net.train_step(np.ones((12, 3)), w.y, optimizer=w.opt),
     ValueError, r"^\[Network\.train_step\] X has 3 features, but .* expects 4"),
    ("train_step-y-int32",
     lambda w: w.net.train_step(w.X, w.y.astype(np.int32), optimizer=w.opt),
     TypeError, r"^\[Network\.train_step\] y must have dtype int64, but has dtype int32"),
    ("train_step-y-length", lambda w: w.net.train_step(w.X, w.y[:5], optimizer=w.opt),
     ValueError, r"^\[Network\.train_step\] y has 5 labels, but X has 12 rows"),
    ("train_step-mse-y-shape",
     lambda w: w.net.train_step(w.X, np.zeros((12, 2)), "mean_squared_error", w.opt),
     ValueError, r"^\[Network\.train_step\] y has shape \(12, 2\), but the network maps X to "
                 r"\(12, 3\)"),
    ("train_step-label-out-of-range", lambda w: w.net.train_step(w.X, w.y + 3, optimizer=w.opt),
     ValueError, r"^\[Network\.train_step\] labels must lie in \[0, 3\), but y\[0\] = \d"),
    ("train_step-loss-unknown", lambda w: w.net.train_step(w.X, w.y, "hinge", w.opt),
     ValueError, r"^\[Network\.train_step\] loss must be one of 'softmax_cross_entropy', "
                 r"'binary_cross_entropy_with_logits', 'mean_squared_error', 'huber', "
                 r"'mean_absolute_error', 'poisson_nll', but got 'hinge'"),
    ("train_step-loss-int", lambda w: w.net.train_step(w.X, w.y, 3, w.opt),
     TypeError, r"^\[Network\.train_step\] loss must be a loss name or a callable, but got int"),
    ("train_step-optimizer-None", lambda w: w.net.train_step(w.X, w.y),
     TypeError, r"^\[Network\.train_step\] optimizer must be an optimizer from bprop\.optim, "
                r"but got NoneType"),
    ("train_step-sample_weight-float32",
     lambda w: w.net.train_step(w.X, w.y, optimizer=w.opt, sample_weight=np.ones(12, "f4")),
     TypeError, r"^\[Network\.train_step\] sample_weight must have dtype float64, but has "
                r"dtype float32"),
    ("train_step-sample_weight-length",
     lambda w: w.net.train_step(w.X, w.y, optimizer=w.opt, sample_weight=np.ones(3)),
     ValueError, r"^\[Network\.train_step\] sample_weight has 3 entries, but X has 12 rows"),
    # an optimizer bound to another network would update that network's weights
    ("train_step-optimizer-of-another-network",
     lambda w: w.net.train_step(w.X, w.y, optimizer=optim.Adam(_other_net())),
     ValueError, r"^\[Network\.train_step\] (the )?optimizer (is bound to|was built for) "
                 r"another network"),
    # ---- fit: X --------------------------------------------------------------------------
    ("fit-X-nan", lambda w: bprop.fit(w.net, np.where(w.X > 1, np.nan, w.X), w.y),
     ValueError, r"^\[fit\] X must be finite in float64, but X\[\d+, \d+\] = nan"),
    ("fit-X-inf", lambda w: bprop.fit(w.net, np.where(w.X > 1, -np.inf, w.X), w.y),
     ValueError, r"^\[fit\] X must be finite in float64, but X\[\d+, \d+\] = -inf"),
    ("fit-X-overflows-float32", lambda w: bprop.fit(w.net32, w.X * 1e300, w.y),
     ValueError, r"^\[fit\] X must be finite in float32, but X\[0, 0\] = -?inf"),
    ("fit-X-bool", lambda w: bprop.fit(w.net, w.X > 0, w.y),
     TypeError, r"^\[fit\] X must hold real numbers \(integer or floating\), but has dtype bool"),
    ("fit-X-complex", lambda w: bprop.fit(w.net, w.X + 0j, w.y),
     TypeError, r"^\[fit\] X must hold real numbers .*, but has dtype complex128"),
    ("fit-X-object", lambda w: bprop.fit(w.net, w.X.astype(object), w.y),
     TypeError, r"^\[fit\] X must hold real numbers .*, but has dtype object"),
    ("fit-X-str", lambda w: bprop.fit(w.net, w.X.astype(str), w.y),
     TypeError, r"^\[fit\] X must hold real numbers .*, but has dtype <U\d+"),
    ("fit-X-None", lambda w: bprop.fit(w.net, None, w.y),
     TypeError, r"^\[fit\] X must be a 2-D array of numbers, but got None"),
    ("fit-X-ragged", lambda w: bprop.fit(w.net, [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]], w.y[:2]),
     ValueError, r"^\[fit\] X must be a rectangular 2-D array, but got a ragged list"),
    ("fit-X-1-D", lambda w: bprop.fit(w.net, w.X[0], w.y[:1]),
     ValueError, r"^\[fit\] X must be 2-D \(samples, features\), but has shape \(4,\); use "
                 r"X\.reshape\(1, -1\) for a single sample"),
    ("fit-X-3-D", lambda w: bprop.fit(w.net, w.X[None], w.y),
     ValueError, r"^\[fit\] X must be 2-D \(samples, features\), but has shape \(1, 12, 4\)"),
    ("fit-X-0-samples", lambda w: bprop.fit(w.net, w.X[:0], w.y[:0]),
     ValueError, r"^\[fit\] X has 0 samples; expected at least one"),
    # ---- fit: y --------------------------------------------------------------------------
    ("fit-y-None", lambda w: bprop.fit(w.net, w.X, None),
     TypeError, r"^\[fit\] y must be the targets of X, but got None \(y may be None only "
                r"when X is an iterable of \(X_batch, y_batch\) tuples\)"),
    ("fit-y-ragged", lambda w: bprop.fit(w.net, w.X, [[0], [1, 2]] * 6),
     ValueError, r"^\[fit\] y must be a rectangular array, but got a ragged list"),
    ("fit-y-str", lambda w: bprop.fit(w.net, w.X, w.y.astype(str)),
     TypeError, r"^\[fit\] y must hold real numbers \(integer or floating\), but has dtype <U"),
    ("fit-y-complex", lambda w: bprop.fit(w.net, w.X, w.y + 0j),
     TypeError, r"^\[fit\] y must hold real numbers .*, but has dtype complex128"),
    ("fit-y-length", lambda w: bprop.fit(w.net, w.X, w.y[:-2]),
     ValueError, r"^\[fit\] y has 10 labels, but X has 12 rows"),
    ("fit-y-nan-label", lambda w: bprop.fit(w.net, w.X, np.where(w.y == 1, np.nan, w.y)),
     ValueError, r"^\[fit\] y must hold class labels, but y\[\d+\] = nan"),
    ("fit-mse-y-inf", lambda w: bprop.fit(w.net, w.X, np.full((12, 3), np.inf), loss="mse"),
     ValueError, r"^\[fit\] y must be finite, but y\[0, 0\] = inf"),
    ("fit-bce-y-not-probability",
     lambda w: bprop.fit(w.net, w.X, np.full((12, 3), 2.0), loss="bce_with_logits"),
     ValueError, r"^\[fit\] y must hold probabilities in \[0, 1\], but y\[0, 0\] = 2\.0"),
    # ---- fit: numbers and options ----------------------------------------------------------
    ("fit-epochs-negative", lambda w: bprop.fit(w.net, w.X, w.y, epochs=-3),
     ValueError, r"^\[fit\] epochs must be >= 1, but got -3"),
    ("fit-epochs-inf", lambda w: bprop.fit(w.net, w.X, w.y, epochs=float("inf")),
     TypeError, r"^\[fit\] epochs must be an int, but got float inf"),
    ("fit-epochs-nan", lambda w: bprop.fit(w.net, w.X, w.y, epochs=np.nan),
     TypeError, r"^\[fit\] epochs must be an int, but got float nan"),
    ("fit-epochs-bool", lambda w: bprop.fit(w.net, w.X, w.y, epochs=True),
     TypeError, r"^\[fit\] epochs must be an int, but got bool True"),
    ("fit-batch_size-negative", lambda w: bprop.fit(w.net, w.X, w.y, batch_size=-5),
     ValueError, r"^\[fit\] batch_size must be >= 1, but got -5"),
    ("fit-batch_size-None", lambda w: bprop.fit(w.net, w.X, w.y, batch_size=None),
     TypeError, r"^\[fit\] batch_size must be an int, but got NoneType None"),
    ("fit-batch_size-float", lambda w: bprop.fit(w.net, w.X, w.y, batch_size=2.5),
     TypeError, r"^\[fit\] batch_size must be an int, but got float 2\.5"),
    ("fit-validation_split-negative", lambda w: bprop.fit(w.net, w.X, w.y, validation_split=-0.1),
     ValueError, r"^\[fit\] validation_split must be >= 0\.0, but got -0\.1"),
    ("fit-validation_split-nan", lambda w: bprop.fit(w.net, w.X, w.y, validation_split=np.nan),
     ValueError, r"^\[fit\] validation_split must be finite, but got nan"),
    ("fit-validation_split-one", lambda w: bprop.fit(w.net, w.X, w.y, validation_split=1),
     ValueError, r"^\[fit\] validation_split must be < 1\.0, but got 1\.0"),
    ("fit-validation_data-short", lambda w: bprop.fit(w.net, w.X, w.y, validation_data=(w.X,)),
     TypeError, r"^\[fit\] validation_data must be \(X_val, y_val\) or \(X_val, y_val, "
                r"sample_weight_val\), but got tuple"),
    ("fit-validation_data-nan",
     lambda w: bprop.fit(w.net, w.X, w.y, validation_data=(w.X * np.nan, w.y)),
     ValueError, r"^\[fit\] validation_data\[0\] must be finite in float64, but "
                 r"validation_data\[0\]\[0, 0\] = nan"),
    ("fit-validation_data-features",
     lambda w: bprop.fit(w.net, w.X, w.y, validation_data=(w.X[:, :3], w.y)),
     ValueError, r"^\[fit\] validation_data\[0\] has 3 features, but the network expects 4"),
    ("fit-optimizer-str", lambda w: bprop.fit(w.net, w.X, w.y, optimizer="adam"),
     TypeError, r"^\[fit\] optimizer must be a bprop\.optim optimizer or None, but got str"),
    ("fit-loss-None", lambda w: bprop.fit(w.net, w.X, w.y, loss=None),
     TypeError, r"^\[fit\] loss must be a name \(one of " + LOSS_NAMES + r"\) or a callable .*"
                r"but got NoneType"),
    ("fit-loss-unknown", lambda w: bprop.fit(w.net, w.X, w.y, loss="Hinge"),
     ValueError, r"^\[fit\] unknown loss 'Hinge'; expected one of " + LOSS_NAMES),
    ("fit-metrics-int", lambda w: bprop.fit(w.net, w.X, w.y, metrics=3),
     TypeError, r"^\[fit\] metrics must be a list of names \['accuracy', 'mse', "
                r"'mean_squared_error'\] or callables, but got int"),
    ("fit-callbacks-str", lambda w: bprop.fit(w.net, w.X, w.y, callbacks="stop"),
     TypeError, r"^\[fit\] callbacks must be a list, but got str"),
    ("fit-check_finite-str", lambda w: bprop.fit(w.net, w.X, w.y, check_finite="yes"),
     TypeError, r"^\[fit\] check_finite must be a bool, but got str 'yes'"),
    ("fit-verbose-int", lambda w: bprop.fit(w.net, w.X, w.y, verbose=1),
     TypeError, r"^\[fit\] verbose must be a bool, but got int 1"),
    ("fit-seed-str", lambda w: bprop.fit(w.net, w.X, w.y, seed="0"),
     TypeError, r"^\[fit\] seed must be an int, but got str '0'"),
    ("fit-early_stopping-float", lambda w: bprop.fit(w.net, w.X, w.y, early_stopping=1.5),
     TypeError, r"^\[fit\] early_stopping must be an int, but got float 1\.5"),
    ("fit-net-None", lambda w: bprop.fit(None, w.X, w.y),
     TypeError, r"^\[fit\] net must be a bprop\.Network, but got NoneType"),
    # ---- evaluate ------------------------------------------------------------------------
    ("evaluate-X-nan", lambda w: bprop.evaluate(w.net, w.X * np.nan, w.y),
     ValueError, r"^\[evaluate\] X must be finite in float64, but X\[0, 0\] = nan"),
    ("evaluate-y-length", lambda w: bprop.evaluate(w.net, w.X, w.y[:5]),
     ValueError, r"^\[evaluate\] y has 5 labels, but X has 12 rows"),
    ("evaluate-batch_size-zero", lambda w: bprop.evaluate(w.net, w.X, w.y, batch_size=0),
     ValueError, r"^\[evaluate\] batch_size must be >= 1, but got 0"),
    ("evaluate-nothing", lambda w: bprop.evaluate(w.net, w.X, w.y, loss=None),
     ValueError, r"^\[evaluate\] nothing to compute: give a loss or metrics"),
    ("evaluate-sample_weight-negative",
     lambda w: bprop.evaluate(w.net, w.X, w.y, sample_weight=-np.ones(12)),
     ValueError, r"^\[evaluate\] sample_weight must be >= 0, but sample_weight\[0\] = -1\.0"),
    # ---- gradcheck -----------------------------------------------------------------------
    ("gradcheck-eps-zero", lambda w: bprop.gradcheck(w.net, w.X[:2], w.y[:2], eps=0),
     ValueError, r"^\[gradcheck\] eps must be > 0\.0, but got 0\.0"),
    ("gradcheck-eps-inf", lambda w: bprop.gradcheck(w.net, w.X[:2], w.y[:2], eps=np.inf),
     ValueError, r"^\[gradcheck\] eps must be finite, but got inf"),
    ("gradcheck-max_checks-zero",
     lambda w: bprop.gradcheck(w.net, w.X[:2], w.y[:2], max_checks=0),
     ValueError, r"^\[gradcheck\] max_checks must be >= 1, but got 0"),
    ("gradcheck-X-inf", lambda w: bprop.gradcheck(w.net, w.X[:2] * np.inf, w.y[:2]),
     ValueError, r"^\[gradcheck\] X must be finite in float64, but X\[0, 0\] = -?inf"),
    ("gradcheck-seed-negative", lambda w: bprop.gradcheck(w.net, w.X[:2], w.y[:2], seed=-1),
     ValueError, r"^\[gradcheck\] seed must be >= 0, but got -1"),
    # ---- losses --------------------------------------------------------------------------
    ("loss-logits-None", lambda w: losses.softmax_cross_entropy(None, w.y),
     TypeError, r"^\[softmax_cross_entropy\] logits must be a float32 or float64 array, but "
                r"got None"),
    ("loss-output-ragged", lambda w: losses.mean_squared_error([[1.0, 2.0], [1.0]], [[0, 0]]),
     ValueError, r"^\[mean_squared_error\] output must be a rectangular 2-D array, but got a "
                 r"ragged list"),
    ("loss-logits-float16",
     lambda w: losses.softmax_cross_entropy(np.zeros((2, 3), np.float16), [0, 1]),
     TypeError, r"^\[softmax_cross_entropy\] logits must be a float32 or float64 array, but "
                r"has dtype float16"),
    ("loss-logits-complex",
     lambda w: losses.binary_cross_entropy_with_logits(np.zeros((2, 3), complex),
                                                       np.zeros((2, 3))),
     TypeError, r"^\[binary_cross_entropy_with_logits\] logits must be a float32 or float64 "
                r"array, but has dtype complex128"),
    ("loss-output-3-D", lambda w: losses.mean_squared_error(np.zeros((2, 3, 1)), np.zeros(2)),
     ValueError, r"^\[mean_squared_error\] output must be 2-D \(batch, features\), but has "
                 r"shape \(2, 3, 1\)"),
    ("get_loss-None", lambda w: losses.get_loss(None),
     TypeError, r"^\[get_loss\] loss must be a name \(one of " + LOSS_NAMES),
    ("get_loss-unknown", lambda w: losses.get_loss("MSE"),
     ValueError, r"^\[get_loss\] unknown loss 'MSE'; expected one of " + LOSS_NAMES),
    # ---- optimizers ----------------------------------------------------------------------
    ("SGD-lr-overflows-float32", lambda w: optim.SGD(w.net32, lr=1e39),
     ValueError, r"^\[SGD\] lr must be <= 3\.40282\d*e\+38 \(the largest float32\), but got "
                 r"1e\+39"),
    ("Adam-eps-overflows-float32", lambda w: optim.Adam(w.net32, eps=1e39),
     ValueError, r"^\[Adam\] eps must be <= 3\.40282\d*e\+38 \(the largest float32\)"),
    ("SGD-lr-inf", lambda w: optim.SGD(w.net, lr=np.inf),
     ValueError, r"^\[SGD\] lr must be finite, but got inf"),
    ("RMSprop-momentum-negative", lambda w: optim.RMSprop(w.net, momentum=-0.5),
     ValueError, r"^\[RMSprop\] momentum must be >= 0\.0, but got -0\.5"),
    ("Adam-betas-short", lambda w: optim.Adam(w.net, betas=(0.9,)),
     TypeError, r"^\[Adam\] betas must be a pair \(beta1, beta2\), but got tuple \(0\.9,\)"),
    ("Adam-betas-nan", lambda w: optim.Adam(w.net, betas=(np.nan, 0.9)),
     ValueError, r"^\[Adam\] betas\[0\] must be finite, but got nan"),
    ("Adam.lr-nan", lambda w: setattr(w.opt, "lr", np.nan),
     ValueError, r"^\[Adam\.lr\] lr must be finite, but got nan"),
    ("Adam.lr-None", lambda w: setattr(w.opt, "lr", None),
     TypeError, r"^\[Adam\.lr\] lr must be a real number, but got NoneType None"),
    ("Adam.lr-overflows-float32", lambda w: setattr(w.opt32, "lr", 1e39),
     ValueError, r"^\[Adam\.lr\] lr must be <= 3\.40282\d*e\+38 \(the largest float32\)"),
    ("load_state_dict-None", lambda w: w.opt.load_state_dict(None),
     ValueError, r"^\[Adam\.load_state_dict\] expected a dict from state_dict\(\), but got "
                 r"NoneType"),
    ("load_state_dict-other-class",
     lambda w: w.opt.load_state_dict(optim.SGD(w.net, lr=0.1).state_dict()),
     ValueError, r"^\[Adam\.load_state_dict\] the state is of optimizer 'SGD', not 'Adam'"),
    ("load_state_dict-nan-state",
     lambda w: w.opt.load_state_dict(_sd_with(w, lambda sd: sd["state"]["layers.1.bias"][
         "exp_avg"].__setitem__(0, np.nan))),
     ValueError, r"^\[Adam\.load_state_dict\] state\['layers\.1\.bias'\]\['exp_avg'\] holds "
                 r"NaN or inf"),
    ("load_state_dict-shape",
     lambda w: w.opt.load_state_dict(_sd_with(w, lambda sd: sd["state"]["layers.0.weight"]
                                              .update(exp_avg=np.zeros((6, 4))))),
     ValueError, r"^\[Adam\.load_state_dict\] state\['layers\.0\.weight'\]\['exp_avg'\] has "
                 r"shape \(6, 4\), but the parameter has shape \(4, 6\)"),
    ("load_state_dict-lr-overflows-float32",
     lambda w: w.opt32.load_state_dict(dict(w.opt32.state_dict(), hyperparameters=dict(
         w.opt32.hyperparameters, lr=1e39))),
     ValueError, r"^\[Adam\.load_state_dict\] lr must be <= 3\.40282\d*e\+38"),
    ("load_state_dict-step-negative",
     lambda w: w.opt.load_state_dict(dict(w.opt.state_dict(), step=-1)),
     ValueError, r"^\[Adam\.load_state_dict\] step must be an int >= 0, but got -1"),
    # ---- save and load -------------------------------------------------------------------
    ("save-path-None", lambda w: bprop.save(w.net, None),
     TypeError, r"^\[save\] path must be a str or os\.PathLike, but got NoneType None"),
    ("save-path-int", lambda w: bprop.save(w.net, 3),
     TypeError, r"^\[save\] path must be a str or os\.PathLike, but got int 3"),
    ("save-net-str", lambda w: bprop.save("net", w.folder / "x.safetensors"),
     TypeError, r"^\[save\] net must be a bprop\.Network, but got str"),
    ("save-optimizer-of-another-network",
     lambda w: bprop.save(w.net32, w.folder / "x.safetensors", optimizer=w.opt),
     ValueError, r"^\[save\] the optimizer is bound to another network"),
    ("load-path-None", lambda w: bprop.load(None),
     TypeError, r"^\[load\] path must be a str or os\.PathLike, but got NoneType None"),
    ("load-path-bytes", lambda w: bprop.load(b"model.safetensors"),
     TypeError, r"^\[load\] path must be a str or os\.PathLike, but got bytes"),
    ("load-with_optimizer-int",
     lambda w: bprop.load(w.folder / "x.safetensors", with_optimizer=1),
     TypeError, r"^\[load\] with_optimizer must be a bool, but got int"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in ERRORS],
                         ids=[c[0] for c in ERRORS])
def test_bad_call_raises_and_changes_nothing(world, call, error, message):
    assert error in (ValueError, TypeError, RuntimeError)
    before = world.snapshot()
    with pytest.raises(error, match=message):
        call(world)
    after = world.snapshot()
    assert after.keys() == before.keys()
    for key in before:
        assert after[key] == before[key], f"{key} changed"


def test_there_are_at_least_40_cases():
    assert len(ERRORS) >= 40 and len({c[0] for c in ERRORS}) == len(ERRORS)


# ---- documented results ----------------------------------------------------------------------

LAYOUTS = {
    "fortran": lambda X: np.asfortranarray(X),
    "row-strided": lambda X: np.repeat(X, 2, axis=0)[::2],
    "column-strided": lambda X: np.repeat(X, 3, axis=1)[:, ::3],
    "transposed": lambda X: np.ascontiguousarray(X.T).T,
    "read-only": lambda X: _read_only(X),
    "reversed": lambda X: X[::-1].copy()[::-1],
    "list": lambda X: X.tolist(),
}


def _read_only(X):
    X = X.copy()
    X.setflags(write=False)
    return X


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_predict_fit_and_evaluate_convert_any_layout_exactly(layout, dtype):
    """The high-level calls convert: bitwise the result of the C-contiguous copy."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((20, 4))
    y = rng.integers(0, 3, 20)
    results = []
    for data in (X, LAYOUTS[layout](X)):
        net = bprop.Network([bprop.Dense(*s) for s in SPECS], dtype=dtype, seed=4)
        out = net.predict(data)
        bprop.fit(net, data, y, epochs=2, batch_size=6, seed=2)
        results.append([out, net.predict(data), *[p.copy() for _, p, _ in net.parameters()],
                        np.array(bprop.evaluate(net, data, y)["loss"])])
    for a, b in zip(*results):
        assert a.tobytes() == b.tobytes()


def test_zero_stride_broadcast_input_is_converted_and_gives_identical_rows():
    net = bprop.Network([bprop.Dense(*s) for s in SPECS], dtype="float64", seed=4)
    row = np.array([[0.5, -1.0, 2.0, 0.25]])
    X = np.broadcast_to(row, (9, 4))
    assert X.strides[0] == 0
    out = net.predict(X)
    assert out.shape == (9, 3)
    assert all(out[i].tobytes() == out[0].tobytes() for i in range(9))
    np.testing.assert_allclose(out[0], net.predict(row)[0], rtol=1e-14)
    with pytest.raises(ValueError, match=r"^\[Network\.forward\] X must be C-contiguous"):
        net.forward(X)  # the low-level call refuses it instead


@pytest.mark.parametrize("dtype", ["float16", "int8", "uint16", "int64"])
def test_predict_converts_real_dtypes_exactly(dtype):
    net = bprop.Network([bprop.Dense(*s) for s in SPECS], dtype="float64", seed=4)
    X = (np.arange(20).reshape(5, 4) % 7).astype(dtype)
    assert net.predict(X).tobytes() == net.predict(X.astype(np.float64)).tobytes()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_and_predict_propagate_non_finite_input_row_by_row(bad, dtype):
    """NaN/inf in row i give a non-finite row i (tanh saturates inf to +-1, so a
    later layer may see finite values: the row is then finite but still the
    row's own result); the other rows are exactly those of a clean batch."""
    net = bprop.Network([bprop.Dense(4, 5, "relu"), bprop.Dense(5, 3)], dtype=dtype, seed=4)
    X = np.random.default_rng(2).standard_normal((6, 4)).astype(dtype)
    clean = net.predict(X)
    X[2, 1] = bad
    with np.errstate(all="ignore"):
        out = net.forward(X)
        pred = net.predict(X)
    assert pred.tobytes() == out.tobytes()
    assert not np.isfinite(out[2]).all()
    rows = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(out[rows], clean[rows], rtol=1e-5 if dtype == "float32" else 1e-13)


def test_losses_propagate_nan_logits_to_their_rows():
    z = np.zeros((3, 4))
    z[1, 2] = np.nan
    value, grad = losses.softmax_cross_entropy(z, [0, 1, 2])
    assert np.isnan(value)
    assert np.isnan(grad[1]).all()
    np.testing.assert_allclose(grad[[0, 2]], (np.full((2, 4), 0.25) - np.eye(4)[[0, 2]]) / 3,
                               rtol=1e-15)


def test_losses_convert_fortran_and_broadcast_logits_exactly():
    z = np.random.default_rng(3).standard_normal((5, 4))
    y = np.array([0, 1, 2, 3, 0])
    value, grad = losses.softmax_cross_entropy(z, y)
    for other in (np.asfortranarray(z), np.repeat(z, 2, axis=1)[:, ::2]):
        v, g = losses.softmax_cross_entropy(other, y)
        assert v == value and g.tobytes() == grad.tobytes()
    b = np.broadcast_to(z[:1], (5, 4))
    v, g = losses.softmax_cross_entropy(b, np.zeros(5, np.int64))
    assert (g == g[0]).all()


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_train_step_with_a_non_finite_loss_does_not_update(optimizer):
    """A NaN in the input gives a NaN loss; the step must then leave the weights
    as they were (fit relies on it, and restores them itself; a direct train_step
    has nobody to restore them)."""
    net = bprop.Network([bprop.Dense(*s) for s in SPECS], dtype="float64", seed=4)
    opt = optim.SGD(net, lr=0.1) if optimizer == "SGD" else optim.Adam(net)
    X = np.random.default_rng(4).standard_normal((6, 4))
    X[3, 0] = np.nan
    before = [p.copy() for _, p, _ in net.parameters()]
    with np.errstate(all="ignore"):
        value = net.train_step(X, np.zeros(6, np.int64), optimizer=opt)
    assert np.isnan(value)
    for b, (name, p, _) in zip(before, net.parameters()):
        assert b.tobytes() == p.tobytes(), f"{name} changed"


def test_file_system_errors_are_os_errors_and_leave_nothing(tmp_path):
    net = bprop.Network([bprop.Dense(*s) for s in SPECS], seed=4)
    with pytest.raises(FileNotFoundError):
        bprop.save(net, tmp_path / "missing" / "model.safetensors")
    # issue 10: load refuses a directory (any non-regular file) as a CheckpointError
    with pytest.raises(bprop.CheckpointError, match=r"it is a directory, not a regular file"):
        bprop.load(tmp_path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError):
        bprop.save(net, tmp_path / "folder")
    assert sorted(os.listdir(tmp_path)) == ["folder"]
    assert os.listdir(tmp_path / "folder") == []


def test_forward_backward_and_losses_accept_read_only_arrays():
    """Nothing writes into its input: a read-only C-contiguous array of the right
    dtype is taken as it is (forward caches it by reference), with the same bits."""
    net = bprop.Network([bprop.Dense(*s) for s in SPECS], dtype="float64", seed=4)
    X = np.random.default_rng(5).standard_normal((6, 4))
    G = np.ones((6, 3))
    out = net.forward(X)
    dX = net.backward(G, input_grad=True)
    grads = [g.copy() for _, _, g in net.parameters()]
    Xr, Gr = _read_only(X), _read_only(G)
    assert net.forward(Xr).tobytes() == out.tobytes()
    assert np.shares_memory(net[0].input, Xr)
    assert net.backward(Gr, input_grad=True).tobytes() == dX.tobytes()
    assert all(a.tobytes() == g.tobytes() for a, (_, _, g) in zip(grads, net.parameters()))
    y = _read_only(np.array([0, 1, 2, 0, 1, 2]))
    assert losses.softmax_cross_entropy(_read_only(out), y)[1].tobytes() == \
        losses.softmax_cross_entropy(out, [0, 1, 2, 0, 1, 2])[1].tobytes()
