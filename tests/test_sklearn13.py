"""The scikit-learn estimators behave as scikit-learn's MLP where a user would
notice (issue 13): the Poisson loss, assignments to coefs_ and intercepts_, the
validation split of early stopping, divergence, class_weight."""

from __future__ import annotations

import inspect
import pickle
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.base import clone
from sklearn.datasets import make_classification, make_regression
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import d2_tweedie_score
from sklearn.neural_network import MLPClassifier as SkMLPClassifier
from sklearn.neural_network import MLPRegressor as SkMLPRegressor
from sklearn.neural_network._base import poisson_loss as sk_poisson_loss
from sklearn.utils._param_validation import InvalidParameterError
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.estimator_checks import parametrize_with_checks

import bprop
from bprop import losses
from bprop.sklearn import MLPClassifier, MLPRegressor


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = bprop.get_num_threads()
    bprop.set_num_threads(1)
    yield
    bprop.set_num_threads(before)


def _quiet(fit, *args, **kwargs):
    """fit(...) with scikit-learn's ConvergenceWarning silenced (short fits)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fit(*args, **kwargs)


def _poisson_data(n=300, outputs=1, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.randn(n, 4)
    rates = np.exp(X[:, :outputs] * 0.6 - 0.3 * X[:, 1:2])
    y = rng.poisson(rates).astype(float)
    return X, (y[:, 0] if outputs == 1 else y)


# ---- 1. MLPRegressor(loss="poisson") ---------------------------------------------------

def test_signatures_follow_sklearn():
    # loss is MLPRegressor's first positional parameter, as in scikit-learn; every
    # parameter of scikit-learn's estimators is ours, in the same order
    for Ours, Theirs in ((MLPRegressor, SkMLPRegressor), (MLPClassifier, SkMLPClassifier)):
        ours = list(inspect.signature(Ours).parameters)
        theirs = list(inspect.signature(Theirs).parameters)
        assert ours[:len(theirs)] == theirs
    assert MLPRegressor("poisson").loss == "poisson"
    assert MLPRegressor().loss == "squared_error"
    assert "loss" not in MLPClassifier().get_params()


@pytest.mark.parametrize("weighted", [False, True])
def test_poisson_loss_equals_sklearns_on_fixed_outputs(weighted):
    rng = np.random.RandomState(0)
    z = rng.randn(50, 3)
    y = rng.poisson(2.0, (50, 3)).astype(float)  # zeros included: 0 log 0 = 0
    assert (y == 0).any()
    sw = rng.rand(50) if weighted else None
    value, grad = losses.poisson_deviance_log_link(z, y, sw)
    # scikit-learn sums the outputs' weighted means; bprop averages over all elements
    assert 3 * value == pytest.approx(sk_poisson_loss(y, np.exp(z), sw), rel=1e-12)
    w = np.ones(50) if sw is None else sw
    expected = w[:, None] * (np.exp(z) - y) / (3 * w.sum())
    np.testing.assert_allclose(grad, expected, rtol=1e-12)


def test_poisson_loss_gradient_by_finite_differences():
    rng = np.random.RandomState(1)
    z = rng.randn(6, 2)
    y = rng.poisson(1.5, (6, 2)).astype(float)
    sw = rng.rand(6)
    _, grad = losses.poisson_deviance_log_link(z, y, sw)
    eps = 1e-6
    numeric = np.empty_like(z)
    for idx in np.ndindex(z.shape):
        up, down = z.copy(), z.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (losses.poisson_deviance_log_link(up, y, sw)[0]
                        - losses.poisson_deviance_log_link(down, y, sw)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-10)


def test_poisson_loss_refuses_negative_targets():
    with pytest.raises(ValueError, match=r"\[poisson_deviance_log_link\] target must be >= 0 "
                                         r"\(counts or rates\), but target\[1, 0\] = -1.0"):
        losses.poisson_deviance_log_link(np.zeros((2, 1)), np.array([1.0, -1.0]))


@pytest.mark.parametrize("outputs", [1, 2])
@pytest.mark.parametrize("solver", ["sgd", "lbfgs"])
def test_poisson_fit_follows_sklearn(outputs, solver):
    # Same initial weights and shuffles as scikit-learn: the objective (half Poisson
    # deviance of exp(output), summed over the outputs, plus the L2 term) and its
    # gradient agree, so the fits agree to rounding.
    X, y = _poisson_data(outputs=outputs)
    sw = np.random.RandomState(2).randint(0, 3, len(X)).astype(float)
    params = dict(loss="poisson", hidden_layer_sizes=(8,), activation="tanh", solver=solver,
                  alpha=0.1, batch_size=32, learning_rate_init=0.01, max_iter=15,
                  random_state=1)
    theirs = _quiet(SkMLPRegressor(**params).fit, X, y, sample_weight=sw)
    ours = _quiet(MLPRegressor(**params).fit, X, y, sample_weight=sw)
    assert ours.out_activation_ == theirs.out_activation_ == "exp"
    assert ours.n_iter_ == theirs.n_iter_
    if solver == "sgd":
        np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-10)
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-10)
    for mine, ref in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        np.testing.assert_allclose(mine, ref, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(ours.predict(X), theirs.predict(X), rtol=1e-8)


def test_poisson_predict_is_exp_of_the_network_output():
    X, y = _poisson_data()
    reg = _quiet(MLPRegressor(loss="poisson", hidden_layer_sizes=(5,), max_iter=5,
                              random_state=0).fit, X, y)
    np.testing.assert_array_equal(reg.predict(X), np.exp(reg._net.predict(X)).ravel())
    assert (reg.predict(X) > 0).all()


def test_poisson_fits_as_well_as_sklearn():
    # Adam (bprop's epsilon sits elsewhere) to convergence: similar Poisson D^2
    X, y = _poisson_data(n=1000)
    X_test, y_test = _poisson_data(n=500, seed=1)
    params = dict(loss="poisson", hidden_layer_sizes=(16,), max_iter=300,
                  learning_rate_init=0.01, random_state=0)
    theirs = _quiet(SkMLPRegressor(**params).fit, X, y)
    ours = _quiet(MLPRegressor(**params).fit, X, y)
    d2_theirs = d2_tweedie_score(y_test, theirs.predict(X_test), power=1)
    d2_ours = d2_tweedie_score(y_test, ours.predict(X_test), power=1)
    assert d2_ours > 0.2
    assert d2_ours == pytest.approx(d2_theirs, abs=0.03)


def test_poisson_target_checks():
    X, y = _poisson_data(n=40)
    bad = y.copy()
    bad[3] = -1.0
    with pytest.raises(ValueError, match=r"^Some value\(s\) of y are negative which is not "
                                         r"allowed for Poisson regression\. \(\[MLPRegressor.fit\] "
                                         r".*y\[3\] = -1.0"):
        MLPRegressor(loss="poisson").fit(X, bad)
    with pytest.raises(ValueError, match=r"^Sum of y is not strictly positive which is "
                                         r"necessary for Poisson regression\."):
        MLPRegressor(loss="poisson").fit(X, np.zeros(40))
    reg = MLPRegressor(loss="poisson", hidden_layer_sizes=(3,), random_state=0)
    reg.partial_fit(X, np.zeros(40))  # one batch of zeros is a valid batch of counts
    with pytest.raises(ValueError, match=r"\[MLPRegressor.partial_fit\]"):
        reg.partial_fit(X, bad)
    with pytest.raises(InvalidParameterError, match="The 'loss' parameter of MLPRegressor"):
        MLPRegressor(loss="gamma").fit(X, y)


# ---- 2. assigning coefs_ and intercepts_ -------------------------------------------------

def _binary():
    return make_classification(120, 5, n_informative=3, random_state=0)


def test_assigned_coefs_are_the_model():
    # scikit-learn's coefs_ are its weights: after the same assignments, both
    # estimators predict the same probabilities
    X, y = _binary()
    params = dict(hidden_layer_sizes=(4,), max_iter=5, random_state=0)
    ours = _quiet(MLPClassifier(**params).fit, X, y)
    theirs = _quiet(SkMLPClassifier(**params).fit, X, y)
    rng = np.random.RandomState(3)
    W0, W1 = rng.randn(5, 4), rng.randn(4, 1)
    b0, b1 = rng.randn(4), rng.randn(1)
    for est in (ours, theirs):
        est.coefs_[0] = W0           # one item
        est.intercepts_ = [b0, b1]   # the whole list
        est.coefs_[1:] = [W1]        # a slice
    np.testing.assert_array_equal(ours.coefs_[0], W0)
    np.testing.assert_array_equal(ours._net.layers[0].weight, W0)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), rtol=1e-12)
    np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))
    # still views of the network
    assert np.shares_memory(ours.coefs_[0], ours._net.layers[0].weight)


def test_assigned_coefs_start_partial_fit_and_warm_start():
    # SGD follows scikit-learn step for step; from the same assigned weights, the
    # next partial_fit and the next warm-start fit agree with scikit-learn's
    X, y = _binary()
    params = dict(hidden_layer_sizes=(4,), solver="sgd", max_iter=4, random_state=0,
                  batch_size=32, activation="tanh")
    rng = np.random.RandomState(4)
    coefs = [rng.randn(5, 4) * 0.3, rng.randn(4, 1) * 0.3]
    intercepts = [rng.randn(4) * 0.1, rng.randn(1) * 0.1]
    for method in ("partial_fit", "warm_start"):
        ours = _quiet(MLPClassifier(**params).fit, X, y)
        theirs = _quiet(SkMLPClassifier(**params).fit, X, y)
        for est in (ours, theirs):
            est.coefs_ = [c.copy() for c in coefs]
            est.intercepts_ = [b.copy() for b in intercepts]
            if method == "partial_fit":
                est.partial_fit(X, y)
            else:
                est.set_params(warm_start=True)
                _quiet(est.fit, X, y)
        for mine, ref in zip(ours.coefs_ + ours.intercepts_,
                             theirs.coefs_ + theirs.intercepts_):
            np.testing.assert_allclose(mine, ref, rtol=1e-9, atol=1e-12)
        assert not np.allclose(ours.coefs_[0], coefs[0])  # it trained from there


def test_assignment_errors_leave_the_network_unchanged():
    X, y = _binary()
    clf = _quiet(MLPClassifier(hidden_layer_sizes=(4,), max_iter=3, random_state=0).fit, X, y)
    before = [a.copy() for a in clf.coefs_ + clf.intercepts_]
    with pytest.raises(ValueError, match=r"\[MLPClassifier.coefs_\] coefs_\[0\] must have "
                                         r"shape \(5, 4\) \(the layer's\), but got shape "
                                         r"\(4, 5\)"):
        clf.coefs_[0] = np.zeros((4, 5))
    with pytest.raises(ValueError, match=r"coefs_\[1\] must have shape \(4, 1\)"):
        clf.coefs_ = [np.zeros((5, 4)), np.zeros(4)]  # the first is not written either
    with pytest.raises(ValueError, match=r"\[MLPClassifier.intercepts_\] intercepts_ must "
                                         r"hold 2 arrays"):
        clf.intercepts_ = [np.zeros(4)]
    with pytest.raises(TypeError, match=r"intercepts_ must be a list of 2 arrays"):
        clf.intercepts_ = np.zeros(4)
    with pytest.raises(TypeError, match=r"coefs_\[0\] must hold real numbers"):
        clf.coefs_[0] = np.full((5, 4), "a")
    with pytest.raises(ValueError, match=r"cannot be resized or reordered"):
        clf.coefs_.append(np.zeros((4, 1)))
    with pytest.raises(IndexError, match=r"coefs_ index 2 out of range for 2 layers"):
        clf.coefs_[2] = np.zeros((4, 1))
    for a, b in zip(clf.coefs_ + clf.intercepts_, before):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(AttributeError, match=r"coefs_ can be assigned only after fit"):
        MLPClassifier().coefs_ = [np.zeros((5, 4))]
    assert not hasattr(MLPClassifier(), "coefs_")


def test_assigned_coefs_survive_pickle_clone_and_float32():
    X, y = _binary()
    clf = _quiet(MLPClassifier(hidden_layer_sizes=(4,), max_iter=3, random_state=0,
                               dtype="float32").fit, X, y)
    W = np.random.RandomState(5).randn(5, 4)  # float64: cast into the float32 layer
    clf.coefs_[0] = W
    np.testing.assert_array_equal(clf.coefs_[0], W.astype(np.float32))
    copy = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(copy.coefs_[0], W.astype(np.float32))
    np.testing.assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))
    copy.coefs_[0] = np.zeros((5, 4))  # the copy's own network
    np.testing.assert_array_equal(clf.coefs_[0], W.astype(np.float32))
    assert not hasattr(clone(clf), "coefs_")
    detached = pickle.loads(pickle.dumps(clf.coefs_))
    assert type(detached) is list and not np.shares_memory(detached[0], clf.coefs_[0])


def test_assigned_coefs_with_dropout_and_batch_norm():
    X, y = _binary()
    clf = _quiet(MLPClassifier(hidden_layer_sizes=(4,), max_iter=3, random_state=0,
                               dropout=0.2, batch_norm=True).fit, X, y)
    clf.coefs_[1] = np.zeros((4, 1))
    clf.intercepts_[1] = np.array([-5.0])  # every logit -5: the negative class
    np.testing.assert_array_equal(clf.predict(X), np.zeros(len(X), dtype=int))


# ---- 3. early stopping's validation split -----------------------------------------------

def test_binary_class_too_small_to_stratify_raises_as_sklearn():
    X, y = _binary()
    y = np.zeros_like(y)
    y[0] = 1  # the positive class has one member
    params = dict(early_stopping=True, random_state=0)
    with pytest.raises(ValueError) as theirs:
        SkMLPClassifier(**params).fit(X, y)
    with pytest.raises(ValueError, match=r"\[MLPClassifier.fit\] early_stopping=True") as ours:
        MLPClassifier(**params).fit(X, y)
    assert "The least populated class" in str(theirs.value)
    assert str(ours.value).startswith(str(theirs.value))


@pytest.mark.parametrize("kind", ["binary", "multiclass with a class of one",
                                  "multilabel", "regression"])
def test_validation_split_is_sklearns(kind):
    # scikit-learn stratifies only one-output classifiers (binary); multi-class is
    # split without stratification, so a class of one sample is fine. With SGD the
    # fits are scikit-learn's step for step, so equal validation scores mean the
    # same held-out samples.
    from sklearn.datasets import make_multilabel_classification
    X, y = make_classification(150, 6, n_informative=4, n_classes=3, random_state=0)
    Sk, Ours = SkMLPClassifier, MLPClassifier
    if kind == "binary":
        y = (y == 1).astype(int)
    elif kind.startswith("multiclass"):
        y[0] = 7
    elif kind == "multilabel":
        X, y = make_multilabel_classification(150, 6, n_classes=3, random_state=0)
    else:
        X, y = make_regression(150, 6, random_state=0)
        y = y / 100
        Sk, Ours = SkMLPRegressor, MLPRegressor
    params = dict(solver="sgd", early_stopping=True, hidden_layer_sizes=(6,),
                  activation="tanh", batch_size=32, max_iter=8, random_state=2,
                  validation_fraction=0.2)
    theirs = _quiet(Sk(**params).fit, X, y)
    ours = _quiet(Ours(**params).fit, X, y)
    assert ours.n_iter_ == theirs.n_iter_
    np.testing.assert_allclose(ours.validation_scores_, theirs.validation_scores_,
                               rtol=1e-9)
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-10)


# ---- 4. divergence ----------------------------------------------------------------------

def _diverging():
    X, y = make_regression(200, 5, noise=1.0, random_state=0)
    params = dict(hidden_layer_sizes=(16,), solver="sgd", learning_rate_init=0.05,
                  random_state=0, max_iter=30)
    return X, y, params


def test_divergence_with_early_stopping_keeps_the_best_weights():
    # scikit-learn ends such a fit without an error, with the best epoch's weights
    # and a non-finite validation score; bprop stops at the diverged epoch
    X, y, params = _diverging()
    params["early_stopping"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's overflows
        theirs = SkMLPRegressor(**params).fit(X, y)
    with pytest.warns(ConvergenceWarning, match=r"\[MLPRegressor.fit\] training diverged "
                                                r"in epoch 7: the loss is inf\. Early stopping"):
        ours = MLPRegressor(**params).fit(X, y)
    assert not np.isfinite(theirs.validation_scores_).all()
    assert not np.isfinite(ours.validation_scores_[-1])
    assert not np.isfinite(ours.loss_curve_[-1]) and not np.isfinite(ours.loss_)
    assert len(ours.validation_scores_) == len(ours.loss_curve_) == ours.n_iter_ == 7
    k = len(ours.validation_scores_) - 1  # the epochs before agree with scikit-learn's
    # (the scores grow to 1e123 before the overflow: rounding grows with them)
    np.testing.assert_allclose(ours.validation_scores_[:k], theirs.validation_scores_[:k],
                               rtol=1e-6)
    assert ours.best_validation_score_ == pytest.approx(theirs.best_validation_score_,
                                                        rel=1e-12)
    assert ours.best_validation_score_ == max(ours.validation_scores_[:k])
    for mine, ref in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        np.testing.assert_allclose(mine, ref, rtol=1e-9, atol=1e-12)
    assert ours.score(X, y) == pytest.approx(theirs.score(X, y), rel=1e-9)


def test_divergence_in_the_first_epoch_keeps_the_initial_weights():
    X, y, params = _diverging()
    params.update(early_stopping=True, learning_rate_init=10.0)
    initial = MLPRegressor(**dict(params, max_iter=1, learning_rate_init=1e-300))
    _quiet(initial.fit, X, y)  # the same draws; a step of ~0 keeps the weights
    with pytest.warns(ConvergenceWarning, match="training diverged in epoch 1"):
        ours = MLPRegressor(**params).fit(X * 1e200, y)
    assert ours.best_validation_score_ == -np.inf and ours.n_iter_ == 1
    for mine, ref in zip(ours.coefs_, initial.coefs_):
        np.testing.assert_allclose(mine, ref, rtol=1e-12)


def test_divergence_without_early_stopping_raises_sklearns_message():
    X, y, params = _diverging()
    with pytest.raises(ValueError, match=r"^Solver produced non-finite parameter weights\. The "
                                         r"input data may contain large values and need to be "
                                         r"preprocessed\. \[MLPRegressor\.fit\] training "
                                         r"diverged in epoch 7: the loss is inf"):
        MLPRegressor(**params).fit(X, y)
    assert not hasattr(MLPRegressor(**params), "coefs_")


# ---- 5. class_weight ----------------------------------------------------------------------

def _imbalanced():
    return make_classification(300, 6, n_informative=4, weights=[0.9, 0.1], random_state=0)


@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs"])
@pytest.mark.parametrize("class_weight", ["balanced", {0: 1.0, 1: 4.0}])
def test_class_weight_equals_explicit_sample_weight(solver, class_weight):
    X, y = _imbalanced()
    user = np.random.RandomState(0).randint(1, 3, len(X)).astype(float)
    params = dict(hidden_layer_sizes=(6,), solver=solver, max_iter=20, random_state=0)
    for sw in (None, user):
        weighted = _quiet(MLPClassifier(class_weight=class_weight, **params).fit, X, y,
                          sample_weight=sw)
        explicit = compute_sample_weight(class_weight, y) * (1.0 if sw is None else sw)
        reference = _quiet(MLPClassifier(**params).fit, X, y, sample_weight=explicit)
        for a, b in zip(weighted.coefs_ + weighted.intercepts_,
                        reference.coefs_ + reference.intercepts_):
            np.testing.assert_array_equal(a, b)
        assert weighted.loss_ == reference.loss_
    plain = _quiet(MLPClassifier(**params).fit, X, y)
    assert not np.array_equal(plain.coefs_[0], weighted.coefs_[0])


def test_balanced_class_weight_recovers_the_minority_class():
    X, y = _imbalanced()
    params = dict(hidden_layer_sizes=(8,), max_iter=200, random_state=0)
    plain = _quiet(MLPClassifier(**params).fit, X, y)
    balanced = _quiet(MLPClassifier(class_weight="balanced", **params).fit, X, y)
    recall = [np.mean(est.predict(X)[y == 1] == 1) for est in (plain, balanced)]
    assert recall[1] > recall[0]


def test_class_weight_in_partial_fit_and_multilabel():
    X, y = _imbalanced()
    with pytest.raises(ValueError, match=r"\[MLPClassifier.partial_fit\] class_weight "
                                         r"'balanced' is not supported for partial_fit"):
        MLPClassifier(class_weight="balanced").partial_fit(X, y, classes=[0, 1])
    # a dict maps over classes_, even for a batch without some class
    batch = y == 0
    a = MLPClassifier(hidden_layer_sizes=(4,), class_weight={1: 3.0}, random_state=0)
    a.partial_fit(X[batch], y[batch], classes=[0, 1])
    b = MLPClassifier(hidden_layer_sizes=(4,), random_state=0)
    b.partial_fit(X[batch], y[batch], classes=[0, 1], sample_weight=np.ones(batch.sum()))
    a.partial_fit(X, y)
    b.partial_fit(X, y, sample_weight=np.where(y == 1, 3.0, 1.0))
    for p, q in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_):
        np.testing.assert_array_equal(p, q)
    # multi-label: scikit-learn's per-label weights, multiplied
    Y = np.column_stack([y, 1 - y, (X[:, 0] > 0).astype(int)])
    params = dict(hidden_layer_sizes=(4,), max_iter=5, random_state=0)
    c = _quiet(MLPClassifier(class_weight="balanced", **params).fit, X, Y)
    d = _quiet(MLPClassifier(**params).fit, X, Y,
               sample_weight=compute_sample_weight("balanced", Y))
    np.testing.assert_array_equal(c.coefs_[0], d.coefs_[0])
    with pytest.raises(ValueError, match="For multi-output, class_weight should be a list"):
        MLPClassifier(class_weight={0: 2.0}).fit(X, Y)
    with pytest.raises(InvalidParameterError, match="The 'class_weight' parameter"):
        MLPClassifier(class_weight="even").fit(X, y)


# ---- scikit-learn's estimator checks for the new parameters ------------------------------

# (class_weight's default, None, runs in test_sklearn.py's checks, which include
# scikit-learn's check_class_weight_classifiers with a dict)
def _poisson_expected_failures(estimator):
    """What scikit-learn's checks ask of a Poisson regressor that it cannot give
    (scikit-learn's own MLPRegressor(loss="poisson") is not run through them)."""
    failures = {"check_regressor_multioutput":
                "feeds negative targets, which loss='poisson' refuses (positive_only is set)"}
    if estimator.solver != "lbfgs":
        for name in ("check_regressors_train", "check_regressors_train(readonly_memmap=True)",
                     "check_regressors_train(readonly_memmap=True,X_dtype=float32)"):
            failures[name] = "asks R^2 > 0.5 of 200 Adam epochs on a Poisson log link"
    return failures


@parametrize_with_checks([MLPRegressor(loss="poisson"),
                          MLPRegressor(loss="poisson", solver="lbfgs")],
                         expected_failed_checks=_poisson_expected_failures)
def test_sklearn_estimator_checks_for_poisson(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)
