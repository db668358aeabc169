"""The README's examples of training features run as printed (in a scratch folder)."""

import os
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
SECTIONS = [
    "Example",  # its second block continues the first (the README says so): one namespace
    "Layers",
    "Schedules and callbacks", "Data that does not fit one array",
    "Crash-safe training: checkpoint and resume"]


def _blocks(title):
    match = re.search(r"^#+ " + re.escape(title) + r"\n(.*?)(?=^#+ )", README, re.S | re.M)
    assert match, f"README.md has no section {title!r}"
    blocks = re.findall(r"```python\n(.*?)```", match.group(1), re.S)
    assert blocks, f"the README's section {title!r} has no python example"
    return "\n".join(blocks)  # run in sequence, in one namespace


@pytest.mark.parametrize("title", SECTIONS)
def test_the_readme_example_runs(title, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _blocks(title)
    scope = {"__name__": "readme"}
    exec(compile(code, f"README.md: {title}", "exec"), scope)  # noqa: S102 - our own README
    if "bprop.fit(" in code:
        history = scope.get("history")
        assert history is not None and history.epochs >= 1
    if "checkpoint" in code:  # run again: the finished run's file gives the same result
        again = {"__name__": "readme"}
        exec(compile(code, f"README.md: {title}", "exec"), again)  # noqa: S102
        assert again["history"].loss == history.loss
        assert os.path.exists("run.ckpt")
