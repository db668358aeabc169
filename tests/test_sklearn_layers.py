"""bprop.sklearn's dropout and batch_norm: the hidden blocks they build, training
in training mode and predicting in eval mode, the parameters' checks, pickling,
warm starts, lbfgs and model selection over them."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.datasets import load_digits, load_iris, make_friedman1
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import bprop
from bprop.sklearn import MLPClassifier, MLPRegressor

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = bprop.get_num_threads()
    bprop.set_num_threads(1)
    yield
    bprop.set_num_threads(before)


def _digits():
    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    X_train, X_test, y_train, y_test = train_test_split(X, y, stratify=y, random_state=0)
    return X_train, y_train, X_test, y_test


def _kinds(est):
    return [layer.kind for layer in est._net.layers]


def _eval_output(net, X):
    """The network's output in eval mode, by hand (forward, not predict)."""
    was = net.training
    net.eval()
    try:
        return net.forward(np.ascontiguousarray(X, dtype=net.dtype))
    finally:
        net.train(was)


# ---- the network they build ----------------------------------------------------------

def test_default_network_is_the_dense_stack():
    X, y, _, _ = _digits()
    clf = MLPClassifier(hidden_layer_sizes=(16, 8), activation="tanh", max_iter=2,
                        random_state=0).fit(X, y)
    assert _kinds(clf) == ["Dense", "Dense", "Dense"]
    assert [L.activation for L in clf._net.layers] == ["tanh", "tanh", "identity"]
    assert list(clf._net.buffers()) == []
    # dropout=0.0 and batch_norm=False spelled out: the same network, bit for bit
    same = MLPClassifier(hidden_layer_sizes=(16, 8), activation="tanh", max_iter=2,
                         random_state=0, dropout=0.0, batch_norm=False).fit(X, y)
    assert same.loss_curve_ == clf.loss_curve_
    for a, b in zip(same.coefs_ + same.intercepts_, clf.coefs_ + clf.intercepts_):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dropout,batch_norm,kinds", [
    (0.3, False, ["Dense", "Dropout", "Dense", "Dropout", "Dense"]),
    (0.0, True, ["Dense", "BatchNorm", "Activation", "Dense", "BatchNorm", "Activation",
                 "Dense"]),
    (0.3, True, ["Dense", "BatchNorm", "Activation", "Dropout", "Dense", "BatchNorm",
                 "Activation", "Dropout", "Dense"]),
])
def test_hidden_blocks(dropout, batch_norm, kinds):
    X, y, _, _ = _digits()
    clf = MLPClassifier(hidden_layer_sizes=(16, 8), activation="tanh", max_iter=2,
                        random_state=0, dropout=dropout, batch_norm=batch_norm).fit(X, y)
    assert _kinds(clf) == kinds
    dense = [L for L in clf._net.layers if L.kind == "Dense"]
    expected = "identity" if batch_norm else "tanh"
    assert [L.activation for L in dense] == [expected, expected, "identity"]
    assert all(L.activation == "tanh" for L in clf._net.layers if L.kind == "Activation")
    assert all(L.p == dropout for L in clf._net.layers if L.kind == "Dropout")
    # coefs_ and intercepts_: the Dense layers' own storage, scikit-learn's shapes
    assert [c.shape for c in clf.coefs_] == [(64, 16), (16, 8), (8, 10)]
    assert [b.shape for b in clf.intercepts_] == [(16,), (8,), (10,)]
    for layer, W, b in zip(dense, clf.coefs_, clf.intercepts_):
        assert np.shares_memory(W, layer.weight) and np.shares_memory(b, layer.bias)
    assert clf.n_layers_ == 4
    assert clf._net.training  # fit restored the mode it found


# ---- dropout ---------------------------------------------------------------------------

def test_dropout_changes_training_and_predict_is_eval_mode():
    X, y, X_test, _ = _digits()
    params = {"hidden_layer_sizes": (32,), "max_iter": 5, "random_state": 0}
    plain = MLPClassifier(**params).fit(X, y)
    dropped = MLPClassifier(dropout=0.5, **params).fit(X, y)
    assert dropped.loss_curve_ != plain.loss_curve_
    assert not np.array_equal(dropped.coefs_[0], plain.coefs_[0])
    # predict is deterministic and is the eval-mode network (no mask)
    proba = dropped.predict_proba(X_test)
    np.testing.assert_array_equal(dropped.predict_proba(X_test), proba)
    logits = _eval_output(dropped._net, X_test)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(proba, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(dropped.predict(X_test), dropped.classes_[proba.argmax(1)])
    # in training mode the masks would change the output
    train_out = dropped._net.forward(np.ascontiguousarray(X_test))
    assert not np.allclose(train_out, logits)


def test_dropout_is_reproducible_from_random_state():
    X, y, _, _ = _digits()
    params = {"hidden_layer_sizes": (32,), "max_iter": 3, "dropout": 0.3, "random_state": 7}
    a = MLPClassifier(**params).fit(X, y)
    b = MLPClassifier(**params).fit(X, y)
    assert a.loss_curve_ == b.loss_curve_
    for u, v in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_):
        np.testing.assert_array_equal(u, v)
    c = MLPClassifier(**{**params, "random_state": 8}).fit(X, y)
    assert c._net.dropout_seed != a._net.dropout_seed


