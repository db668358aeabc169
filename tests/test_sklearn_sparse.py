"""bprop.sklearn with scipy.sparse X: every method that takes X takes it, never
densified; a sparse fit gives the weights and predictions of the same fit on
X.toarray() (float64, to 1e-12); the estimators work in a TfidfVectorizer
pipeline and in model selection; hostile sparse input is refused with the call,
the argument and what arrived, and leaves the estimator as it was."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")
sp = pytest.importorskip("scipy.sparse")

from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.utils import get_tags  # noqa: E402

import bprop  # noqa: E402
from bprop.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

# Short fits (a few epochs) end before converging, by design: equality, not
# convergence, is what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

TOL = 1e-12  # float64: sparse against dense


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The products here are tiny: threads only contend."""
    before = bprop.get_num_threads()
    bprop.set_num_threads(1)
    yield
    bprop.set_num_threads(before)


def sparse_problem(seed=0, rows=90, cols=20, density=0.25):
    """A CSR float64 X (row 3 empty, every other row not), three classes and two
    regression targets that depend on X."""
    rng = np.random.default_rng(seed)
    X = sp.random(rows, cols, density=density, format="csr", random_state=seed)
    X.data = rng.standard_normal(X.nnz)
    X.data[X.indptr[3]:X.indptr[4]] = 0.0
    X.eliminate_zeros()
    D = X.toarray()
    score = D[:, :6] @ rng.standard_normal(6)
    y = np.digitize(score, np.quantile(score, [1 / 3, 2 / 3]))
    Y = np.column_stack([score, D[:, 6:9].sum(axis=1)])
    return X, y, Y


def assert_same_fit(a, b, X, D, tol=TOL):
    """Two fitted estimators hold the same weights and predict the same (a on the
    sparse X, b on the dense D)."""
    for name in ("coefs_", "intercepts_"):
        for i, (p, q) in enumerate(zip(getattr(a, name), getattr(b, name))):
            np.testing.assert_allclose(p, q, rtol=tol, atol=tol, err_msg=f"{name}[{i}]")
    assert a.n_iter_ == b.n_iter_
    for name in ("loss_curve_", "validation_scores_"):
        if getattr(b, name, None) is not None:
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=tol, atol=tol)
    if hasattr(b, "predict_proba"):
        np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(D), rtol=tol, atol=tol)
        np.testing.assert_array_equal(a.predict(X), b.predict(D))
    else:
        np.testing.assert_allclose(a.predict(X), b.predict(D), rtol=tol, atol=tol)


def fit_both(Estimator, params, X, y, **fit_kwargs):
    """The same fit on the sparse X and on X.toarray()."""
    sparse = Estimator(**params).fit(X, y, **fit_kwargs)
    dense = Estimator(**params).fit(X.toarray(), y, **fit_kwargs)
    return sparse, dense


@pytest.fixture
def no_densifying(monkeypatch):
    """no_densifying(n_features): densifying a CSR matrix of n_features columns
    (X, its minibatches or rows; not the label indicators scikit-learn builds)
    becomes an error."""
    def refusing(original, n_features):
        def densify(self, *args, **kwargs):
            if self.shape[-1] == n_features:
                raise AssertionError("a sparse X was densified")
            return original(self, *args, **kwargs)
        return densify

    def refuse_for(n_features):
        for cls in (sp.csr_matrix, sp.csr_array):
            for name in ("toarray", "todense"):
                monkeypatch.setattr(cls, name, refusing(getattr(cls, name), n_features))
    return refuse_for


# ---- sparse and dense X: the same fit ------------------------------------------------

BASE = {"hidden_layer_sizes": (7, 5), "max_iter": 6, "batch_size": 16, "random_state": 0}

