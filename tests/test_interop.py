"""bprop.interop: ONNX export (checked in onnxruntime) and PyTorch conversion.

onnx, onnxruntime and torch are optional; each group of tests is skipped when its
package is missing. Measured on the development machine (onnxruntime 1.32, torch 2.13
with MKL, AVX-512):

* onnxruntime vs Network.predict, float32: at most 2.4e-7 absolute on ARCHITECTURES
  (GEMM summation order); the tests ask for 1e-5. float64: at most 4.4e-16; the tests
  ask for 1e-12. onnxruntime has no float64 Erf/Gelu kernel, so float64 gelu graphs
  are checked with onnx's reference evaluator instead.
* to_torch/from_torch, float64: Eigen and MKL sum a dot product in different orders,
  and torch's sigmoid/tanh/gelu kernels are not the core's, so outputs agree to
  ~1 eps * (1 + |y|) per layer, at most 28.5 eps * (1 + |y|) (6.4e-15) on a
  784-512-512-10 network. The tests use rtol = atol = 1e-13 (about 450 eps) on
  smaller networks. Where every product and sum is exact (dyadic weights and inputs,
  piecewise-linear activations) the outputs are bitwise equal, and so are parameters
  after any round trip.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import bprop
from bprop import interop
from bprop.activations import REGISTRY

ACTIVATIONS = bprop.ACTIVATIONS

# (widths, activations, negative_slope) of the networks every check runs on; together
# they cover every activation, in hidden and output positions.
ARCHITECTURES = {
    "linear": ([5, 3], ["identity"], 0.01),
    "relu-tanh-softmax": ([8, 16, 16, 4], ["relu", "tanh", "softmax"], 0.01),
    "sigmoid-leaky-identity": ([6, 12, 12, 3], ["sigmoid", "leaky_relu", "identity"], 0.2),
    "gelu-gelu-sigmoid": ([10, 32, 32, 1], ["gelu", "gelu", "sigmoid"], 0.01),
    "deep-mixed": ([20, 64, 64, 32, 32, 16, 10],
                   ["leaky_relu", "gelu", "tanh", "relu", "sigmoid", "softmax"], 0.05),
    "elu-selu-silu-softplus": ([8, 24, 24, 16, 3], ["elu", "selu", "silu", "softplus"], 0.01),
}


def make_net(name: str, dtype: str, seed: int = 0) -> bprop.Network:
    widths, activations, slope = ARCHITECTURES[name]
    layers = [bprop.Dense(widths[i], widths[i + 1], activation=act, negative_slope=slope)
              for i, act in enumerate(activations)]
    net = bprop.Network(layers, dtype=dtype, seed=seed)
    # non-zero biases, so a dropped or misplaced bias shows
    rng = np.random.default_rng(seed + 100)
    for layer in net:
        layer.bias = 0.5 * rng.standard_normal(layer.out_features)
    return net


def inputs(net: bprop.Network, rows: int, seed: int = 1) -> np.ndarray:
    return (2.0 * np.random.default_rng(seed).standard_normal((rows, net.in_features))
            ).astype(net.dtype)


# ==== ONNX ===========================================================================


@pytest.fixture
def onnx():
    return pytest.importorskip("onnx")


@pytest.fixture
def ort():
    return pytest.importorskip("onnxruntime")


def run_ort(ort, path, X, input_name="X"):
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return session.run(None, {input_name: X})[0]


@pytest.mark.parametrize("opset", [13, 17, 20])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_onnx_matches_predict_float32(onnx, ort, tmp_path, name, opset):
    net = make_net(name, "float32")
    path = tmp_path / "net.onnx"
    assert interop.to_onnx(net, path, opset=opset) is None
    # one model, several batch sizes: the batch dimension is dynamic
    for rows in (1, 7, 300):
        X = inputs(net, rows, seed=rows)
        got = run_ort(ort, path, X)
        assert got.dtype == np.float32 and got.shape == (rows, net.out_features)
        np.testing.assert_allclose(got, net.predict(X), rtol=0, atol=1e-5)


# onnxruntime's CPU provider has no float64 kernel for Erf or Gelu, so float64
# networks with a gelu layer cannot run there; see test_onnx_float64_gelu_graph.
@pytest.mark.parametrize("opset", [13, 17, 20])
@pytest.mark.parametrize("name", ["linear", "relu-tanh-softmax", "sigmoid-leaky-identity",
                                  "elu-selu-silu-softplus"])
def test_onnx_matches_predict_float64(onnx, ort, tmp_path, name, opset):
    net = make_net(name, "float64")
    path = tmp_path / "net.onnx"
    interop.to_onnx(net, path, opset=opset)
    X = inputs(net, 50)
    got = run_ort(ort, path, X)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, net.predict(X), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("slope", [0.01, 0.3, 1.5, -0.25])
def test_onnx_float64_leaky_relu_keeps_the_slope_in_float64(onnx, ort, tmp_path, slope):
    # LeakyRelu's alpha attribute is 32-bit: used for float64 it would round the slope
    # (0.3 -> 0.30000001192...) and move outputs by ~1e-8.
    net = bprop.Network([bprop.Dense(4, 6, activation="leaky_relu", negative_slope=slope),
                         bprop.Dense(6, 2, activation="leaky_relu", negative_slope=slope)],
                        dtype="float64", seed=3)
    path = tmp_path / "net.onnx"
    interop.to_onnx(net, path)
    ops = [node.op_type for node in onnx.load(path).graph.node]
    assert "LeakyRelu" not in ops and ops.count("Where") == 2
    X = inputs(net, 40)
    np.testing.assert_allclose(run_ort(ort, path, X), net.predict(X), rtol=1e-14, atol=1e-15)


# Both branches, softplus's threshold (ONNX's Softplus has none), the saturated tails
# and tiny |z|, where exp(z) - 1 cancels.
EXTREME_Z = [-1e4, -800.0, -100.0, -40.0, -20.1, -20.0, -19.9, -3.0, -1.0, -1e-3, -1e-10, 0.0,
             1e-10, 1e-3, 1.0, 3.0, 19.9, 20.0, 20.1, 40.0, 100.0, 800.0, 1e4]


def _identity_dense(activation, dtype):
    n = len(EXTREME_Z)
    net = bprop.Network([bprop.Dense(n, n, activation=activation)], dtype=dtype, seed=0)
    net[0].weight = np.eye(n)
    net[0].bias = np.zeros(n)
    X = np.array([EXTREME_Z, EXTREME_Z[::-1]], dtype=dtype)
    return net, X


@pytest.mark.parametrize("activation", ["elu", "selu", "silu", "softplus"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_onnx_at_extreme_pre_activations(onnx, ort, tmp_path, activation, dtype):
    net, X = _identity_dense(activation, dtype)
    path = tmp_path / "net.onnx"
    interop.to_onnx(net, path)
    expected = net.predict(X)
    got = run_ort(ort, path, X)
    assert got.dtype == np.dtype(dtype) and np.isfinite(got).all()
    big = np.abs(X) > 20
    if activation in ("elu", "softplus"):
        # the linear branch is z itself in any runtime, softplus above its threshold too
        assert got[big & (X > 0)].tobytes() == X[big & (X > 0)].tobytes()
    if dtype == "float64":
        # the spelled-out expm1 and log1p keep the relative accuracy at tiny outputs
        # (onnxruntime's Sigmoid does not, below z = -36: silu's absolute term)
        np.testing.assert_allclose(got, expected, rtol=1e-14, atol=1e-300 if activation != "silu"
                                   else 1e-14)
    else:
        # onnxruntime's float32 Elu and Selu form exp(z) - 1, off expm1 by up to 6e-8
        # absolute where |z| is small
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


# not silu: the evaluator's own Sigmoid, 1 / (1 + exp(-x)), warns of overflow at -1e4
@pytest.mark.parametrize("activation", ["elu", "selu", "softplus"])
def test_onnx_float64_graph_in_the_reference_evaluator(onnx, tmp_path, activation):
    # onnx's own evaluator (NumPy) runs the spelled-out float64 graphs silently
    # (warnings are errors here): no exp overflows, no log of 0, no 0/0 in a branch
    # that Where drops
    from onnx.reference import ReferenceEvaluator

    net, X = _identity_dense(activation, "float64")
    path = tmp_path / "net.onnx"
    interop.to_onnx(net, path)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    got = ReferenceEvaluator(model).run(None, {"X": X})[0]
    np.testing.assert_allclose(got, net.predict(X), rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("opset", [17, 20])
def test_onnx_float64_gelu_graph(onnx, tmp_path, opset):
    # Checked with onnx's own reference evaluator instead of onnxruntime (no float64
    # Erf/Gelu kernel); its Erf goes through float32, hence the tolerance.
    from onnx.reference import ReferenceEvaluator

    net = make_net("gelu-gelu-sigmoid", "float64")
    path = tmp_path / "net.onnx"
    interop.to_onnx(net, path, opset=opset)
    model = onnx.load(path)
    assert all(t.data_type == onnx.TensorProto.DOUBLE for t in model.graph.initializer)
    X = inputs(net, 30)
    got = ReferenceEvaluator(model).run(None, {"X": X})[0]
    np.testing.assert_allclose(got, net.predict(X), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_onnx_graph_layout(onnx, tmp_path, dtype):
    net = make_net("deep-mixed", dtype)
    path = tmp_path / "net.onnx"
    interop.to_onnx(net, path)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert model.producer_name == "bprop"
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    (inp,), (out,) = model.graph.input, model.graph.output
    for value, features in ((inp, net.in_features), (out, net.out_features)):
        assert value.type.tensor_type.elem_type == elem
        dims = value.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", ""]
        assert dims[1].dim_value == features
    assert (inp.name, out.name) == ("X", "output")
    # parameters are copied exactly, in the net's dtype, W as Gemm's B (in, out)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for i, layer in enumerate(net):
        for what in ("weight", "bias"):
            value = inits[f"layers.{i}.{what}"]
            assert value.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(value, getattr(layer, what))
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == len(net)
    assert all(not n.attribute for n in gemms)  # alpha = beta = 1, no transposes


@pytest.mark.parametrize("opset, expected", [(17, ["Mul", "Erf", "Add", "Mul", "Mul"]),
                                             (20, ["Gelu"])])
def test_onnx_gelu_node_by_opset(onnx, tmp_path, opset, expected):
    net = bprop.Network([bprop.Dense(3, 4, activation="gelu")], seed=0)
    path = tmp_path / "net.onnx"
    interop.to_onnx(net, path, opset=opset)
    nodes = onnx.load(path).graph.node
    assert [n.op_type for n in nodes] == ["Gemm"] + expected
    if opset >= 20:
        assert onnx.helper.get_attribute_value(nodes[1].attribute[0]) == b"none"


def row_onnx_ops(onnx, activation, dtype, opset, slope):
    """The op types the registry row's ONNX emitter writes for out = sigma(z), built
    with interop's own graph builder; [] for a row without one (identity)."""
    emit = REGISTRY[activation].onnx
    if emit is None:
        return []
    g = interop._OnnxGraph(onnx, np.dtype(dtype), opset)
    emit(g, "p", "z", "out", slope)
    assert g.nodes and list(g.nodes[-1].output) == ["out"], activation  # ends in out
    return [n.op_type for n in g.nodes]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_onnx_activation_nodes(onnx, ort, tmp_path, activation):
    # The graph is the Gemm and then exactly the nodes the row declares, and
    # onnxruntime computes from them what predict computes: a row whose emitter
    # writes the wrong function (or none, for anything but identity) fails here.
    opset, slope = 17, 0.125
    net = bprop.Network([bprop.Dense(3, 4, activation=activation, negative_slope=slope)],
                        seed=0)
    net[0].bias = np.array([0.5, -0.25, 0.0, 1.0])
    path = tmp_path / f"{activation}.onnx"
    interop.to_onnx(net, path, opset=opset)
    nodes = onnx.load(path).graph.node
    ops = row_onnx_ops(onnx, activation, "float32", opset, slope)
    assert [n.op_type for n in nodes] == ["Gemm"] + ops
    X = inputs(net, 50)
    np.testing.assert_allclose(run_ort(ort, path, X), net.predict(X), rtol=0, atol=1e-5)
    # attributes of the single-operator rows, as the float32 core computes them
    attrs = {a.name: onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute}
    if activation == "leaky_relu":
        assert attrs == {"alpha": 0.125}
    if activation == "softmax":
        assert attrs == {"axis": -1}
    if activation == "elu":
        assert attrs == {"alpha": 1.0}
    if activation == "selu":  # 32-bit attributes, as the float32 core's constants
        assert attrs == pytest.approx({"alpha": 1.6732632423543772,
                                       "gamma": 1.0507009873554805}, rel=1e-7)


