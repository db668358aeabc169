"""A fit over a CSR matrix whose dense form could not exist: 20,000 x 2^22 (335 GB
dense in float32; one dense minibatch of 256 rows would be 4 GiB). fit (with a
validation split), evaluate and predict run in a fresh process, whose peak resident
set must stay within 512 MiB of what it held before: far below one dense minibatch,
so nothing, not even one minibatch, was densified."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("scipy.sparse")

SCRIPT = textwrap.dedent("""
    import json, resource
    import numpy as np
    import scipy.sparse as sp
    import bprop

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    rows, cols, per_row = 20_000, 2 ** 22, 20
    rng = np.random.default_rng(0)
    indices = np.sort(rng.choice(cols, size=(rows, per_row)), axis=1).astype(np.int32)
    keep = np.ones_like(indices, dtype=bool)
    keep[:, 1:] = indices[:, 1:] != indices[:, :-1]  # no duplicates within a row
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
    X = sp.csr_matrix((rng.uniform(0.1, 1.0, indptr[-1]).astype(np.float32),
                       indices[keep], indptr), shape=(rows, cols))
    y = rng.integers(0, 3, rows)
    net = bprop.Network([bprop.Dense(cols, 4, activation="relu"), bprop.Dense(4, 3)],
                        seed=0, dtype="float32")
    opt = bprop.optim.SGD(net, lr=0.1)
    try:  # reset the peak resident set to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        peak = lambda: status("VmHWM")
    except OSError:  # the peak since the start, which is at least the current one
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = status("VmRSS")
    history = bprop.fit(net, X, y, optimizer=opt, epochs=1, batch_size=256, seed=0,
                        validation_split=0.1, metrics=["accuracy"])
    value = bprop.evaluate(net, X, y, metrics=["accuracy"])
    out = net.predict(X)
    print(json.dumps({"before": before, "peak": peak(), "out": list(out.shape),
                      "finite": bool(np.isfinite(out).all()),
                      "val_loss": history.val_loss, "value": value}))
""")


def test_fit_evaluate_predict_over_a_matrix_too_big_to_densify():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    assert r["out"] == [20_000, 3] and r["finite"]
    assert len(r["val_loss"]) == 1
    growth = r["peak"] - r["before"]
    # the network (W: 2^22 x 4 float32 = 64 MiB, and its gradient) and the
    # validation rows' copy fit in far less; one dense minibatch alone is 4 GiB
    assert growth < 512 * 2 ** 20, f"peak resident set grew by {growth / 2**20:.0f} MiB"