FITS = {
    "adam": {},
    "sgd-invscaling": {"solver": "sgd", "learning_rate": "invscaling", "learning_rate_init": 0.05},
    "rmsprop": {"solver": "rmsprop", "activation": "tanh"},
    "lbfgs": {"solver": "lbfgs", "max_iter": 15},
    "early_stopping": {"early_stopping": True, "validation_fraction": 0.2},
    "no-shuffle-alpha": {"shuffle": False, "alpha": 0.1},
    # sgd: the bias of a Dense before a BatchNorm has a gradient of 0 up to rounding,
    # which Adam's normalisation by sqrt(v) would blow up to steps of lr
    "batch_norm-dropout": {"batch_norm": True, "dropout": 0.2, "batch_size": 11,
                           "solver": "sgd", "learning_rate_init": 0.05},
    "batch_norm-lbfgs": {"batch_norm": True, "solver": "lbfgs", "max_iter": 10},
}


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
@pytest.mark.parametrize("fit", list(FITS))
def test_sparse_fit_equals_dense_fit(Estimator, fit):
    X, y, Y = sparse_problem()
    target = y if Estimator is MLPClassifier else Y
    sparse, dense = fit_both(Estimator, {**BASE, **FITS[fit]}, X, target)
    assert_same_fit(sparse, dense, X, X.toarray())
    assert sparse.n_features_in_ == X.shape[1]


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
@pytest.mark.parametrize("early_stopping", [False, True])
def test_sample_weight_with_sparse_x(Estimator, early_stopping):
    # shuffling, the validation split and the minibatches take rows of X and of
    # sample_weight by the same indices
    X, y, Y = sparse_problem(1)
    w = np.random.default_rng(1).uniform(0.0, 3.0, X.shape[0])
    w[:5] = 0.0
    params = {**BASE, "early_stopping": early_stopping}
    target = y if Estimator is MLPClassifier else Y
    sparse, dense = fit_both(Estimator, params, X, target, sample_weight=w)
    assert_same_fit(sparse, dense, X, X.toarray())
    assert sparse.score(X, target, sample_weight=w) == pytest.approx(
        dense.score(X.toarray(), target, sample_weight=w), rel=TOL)


def test_class_weight_with_sparse_x():
    X, y, _ = sparse_problem(2)
    for class_weight in ("balanced", {0: 3.0, 2: 0.5}):
        params = {**BASE, "class_weight": class_weight, "early_stopping": True}
        sparse, dense = fit_both(MLPClassifier, params, X, y)
        assert_same_fit(sparse, dense, X, X.toarray())


def test_binary_and_multilabel_with_sparse_x():
    X, y, _ = sparse_problem(3)
    D = X.toarray()
    for target in (y == 1, np.column_stack([y == 0, y == 2, D[:, 0] > 0])):
        sparse, dense = fit_both(MLPClassifier, {**BASE, "early_stopping": True}, X, target)
        assert_same_fit(sparse, dense, X, D)


def test_poisson_with_sparse_x():
    # the loss computed in NumPy: forward and backward of the CSR minibatches
    X, _, _ = sparse_problem(4)
    counts = np.random.default_rng(4).poisson(np.exp(0.5 * X.toarray()[:, :3].sum(axis=1)))
    for solver in ("adam", "lbfgs"):
        params = {**BASE, "loss": "poisson", "solver": solver}
        sparse, dense = fit_both(MLPRegressor, params, X, counts)
        assert_same_fit(sparse, dense, X, X.toarray())


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_partial_fit_with_sparse_x(Estimator):
    X, y, Y = sparse_problem(5)
    D = X.toarray()
    target = y if Estimator is MLPClassifier else Y
    w = np.random.default_rng(5).uniform(0.5, 2.0, X.shape[0])
    extra = {"classes": np.unique(y)} if Estimator is MLPClassifier else {}
    sparse, dense = Estimator(**BASE), Estimator(**BASE)
    for lo, hi in ((0, 30), (30, 60), (60, 90), (0, 90)):
        sparse.partial_fit(X[lo:hi], target[lo:hi], sample_weight=w[lo:hi], **extra)
        dense.partial_fit(D[lo:hi], target[lo:hi], sample_weight=w[lo:hi], **extra)
    assert_same_fit(sparse, dense, X, D)
    # dense and sparse batches mix: one network, one dtype
    sparse.partial_fit(D[:40], target[:40])
    dense.partial_fit(X[:40], target[:40])
    assert_same_fit(sparse, dense, X, D)