# ---- batch_norm ------------------------------------------------------------------------

def test_batch_norm_learns_digits():
    X, y, X_test, y_test = _digits()
    clf = MLPClassifier(hidden_layer_sizes=(64,), batch_norm=True, max_iter=60,
                        random_state=0).fit(X, y)
    assert clf.score(X_test, y_test) > 0.9
    bn = clf._net.layers[1]
    assert not np.allclose(bn.running_var, 1.0)  # the running statistics were learnt
    # predict uses the running statistics: the eval-mode output, not the batch's
    logits = _eval_output(clf._net, X_test)
    np.testing.assert_array_equal(clf.predict(X_test), clf.classes_[logits.argmax(1)])


def test_batch_norm_and_dropout_regression():
    X, y = make_friedman1(n_samples=600, noise=0.5, random_state=0)
    X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0)
    model = Pipeline([("scale", StandardScaler()),
                      ("mlp", MLPRegressor(hidden_layer_sizes=(64,), batch_norm=True,
                                           dropout=0.1, max_iter=300,
                                           learning_rate_init=0.01, random_state=0))])
    model.fit(X_train, y_train)
    assert model.score(X_test, y_test) > 0.6


def test_batch_norm_skips_a_one_row_minibatch():
    # 21 samples in minibatches of 10: the third has one row, without a batch variance
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((21, 4)), rng.standard_normal(21)
    reg = MLPRegressor(hidden_layer_sizes=(6,), batch_norm=True, batch_size=10, max_iter=3,
                       tol=0.0, n_iter_no_change=100, random_state=0).fit(X, y)
    assert reg._optimizer.step_count == 2 * 3  # two updates per epoch
    assert len(reg.loss_curve_) == 3 and np.isfinite(reg.loss_curve_).all()
    assert reg._net.dropout_step == 2 * 3


def test_lbfgs_batch_norm_uses_full_batch_statistics():
    X, y = load_iris(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    clf = MLPClassifier(hidden_layer_sizes=(8,), solver="lbfgs", batch_norm=True,
                        max_iter=200, random_state=0).fit(X, y)
    assert clf.score(X, y) > 0.9
    z = X @ clf.coefs_[0] + clf.intercepts_[0]  # BatchNorm's input
    bn = clf._net.layers[1]
    np.testing.assert_allclose(bn.running_mean, z.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bn.running_var, z.var(axis=0, ddof=1), rtol=1e-10)


def test_early_stopping_keeps_the_best_weights_and_buffers(monkeypatch):
    X, y = make_friedman1(n_samples=400, noise=0.5, random_state=1)
    X = StandardScaler().fit_transform(X)
    held_out = {}
    original = MLPRegressor._validation_split

    def capture(self, *args):
        parts = original(self, *args)
        held_out["X"], held_out["y"] = parts[3], parts[4]
        return parts
    monkeypatch.setattr(MLPRegressor, "_validation_split", capture)
    reg = MLPRegressor(hidden_layer_sizes=(32,), batch_norm=True, dropout=0.2,
                       early_stopping=True, n_iter_no_change=3, max_iter=200,
                       learning_rate_init=0.01, random_state=0).fit(X, y)
    best = int(np.argmax(reg.validation_scores_))
    assert best < len(reg.validation_scores_) - 1  # training went on past the best epoch
    # the kept network (weights and running statistics), scored in eval mode, is the best
    assert reg.score(held_out["X"], held_out["y"]) == reg.best_validation_score_


# ---- warm starts, partial_fit, pickling ----------------------------------------------------

def test_warm_start_and_partial_fit_continue():
    X, y, X_test, y_test = _digits()
    clf = MLPClassifier(hidden_layer_sizes=(32,), batch_norm=True, dropout=0.2, max_iter=3,
                        warm_start=True, random_state=0).fit(X, y)
    net, step = clf._net, clf._net.dropout_step
    clf.fit(X, y)
    assert clf._net is net and len(clf.loss_curve_) == 6
    assert clf._net.dropout_step == 2 * step  # new masks: the clock went on
    inc = MLPClassifier(hidden_layer_sizes=(32,), batch_norm=True, dropout=0.2,
                        learning_rate_init=0.01, random_state=0)
    for _ in range(10):
        inc.partial_fit(X, y, classes=np.arange(10))
    assert inc.score(X_test, y_test) > 0.85 and inc.loss_curve_[-1] < inc.loss_curve_[0]


@pytest.mark.parametrize("change", [{"dropout": 0.3}, {"batch_norm": False},
                                    {"dropout": 0.0}])
def test_warm_start_refuses_other_blocks(change):
    X, y, _, _ = _digits()
    clf = MLPClassifier(hidden_layer_sizes=(16,), batch_norm=True, dropout=0.2, max_iter=1,
                        warm_start=True, random_state=0).fit(X, y)
    clf.set_params(**change)
    with pytest.raises(ValueError, match=r"\[MLPClassifier.fit\] the network was built with "
                                         r"dropout=0.2 and batch_norm=True, but dropout="):
        clf.fit(X, y)
    with pytest.raises(ValueError, match=r"\[MLPClassifier.partial_fit\] the network was built"):
        clf.partial_fit(X, y)


def test_warm_start_refuses_another_activation_after_batch_norm():
    X, y, _, _ = _digits()
    clf = MLPClassifier(hidden_layer_sizes=(16,), batch_norm=True, max_iter=1,
                        warm_start=True, random_state=0).fit(X, y)
    clf.set_params(activation="tanh")
    with pytest.raises(ValueError, match="built with activation='relu', but activation='tanh'"):
        clf.fit(X, y)


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_pickle_round_trip(Estimator):
    X, y, X_test, _ = _digits()
    est = Estimator(hidden_layer_sizes=(16,), batch_norm=True, dropout=0.3, random_state=0)
    kwargs = {"classes": np.arange(10)} if Estimator is MLPClassifier else {}
    for _ in range(2):
        est.partial_fit(X, y, **kwargs)
    copy = pickle.loads(pickle.dumps(est))
    assert copy._net is not est._net
    assert _kinds(copy) == _kinds(est)
    np.testing.assert_array_equal(copy.predict(X_test), est.predict(X_test))
    for (_, a), (_, b) in zip(copy._net.buffers(), est._net.buffers()):
        np.testing.assert_array_equal(a, b)
    # the dropout masks and Adam's state travel: the next epoch agrees bit for bit
    est.partial_fit(X, y)
    copy.partial_fit(X, y)
    assert copy.loss_curve_ == est.loss_curve_
    for a, b in zip(copy.coefs_ + copy.intercepts_, est.coefs_ + est.intercepts_):
        np.testing.assert_array_equal(a, b)


# ---- parameters ----------------------------------------------------------------------------

@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, np.nan, np.inf, "0.5", None])
def test_dropout_values_refused(value):
    X, y, _, _ = _digits()
    with pytest.raises(ValueError, match=r"The 'dropout' parameter of MLPClassifier must be a "
                                         r"float in the range \[0.0, 1.0\)"):
        MLPClassifier(dropout=value).fit(X, y)


