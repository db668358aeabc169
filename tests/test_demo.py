"""python -m bprop demo: a few epochs in-process, and once through the command line."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import bprop
from bprop.__main__ import main

pytest.importorskip("sklearn")


def test_demo_trains_reports_and_plots(tmp_path, capsys):
    png = tmp_path / "curve.png"
    ckpt = tmp_path / "digits.safetensors"
    code = main(["demo", "--epochs", "8", "--hidden", "32", "--seed", "1", "--plot", str(png),
                 "--save", str(ckpt)])
    assert code == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "network 64-32-10" in out and "8 epochs, batch 32" in out
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)%", out).group(1))
    assert accuracy > 85.0
    assert re.search(r"training time: [0-9.]+ s", out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "epoch 8/8" in captured.err  # the progress bar
    net = bprop.load(ckpt)
    assert [L.out_features for L in net.layers] == [32, 10]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "rmsprop"])
def test_demo_optimizers(optimizer, capsys):
    lr = "0.1" if optimizer == "sgd" else "0.003"
    assert main(["demo", "--epochs", "3", "--optimizer", optimizer, "--lr", lr, "--no-plot",
                 "--no-progress", "--hidden", "32", "16", "--dtype", "float64"]) == 0
    captured = capsys.readouterr()
    assert "network 64-32-16-10" in captured.out and "float64" in captured.out
    assert captured.err == ""


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--batch-size", "0"], ["--hidden", "0"],
                                  ["--lr", "-1"]])
def test_demo_refuses_bad_options(argv, capsys):
    assert main(["demo", "--no-plot", *argv]) == 2
    assert "must be" in capsys.readouterr().err


def test_command_line_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bprop", "demo", "--epochs", "2", "--no-progress", "--no-plot"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "test accuracy:" in result.stdout
    assert list(tmp_path.iterdir()) == []


_BLOCK_IMPORTS = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # import fails as if the package were not installed
from bprop.__main__ import main
sys.exit(main(["demo", "--epochs", "2", "--hidden", "16", *{options!r}]))
"""


def test_demo_without_tqdm_prints_a_plain_progress_line(tmp_path):
    # Regression: `pip install .` then `python -m bprop demo` crashed with a traceback
    # once scikit-learn was there, because tqdm was missing.
    code = _BLOCK_IMPORTS.format(blocked=["tqdm", "tqdm.auto"], options=["--no-plot"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "test accuracy:" in result.stdout
    lines = result.stderr.splitlines()
    assert re.fullmatch(r"epoch 1/2: loss=[0-9.e-]+ \([0-9.]+ s\)", lines[0]), lines
    assert re.fullmatch(r"epoch 2/2: loss=[0-9.e-]+ \([0-9.]+ s\)", lines[1]), lines
    assert lines[2].startswith("2/2 epochs in ")


def test_demo_without_tqdm_and_matplotlib_trains_and_says_why_there_is_no_plot(tmp_path):
    # scikit-learn is the demo's only hard requirement: with the default plot option
    # and neither the progress bar's nor the plot's package, it still trains, reports,
    # and says that there is no plot and why, instead of failing.
    code = _BLOCK_IMPORTS.format(
        blocked=["tqdm", "tqdm.auto", "matplotlib", "matplotlib.figure",
                 "matplotlib.backends.backend_agg"], options=[])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"test accuracy: [0-9.]+%", result.stdout), result.stdout
    assert "loss curve:" not in result.stdout
    no_plot = [line for line in result.stderr.splitlines() if line.startswith("no plot: ")]
    assert len(no_plot) == 1, result.stderr
    assert "needs matplotlib" in no_plot[0] and "pip install matplotlib" in no_plot[0]
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no loss.png, not even an empty one


def test_demo_without_scikit_learn_says_what_to_install(tmp_path):
    code = _BLOCK_IMPORTS.format(blocked=["sklearn", "sklearn.datasets"],
                                 options=["--no-plot"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "the demo needs scikit-learn (for the digits data); install it, with the progress "
        "bar and the plot, by: pip install scikit-learn tqdm matplotlib")
