"""Row-sparse updates for sparse input: plain SGD's fused step touches only the
batch's rows of the first layer's W (exactly: the gradient is zero elsewhere), and
Adam(lazy=True) updates only those rows, as torch.optim.SparseAdam does. Checked
against a NumPy oracle, against PyTorch's SparseAdam, and for the rows and state it
must leave alone."""

from __future__ import annotations

import numpy as np
import pytest

sp = pytest.importorskip("scipy.sparse")

import bprop  # noqa: E402
from bprop import optim  # noqa: E402

IN, HIDDEN, OUT = 300, 8, 3


def make_net(dtype="float64", activation="tanh"):
    return bprop.Network([bprop.Dense(IN, HIDDEN, activation), bprop.Dense(HIDDEN, OUT)],
                         dtype=dtype, seed=0)


def batches(rng, steps=20, rows=16, dtype="float64", index=np.int32):
    """Sparse minibatches over a few of the IN columns (most rows of W untouched
    by any one batch), nonzero stored values, and labels."""
    out = []
    for _ in range(steps):
        X = sp.random(rows, IN, density=0.02, format="csr", random_state=rng, dtype=np.float64)
        X.data = rng.uniform(0.5, 1.5, X.nnz) * rng.choice([-1, 1], X.nnz)
        X = X.astype(dtype)
        X.indices, X.indptr = X.indices.astype(index), X.indptr.astype(index)
        out.append((X, rng.integers(0, OUT, rows)))
    return out