def test_dropout_bool_refused():
    X, y, _, _ = _digits()
    with pytest.raises(TypeError, match=r"\[MLPRegressor.fit\] dropout must be a float in "
                                        r"\[0, 1\), but got bool False"):
        MLPRegressor(dropout=False).fit(X, y)


@pytest.mark.parametrize("value", [1, "yes", None, 0.5])
def test_batch_norm_values_refused(value):
    X, y, _, _ = _digits()
    with pytest.raises(ValueError, match="The 'batch_norm' parameter of MLPRegressor must be "
                                         "an instance of 'bool'"):
        MLPRegressor(batch_norm=value).fit(X, y)


def test_lbfgs_refuses_dropout():
    X, y, _, _ = _digits()
    clf = MLPClassifier(solver="lbfgs", dropout=0.1)
    with pytest.raises(ValueError, match=r"\[MLPClassifier.fit\] solver='lbfgs' needs a "
                                         r"deterministic objective, but dropout=0.1"):
        clf.fit(X, y)
    assert not hasattr(clf, "_net")


def test_batch_norm_needs_two_samples():
    X, y, _, _ = _digits()
    with pytest.raises(ValueError, match=r"\[MLPRegressor.fit\] batch_norm=True needs at least "
                                         r"2 training samples .*but got 1 sample"):
        MLPRegressor(batch_norm=True).fit(X[:1], y[:1])


# ---- model selection -----------------------------------------------------------------------

def test_grid_search_over_dropout_and_batch_norm():
    X, y = load_iris(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, stratify=y, random_state=0)
    pipe = Pipeline([("scale", StandardScaler()),
                     ("mlp", MLPClassifier(hidden_layer_sizes=(16,), max_iter=200,
                                           learning_rate_init=0.01, random_state=0))])
    grid = GridSearchCV(pipe, {"mlp__dropout": [0.0, 0.2], "mlp__batch_norm": [False, True]},
                        cv=3, error_score="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        grid.fit(X_train, y_train)
    assert len(grid.cv_results_["params"]) == 4
    assert np.isfinite(grid.cv_results_["mean_test_score"]).all()
    assert grid.best_score_ > 0.85 and grid.score(X_test, y_test) > 0.85
    best = grid.best_estimator_.named_steps["mlp"]
    assert (best.dropout, best.batch_norm) == (grid.best_params_["mlp__dropout"],
                                               grid.best_params_["mlp__batch_norm"])
