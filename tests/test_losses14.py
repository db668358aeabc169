"""The losses of issue 14 (huber, mean_absolute_error, poisson_nll; softmax
cross-entropy's label_smoothing and class_weight) against torch.nn in float64, the
NumPy reference and central differences; hostile targets; the fused path by name and
by functools.partial against the user-loss path; and fit's class_weight."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import bprop
from bprop import _core, losses, reference

torch = pytest.importorskip("torch")

TOL = 1e-12


def _t(a):
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def _torch_value_grad(module, z, y, y_is_labels=False):
    zt = _t(z).requires_grad_(True)
    yt = torch.tensor(y, dtype=torch.int64) if y_is_labels else _t(y)
    value = module(zt, yt)
    value.backward()
    return float(value.detach()), zt.grad.numpy()


def _assert_close(value, grad, ref_value, ref_grad, tol=TOL):
    np.testing.assert_allclose(value, ref_value, rtol=tol, atol=tol)
    np.testing.assert_allclose(grad, ref_grad, rtol=tol, atol=tol * max(1.0, np.abs(ref_grad).max()))


# ---- each loss against torch.nn, float64 -------------------------------------------

def _regression_case(rng, shape=(6, 3)):
    z = rng.standard_normal(shape) * 2
    y = rng.standard_normal(shape) * 2
    y[0, 0] = z[0, 0]            # r == 0 exactly: mae's gradient is 0 there
    y[1, 1] = z[1, 1] - 1.0      # r == delta exactly (delta 1): huber's boundary
    return z, y


ELEMENTWISE = [
    ("huber", {}, lambda: torch.nn.HuberLoss(reduction="mean", delta=1.0)),
    ("huber", {"delta": 2.0}, lambda: torch.nn.HuberLoss(reduction="mean", delta=2.0)),
    ("huber", {"delta": 0.3}, lambda: torch.nn.HuberLoss(reduction="mean", delta=0.3)),
    ("mean_absolute_error", {}, lambda: torch.nn.L1Loss()),
    ("poisson_nll", {}, lambda: torch.nn.PoissonNLLLoss(log_input=True, full=False)),
]


@pytest.mark.parametrize("name,kwargs,make_torch", ELEMENTWISE)
def test_elementwise_loss_equals_torch(name, kwargs, make_torch, rng):
    z, y = _regression_case(rng)
    if name == "poisson_nll":
        y = rng.poisson(2.0, z.shape).astype(np.float64)
    value, grad = getattr(losses, name)(z, y, **kwargs)
    _assert_close(value, grad, *_torch_value_grad(make_torch(), z, y))
    # and by name through LOSSES
    if not kwargs:
        v2, g2 = losses.LOSSES[name](z, y)
        assert v2 == value and np.array_equal(g2, grad)


def test_mean_absolute_error_gradient_is_zero_where_output_equals_target():
    z = np.array([[1.0, -2.0, 0.5]])
    value, grad = losses.mean_absolute_error(z, z.copy())
    assert value == 0.0 and np.array_equal(grad, np.zeros_like(z))


def test_poisson_nll_accepts_negative_targets_as_torch_does(rng):
    z = rng.standard_normal((4, 2))
    y = rng.standard_normal((4, 2))  # negative entries: not counts, but torch computes them
    value, grad = losses.poisson_nll(z, y)
    _assert_close(value, grad, *_torch_value_grad(
        torch.nn.PoissonNLLLoss(log_input=True, full=False), z, y))


SMOOTH_WEIGHT = [(0.0, None), (0.1, None), (0.0, [0.5, 2.0, 1.0, 3.0]),
                 (0.25, [0.5, 2.0, 1.0, 3.0]), (1.0, [1.0, 0.0, 2.0, 1.0])]


@pytest.mark.parametrize("eps,class_weight", SMOOTH_WEIGHT)
@pytest.mark.parametrize("kind", ["labels", "probabilities"])
def test_softmax_cross_entropy_options_equal_torch(eps, class_weight, kind, rng):
    z = rng.standard_normal((8, 4)) * 3
    if kind == "labels":
        y = rng.integers(0, 4, 8)
        y[:4] = [0, 1, 2, 3]
    else:
        p = rng.random((8, 4))
        y = p / p.sum(axis=1, keepdims=True)
    value, grad = losses.softmax_cross_entropy(z, y, label_smoothing=eps,
                                               class_weight=class_weight)
    module = torch.nn.CrossEntropyLoss(
        weight=None if class_weight is None else _t(class_weight), label_smoothing=eps)
    _assert_close(value, grad, *_torch_value_grad(module, z, y, kind == "labels"))
    ref = reference.softmax_cross_entropy(z, y, label_smoothing=eps, class_weight=class_weight)
    _assert_close(value, grad, *ref)


@pytest.mark.parametrize("eps,class_weight", SMOOTH_WEIGHT)
@pytest.mark.parametrize("kind", ["labels", "probabilities"])
def test_softmax_options_combine_with_sample_weights_per_row(eps, class_weight, kind, rng):
    """sample_weight w and class_weight c multiply per row; the mean divides by
    sum_i w_i c[y_i] for labels (sum_i w_i for probability rows): torch's per-row
    losses (reduction='none'), weighted and divided by hand."""
    z = rng.standard_normal((8, 4)) * 2
    w = rng.uniform(0.1, 2.0, 8)
    if kind == "labels":
        y = np.array([0, 1, 2, 3, 3, 0, 1, 2])
    else:
        p = rng.random((8, 4))
        y = p / p.sum(axis=1, keepdims=True)
    value, grad = losses.softmax_cross_entropy(z, y, w, label_smoothing=eps,
                                               class_weight=class_weight)
    c = np.ones(4) if class_weight is None else np.asarray(class_weight)
    zt = _t(z).requires_grad_(True)
    yt = torch.tensor(y) if kind == "labels" else _t(y)
    rows = torch.nn.functional.cross_entropy(
        zt, yt, weight=None if class_weight is None else _t(c), label_smoothing=eps,
        reduction="none")
    denom = (w * c[y]).sum() if kind == "labels" else w.sum()
    ref = (rows * _t(w)).sum() / denom
    ref.backward()
    _assert_close(value, grad, float(ref.detach()), zt.grad.numpy())
    _assert_close(value, grad, *reference.softmax_cross_entropy(
        z, y, w, label_smoothing=eps, class_weight=class_weight))
    # only the weights' ratios matter
    v2, g2 = losses.softmax_cross_entropy(z, y, 8 * w, label_smoothing=eps,
                                          class_weight=class_weight)
    _assert_close(v2, g2, value, grad)


def test_class_weight_alone_equals_sample_weights_of_the_labels(rng):
    z = rng.standard_normal((10, 3))
    y = rng.integers(0, 3, 10)
    c = np.array([0.5, 2.0, 1.5])
    w = rng.uniform(0.5, 1.5, 10)
    _assert_close(*losses.softmax_cross_entropy(z, y, w, class_weight=c),
                  *losses.softmax_cross_entropy(z, y, w * c[y]))


# ---- against the reference (both dtypes) and central differences ---------------------

NEW = [("huber", {}), ("huber", {"delta": 0.5}), ("mean_absolute_error", {}),
       ("poisson_nll", {})]


@pytest.mark.parametrize("name,kwargs", NEW)
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("weighted", [False, True])
def test_new_loss_matches_reference(name, kwargs, dtype, rtol, weighted, rng):
    z = rng.standard_normal((7, 3)).astype(dtype)
    y = (rng.standard_normal((7, 3)) * 2).astype(dtype)
    w = (rng.random(7) + 0.1).astype(dtype) if weighted else None
    value, grad = getattr(losses, name)(z, y, w, **kwargs)
    ref_value, ref_grad = getattr(reference, name)(z, y, w, **kwargs)
    assert isinstance(value, float)
    assert grad.dtype == dtype and grad.shape == z.shape and grad.flags.c_contiguous
    np.testing.assert_allclose(value, ref_value, rtol=rtol)
    np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=rtol * np.abs(ref_grad).max())


def _central_differences(fn, z, eps=1e-6):
    g = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += eps
        zm[idx] -= eps
        g[idx] = (fn(zp) - fn(zm)) / (2 * eps)
    return g


@pytest.mark.parametrize("name,kwargs", NEW + [
    ("softmax_cross_entropy", {"label_smoothing": 0.2}),
    ("softmax_cross_entropy", {"class_weight": [1.0, 3.0, 0.5]}),
    ("softmax_cross_entropy", {"label_smoothing": 0.1, "class_weight": [1.0, 3.0, 0.5]})])
@pytest.mark.parametrize("weighted", [False, True])
def test_new_loss_gradient_matches_central_differences(name, kwargs, weighted, rng):
    z = rng.standard_normal((5, 3))
    if name == "softmax_cross_entropy":
        y = np.array([0, 1, 2, 2, 1])
    else:
        # keep every residual away from the kinks (0 for mae, +-delta for huber)
        y = z - np.where(rng.random(z.shape) < 0.5, -1, 1) * rng.uniform(0.1, 0.4, z.shape)
        y[0] = z[0] + 1.7
    w = rng.uniform(0.2, 2.0, 5) if weighted else None
    fn = functools.partial(getattr(losses, name), **kwargs)
    _, grad = fn(z, y, w)
    numeric = _central_differences(lambda zz: fn(zz, y, w)[0], z)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)
    ref = functools.partial(getattr(reference, name), **kwargs)
    np.testing.assert_allclose(ref(z, y, w)[1], numeric, rtol=1e-6, atol=1e-9)


# ---- hostile arguments -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["huber", "mean_absolute_error", "poisson_nll"])
def test_new_loss_refuses_bad_targets(name):
    z = np.zeros((3, 2))
    fn = getattr(losses, name)
    with pytest.raises(ValueError, match=rf"\[{name}\] target has 2 rows"):
        fn(z, np.zeros((2, 2)))
    with pytest.raises(ValueError, match=rf"\[{name}\] target has 3 columns"):
        fn(z, np.zeros((3, 3)))
    bad = np.zeros((3, 2))
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match=rf"\[{name}\] target must be finite, but "
                                         r"target\[1, 0\] = nan"):
        fn(z, bad)
    with pytest.raises(ValueError, match=rf"\[{name}\] sample_weight must be >= 0"):
        fn(z, np.zeros((3, 2)), np.array([1.0, -1.0, 1.0]))


@pytest.mark.parametrize("delta", [0.0, -1.0, np.inf, np.nan])
def test_huber_refuses_a_bad_delta(delta):
    with pytest.raises(ValueError, match=r"\[huber\] delta must be a finite number > 0"):
        losses.huber(np.zeros((2, 1)), np.zeros((2, 1)), delta=delta)
    with pytest.raises(TypeError, match=r"\[huber\] delta must be a number"):
        losses.huber(np.zeros((2, 1)), np.zeros((2, 1)), delta="1")


def test_softmax_options_refuse_bad_values():
    z, y = np.zeros((3, 4)), np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\], but got 1.5"):
        losses.softmax_cross_entropy(z, y, label_smoothing=1.5)
    with pytest.raises(TypeError, match=r"label_smoothing must be a number"):
        losses.softmax_cross_entropy(z, y, label_smoothing=None)
    with pytest.raises(ValueError, match=r"class_weight must have one weight per class \(4,\)"):
        losses.softmax_cross_entropy(z, y, class_weight=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"class_weight must be finite and >= 0, but "
                                         r"class_weight\[2\] = -1.0"):
        losses.softmax_cross_entropy(z, y, class_weight=[1.0, 1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match=r"denominator .* is 0"):
        losses.softmax_cross_entropy(z, y, class_weight=[0.0, 0.0, 0.0, 1.0])


# ---- the registry and the fused step ----------------------------------------------------

def test_core_loss_table_matches_the_python_registry():
    names = _core.loss_names()
    assert {"huber", "mean_absolute_error", "poisson_nll"} <= set(names)
    for name in names:
        assert losses._builtin(losses.LOSSES[name]).name == name
    with pytest.raises(ValueError, match=r"loss must be one of 'softmax_cross_entropy'.*"
                                         r"'poisson_nll', but got 'nope'"):
        net = bprop.Network([bprop.Dense(2, 1)], dtype="float64", seed=0)
        net._core.train_step(np.zeros((2, 2)), np.zeros((2, 1)), "nope", None, 0.1)


def test_a_partial_with_default_options_is_fused_and_others_are_not():
    assert losses._builtin(functools.partial(losses.huber, delta=1.0)).name == "huber"
    assert losses._builtin(functools.partial(losses.softmax_cross_entropy,
                                             label_smoothing=0)).name == "softmax_cross_entropy"
    assert losses._builtin(functools.partial(losses.huber, delta=2.0)) is None
    assert losses._builtin(functools.partial(losses.softmax_cross_entropy,
                                             label_smoothing=0.1)) is None
    assert losses._builtin(functools.partial(losses.mean_squared_error, foo=1)) is None


@pytest.mark.parametrize("name", ["huber", "mean_absolute_error", "poisson_nll"])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_train_step_equals_the_four_calls(name, weighted, rng):
    def make():
        return bprop.Network([bprop.Dense(4, 6, activation="tanh"), bprop.Dense(6, 3)],
                             dtype="float64", seed=3)
    a, b = make(), make()
    X = rng.standard_normal((9, 4))
    y = rng.poisson(1.5, (9, 3)).astype(np.float64) if name == "poisson_nll" else \
        rng.standard_normal((9, 3)) * 2
    w = rng.uniform(0.1, 2.0, 9) if weighted else None
    for _ in range(3):
        va = a._core.train_step(X, y, name, w, 0.05)
        out = b.forward(X)
        vb, grad = getattr(losses, name)(out, y, w)
        b.backward(grad)
        b.step(0.05)
        assert va == pytest.approx(vb, rel=1e-13)
    for (_, pa, _), (_, pb, _) in zip(a.parameters(), b.parameters()):
        np.testing.assert_allclose(pa, pb, rtol=1e-12, atol=1e-14)


def _problem(name, rng, n=80):
    X = rng.standard_normal((n, 4))
    if name == "softmax_cross_entropy":
        return X, rng.integers(0, 3, n)
    if name == "binary_cross_entropy_with_logits":
        return X, rng.integers(0, 2, (n, 1)).astype(np.float64)
    if name == "poisson_nll":
        return X, rng.poisson(1.0, (n, 3)).astype(np.float64)
    return X, rng.standard_normal((n, 3))


def _net(out=3):
    return bprop.Network([bprop.Dense(4, 8, activation="tanh"), bprop.Dense(8, out)],
                         dtype="float64", seed=7)


def _fit(loss, X, y, **kwargs):
    net = _net(3 if y.ndim == 1 or y.shape[1] == 3 else 1)
    opt = bprop.optim.SGD(net, lr=0.01)
    bprop.fit(net, X, y, loss=loss, optimizer=opt, epochs=1, batch_size=4, shuffle=False,
              **kwargs)  # 80 rows / 4: 20 steps
    return [p.copy() for _, p, _ in net.parameters()]


@pytest.mark.parametrize("name", ["huber", "mean_absolute_error", "poisson_nll"])
@pytest.mark.parametrize("weighted", [False, True])
def test_twenty_fused_steps_by_name_equal_the_user_loss_path(name, weighted, rng):
    X, y = _problem(name, rng)
    w = rng.uniform(0.5, 1.5, len(X)) if weighted else None
    fn = getattr(losses, name)
    by_name = _fit(name, X, y, sample_weight=w)
    by_partial = _fit(functools.partial(fn), X, y, sample_weight=w)
    by_callable = _fit(lambda o, t, sw=None: fn(o, t, sw), X, y, sample_weight=w)
    by_oracle = _fit(lambda o, t, sw=None: getattr(reference, name)(o, t, sw), X, y,
                     sample_weight=w)
    for a, b, c, d in zip(by_name, by_partial, by_callable, by_oracle):
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(b, c, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(d, c, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("loss,oracle", [
    (functools.partial(losses.huber, delta=2.0),
     functools.partial(reference.huber, delta=2.0)),
    (functools.partial(losses.softmax_cross_entropy, label_smoothing=0.1),
     functools.partial(reference.softmax_cross_entropy, label_smoothing=0.1)),
    (functools.partial(losses.softmax_cross_entropy, label_smoothing=0.1,
                       class_weight=[1.0, 2.0, 0.5]),
     functools.partial(reference.softmax_cross_entropy, label_smoothing=0.1,
                       class_weight=[1.0, 2.0, 0.5])),
])
def test_fit_with_a_partial_with_options_equals_the_oracle(loss, oracle, rng):
    name = "huber" if loss.func is losses.huber else "softmax_cross_entropy"
    X, y = _problem(name, rng)
    if name == "huber":
        y = y * 3  # residuals beyond delta
    for a, b in zip(_fit(loss, X, y), _fit(lambda o, t, sw=None: oracle(o, t, sw), X, y)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["huber", "mean_absolute_error", "poisson_nll"])
def test_network_train_step_by_name(name, rng):
    X, y = _problem(name, rng, n=8)
    a, b = _net(), _net()
    oa, ob = bprop.optim.SGD(a, lr=0.01), bprop.optim.SGD(b, lr=0.01)
    va = a.train_step(X, y, loss=name, optimizer=oa)
    vb = b.train_step(X, y, loss=lambda o, t, sw=None: getattr(reference, name)(o, t, sw),
                      optimizer=ob)
    assert va == pytest.approx(vb, rel=1e-12)
    for (_, pa, _), (_, pb, _) in zip(a.parameters(), b.parameters()):
        np.testing.assert_allclose(pa, pb, rtol=1e-12, atol=1e-14)


# ---- fit's class_weight ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["softmax_cross_entropy", "binary_cross_entropy_with_logits"])
@pytest.mark.parametrize("weighted", [False, True])
def test_fit_class_weight_equals_sample_weights_by_hand(name, weighted, rng):
    X, y = _problem(name, rng)
    labels = y.reshape(-1).astype(int)
    w = rng.uniform(0.5, 1.5, len(X)) if weighted else np.ones(len(X))
    cw = {0: 2.0, 1: 0.5} if name != "softmax_cross_entropy" else {0: 2.0, 2: 0.25}
    by_hand = np.array([cw.get(int(k), 1.0) for k in labels]) * w
    a = _fit(name, X, y, sample_weight=w if weighted else None, class_weight=cw)
    b = _fit(name, X, y, sample_weight=by_hand)
    for pa, pb in zip(a, b):
        np.testing.assert_allclose(pa, pb, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["softmax_cross_entropy", "binary_cross_entropy_with_logits"])
def test_fit_balanced_class_weight_is_scikit_learns(name, rng):
    from sklearn.utils.class_weight import compute_class_weight
    X, y = _problem(name, rng)
    labels = y.reshape(-1).astype(int)
    labels[:3] = 0  # unequal counts
    y = labels if name == "softmax_cross_entropy" else labels.reshape(-1, 1).astype(float)
    classes = np.unique(labels)
    sk = compute_class_weight("balanced", classes=classes, y=labels)
    from bprop.train import _class_weights
    ours = _class_weights("fit", "balanced", losses.LOSSES[name], y, 3 if y.ndim == 1 else 1)
    np.testing.assert_allclose(ours[classes], sk, rtol=1e-15)
    by_hand = dict(zip(classes.tolist(), sk.tolist()))
    a = _fit(name, X, y, class_weight="balanced")
    b = _fit(name, X, y, sample_weight=np.array([by_hand[k] for k in labels]))
    for pa, pb in zip(a, b):
        np.testing.assert_allclose(pa, pb, rtol=1e-12, atol=1e-14)


def test_fit_class_weight_multiplies_a_partial_with_options(rng):
    X, y = _problem("softmax_cross_entropy", rng)
    loss = functools.partial(losses.softmax_cross_entropy, label_smoothing=0.1)
    a = _fit(loss, X, y, class_weight={0: 2.0, 1: 0.5})
    b = _fit(loss, X, y, sample_weight=np.array([{0: 2.0, 1: 0.5}.get(int(k), 1.0) for k in y]))
    for pa, pb in zip(a, b):
        np.testing.assert_allclose(pa, pb, rtol=1e-12, atol=1e-14)


def test_fit_class_weight_leaves_the_validation_loss_unweighted(rng):
    X, y = _problem("softmax_cross_entropy", rng)
    net = _net()
    snapshot = [p.copy() for _, p, _ in net.parameters()]
    # validation_split takes the last half (no shuffle) out of the class-weighted data
    history = bprop.fit(net, X, y, optimizer=bprop.optim.SGD(net, lr=0.0), epochs=1,
                        shuffle=False, validation_split=0.5, class_weight={0: 3.0})
    for (_, p, _), q in zip(net.parameters(), snapshot):
        np.testing.assert_array_equal(p, q)  # lr 0: the network is the initial one
    expected = losses.softmax_cross_entropy(net.predict(X[40:]), y[40:])[0]
    assert history.val_loss[0] == pytest.approx(expected, rel=1e-12)


def test_fit_class_weight_errors(rng):
    X, y = _problem("softmax_cross_entropy", rng)
    y = np.where(y == 2, 1, y)  # class 2 never occurs
    with pytest.raises(ValueError, match=r"\[fit\] class_weight has label 5, which is not a "
                                         r"class"):
        _fit("softmax_cross_entropy", X, y, class_weight={5: 1.0})
    with pytest.raises(ValueError, match=r"\[fit\] class_weight has label 2, which does not "
                                         r"occur in y"):
        _fit("softmax_cross_entropy", X, y, class_weight={2: 1.0})
    for bad in (0.0, -1.0, np.nan):
        with pytest.raises(ValueError, match=r"\[fit\] class_weight\[1\] must be a finite "
                                             r"number > 0"):
            _fit("softmax_cross_entropy", X, y, class_weight={1: bad})
    with pytest.raises(ValueError, match=r"must be None, 'balanced' or a dict"):
        _fit("softmax_cross_entropy", X, y, class_weight="auto")
    with pytest.raises(TypeError, match=r"must be None, 'balanced' or a dict"):
        _fit("softmax_cross_entropy", X, y, class_weight=[1.0, 2.0])
    Xr, yr = _problem("huber", rng)
    with pytest.raises(ValueError, match=r"\[fit\] class_weight is for classification losses.*"
                                         r"'huber'"):
        _fit("huber", Xr, yr, class_weight="balanced")
    p = rng.random((len(X), 3))
    with pytest.raises(ValueError, match=r"needs integer class labels"):
        _fit("softmax_cross_entropy", X, p / p.sum(axis=1, keepdims=True),
             class_weight="balanced")
    yb = rng.random((len(X), 1))
    with pytest.raises(ValueError, match=r"needs 0/1 targets"):
        _fit("binary_cross_entropy_with_logits", X, yb, class_weight="balanced")