def test_onnx_custom_names(onnx, ort, tmp_path):
    net = make_net("relu-tanh-softmax", "float32")
    path = tmp_path / "net.onnx"
    interop.to_onnx(net, str(path), input_name="features", output_name="probabilities")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features"]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    X = inputs(net, 5)
    np.testing.assert_allclose(session.run(None, {"features": X})[0], net.predict(X),
                               rtol=0, atol=1e-5)


def test_onnx_replaces_an_existing_file_and_leaves_no_temporary(onnx, tmp_path):
    path = tmp_path / "net.onnx"
    path.write_bytes(b"old")
    net = make_net("linear", "float32")
    interop.to_onnx(net, path)
    assert onnx.load(path).graph.name == "bprop.Network"
    assert sorted(os.listdir(tmp_path)) == ["net.onnx"]


def test_onnx_failed_write_keeps_the_old_file(onnx, tmp_path, monkeypatch):
    path = tmp_path / "net.onnx"
    path.write_bytes(b"old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(interop.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        interop.to_onnx(make_net("linear", "float32"), path)
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["net.onnx"]


def test_onnx_invalid_model_is_not_written(onnx, tmp_path, monkeypatch):
    def reject(model, full_check=False):
        raise onnx.checker.ValidationError("rejected")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    path = tmp_path / "net.onnx"
    with pytest.raises(onnx.checker.ValidationError, match="rejected"):
        interop.to_onnx(make_net("linear", "float32"), path)
    assert os.listdir(tmp_path) == []


def test_onnx_argument_errors(onnx, tmp_path):
    net = make_net("linear", "float32")
    path = tmp_path / "net.onnx"
    with pytest.raises(TypeError, match=r"\[to_onnx\] net must be a bprop.Network, but got list"):
        interop.to_onnx([net], path)
    with pytest.raises(TypeError, match=r"\[to_onnx\] path must be a str or os.PathLike, but "
                                        r"got int"):
        interop.to_onnx(net, 3)
    with pytest.raises(TypeError, match="but got bytes"):
        interop.to_onnx(net, b"net.onnx")
    with pytest.raises(ValueError, match="non-empty file name"):
        interop.to_onnx(net, "")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        interop.to_onnx(net, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        interop.to_onnx(net, tmp_path / "missing" / "net.onnx")
    with pytest.raises(ValueError, match=r"\[to_onnx\] opset must be >= 13, but got 12"):
        interop.to_onnx(net, path, opset=12)
    newest = onnx.defs.onnx_opset_version()
    with pytest.raises(ValueError, match=rf"opset must be <= {newest}, but got {newest + 1}"):
        interop.to_onnx(net, path, opset=newest + 1)
    with pytest.raises(TypeError, match="opset must be an int, but got float"):
        interop.to_onnx(net, path, opset=17.0)
    with pytest.raises(TypeError, match="opset must be an int, but got bool"):
        interop.to_onnx(net, path, opset=True)
    with pytest.raises(TypeError, match="input_name must be a str, but got int"):
        interop.to_onnx(net, path, input_name=0)
    with pytest.raises(ValueError, match="output_name must be a non-empty str"):
        interop.to_onnx(net, path, output_name="")
    with pytest.raises(ValueError, match="input_name and output_name must differ"):
        interop.to_onnx(net, path, input_name="y", output_name="y")
    deep = make_net("relu-tanh-softmax", "float32")
    with pytest.raises(ValueError, match="input_name 'layers.0.weight' collides"):
        interop.to_onnx(deep, path, input_name="layers.0.weight")
    with pytest.raises(ValueError, match="output_name 'layers.1.output' collides"):
        interop.to_onnx(deep, path, output_name="layers.1.output")
    assert os.listdir(tmp_path) == []


def test_onnx_protobuf_size_limit(onnx, tmp_path, monkeypatch):
    # The real limit (2 GiB of parameters) is too big to build in a test; lower it.
    net = make_net("linear", "float64")  # 18 parameters, 144 bytes
    monkeypatch.setattr(interop, "_MAX_ONNX_PARAMETER_BYTES", 100)
    with pytest.raises(ValueError, match="parameters take 144 bytes, more than the 100"):
        interop.to_onnx(net, tmp_path / "net.onnx")


def test_onnx_missing_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail
    with pytest.raises(ImportError, match=r"\[to_onnx\] needs the optional package 'onnx'.*"
                                          r"pip install onnx"):
        interop.to_onnx(make_net("linear", "float32"), tmp_path / "net.onnx")


# ==== PyTorch ========================================================================


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


TOL64 = dict(rtol=1e-13, atol=1e-13)  # ~450 eps; see the module docstring


def torch_forward(torch, module, X):
    with torch.no_grad():
        return module(torch.from_numpy(X)).numpy()


def torch_stack(torch, dtype, negative_slope=0.05):
    """A Sequential with every supported module kind, and its bprop activations."""
    nn = torch.nn
    torch.manual_seed(0)
    modules = [nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 16), nn.LeakyReLU(negative_slope),
               nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Tanh(),
               nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16, bias=False), nn.Identity(),
               nn.Linear(16, 12), nn.Linear(12, 5), nn.Softmax(dim=-1)]
    acts = ["relu", "leaky_relu", "sigmoid", "tanh", "gelu", "identity", "identity",
            "softmax"]
    return nn.Sequential(*modules).to(dtype), acts


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_to_torch_matches_predict_float64(torch, name):
    net = make_net(name, "float64")
    module = interop.to_torch(net)
    X = inputs(net, 64)
    got = torch_forward(torch, module, X)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, net.predict(X), **TOL64)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_to_torch_matches_predict_float32(torch, name):
    net = make_net(name, "float32")
    X = inputs(net, 64)
    got = torch_forward(torch, interop.to_torch(net), X)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, net.predict(X), rtol=0, atol=1e-5)


