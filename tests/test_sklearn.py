"""bprop.sklearn: scikit-learn's own estimator checks, the same objective as
scikit-learn's MLP (trajectories equal to float64 rounding), and the estimators
in Pipeline, GridSearchCV, warm starts and partial_fit."""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.base import clone
from sklearn.datasets import (load_digits, load_iris, make_classification,
                              make_friedman1, make_multilabel_classification,
                              make_regression)
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.neural_network import MLPClassifier as SkMLPClassifier
from sklearn.neural_network import MLPRegressor as SkMLPRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import bprop
from bprop.sklearn import MLPClassifier, MLPRegressor

# The checks fit with scikit-learn's default max_iter on tiny data, where the
# optimizer rightly reports that it has not converged; nothing else is ignored.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The products here are tiny: threads only contend (on a loaded 2-core
    machine a second OpenBLAS thread made a digits fit 20x slower)."""
    before = bprop.get_num_threads()
    bprop.set_num_threads(1)
    yield
    bprop.set_num_threads(before)


# ---- scikit-learn's estimator checks -------------------------------------------------

# The defaults, and each solver at least once. Every check runs; none is
# expected to fail.
CHECKED_PARAMS = [
    ("MLPClassifier", {}),
    ("MLPRegressor", {}),
    ("MLPClassifier", {"solver": "sgd"}),
    ("MLPRegressor", {"solver": "sgd"}),
    ("MLPRegressor", {"solver": "lbfgs"}),
    ("MLPClassifier", {"solver": "rmsprop", "activation": "tanh"}),
    ("MLPClassifier", {"dropout": 0.2, "batch_norm": True}),
    ("MLPRegressor", {"batch_norm": True, "solver": "lbfgs"}),
]
ESTIMATORS = {"MLPClassifier": MLPClassifier, "MLPRegressor": MLPRegressor}


def _expected_failed_checks(estimator):
    """BatchNorm's statistics count rows and dropout draws a mask per row, so a
    sample weight of 2 is not a repeated row (as in PyTorch): by design."""
    if estimator.batch_norm or estimator.dropout > 0:
        why = "batch statistics and dropout masks are per row, not per unit of weight"
        return {"check_sample_weight_equivalence_on_dense_data": why,
                "check_sample_weight_equivalence_on_sparse_data": why}
    return {}


@parametrize_with_checks([ESTIMATORS[name](**params) for name, params in CHECKED_PARAMS],
                         expected_failed_checks=_expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_array_api_checks_with_scipy_array_api():
    # check_array_api_input skips unless SCIPY_ARRAY_API=1 was set before SciPy was
    # imported, which would change SciPy for the whole session: run it apart.
    code = textwrap.dedent(f"""
        import warnings
        import bprop
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.utils.estimator_checks import estimator_checks_generator
        from bprop.sklearn import MLPClassifier, MLPRegressor
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", ConvergenceWarning)
        bprop.set_num_threads(1)
        ran = 0
        for name, params in {CHECKED_PARAMS!r}:
            est = {{"MLPClassifier": MLPClassifier, "MLPRegressor": MLPRegressor}}[name](**params)
            for e, check in estimator_checks_generator(est, legacy=True):
                if "array_api" in getattr(check, "func", check).__name__:
                    check(e)
                    ran += 1
        print("ran", ran)
    """)
    env = dict(os.environ, SCIPY_ARRAY_API="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"ran {len(CHECKED_PARAMS)}" in result.stdout


# ---- the same objective as scikit-learn ----------------------------------------------

def _problems():
    X, y3 = make_classification(120, 6, n_informative=4, n_classes=3, random_state=0)
    Xm, ym = make_multilabel_classification(120, 6, n_classes=4, random_state=0)
    Xr, yr = make_regression(120, 6, n_targets=3, random_state=0)
    yr = yr / 100
    return {
        "multiclass": (SkMLPClassifier, MLPClassifier, X, y3),
        "binary": (SkMLPClassifier, MLPClassifier, X, (y3 == 1).astype(int)),
        "multilabel": (SkMLPClassifier, MLPClassifier, Xm, ym),
        "regression": (SkMLPRegressor, MLPRegressor, Xr, yr[:, 0]),
        "multi-output regression": (SkMLPRegressor, MLPRegressor, Xr, yr),
    }


PROBLEMS = _problems()


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("solver", ["sgd", "lbfgs"])
def test_same_trajectory_as_sklearn(problem, weighted, solver):
    # Same initial weights, shuffles, loss scaling, L2 term (alpha on the weights,
    # divided by the batch's weight sum) and SGD-with-Nesterov updates: the fits
    # agree to float64 rounding, for every kind of target, with and without weights.
    Sk, Ours, X, y = PROBLEMS[problem]
    sw = np.random.RandomState(1).randint(0, 4, len(X)).astype(float) if weighted else None
    params = dict(solver=solver, alpha=0.1, batch_size=32, hidden_layer_sizes=(7, 5),
                  activation="tanh", max_iter=12, random_state=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = Sk(**params).fit(X, y, sample_weight=sw)
        ours = Ours(**params).fit(X, y, sample_weight=sw)
    assert ours.n_iter_ == theirs.n_iter_
    if solver == "sgd":
        np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-12)
    np.testing.assert_allclose(ours.loss_, theirs.loss_, rtol=1e-12)
    for mine, ref in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        np.testing.assert_allclose(mine, ref, rtol=1e-9, atol=1e-12)
    method = "predict_proba" if hasattr(ours, "predict_proba") else "predict"
    np.testing.assert_allclose(getattr(ours, method)(X), getattr(theirs, method)(X),
                               rtol=1e-9, atol=1e-12)
    if method == "predict_proba":
        np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))


@pytest.mark.parametrize("learning_rate,extra", [("invscaling", {}),
                                                 ("adaptive", {"tol": 0.05,
                                                               "n_iter_no_change": 1})])
def test_learning_rate_schedules_follow_sklearn(learning_rate, extra):
    # Regression: the minibatch loop held the optimizer's update plan from before the
    # first epoch, so the learning rates that invscaling and adaptive set between
    # epochs (each makes a new plan) were ignored until the next call to fit.
    # Without momentum, bprop's SGD is scikit-learn's update at any learning rate.
    Sk, Ours, X, y = PROBLEMS["multiclass"]
    params = dict(solver="sgd", momentum=0.0, learning_rate=learning_rate,
                  learning_rate_init=0.5, alpha=0.1, batch_size=32, hidden_layer_sizes=(7, 5),
                  activation="tanh", max_iter=12, random_state=1, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = Sk(**params).fit(X, y)
        ours = Ours(**params).fit(X, y)
    assert ours._optimizer.lr == theirs._optimizer.learning_rate < 0.5
    assert ours._optimizer.step_count == 12 * 4  # 120 samples in minibatches of 32
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-12)
    for mine, ref in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        np.testing.assert_allclose(mine, ref, rtol=1e-9, atol=1e-12)


def test_adam_and_early_stopping_follow_sklearn():
    # Adam differs only in where epsilon sits (torch's form); early stopping on a
    # binary problem uses the same stratified split and the same stopping rule.
    X, y = make_classification(200, 6, n_informative=4, random_state=0)
    params = dict(early_stopping=True, n_iter_no_change=3, random_state=1, max_iter=100,
                  batch_size=32)
    theirs = SkMLPClassifier(**params).fit(X, y)
    ours = MLPClassifier(**params).fit(X, y)
    assert ours.n_iter_ == theirs.n_iter_ < 100
    assert ours.validation_scores_ == pytest.approx(theirs.validation_scores_)
    assert ours.best_validation_score_ == max(ours.validation_scores_)
    assert ours.best_loss_ is None
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-5)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-4)


# ---- real problems, Pipeline and GridSearchCV -----------------------------------------

def test_digits_pipeline():
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, stratify=y, random_state=0)
    model = Pipeline([("scale", StandardScaler()),
                      ("mlp", MLPClassifier(hidden_layer_sizes=(64,), random_state=0))])
    model.fit(X_train, y_train)
    assert model.score(X_test, y_test) > 0.95
    proba = model.predict_proba(X_test)
    assert proba.shape == (len(X_test), 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    mlp = model.named_steps["mlp"]
    assert mlp.out_activation_ == "softmax" and mlp.n_outputs_ == 10
    assert mlp.n_iter_ < 200  # converged: the training loss stopped improving by tol
    assert len(mlp.loss_curve_) == mlp.n_iter_ and mlp.best_loss_ == min(mlp.loss_curve_)


def test_iris_grid_search():
    X, y = load_iris(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, stratify=y, random_state=0)
    pipe = Pipeline([("scale", StandardScaler()),
                     ("mlp", MLPClassifier(max_iter=300, random_state=0))])
    grid = GridSearchCV(pipe, {"mlp__hidden_layer_sizes": [(8,), (32,)],
                               "mlp__alpha": [1e-4, 1e-1],
                               "mlp__solver": ["adam", "lbfgs"]}, cv=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        grid.fit(X_train, y_train)
    assert grid.best_score_ > 0.9
    assert grid.score(X_test, y_test) > 0.9
    assert len(grid.cv_results_["params"]) == 8


def test_regression_pipeline_r2():
    X, y = make_friedman1(n_samples=1200, noise=0.5, random_state=0)
    X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0)
    model = Pipeline([("scale", StandardScaler()),
                      ("mlp", MLPRegressor(hidden_layer_sizes=(64, 64), max_iter=500,
                                           random_state=0))])
    model.fit(X_train, y_train)
    assert model.score(X_test, y_test) > 0.9
    assert model.named_steps["mlp"].out_activation_ == "identity"


def test_multi_output_regression_and_multilabel():
    X, Y = make_regression(300, 5, n_targets=3, noise=1.0, random_state=0)
    reg = MLPRegressor(hidden_layer_sizes=(32,), solver="lbfgs", max_iter=500,
                       random_state=0).fit(X, Y)
    assert reg.predict(X).shape == (300, 3) and reg.n_outputs_ == 3
    assert reg.score(X, Y) > 0.95
    Xm, Ym = make_multilabel_classification(300, 8, n_classes=4, random_state=0)
    Xm = StandardScaler().fit_transform(Xm)
    clf = MLPClassifier(max_iter=500, random_state=0).fit(Xm, Ym)
    assert clf.out_activation_ == "logistic" and clf.n_outputs_ == 4
    assert clf.predict(Xm).shape == (300, 4) and clf.predict_proba(Xm).shape == (300, 4)
    # subset accuracy on noisy labels: the same as scikit-learn's MLP reaches
    reference = SkMLPClassifier(max_iter=500, random_state=0).fit(Xm, Ym).score(Xm, Ym)
    assert clf.score(Xm, Ym) >= reference - 0.03


def test_binary_uses_one_sigmoid_output():
    X, y = make_classification(100, 4, random_state=0)
    labels = np.where(y == 1, "yes", "no")
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=300, random_state=0).fit(X, labels)
    assert clf.n_outputs_ == 1 and clf.coefs_[-1].shape == (8, 1)
    assert clf.out_activation_ == "logistic"
    assert list(clf.classes_) == ["no", "yes"]
    proba = clf.predict_proba(X)
    assert proba.shape == (100, 2)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[proba.argmax(axis=1)])
    np.testing.assert_allclose(clf.predict_log_proba(X), np.log(proba))


# ---- warm_start and partial_fit -----------------------------------------------------

def _digits():
    X, y = load_digits(return_X_y=True)
    return StandardScaler().fit_transform(X), y


def test_warm_start_continues():
    X, y = _digits()
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=5, random_state=0,
                        warm_start=True)
    with pytest.warns(ConvergenceWarning, match="Maximum iterations \\(5\\)"):
        clf.fit(X, y)
    first = list(clf.loss_curve_)
    net = clf._net
    with pytest.warns(ConvergenceWarning):
        clf.fit(X, y)
    assert clf._net is net  # same network, trained further
    assert clf.n_iter_ == 5 and len(clf.loss_curve_) == 10 and clf.t_ == 10 * len(X)
    assert clf.loss_curve_[:5] == first
    assert clf.loss_curve_[5] < first[-1]
    # a cold start begins again from the same initial weights
    cold = clone(clf).set_params(warm_start=False)
    with pytest.warns(ConvergenceWarning):
        cold.fit(X, y)
    with pytest.warns(ConvergenceWarning):
        cold.fit(X, y)
    assert cold.loss_curve_ == first


def test_warm_start_across_solvers_and_early_stopping():
    X, y = _digits()
    clf = MLPClassifier(hidden_layer_sizes=(16,), solver="lbfgs", max_iter=20,
                        warm_start=True, random_state=0)
    with pytest.warns(ConvergenceWarning, match="lbfgs failed to converge"):
        clf.fit(X, y)
    assert not hasattr(clf, "loss_curve_") and clf.n_iter_ == 20
    lbfgs_loss = clf.loss_
    clf.set_params(solver="adam", max_iter=3)
    with pytest.warns(ConvergenceWarning):
        clf.fit(X, y)
    assert len(clf.loss_curve_) == 3 and clf.loss_curve_[0] < 2 * lbfgs_loss
    clf.set_params(early_stopping=True, max_iter=50)
    clf.fit(X, y)
    assert clf.best_loss_ is None and len(clf.validation_scores_) == clf.n_iter_
    assert clf.best_validation_score_ == max(clf.validation_scores_)
    assert len(clf.loss_curve_) == 3 + clf.n_iter_


def test_warm_start_refuses_other_classes_and_architecture():
    X, y = _digits()
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=2, warm_start=True,
                        random_state=0)
    with pytest.warns(ConvergenceWarning):
        clf.fit(X, y)
    with pytest.raises(ValueError, match="warm_start can only be used where `y` has the same"):
        clf.fit(X[y < 5], y[y < 5])
    clf.set_params(hidden_layer_sizes=(8,))
    with pytest.raises(ValueError, match="layer sizes \\[64, 16, 10\\]"):
        clf.fit(X, y)


def test_partial_fit_classifier():
    X, y = _digits()
    clf = MLPClassifier(hidden_layer_sizes=(32,), learning_rate_init=0.01, random_state=0)
    with pytest.raises(ValueError, match="classes must be passed on the first call"):
        clf.partial_fit(X[:100], y[:100])
    assert not hasattr(clf, "classes_") or not hasattr(clf, "_net")
    clf.partial_fit(X[:200], y[:200], classes=np.arange(10))
    assert clf.n_iter_ == 1 and clf.t_ == 200 and len(clf.loss_curve_) == 1
    scores = []
    for epoch in range(15):
        for lo in range(0, len(X), 300):
            clf.partial_fit(X[lo:lo + 300], y[lo:lo + 300])
        scores.append(clf.score(X, y))
    assert scores[-1] > 0.98 and scores[-1] > scores[0]
    with pytest.raises(ValueError, match="`y` has classes not in `self.classes_`"):
        clf.partial_fit(X[:10], np.full(10, 11))
    with pytest.raises(ValueError, match="X has 3 features, but MLPClassifier is expecting "
                                         "64 features as input"):
        clf.partial_fit(X[:10, :3], y[:10])


def test_partial_fit_regressor_and_availability():
    X, y = make_regression(200, 4, noise=0.1, random_state=0)
    y = y / y.std()
    reg = MLPRegressor(hidden_layer_sizes=(16,), learning_rate_init=0.01, random_state=0)
    for _ in range(200):
        reg.partial_fit(X, y)
    assert reg.score(X, y) > 0.95
    assert len(reg.loss_curve_) == 200
    assert not hasattr(MLPRegressor(solver="lbfgs"), "partial_fit")
    assert not hasattr(MLPClassifier(solver="lbfgs"), "partial_fit")
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping"):
        MLPRegressor(early_stopping=True).partial_fit(X, y)


def test_partial_fit_equals_fit_for_one_epoch():
    X, y = _digits()
    params = dict(hidden_layer_sizes=(16,), random_state=3, shuffle=False)
    a = MLPClassifier(max_iter=1, **params)
    with pytest.warns(ConvergenceWarning):
        a.fit(X, y)
    b = MLPClassifier(**params).partial_fit(X, y, classes=np.unique(y))
    for pa, pb in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_):
        np.testing.assert_array_equal(pa, pb)


# ---- attributes, dtypes, pickling -----------------------------------------------------

def test_coefs_are_views_of_the_network():
    X, y = make_classification(60, 5, random_state=0)
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=50, random_state=0).fit(X, y)
    assert [c.shape for c in clf.coefs_] == [(5, 4), (4, 1)]
    assert [b.shape for b in clf.intercepts_] == [(4,), (1,)]
    assert clf.n_layers_ == 3 and clf.n_features_in_ == 5
    for layer, W, b in zip(clf._net.layers, clf.coefs_, clf.intercepts_):
        assert np.shares_memory(W, layer.weight) and np.shares_memory(b, layer.bias)
    clf.coefs_[-1][...] = 0.0
    clf.intercepts_[-1][...] = 5.0  # every logit 5: the positive class everywhere
    np.testing.assert_array_equal(clf.predict(X), np.ones(60, dtype=int))


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_dtype(Estimator):
    X, y = make_classification(60, 5, random_state=0)
    est = Estimator(hidden_layer_sizes=(4,), max_iter=5, random_state=0)
    with pytest.warns(ConvergenceWarning):
        est.fit(X.astype(np.float32), y)
    assert est._net.dtype == np.float32 and est.coefs_[0].dtype == np.float32
    with pytest.warns(ConvergenceWarning):
        est.fit(X.astype(np.int64), y)  # like scikit-learn: anything else is float64
    assert est._net.dtype == np.float64
    with pytest.warns(ConvergenceWarning):
        est.set_params(dtype="float32").fit(X, y)
    assert est._net.dtype == np.float32
    assert est.predict(X).shape[0] == 60


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_pickle_keeps_weights_and_optimizer_state(Estimator):
    X, y = make_classification(80, 5, random_state=0)
    est = Estimator(hidden_layer_sizes=(6,), random_state=0)
    for _ in range(3):
        est.partial_fit(X, y, **({"classes": [0, 1]} if Estimator is MLPClassifier else {}))
    copy = pickle.loads(pickle.dumps(est))
    assert copy._net is not est._net
    np.testing.assert_array_equal(copy.predict(X), est.predict(X))
    # Adam's moments and step count travel too: the next epochs agree exactly
    est.partial_fit(X, y)
    copy.partial_fit(X, y)
    assert copy.loss_curve_ == est.loss_curve_
    for a, b in zip(copy.coefs_, est.coefs_):
        np.testing.assert_array_equal(a, b)


def test_feature_names_in():
    pd = pytest.importorskip("pandas")
    X, y = make_classification(50, 3, n_redundant=0, random_state=0)
    frame = pd.DataFrame(X, columns=["a", "b", "c"])
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=5, random_state=0)
    with pytest.warns(ConvergenceWarning):
        clf.fit(frame, y)
    assert list(clf.feature_names_in_) == ["a", "b", "c"]
    with pytest.warns(UserWarning, match="X does not have valid feature names"):
        clf.predict(X)


@pytest.mark.parametrize("activation", ["elu", "selu", "silu", "softplus"])
def test_activations_scikit_learn_does_not_have(activation):
    # bprop's own names are accepted as activation=, for both estimators
    X, y = make_classification(60, 4, n_redundant=0, random_state=0)
    for est in (MLPClassifier(hidden_layer_sizes=(6, 5), activation=activation, max_iter=3,
                              random_state=0),
                MLPRegressor(hidden_layer_sizes=(6,), activation=activation, max_iter=3,
                             random_state=0)):
        with pytest.warns(ConvergenceWarning):
            est.fit(X, y)
        hidden = [L.activation for L in est._net.layers][:-1]
        assert hidden and all(a == activation for a in hidden), hidden
        assert np.isfinite(est.predict(X).astype(float)).all()
        assert clone(est).get_params()["activation"] == activation


# ---- errors ---------------------------------------------------------------------------

def test_parameter_errors():
    X, y = make_classification(30, 3, n_redundant=0, random_state=0)
    with pytest.raises(ValueError, match="The 'activation' parameter of MLPClassifier must be"):
        MLPClassifier(activation="softmax").fit(X, y)
    with pytest.raises(ValueError, match="The 'solver' parameter of MLPRegressor must be"):
        MLPRegressor(solver="newton").fit(X, y)
    with pytest.raises(ValueError, match="hidden_layer_sizes must be > 0, got \\[3, 0\\]"):
        MLPClassifier(hidden_layer_sizes=(3, 0)).fit(X, y)
    with pytest.raises(ValueError, match="The 'dtype' parameter"):
        MLPClassifier(dtype="float16").fit(X, y)
    with pytest.raises(ValueError, match="Unknown label type"):
        MLPClassifier().fit(X, X[:, 0])
    with pytest.raises(NotFittedError):
        MLPRegressor().predict(X)


def test_a_failed_fit_leaves_the_fitted_attributes():
    # Regression: a fit refused after validate_data (here by early stopping's
    # stratified split) kept the new n_features_in_ and classes_, so that the
    # unchanged network then refused the data it was fitted on.
    X, y = make_classification(60, 5, n_informative=3, n_classes=3, random_state=0)
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=3, random_state=0).fit(X, y)
    proba = clf.predict_proba(X)
    clf.set_params(early_stopping=True)
    with pytest.raises(ValueError, match="least populated class"):
        clf.fit(X[:30, :4], np.arange(30) == 0)
    assert clf.n_features_in_ == 5
    np.testing.assert_array_equal(clf.classes_, [0, 1, 2])
    np.testing.assert_array_equal(clf.predict_proba(X), proba)


def test_divergence_raises_and_keeps_the_weights():
    X, y = make_regression(40, 3, random_state=0)
    reg = MLPRegressor(hidden_layer_sizes=(4,), solver="sgd", random_state=0,
                       warm_start=True, max_iter=3)
    with pytest.warns(ConvergenceWarning):
        reg.fit(X, y)
    before = [c.copy() for c in reg.coefs_ + reg.intercepts_]
    curve = list(reg.loss_curve_)
    with pytest.raises(ValueError, match="training diverged in epoch 1: the loss is"):
        reg.fit(X * 1e200, y)
    for a, b in zip(reg.coefs_ + reg.intercepts_, before):
        np.testing.assert_array_equal(a, b)
    assert reg.loss_curve_ == curve


# ---- nothing on the per-step path calls NumPy's BLAS (issue 11) ----------------------
# NumPy's OpenBLAS has its own thread pool, which fights bprop's on the same cores
# whenever a NumPy product sits between two steps. Each case trains for 1 and for 4
# epochs (L-BFGS: iterations) and must make the same number of calls.

def _train_estimator(Estimator, **params):
    def train(epochs, X, y):
        est = Estimator(hidden_layer_sizes=(16,), alpha=1e-3, batch_size=32, max_iter=epochs,
                        tol=0.0, n_iter_no_change=100, random_state=0, **params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X, y)
    return train


def _train_weighted_poisson(epochs, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        MLPRegressor(loss="poisson", solver="sgd", hidden_layer_sizes=(16,), alpha=1e-3,
                     batch_size=32, max_iter=epochs, tol=0.0, n_iter_no_change=100,
                     random_state=0).fit(X, y, sample_weight=np.linspace(0.5, 1.5, len(y)))


def _train_fit(epochs, X, y):
    net = bprop.Network([bprop.Dense(X.shape[1], 16, "relu"), bprop.Dense(16, 2)], seed=0)
    bprop.fit(net, X, y, loss="softmax_cross_entropy", optimizer=bprop.optim.Adam(net, lr=1e-3),
              epochs=epochs, batch_size=32, seed=0)


def _train_fit_with_loss_options(epochs, X, y):
    """softmax cross-entropy with label smoothing and class weights (computed in NumPy
    on every step), with sample weights"""
    net = bprop.Network([bprop.Dense(X.shape[1], 16, "relu"), bprop.Dense(16, 2)], seed=0)
    loss = functools.partial(bprop.losses.softmax_cross_entropy, label_smoothing=0.1,
                             class_weight=[1.0, 2.0])
    bprop.fit(net, X, y, loss=loss, optimizer=bprop.optim.Adam(net, lr=1e-3), epochs=epochs,
              batch_size=32, seed=0, sample_weight=np.linspace(0.5, 1.5, len(y)))


def _train_steps(epochs, X, y):
    X = X.astype(np.float32)
    net = bprop.Network([bprop.Dense(X.shape[1], 16, "relu"), bprop.Dense(16, 2)], seed=0)
    optimizers = (bprop.optim.SGD(net, lr=1e-2), bprop.optim.Adam(net, lr=1e-3))
    for _ in range(epochs):
        for lo in range(0, len(y), 32):
            for opt in optimizers:
                net.train_step(X[lo:lo + 32], y[lo:lo + 32], optimizer=opt)


# (name, train(epochs, X, y), target): "class" 0/1 labels, "real" two real columns,
# "count" two Poisson counts
PER_STEP_PATHS = [
    ("classifier-adam", _train_estimator(MLPClassifier, solver="adam"), "class"),
    ("classifier-sgd", _train_estimator(MLPClassifier, solver="sgd"), "class"),
    ("classifier-lbfgs", _train_estimator(MLPClassifier, solver="lbfgs"), "class"),
    ("regressor-adam", _train_estimator(MLPRegressor, solver="adam"), "real"),
    ("regressor-lbfgs", _train_estimator(MLPRegressor, solver="lbfgs"), "real"),
    # the L2 term of the NumPy-side objective (it was np.dot, BLAS's ddot, per step)
    ("poisson-sgd", _train_estimator(MLPRegressor, loss="poisson", solver="sgd"), "count"),
    ("poisson-adam", _train_estimator(MLPRegressor, loss="poisson", solver="adam"), "count"),
    ("poisson-lbfgs", _train_estimator(MLPRegressor, loss="poisson", solver="lbfgs"), "count"),
    ("bprop.fit", _train_fit, "class"),
    ("Network.train_step", _train_steps, "class"),
]


def _per_step_data(target):
    X, y = make_classification(n_samples=300, n_features=12, random_state=0)
    if target == "real":
        y = X[:, :2] @ np.array([[1.0, -2.0], [0.5, 1.0]])
    elif target == "count":
        y = np.random.default_rng(0).poisson(np.exp(0.3 * X[:, :2]), (300, 2)).astype(float)
    return X, y


def _calls_per_fit(train, target, count):
    """[calls in a 1-epoch run, calls in a 4-epoch run], count() being the total so far."""
    X, y = _per_step_data(target)
    calls = []
    for epochs in (1, 4):
        before = count()
        train(epochs, X, y)
        calls.append(count() - before)
    return calls


@pytest.mark.parametrize("name,train,target", PER_STEP_PATHS,
                         ids=[case[0] for case in PER_STEP_PATHS])
def test_training_steps_call_no_numpy_product_function(name, train, target, monkeypatch):
    """NumPy's product functions, patched and counted (portable, but blind to the @
    operator and ndarray.dot; the next test sees those)."""
    counts = {"n": 0}
    for fn in ("dot", "matmul", "vdot", "inner", "tensordot", "einsum"):
        original = getattr(np, fn)

        def counted(*args, _original=original, _fn=fn, **kwargs):
            # einsum reaches BLAS only through optimize (tensordot); without it, it
            # is NumPy's own loop (the poisson objective's L2 term)
            counts["n"] += _fn != "einsum" or kwargs.get("optimize", False) is not False
            return _original(*args, **kwargs)
        monkeypatch.setattr(np, fn, counted)
    calls = _calls_per_fit(train, target, lambda: counts["n"])
    assert calls[0] == calls[1], f"NumPy products: {calls[0]} in 1 epoch, {calls[1]} in 4"


class _BlasCallCounter:
    """Counts every call from NumPy's core module (dot, matmul, @, ndarray.dot, vdot,
    inner, ...) into its BLAS, at the BLAS itself: each cblas_* slot of the module's
    global offset table is pointed, while the counter is installed, at a trampoline
    ``lock inc [count]; jmp [cblas function]`` (x86-64 Linux, ELF)."""

    _pages: list = []  # the trampolines' pages live as long as the process

    def __init__(self) -> None:
        import ctypes
        import mmap
        import struct
        import numpy._core._multiarray_umath as module

        self._ctypes, self._struct = ctypes, struct
        path = os.path.realpath(module.__file__)
        slots = {name: offset for name, offset in self._relocations(path).items()
                 if "cblas_" in name}
        if not slots:
            pytest.skip("NumPy's core module calls no cblas_* function through its GOT")
        with open("/proc/self/maps") as maps:  # the module's load address
            base = next(int(line.split("-")[0], 16) for line in maps
                        if line.split()[5:6] == [path] and int(line.split()[2], 16) == 0)
        # dlsym on the module's handle searches the module and its dependencies:
        # the functions of NumPy's own BLAS, whatever else is loaded
        lookup = ctypes.CDLL(path)
        self._names = sorted(slots)
        try:
            self._code = mmap.mmap(-1, 32 * len(self._names),
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except OSError as exc:  # a system that refuses writable + executable pages
            pytest.skip(f"no writable and executable page for the trampolines: {exc}")
        self._pages.append(self._code)
        start = ctypes.addressof(ctypes.c_char.from_buffer(self._code))
        self._libc = ctypes.CDLL(None)
        self._libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        self._saved = []
        for i, name in enumerate(self._names):
            at = 32 * i  # [0:8) count, [8:16) the function, [16:30) the trampoline
            function = ctypes.cast(getattr(lookup, name), ctypes.c_void_p).value
            struct.pack_into("<QQ", self._code, at, 0, function)
            struct.pack_into("<4si2si", self._code, at + 16,
                             b"\xf0\x48\xff\x05", at - (at + 24),  # lock inc qword [rip+d]
                             b"\xff\x25", at + 8 - (at + 30))  # jmp qword [rip+d]
            slot = base + slots[name]
            page = slot & ~(mmap.PAGESIZE - 1)
            if self._libc.mprotect(page, mmap.PAGESIZE, 3) != 0:  # read | write
                self.uninstall()
                pytest.skip("the GOT of NumPy's core module cannot be made writable")
            cell = ctypes.c_uint64.from_address(slot)
            self._saved.append((cell, cell.value))
            cell.value = start + at + 16

    @staticmethod
    def _relocations(path):
        """{symbol: offset of its GOT slot} for the JUMP_SLOT and GLOB_DAT relocations."""
        import struct
        with open(path, "rb") as file:
            data = file.read()
        assert data[:5] == b"\x7fELF\x02", "an ELF64 file"
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                    for i in range(shnum)]
        out = {}
        for _, kind, _, _, offset, size, link, _, _, entsize in sections:
            if kind != 4:  # SHT_RELA
                continue
            symtab = sections[link]
            strings = sections[symtab[6]][4]
            for r in range(offset, offset + size, entsize):
                where, info, _ = struct.unpack_from("<QQq", data, r)
                if info & 0xFFFFFFFF not in (6, 7):  # R_X86_64_GLOB_DAT, _JUMP_SLOT
                    continue
                name_at = strings + struct.unpack_from(
                    "<I", data, symtab[4] + (info >> 32) * symtab[9])[0]
                out[data[name_at:data.index(b"\0", name_at)].decode()] = where
        return out

    def counts(self):
        return {name: self._struct.unpack_from("<Q", self._code, 32 * i)[0]
                for i, name in enumerate(self._names)}

    def total(self):
        return sum(self.counts().values())

    def uninstall(self):
        for cell, value in self._saved:
            cell.value = value


@pytest.fixture
def numpy_blas_calls():
    """A _BlasCallCounter, installed for the test."""
    import platform
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("the counter patches an x86-64 ELF module")
    counter = _BlasCallCounter()
    yield counter
    counter.uninstall()


def test_the_blas_call_counter_sees_operators_methods_and_functions(numpy_blas_calls):
    """The counter is not blind: each NumPy product reaches BLAS and is counted."""
    a, v = np.ones((40, 40)), np.ones(40)
    for product in (lambda: a @ a, lambda: a.dot(v), lambda: v @ v, lambda: np.dot(v, v),
                    lambda: np.matmul(a, a), lambda: np.vdot(v, v), lambda: np.inner(a, a),
                    lambda: a.astype(np.float32) @ a.astype(np.float32)):
        before = numpy_blas_calls.total()
        result = product()
        assert numpy_blas_calls.total() > before
        assert np.all(np.asarray(result) == 40)  # the calls went through
    # NumPy's own loops, which the L2 term uses instead
    before = numpy_blas_calls.total()
    np.einsum("i,i->", v, v, dtype=np.float64)
    assert numpy_blas_calls.total() == before


@pytest.mark.parametrize("name,train,target", PER_STEP_PATHS + [
    ("poisson-weighted", _train_weighted_poisson, "count"),
    ("fit-loss-options", _train_fit_with_loss_options, "class")],
    ids=[case[0] for case in PER_STEP_PATHS] + ["poisson-weighted", "fit-loss-options"])
def test_training_steps_call_no_numpy_blas(name, train, target, numpy_blas_calls):
    """At NumPy's BLAS itself: the @ operator and ndarray.dot are counted too."""
    calls = _calls_per_fit(train, target, numpy_blas_calls.total)
    assert calls[0] == calls[1], (
        f"NumPy BLAS calls: {calls[0]} in 1 epoch, {calls[1]} in 4; by function after both: "
        f"{ {k: v for k, v in numpy_blas_calls.counts().items() if v} }")