def lazy_adam_oracle(net, data, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
    """Lazy Adam in NumPy on the dense form of each batch, from the gradients of
    the reference-checked backward: rows of layers.0.weight outside the batch's
    columns keep their value, m and v."""
    b1, b2 = betas
    m = {n: np.zeros_like(p) for n, p, _ in net.parameters()}
    v = {n: np.zeros_like(p) for n, p, _ in net.parameters()}
    for t, (X, y) in enumerate(data, start=1):
        _, grad = bprop.losses.softmax_cross_entropy(net.forward(X.toarray()), y)
        net.backward(grad)
        present = np.unique(X.indices)
        for name, p, g in net.parameters():
            rows = present if name == "layers.0.weight" else slice(None)
            m[name][rows] = b1 * m[name][rows] + (1 - b1) * g[rows]
            v[name][rows] = b2 * v[name][rows] + (1 - b2) * g[rows] ** 2
            p[rows] -= lr / (1 - b1 ** t) * m[name][rows] / (
                np.sqrt(v[name][rows] / (1 - b2 ** t)) + eps)
    return m, v


@pytest.mark.parametrize("index", [np.int32, np.int64])
@pytest.mark.parametrize("path", ["train_step", "step"])
def test_lazy_adam_matches_the_oracle(rng, index, path):
    data = batches(rng, index=index)
    net, ref = make_net(), make_net()
    opt = optim.Adam(net, lr=1e-2, lazy=True)
    for X, y in data:
        if path == "train_step":
            net.train_step(X, y, loss="softmax_cross_entropy", optimizer=opt)
        else:  # from the stored gradients: the rows come from the last sparse forward
            _, grad = bprop.losses.softmax_cross_entropy(net.forward(X), y)
            net.backward(grad)
            opt.step()
    m, v = lazy_adam_oracle(ref, data)
    state = opt.state_dict()["state"]
    for (name, p, _), (_, q, _) in zip(net.parameters(), ref.parameters()):
        np.testing.assert_allclose(p, q, rtol=0, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(state[name]["exp_avg"], m[name], rtol=0, atol=1e-12)
        np.testing.assert_allclose(state[name]["exp_avg_sq"], v[name], rtol=0, atol=1e-12)
    assert opt.step_count == len(data)


def test_untouched_rows_keep_value_and_state_bitwise(rng):
    data = batches(rng, steps=2)
    net = make_net()
    opt = optim.Adam(net, lr=1e-2, lazy=True)
    w0 = net.layers[0].weight.copy()
    for X, y in data:
        net.train_step(X, y, loss="softmax_cross_entropy", optimizer=opt)
    touched = np.unique(np.concatenate([X.indices for X, _ in data]))
    untouched = np.setdiff1d(np.arange(IN), touched)
    assert untouched.size > 50 and touched.size > 10
    w = net.layers[0].weight
    np.testing.assert_array_equal(w[untouched], w0[untouched])
    assert np.all(w[touched] != w0[touched])
    state = opt.state_dict()["state"]["layers.0.weight"]
    assert not state["exp_avg"][untouched].any() and not state["exp_avg_sq"][untouched].any()
    # between two steps, lazy Adam leaves the rows the second batch does not touch
    # (plain Adam moves every row that has momentum)
    X, y = data[0]
    before = w.copy()
    net.train_step(X, y, loss="softmax_cross_entropy", optimizer=opt)
    elsewhere = np.setdiff1d(np.arange(IN), X.indices)
    np.testing.assert_array_equal(w[elsewhere], before[elsewhere])


def test_lazy_adam_matches_torch_sparse_adam(rng):
    """torch.optim.SparseAdam on an EmbeddingBag (sum of rows weighted by the
    stored values: X W as a sparse gradient) plus Adam on the rest. eps=1e-300
    (SparseAdam refuses 0): their placements of eps differ (SparseAdam's is not
    scaled by the bias correction), so with an eps that changes no sum the two are
    the same arithmetic."""
    torch = pytest.importorskip("torch")
    data = batches(rng)
    net = make_net()
    opt = optim.Adam(net, lr=1e-2, eps=1e-300, lazy=True)
    W, b = (torch.tensor(net.layers[0].weight.copy()), torch.tensor(net.layers[0].bias.copy()))
    bag = torch.nn.EmbeddingBag(IN, HIDDEN, mode="sum", sparse=True, dtype=torch.float64)
    with torch.no_grad():
        bag.weight.copy_(W)
    bias = torch.nn.Parameter(b)
    head = torch.nn.Linear(HIDDEN, OUT, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(net.layers[1].weight.T.copy()))
        head.bias.copy_(torch.tensor(net.layers[1].bias.copy()))
    sparse_opt = torch.optim.SparseAdam(list(bag.parameters()), lr=1e-2, eps=1e-300)
    dense_opt = torch.optim.Adam([bias, *head.parameters()], lr=1e-2, eps=1e-300)
    for X, y in data:
        net.train_step(X, y, loss="softmax_cross_entropy", optimizer=opt)
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        z = bag(torch.tensor(X.indices.astype(np.int64)), torch.tensor(X.indptr[:-1].astype(np.int64)),
                per_sample_weights=torch.tensor(X.data)) + bias
        loss = torch.nn.functional.cross_entropy(head(torch.tanh(z)), torch.tensor(y))
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
    np.testing.assert_allclose(net.layers[0].weight, bag.weight.detach().numpy(), rtol=0,
                               atol=1e-12)
    np.testing.assert_allclose(net.layers[0].bias, bias.detach().numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(net.layers[1].weight, head.weight.detach().numpy().T, rtol=0,
                               atol=1e-12)


def test_lazy_adam_after_a_dense_batch_is_adam(rng):
    X, y = rng.standard_normal((16, IN)), rng.integers(0, OUT, 16)
    a, b = make_net(), make_net()
    oa, ob = optim.Adam(a, lr=1e-2, lazy=True), optim.Adam(b, lr=1e-2)
    for _ in range(3):
        a.train_step(X, y, loss="softmax_cross_entropy", optimizer=oa)
        b.train_step(X, y, loss="softmax_cross_entropy", optimizer=ob)
    for (name, p, _), (_, q, _) in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(p, q, err_msg=name)


def test_fused_sgd_touches_only_the_batch_rows_and_equals_dense(rng):
    """Plain SGD needs no option: its fused step over a sparse batch is one sparse
    product into W, exact, and equal to the dense step."""
    data = batches(rng, steps=10)
    sparse_net, dense_net = make_net(), make_net()
    so, do = optim.SGD(sparse_net, lr=0.1), optim.SGD(dense_net, lr=0.1)
    w0 = sparse_net.layers[0].weight.copy()
    for X, y in data:
        sparse_net.train_step(X, y, loss="softmax_cross_entropy", optimizer=so)
        dense_net.train_step(X.toarray(), y, loss="softmax_cross_entropy", optimizer=do)
    for (name, p, _), (_, q, _) in zip(sparse_net.parameters(), dense_net.parameters()):
        np.testing.assert_allclose(p, q, rtol=0, atol=1e-12, err_msg=name)
    untouched = np.setdiff1d(np.arange(IN), np.concatenate([X.indices for X, _ in data]))
    np.testing.assert_array_equal(sparse_net.layers[0].weight[untouched], w0[untouched])


def test_lazy_adam_in_fit_is_bitwise_the_same_for_any_thread_count(rng):
    X = sp.vstack([Xb for Xb, _ in batches(rng, steps=8)]).tocsr()
    y = rng.integers(0, OUT, X.shape[0])
    results = []
    before = bprop.get_num_threads()
    try:
        for threads in (1, 2, 3):
            bprop.set_num_threads(threads)
            net = make_net("float32", activation="relu")
            opt = optim.Adam(net, lr=1e-2, lazy=True)
            bprop.fit(net, X, y, optimizer=opt, epochs=2, batch_size=16, seed=0)
            results.append([p.copy() for _, p, _ in net.parameters()]
                           + [a for s in opt.state_dict()["state"].values() for a in s.values()])
    finally:
        bprop.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_lazy_setting_checked_saved_and_loaded(rng, tmp_path):
    net = make_net()
    with pytest.raises(ValueError, match=r"\[Adam\] lazy=True takes no weight_decay"):
        optim.Adam(net, lazy=True, weight_decay=1e-4)
    with pytest.raises(TypeError, match=r"\[Adam\] lazy must be a bool"):
        optim.Adam(net, lazy="yes")
    with pytest.raises(TypeError):
        optim.AdamW(net, lazy=True)  # decoupled decay is AdamW's point: no lazy form
    assert "lazy" not in optim.AdamW(net).hyperparameters
    opt = optim.Adam(net, lr=1e-2, lazy=True)
    X, y = batches(rng, steps=1)[0]
    net.train_step(X, y, loss="softmax_cross_entropy", optimizer=opt)
    net.save(tmp_path / "m.safetensors", optimizer=opt)
    net2, opt2 = bprop.load(tmp_path / "m.safetensors", with_optimizer=True)
    assert opt2.hyperparameters["lazy"] is True and repr(opt2) == repr(opt)
    # a state_dict from before the setting existed loads as lazy=False
    old = opt.state_dict()
    del old["hyperparameters"]["lazy"]
    opt2.load_state_dict(old)
    assert opt2.hyperparameters["lazy"] is False


def test_lazy_adam_leaves_no_stale_gradient_visible(rng):
    """The lazy step forms the first layer's dL/dW in the batch's rows only, so the
    network then holds no complete gradient: step() refuses it, as after fused SGD."""
    net = make_net()
    opt = optim.Adam(net, lr=1e-2, lazy=True)
    X, y = batches(rng, steps=1)[0]
    net.train_step(X, y, loss="softmax_cross_entropy", optimizer=opt)
    with pytest.raises(RuntimeError, match="no gradients"):
        opt.step()