def test_to_torch_layout(torch):
    nn = torch.nn
    net = make_net("deep-mixed", "float64")
    module = interop.to_torch(net)
    assert isinstance(module, nn.Sequential)
    kinds = [type(m) for m in module]
    assert kinds == [nn.Linear, nn.LeakyReLU, nn.Linear, nn.GELU, nn.Linear, nn.Tanh,
                     nn.Linear, nn.ReLU, nn.Linear, nn.Sigmoid, nn.Linear, nn.Softmax]
    assert module[1].negative_slope == 0.05
    assert module[3].approximate == "none"
    assert module[11].dim == -1
    linears = [m for m in module if isinstance(m, nn.Linear)]
    for layer, linear in zip(net, linears):
        assert linear.weight.dtype == torch.float64 and linear.weight.device.type == "cpu"
        np.testing.assert_array_equal(linear.weight.detach().numpy(), layer.weight.T)
        np.testing.assert_array_equal(linear.bias.detach().numpy(), layer.bias)
        assert linear.weight.requires_grad and linear.bias.requires_grad
    # identity layers get no activation module
    plain = interop.to_torch(make_net("linear", "float32"))
    assert [type(m) for m in plain] == [nn.Linear]
    assert plain[0].weight.dtype == torch.float32


def test_to_torch_copies_and_leaves_the_rng_alone(torch):
    net = make_net("relu-tanh-softmax", "float64")
    before = net[0].weight.copy()
    state = torch.random.get_rng_state()
    module = interop.to_torch(net)
    assert torch.equal(state, torch.random.get_rng_state())
    with torch.no_grad():
        module[0].weight.add_(1.0)
    np.testing.assert_array_equal(net[0].weight, before)