def test_warm_start_from_dense_to_sparse():
    X, y, _ = sparse_problem(6)
    D = X.toarray()
    a = MLPClassifier(**BASE, warm_start=True).fit(D, y)
    b = MLPClassifier(**BASE, warm_start=True).fit(D, y)
    a.fit(X, y)
    b.fit(D, y)
    assert_same_fit(a, b, X, D)


def test_fit_and_predict_never_densify(no_densifying):
    X, y, Y = sparse_problem(7)
    no_densifying(X.shape[1])
    for est, target in ((MLPClassifier(**BASE, early_stopping=True), y),
                        (MLPClassifier(**BASE, solver="lbfgs"), y),
                        (MLPRegressor(**BASE, batch_norm=True), Y)):
        est.fit(X, target)
        est.predict(X)
        est.score(X, target)
        if isinstance(est, MLPClassifier):
            est.predict_proba(X)
            est.predict_log_proba(X)
    MLPClassifier(**BASE).partial_fit(X, y, classes=np.unique(y)).partial_fit(X, y)


# ---- dtypes and formats -----------------------------------------------------------------

def test_dtype_follows_the_sparse_input_as_for_dense():
    X, y, _ = sparse_problem(8)
    D = X.toarray()
    X32 = X.astype(np.float32)
    sparse32 = MLPClassifier(**BASE).fit(X32, y)
    dense32 = MLPClassifier(**BASE).fit(D.astype(np.float32), y)
    assert sparse32.coefs_[0].dtype == np.float32
    assert_same_fit(sparse32, dense32, X32, D.astype(np.float32), tol=1e-5)
    # a float64 X predicted by a float32 network is cast, as dense X is
    np.testing.assert_allclose(sparse32.predict_proba(X), dense32.predict_proba(D), rtol=1e-5)
    # integers become float64, as a dense integer X does
    Xi = (X * 10).astype(np.int64)
    sparse, dense = fit_both(MLPClassifier, BASE, Xi, y)
    assert sparse.coefs_[0].dtype == np.float64
    assert_same_fit(sparse, dense, Xi, Xi.toarray())
    # dtype="float32" forces it
    forced = MLPClassifier(**BASE, dtype="float32").fit(X, y)
    assert forced.coefs_[0].dtype == np.float32


@pytest.mark.parametrize("fmt", ["csr_array", "csc", "coo", "dok", "lil", "bsr",
                                 "csr-int64", "csc-int64", "coo-int64"])
def test_other_formats_and_int64_indices_are_taken(fmt):
    X, y, _ = sparse_problem(9)
    reference = MLPClassifier(**BASE).fit(X, y)
    kind, _, index = fmt.partition("-")
    Xf = sp.csr_array(X) if kind == "csr_array" else X.asformat(kind)
    if index:
        if kind == "coo":
            Xf.row, Xf.col = Xf.row.astype(np.int64), Xf.col.astype(np.int64)
        else:
            Xf.indices, Xf.indptr = Xf.indices.astype(np.int64), Xf.indptr.astype(np.int64)
    before = Xf.copy()
    est = MLPClassifier(**BASE).fit(Xf, y)
    assert_same_fit(est, reference, Xf, X)
    np.testing.assert_array_equal(est.predict_proba(Xf), reference.predict_proba(X))
    assert (Xf != before).nnz == 0  # the user's matrix is left as it was


