"""Types: bprop ships py.typed and stubs of its compiled core (_core.pyi); the
stubs match the module; mypy --strict passes on the README example and on the
demo (python -m bprop demo), checked against the installed package as a user's
code would be."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bprop
from bprop import _core

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(bprop.__file__).resolve().parent  # where bprop is imported from
STUB = PACKAGE / "_core.pyi"


def _readme_example() -> str:
    """The python blocks of the README's "## Example" section, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Example\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "README.md has no '## Example' section"
    blocks = re.findall(r"^```python\n(.*?)^```", match.group(1), re.M | re.S)
    assert blocks, "the README's Example section has no python code block"
    return "\n".join(blocks)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, check=False)


def test_package_ships_typing_files():
    # In an installed wheel these sit next to the package's modules (scikit-build-core
    # packs every file of python/bprop); an empty py.typed is the PEP 561 marker.
    assert (PACKAGE / "py.typed").is_file()
    assert STUB.is_file()


def test_readme_example_and_demo_pass_mypy_strict(tmp_path):
    pytest.importorskip("mypy")
    example = tmp_path / "readme_example.py"
    example.write_text(_readme_example(), encoding="utf-8")
    # A copy, so that mypy resolves `import bprop` to the installed package (which
    # it analyses only because of py.typed) rather than to a source tree.
    demo = tmp_path / "bprop_demo.py"
    shutil.copyfile(PACKAGE / "__main__.py", demo)
    result = _run(["-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
                   str(example), str(demo)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 2 source files" in result.stdout


def test_readme_example_is_checked_for_real(tmp_path):
    # Guards the test above: mypy must see bprop's types, not Any.
    pytest.importorskip("mypy")
    probe = tmp_path / "probe.py"
    probe.write_text(_readme_example() + "\nwrong: int = history\n"
                     "wrong_too: str = layer.in_features\n"
                     "import bprop._core as core\n"
                     "bad: str = core.build_info()['openmp']\n", encoding="utf-8")
    result = _run(["-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
                   str(probe)], cwd=tmp_path)
    assert result.returncode == 1
    assert 'has type "History", variable has type "int"' in result.stdout
    assert 'has type "int", variable has type "str"' in result.stdout
    assert 'has type "bool", variable has type "str"' in result.stdout
    assert "Found 3 errors" in result.stdout


def test_core_stub_matches_module(tmp_path):
    # stubtest: every name of the module is in the stub and every name of the stub
    # is in the module. Allowed: pybind11's metaclass and its module_local marker.
    pytest.importorskip("mypy.stubtest")
    allowlist = tmp_path / "allowlist.txt"
    allowlist.write_text("bprop\\._core\\.(Network|UpdatePlan)(32|64)\n"
                         "bprop\\._core\\.\\w+\\.__pybind11_module_local_\\w*\n",
                         encoding="utf-8")
    result = _run(["-m", "mypy.stubtest", "bprop._core", "--allowlist", str(allowlist),
                   "--ignore-unused-allowlist"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- argument names and defaults: stubtest cannot read pybind11 signatures ----------

def _split_top_level(params: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in params:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def _runtime_params(obj: object) -> list[tuple[str, bool]]:
    """(name, has default) of each argument, from pybind11's docstring signature."""
    first = (obj.__doc__ or "").strip().splitlines()[0]
    match = re.match(r"\w+\((.*)\) -> .*$", first)
    assert match, f"no pybind11 signature in {first!r}"
    params = []
    for part in _split_top_level(match.group(1)):
        name = part.split(":", 1)[0].strip()
        if name != "self":
            params.append((name, "=" in part))
    return params


def _stub_params(fn: ast.FunctionDef) -> list[tuple[str, bool, bool]]:
    """(name, has default, positional-only) of each argument but self."""
    args = fn.args
    positional = args.posonlyargs + args.args
    first_default = len(positional) - len(args.defaults)
    out = [(a.arg, i >= first_default, i < len(args.posonlyargs))
           for i, a in enumerate(positional)]
    out += [(a.arg, d is not None, False) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return [p for p in out if p[0] != "self"]


def _stub_functions() -> dict[str, ast.FunctionDef]:
    """'name' and 'Class.name' -> definition (the last one: the general overload)."""
    tree = ast.parse(STUB.read_text(encoding="utf-8"))
    found: dict[str, ast.FunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = item
    return found


def _runtime_functions() -> dict[str, object]:
    found: dict[str, object] = {}
    for name in dir(_core):
        obj = getattr(_core, name)
        if name.startswith("_"):
            continue
        if isinstance(obj, type):
            for attr, member in vars(obj).items():
                if attr == "__init__" or (not attr.startswith("_") and callable(member)):
                    found[f"{name}.{attr}"] = member
        elif callable(obj):
            found[name] = obj
    return found


def test_core_stub_signatures_match_bindings():
    stub = _stub_functions()
    runtime = _runtime_functions()
    assert set(runtime) <= set(stub), sorted(set(runtime) - set(stub))
    for name, obj in runtime.items():
        expected = _runtime_params(obj)
        got = _stub_params(stub[name])
        assert len(got) == len(expected), f"{name}: stub {got}, bindings {expected}"
        for (s_name, s_default, s_posonly), (r_name, r_default) in zip(got, expected):
            if re.fullmatch(r"arg\d+", r_name):  # unnamed in the bindings
                assert s_posonly, f"{name}: {s_name} should be positional-only"
            else:
                assert s_name == r_name, f"{name}: stub names {s_name}, bindings {r_name}"
            assert s_default == r_default, f"{name}.{r_name}: default in stub {s_default}"


def test_core_stub_properties_match_bindings():
    tree = ast.parse(STUB.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            cls = getattr(_core, node.name)
            stub_props = {f.name for f in node.body if isinstance(f, ast.FunctionDef)
                          and any(isinstance(d, ast.Name) and d.id == "property"
                                  for d in f.decorator_list)}
            runtime_props = {k for k, v in vars(cls).items() if isinstance(v, property)}
            assert stub_props == runtime_props, node.name


def test_readme_layers_example_runs_and_passes_mypy(tmp_path):
    # the "## Layers" block as a user would paste it after `import bprop`
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Layers\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "README.md has no '## Layers' section"
    block = re.findall(r"^```python\n(.*?)^```", match.group(1), re.M | re.S)[0]
    code = "import bprop\n" + block
    namespace: dict = {}
    exec(compile(code, "README-layers", "exec"), namespace)  # noqa: S102 - our own README
    net = namespace["net"]
    assert not net.training and len(net) == 7
    assert [name for name, _ in net.buffers()] == ["layers.1.running_mean", "layers.1.running_var"]
    pytest.importorskip("mypy")
    (tmp_path / "layers_example.py").write_text(code, encoding="utf-8")
    result = _run(["-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
                   "layers_example.py"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_sparse_input_example_runs(capsys):
    # the "### Sparse input" block (a TfidfVectorizer pipeline), as written; not run
    # through mypy: scikit-learn ships no type information
    pytest.importorskip("sklearn")
    sparse = pytest.importorskip("scipy.sparse")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^### Sparse input\s*$(.*?)(?=^##)", text, re.M | re.S)
    assert match, "README.md has no '### Sparse input' section"
    blocks = re.findall(r"^```python\n(.*?)^```", match.group(1), re.M | re.S)
    assert blocks, "the README's Sparse input section has no python code block"
    namespace: dict = {}
    exec(compile("\n".join(blocks), "README-sparse", "exec"), namespace)  # noqa: S102
    clf = namespace["clf"]
    assert sparse.issparse(clf[:-1].transform(namespace["docs"][:2]))
    assert float(capsys.readouterr().out) > 0.8  # three topics: chance is 1/3