def test_exact_arithmetic_gives_bitwise_equal_outputs(torch):
    # Dyadic weights, biases and inputs with few significant bits: every product and
    # every partial sum is exactly representable, so any summation order (Eigen's,
    # MKL's, with or without FMA) gives the same bits; relu and leaky_relu with a
    # power-of-two slope are exact too. Outputs must then be identical.
    rng = np.random.default_rng(5)
    for act in ("identity", "relu", "leaky_relu"):
        net = bprop.Network([bprop.Dense(32, 64, activation=act, negative_slope=0.25),
                             bprop.Dense(64, 64, activation=act, negative_slope=0.25),
                             bprop.Dense(64, 8)], dtype="float64", seed=0)
        for layer in net:
            layer.weight = rng.integers(-8, 9, layer.weight.shape) / 8.0
            layer.bias = rng.integers(-8, 9, layer.bias.shape) / 4.0
        X = rng.integers(-16, 17, (50, 32)) / 4.0
        expected = net.predict(X)
        np.testing.assert_array_equal(torch_forward(torch, interop.to_torch(net), X), expected)
        back = interop.from_torch(interop.to_torch(net))
        np.testing.assert_array_equal(back.predict(X), expected)


def test_from_torch_matches_torch_float64(torch):
    module, acts = torch_stack(torch, torch.float64)
    net = interop.from_torch(module)
    assert net.dtype == np.float64
    assert [layer.activation for layer in net] == acts
    assert net[1].negative_slope == 0.05
    X = np.random.default_rng(2).standard_normal((80, 7))
    np.testing.assert_allclose(net.predict(X), torch_forward(torch, module, X), **TOL64)
    linears = [m for m in module if isinstance(m, torch.nn.Linear)]
    for layer, linear in zip(net, linears):
        np.testing.assert_array_equal(layer.weight, linear.weight.detach().numpy().T)
        if linear.bias is None:  # Linear(bias=False) -> Dense(bias=False)
            assert not layer.has_bias and layer.bias is None
        else:
            np.testing.assert_array_equal(layer.bias, linear.bias.detach().numpy())