def test_unsorted_and_duplicate_indices_are_summed_in_a_copy():
    # scikit-learn's MLP takes a non-canonical matrix (X @ W sums duplicates);
    # the core needs canonical rows, so the estimator makes a canonical copy
    X, y, _ = sparse_problem(10)
    est = MLPClassifier(**BASE).fit(X, y)
    data, indices, indptr = [1.0, 2.0, 3.0, -1.0], [7, 2, 7, 0], [0, 3, 4]
    messy = sp.csr_matrix((data, indices, indptr), shape=(2, X.shape[1]))
    assert not messy.has_canonical_format
    D = np.zeros((2, X.shape[1]))
    D[0, 7], D[0, 2], D[1, 0] = 4.0, 2.0, -1.0
    np.testing.assert_allclose(est.predict_proba(messy), est.predict_proba(D), rtol=TOL)
    np.testing.assert_array_equal(messy.indices, indices)  # not sorted in place
    # scipy's cached flag claims canonical form: the arrays are checked, not the flag
    r = int(np.argmax(np.diff(X.indptr) >= 2))  # a row of 2 or more values
    stale = sp.csr_matrix(X[r:r + 1], copy=True)
    assert stale.has_canonical_format
    stale.indices[[0, 1]] = stale.indices[[1, 0]]
    np.testing.assert_allclose(est.predict_proba(stale), est.predict_proba(stale.toarray()),
                               rtol=TOL)


def test_tags_declare_sparse_input():
    for est in (MLPClassifier(), MLPRegressor(), MLPRegressor(loss="poisson")):
        assert get_tags(est).input_tags.sparse is True


# ---- pipelines and model selection ---------------------------------------------------------

def documents(n, seed):
    """Synthetic documents of three topics: each draws 10 words from its topic's
    words and words common to all."""
    rng = np.random.default_rng(seed)
    topics = [["goal", "match", "team", "league", "coach", "score"],
              ["stock", "market", "price", "bank", "trade", "bond"],
              ["cell", "gene", "protein", "virus", "lab", "enzyme"]]
    common = ["the", "a", "of", "and", "new", "today", "report", "said"]
    y = rng.integers(0, 3, n)
    return [" ".join(rng.choice(topics[k] + common, size=10)) for k in y], y


def test_tfidf_pipeline_trains_and_predicts(no_densifying):
    docs, y = documents(360, 0)
    no_densifying(len(TfidfVectorizer().fit(docs).vocabulary_))
    pipe = Pipeline([("tfidf", TfidfVectorizer()),
                     ("mlp", MLPClassifier(hidden_layer_sizes=(16,), learning_rate_init=0.01,
                                           max_iter=50, random_state=0))])
    pipe.fit(docs[:300], y[:300])
    assert sp.issparse(pipe[:-1].transform(docs[:2]))
    assert pipe.predict(docs[300:]).shape == (60,)
    assert pipe.predict_proba(docs[300:]).shape == (60, 3)
    assert pipe.score(docs[300:], y[300:]) > 0.8  # chance is 1/3


def test_grid_search_and_cross_val_score_on_sparse_x():
    X, y, Y = sparse_problem(11, rows=120)
    scores = cross_val_score(MLPRegressor(**BASE), X, Y, cv=3)
    dense_scores = cross_val_score(MLPRegressor(**BASE), X.toarray(), Y, cv=3)
    np.testing.assert_allclose(scores, dense_scores, rtol=TOL, atol=TOL)
    search = GridSearchCV(MLPClassifier(**BASE), {"alpha": [1e-4, 1e-1]}, cv=3).fit(X, y)
    dense = GridSearchCV(MLPClassifier(**BASE), {"alpha": [1e-4, 1e-1]},
                         cv=3).fit(X.toarray(), y)
    np.testing.assert_allclose(search.cv_results_["mean_test_score"],
                               dense.cv_results_["mean_test_score"], rtol=TOL)
    assert search.best_params_ == dense.best_params_
    np.testing.assert_array_equal(search.predict(X), dense.predict(X.toarray()))


# ---- hostile sparse input -----------------------------------------------------------------

@pytest.fixture
def fitted():
    X, y, _ = sparse_problem(12)
    est = MLPClassifier(**BASE).fit(X, y)
    return est, X, y


def assert_unchanged(est, before, X):
    coefs, proba, n_features = before
    for p, q in zip(est.coefs_, coefs):
        np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(est.predict_proba(X), proba)
    assert est.n_features_in_ == n_features


def state(est, X):
    return [c.copy() for c in est.coefs_], est.predict_proba(X), est.n_features_in_


