"""Sparse input: bprop against scikit-learn's MLPClassifier and PyTorch (torch.sparse CSR).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/sparse.py
    python bench/sparse.py --rows 10000 --epochs 1 --skip sklearn     # a quick look

The workload of issue 13, TF-IDF-shaped and synthetic: 50,000 training rows (and
10,000 held-out rows) over 2^17 columns, ~100 stored values per row drawn from a
Zipf-like column distribution, 20 classes, each class favouring its own few hundred
columns; the values are TF-IDF weights (log counts times idf, rows scaled to unit
norm). Network [Dense(2^17, 256) relu] -> [Dense(256, 20)], softmax cross-entropy,
Adam(lr=1e-3), 5 epochs, batch 256, shuffled, float32 for every library, no L2.

- bprop: ``bprop.fit`` on the CSR matrix, with dense Adam (every row of W updated
  each step, as the peers do) and with ``Adam(lazy=True)`` (only the rows of W the
  batch touches, like torch.optim.SparseAdam).
- scikit-learn: ``MLPClassifier(hidden_layer_sizes=(256,), solver="adam",
  batch_size=256, max_iter=5, alpha=0, tol=0)`` on the same CSR matrix, float32; and
  bprop.sklearn's MLPClassifier with the same arguments (the drop-in replacement).
- PyTorch: the same network with W1 as a (2^17, 256) parameter, z = torch.sparse.mm
  (X_batch as a sparse CSR tensor, W1) + b1, torch.optim.Adam(fused=True) (its fastest
  Adam here: the default foreach Adam took 10x longer per update); batches gathered with
  scipy's CSR row indexing, as bprop gathers them.

Each library's threads are its own defaults (bprop's pool, NumPy's OpenBLAS pool for
scikit-learn, torch's intra-op pool). The figure is the ratio of wall times in one
run (above 1: bprop is faster), with held-out accuracy so that the runs are seen to
train the same thing.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import scipy.sparse as sp

import bprop


def make_data(rows: int, cols: int, per_row: int, classes: int, seed: int = 0):
    """A TF-IDF-like CSR matrix (float32, int32 indices) and its labels."""
    rng = np.random.default_rng(seed)
    # Zipf-like popularity: the column of rank k is drawn with probability ~ 1/(k + 10)^1.1
    p = 1.0 / (np.arange(cols) + 10.0) ** 1.1
    p /= p.sum()
    column_of_rank = rng.permutation(cols)
    # each class favours 300 columns among the ranks 200..20000 (topic words)
    topics = rng.integers(200, 20000, size=(classes, 300))
    y = rng.integers(0, classes, size=rows)
    n_topic = max(1, per_row // 33)  # 3 of 100 tokens carry the class
    ranks = rng.choice(cols, size=(rows, per_row - n_topic), p=p)
    topic_ranks = topics[y[:, None], rng.integers(0, 300, size=(rows, n_topic))]
    cols_drawn = column_of_rank[np.concatenate([ranks, topic_ranks], axis=1)]
    counts = sp.csr_matrix((np.ones(cols_drawn.size, dtype=np.float32),
                            (np.repeat(np.arange(rows), per_row), cols_drawn.ravel())),
                           shape=(rows, cols))
    counts.sum_duplicates()  # canonical: sorted, unique; the values are counts
    df = np.bincount(counts.indices, minlength=cols)
    idf = (np.log((1 + rows) / (1 + df)) + 1).astype(np.float32)
    counts.data = np.log1p(counts.data) * idf[counts.indices]
    norms = np.sqrt(np.asarray(counts.multiply(counts).sum(axis=1)).ravel())
    X = sp.csr_matrix(sp.diags(1 / np.maximum(norms, 1e-12)).astype(np.float32) @ counts)
    X.sort_indices()
    X.indices = X.indices.astype(np.int32)
    X.indptr = X.indptr.astype(np.int32)
    return X.astype(np.float32), y.astype(np.int64)


def run_bprop(X, y, Xt, yt, args, lazy: bool):
    net = bprop.Network([bprop.Dense(X.shape[1], 256, activation="relu"),
                         bprop.Dense(256, args.classes)], seed=0, dtype="float32")
    opt = bprop.optim.Adam(net, lr=1e-3, lazy=True) if lazy else bprop.optim.Adam(net, lr=1e-3)
    start = time.perf_counter()
    bprop.fit(net, X, y, optimizer=opt, epochs=args.epochs, batch_size=256, seed=0)
    seconds = time.perf_counter() - start
    accuracy = float(np.mean(net.predict(Xt).argmax(axis=1) == yt))
    return seconds, accuracy


def run_sklearn(X, y, Xt, yt, args, bprop_estimator=False):
    from sklearn.exceptions import ConvergenceWarning
    if bprop_estimator:
        from bprop.sklearn import MLPClassifier
    else:
        from sklearn.neural_network import MLPClassifier
    est = MLPClassifier(hidden_layer_sizes=(256,), solver="adam", batch_size=256,
                        learning_rate_init=1e-3, max_iter=args.epochs, alpha=0.0, tol=0.0,
                        n_iter_no_change=args.epochs + 1, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        est.fit(X, y)
        seconds = time.perf_counter() - start
    return seconds, float(est.score(Xt, yt))


def run_torch(X, y, Xt, yt, args):
    import torch
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    torch.manual_seed(0)
    bound = 1 / np.sqrt(X.shape[1])  # nn.Linear's initialisation
    W1 = torch.nn.Parameter(torch.empty(X.shape[1], 256).uniform_(-bound, bound))
    b1 = torch.nn.Parameter(torch.empty(256).uniform_(-bound, bound))
    head = torch.nn.Linear(256, args.classes)
    params = [W1, b1, *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)  # its fastest Adam on this workload
    loss_fn = torch.nn.CrossEntropyLoss()

    def as_torch(B):
        return torch.sparse_csr_tensor(torch.from_numpy(B.indptr.astype(np.int64)),
                                       torch.from_numpy(B.indices.astype(np.int64)),
                                       torch.from_numpy(B.data), size=B.shape)

    def forward(B):
        return head(torch.relu(torch.sparse.mm(as_torch(B), W1) + b1))

    rng = np.random.default_rng(0)
    yt_torch = torch.from_numpy(y)
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = rng.permutation(X.shape[0])
        for i in range(0, X.shape[0], 256):
            rows = order[i:i + 256]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(forward(X[rows]), yt_torch[rows])
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        predicted = np.concatenate([forward(Xt[i:i + 4096]).argmax(dim=1).numpy()
                                    for i in range(0, Xt.shape[0], 4096)])
    return seconds, float(np.mean(predicted == yt)), torch.__version__


def blas_report() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    return "; ".join(f"{i['user_api']}:{i.get('internal_api')} "
                     f"{os.path.basename(i.get('filepath', '?'))} threads={i.get('num_threads')} "
                     f"kernel={i.get('architecture')}" for i in threadpool_info())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50000)
    parser.add_argument("--test-rows", type=int, default=10000)
    parser.add_argument("--cols", type=int, default=2 ** 17)
    parser.add_argument("--per-row", type=int, default=100)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--skip", action="append", default=[],
                        choices=["sklearn", "torch", "lazy", "dense", "estimator"])
    args = parser.parse_args()

    start = time.perf_counter()
    X_all, y_all = make_data(args.rows + args.test_rows, args.cols, args.per_row, args.classes)
    X, y = X_all[:args.rows], y_all[:args.rows]
    Xt, yt = X_all[args.rows:], y_all[args.rows:]
    print(f"data: {X.shape[0]} x {X.shape[1]} CSR float32, {X.nnz / X.shape[0]:.1f} stored "
          f"per row ({X.nnz} in all, {(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 2**20:.0f} MiB; "
          f"dense it would be {X.shape[0] * X.shape[1] * 4 / 2**30:.1f} GiB), "
          f"{args.classes} classes; made in {time.perf_counter() - start:.1f} s")
    print(f"bprop {bprop.__version__}; NumPy {np.__version__}; load average "
          f"{os.getloadavg()[0]:.2f}; CPUs {len(os.sched_getaffinity(0))}")
    bprop.show_config()
    print(f"{args.epochs} epochs, batch 256, Adam(lr=1e-3), float32\n")

    rows = []
    if "dense" not in args.skip:
        rows.append(("bprop, Adam", *run_bprop(X, y, Xt, yt, args, lazy=False)))
        print(f"  {rows[-1][0]}: {rows[-1][1]:.2f} s, accuracy {rows[-1][2]:.3f}", flush=True)
    if "lazy" not in args.skip:
        rows.append(("bprop, Adam(lazy=True)", *run_bprop(X, y, Xt, yt, args, lazy=True)))
        print(f"  {rows[-1][0]}: {rows[-1][1]:.2f} s, accuracy {rows[-1][2]:.3f}", flush=True)
    if "torch" not in args.skip:
        seconds, accuracy, version = run_torch(X, y, Xt, yt, args)
        rows.append((f"PyTorch {version}, torch.sparse.mm + Adam", seconds, accuracy))
        print(f"  {rows[-1][0]}: {rows[-1][1]:.2f} s, accuracy {rows[-1][2]:.3f}", flush=True)
    if "estimator" not in args.skip:
        rows.append(("bprop.sklearn.MLPClassifier", *run_sklearn(X, y, Xt, yt, args, True)))
        print(f"  {rows[-1][0]}: {rows[-1][1]:.2f} s, accuracy {rows[-1][2]:.3f}", flush=True)
    if "sklearn" not in args.skip:
        import sklearn
        rows.append((f"scikit-learn {sklearn.__version__} MLPClassifier",
                     *run_sklearn(X, y, Xt, yt, args)))
        print(f"  {rows[-1][0]}: {rows[-1][1]:.2f} s, accuracy {rows[-1][2]:.3f}", flush=True)
    print(f"\nBLAS: {blas_report()}; load average now {os.getloadavg()[0]:.2f}\n")
    bprop_rows = [r for r in rows if r[0].startswith("bprop")]
    print(f"{'run':48} {'seconds':>8} {'held-out acc':>13}  peer time / bprop time")
    for name, seconds, accuracy in rows:
        ratios = ", ".join(f"{seconds / b[1]:.2f}x ({b[0]})" for b in bprop_rows
                           if not name.startswith("bprop"))
        print(f"{name:48} {seconds:8.2f} {accuracy:13.3f}  {ratios}")


if __name__ == "__main__":
    main()