def test_from_torch_float32_and_list_input(torch):
    module, acts = torch_stack(torch, torch.float32)
    net = interop.from_torch(list(module))
    assert net.dtype == np.float32
    assert [layer.activation for layer in net] == acts
    X = np.random.default_rng(2).standard_normal((80, 7)).astype(np.float32)
    np.testing.assert_allclose(net.predict(X), torch_forward(torch, module, X),
                               rtol=0, atol=1e-5)
    assert isinstance(interop.from_torch(tuple(module)), bprop.Network)


def test_from_torch_explicit_dtype(torch):
    nn = torch.nn
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    up = interop.from_torch(module, dtype="float64")  # float32 -> float64 is exact
    assert up.dtype == np.float64
    np.testing.assert_array_equal(up[0].weight, module[0].weight.detach().double().numpy().T)
    half = interop.from_torch(module.to(torch.float16), dtype=np.float32)
    np.testing.assert_array_equal(half[1].bias, module[2].bias.detach().float().numpy())
    with pytest.raises(ValueError, match=r"\[from_torch\] dtype must be 'float32' or "
                                         r"'float64', but got 'float16'"):
        interop.from_torch(module, dtype="float16")


def test_from_torch_dtype_inference_errors(torch):
    nn = torch.nn
    with pytest.raises(ValueError, match=r"cannot infer the dtype from parameters of dtype "
                                         r"torch.float16; .*pass dtype="):
        interop.from_torch(nn.Sequential(nn.Linear(3, 4)).to(torch.float16))
    mixed = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
    with pytest.raises(ValueError, match="torch.float32, torch.float64"):
        interop.from_torch(mixed)
    assert interop.from_torch(mixed, dtype="float64").dtype == np.float64


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_round_trip_net_torch_net_is_bitwise(torch, name, dtype):
    net = make_net(name, dtype)
    back = interop.from_torch(interop.to_torch(net))
    assert back.dtype == net.dtype and len(back) == len(net)
    for a, b in zip(net, back):
        assert (b.in_features, b.out_features, b.activation) == \
            (a.in_features, a.out_features, a.activation)
        if a.activation == "leaky_relu":  # other layers' slope is unused and not carried
            assert b.negative_slope == a.negative_slope
        assert a.weight.dtype == b.weight.dtype
        np.testing.assert_array_equal(b.weight, a.weight)
        np.testing.assert_array_equal(b.bias, a.bias)
        assert not np.shares_memory(a.weight, b.weight)
    # Same parameters, so the same function. Not compared bitwise: with the OpenBLAS
    # core, predict on one network and one input can differ by 1 ulp from call to call
    # in sigmoid/softmax layers (exp over differently aligned workspaces).
    X = inputs(net, 20)
    tol = 1e-14 if dtype == "float64" else 1e-6
    np.testing.assert_allclose(back.predict(X), net.predict(X), rtol=tol, atol=tol)