def test_wrong_number_of_features_is_refused(fitted):
    est, X, y = fitted
    wide = sp.random(4, X.shape[1] + 1, density=0.5, format="csr", random_state=0)
    for method in (est.predict, est.predict_proba, est.predict_log_proba):
        with pytest.raises(ValueError, match=f"X has {X.shape[1] + 1} features, but "
                                             f"MLPClassifier is expecting {X.shape[1]}"):
            method(wide)
    before = state(est, X)
    with pytest.raises(ValueError, match=f"X has {X.shape[1] + 1} features"):
        est.partial_fit(wide, y[:4])
    assert_unchanged(est, before, X)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_stored_values_are_refused_with_where(fitted, bad):
    est, X, y = fitted
    Xbad = X.copy()
    assert Xbad.indptr[6] > Xbad.indptr[5]
    k = Xbad.indptr[5]  # a value of row 5
    Xbad.data[k] = bad
    col = Xbad.indices[k]
    word = "NaN" if np.isnan(bad) else "infinity"
    for method in ("predict", "predict_proba"):
        with pytest.raises(ValueError, match=rf"Input X contains {word}\. \[MLPClassifier\."
                                             rf"{method}\] X must hold values finite in "
                                             rf"float64 .* X\[5, {col}\] is {bad}"):
            getattr(est, method)(Xbad)
    before = state(est, X)
    # a refit with other data (and another width) fails before anything changes
    wider = sp.hstack([Xbad, Xbad], format="csr")
    for call in (lambda: est.fit(wider, y), lambda: est.partial_fit(Xbad, y)):
        with pytest.raises(ValueError, match=r"\[MLPClassifier\.(partial_)?fit\] X must hold"):
            call()
        assert_unchanged(est, before, X)


def test_too_large_for_float32_is_refused():
    X, y, _ = sparse_problem(13)
    est = MLPClassifier(**BASE, dtype="float32").fit(X, y)
    big = X.copy()
    big.data[0] = 1e300
    with pytest.raises(ValueError, match=r"finite in float32 .* X\[0, \d+\] is inf in float32"):
        est.predict(big)


def test_a_failed_fit_leaves_the_estimator_as_it_was(fitted):
    est, X, _ = fitted
    before = state(est, X)
    classes = est.classes_.copy()
    other = sp.random(30, 4, density=0.5, format="csr", random_state=1)
    other.data[0] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        est.fit(other, np.arange(30) % 5)  # refused after validate_data set n_features_in_
    assert_unchanged(est, before, X)
    np.testing.assert_array_equal(est.classes_, classes)
    # refused in the training loop, after classes_ was set: early stopping's
    # stratified split of a binary y with a class of one sample
    est.set_params(early_stopping=True)
    other.data[0] = 1.0
    with pytest.raises(ValueError, match="least populated class"):
        est.fit(other, np.arange(30) == 0)
    assert_unchanged(est, before, X)
    np.testing.assert_array_equal(est.classes_, classes)


def test_malformed_sparse_input_is_refused(fitted):
    est, X, _ = fitted
    out_of_range = X[:3].copy()
    out_of_range.indices[0] = X.shape[1] + 5  # a hand-built matrix: scipy does not look
    with pytest.raises(ValueError, match=rf"\[MLPClassifier\.predict\] X has a column index "
                                         rf"out of range: it stores column {X.shape[1] + 5}"):
        est.predict(out_of_range)
    with pytest.raises(ValueError, match=r"Complex data not supported\. \[MLPClassifier\."
                                         r"predict\] X must hold real numbers, but the sparse X "
                                         r"has dtype complex128"):
        est.predict(X.astype(np.complex128))
    with pytest.raises(ValueError, match=r"X must be 2-D \(samples, features\), but the sparse "
                                         r"X has shape \(20,\); use X\.reshape\(1, -1\)"):
        est.predict(sp.csr_array(np.ones(X.shape[1])))
    with pytest.raises(ValueError, match="Found array with 0 sample"):
        est.predict(sp.csr_matrix((0, X.shape[1])))