def test_round_trip_torch_net_torch_is_bitwise(torch):
    module, _ = torch_stack(torch, torch.float64)
    again = interop.to_torch(interop.from_torch(module))
    original = {k: v for k, v in module.state_dict().items()}
    # bias=False comes back as bias=False; Identity modules are dropped
    linears = [m for m in module if isinstance(m, torch.nn.Linear)]
    linears_again = [m for m in again if isinstance(m, torch.nn.Linear)]
    assert len(linears) == len(linears_again) and len(original) > 0
    for a, b in zip(linears, linears_again):
        assert torch.equal(a.weight, b.weight)
        assert (a.bias is None) == (b.bias is None)
        assert a.bias is None or torch.equal(a.bias, b.bias)


def test_from_torch_shares_no_memory(torch):
    module = torch.nn.Sequential(torch.nn.Linear(3, 2).double())
    net = interop.from_torch(module)
    with torch.no_grad():
        module[0].weight.zero_()
    assert np.abs(net[0].weight).sum() > 0


def test_from_torch_module_errors(torch):
    nn = torch.nn
    lin = nn.Linear(4, 4)
    cases = [
        ([lin, nn.Conv2d(1, 1, 1)], r"module 1 \(Conv2d\) is not supported; expected Linear"),
        ([lin, nn.GELU(approximate="tanh")],
         r"module 1 \(GELU\) uses approximate='tanh'; bprop's gelu is the exact erf form"),
        ([lin, nn.Softmax(dim=0)], r"module 1 \(Softmax\) has dim=0"),
        ([lin, nn.Softmax()], r"module 1 \(Softmax\) has dim=None"),
        ([lin, nn.LogSoftmax(dim=-1)], r"module 1 \(LogSoftmax\) is not supported"),
        ([lin, nn.Linear(5, 2)],
         r"module 1 \(Linear\) expects 5 input features, but module 0 \(Linear\) produces 4"),
        ([lin, nn.Sequential(nn.Identity(), nn.Tanh(), nn.ModuleList())],
         r"module 1.2 \(ModuleList\) is not supported"),
        ([], "module holds no Linear, BatchNorm1d or LayerNorm layer"),
        ([nn.Identity(), nn.ReLU(), nn.Dropout(0.1)], "module holds no Linear, BatchNorm1d"),
    ]
    for modules, message in cases:
        with pytest.raises(ValueError, match=r"\[from_torch\] " + message):
            interop.from_torch(nn.Sequential(*modules))


def test_from_torch_error_lists_every_activation_module(torch):
    # the message is built from the registry: a new row's module is listed
    nn = torch.nn
    with pytest.raises(ValueError, match=r"is not supported; expected ") as info:
        interop.from_torch(nn.Sequential(nn.Linear(4, 4), nn.Conv2d(1, 1, 1)))
    expected = str(info.value).split("expected ", 1)[1]
    listed = set(expected.replace(" or ", ", ").split(", "))
    for row in REGISTRY.values():
        assert row.torch in listed, row.name
        assert type(row.to_torch(nn, 0.01)) is getattr(nn, row.torch), row.name
    for name in listed - {"bprop.interop.TorchResidual"}:
        assert hasattr(nn, name), name


def test_from_torch_rejects_subclasses(torch):
    class Shifted(torch.nn.ReLU):  # same type family, different function
        def forward(self, x):
            return super().forward(x) + 1

    with pytest.raises(ValueError, match=r"module 1 \(Shifted\) is not supported"):
        interop.from_torch([torch.nn.Linear(2, 2), Shifted()])


def test_from_torch_parameter_errors(torch):
    nn = torch.nn
    bad = nn.Linear(2, 2)
    with torch.no_grad():
        bad.bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"module 0 \(Linear\) holds NaN or inf"):
        interop.from_torch(nn.Sequential(bad))
    meta = nn.Linear(2, 2, device="meta")
    with pytest.raises(ValueError, match=r"module 0 \(Linear\) has its weight on the meta"):
        interop.from_torch([meta])


def test_from_torch_type_errors(torch):
    with pytest.raises(TypeError, match=r"\[from_torch\] module must be a "
                                        r"torch.nn.Sequential or a list of modules, but got "
                                        r"Linear"):
        interop.from_torch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"module 1 must be a torch.nn.Module, but got str"):
        interop.from_torch([torch.nn.Linear(2, 2), "relu"])
    with pytest.raises(TypeError, match=r"\[to_torch\] net must be a bprop.Network, but got "
                                        r"Sequential"):
        interop.to_torch(torch.nn.Sequential())


def test_failed_from_torch_leaves_the_module_as_it_was(torch):
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Conv2d(1, 1, 1))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError):
        interop.from_torch(module)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_torch_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    net = make_net("linear", "float32")
    with pytest.raises(ImportError, match=r"\[to_torch\] needs the optional package 'torch'.*"
                                          r"pip install torch"):
        interop.to_torch(net)
    with pytest.raises(ImportError, match=r"\[from_torch\] needs the optional package"):
        interop.from_torch([])

