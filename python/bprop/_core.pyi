"""Type stubs of bprop's compiled core, ``bprop._core`` (cpp/bindings/).

Written by hand from the bindings: pybind11 sees arguments taken as
``py::handle`` as ``Any``, while the bindings accept exactly one dtype per
network (Network32: float32, Network64: float64) in C-contiguous arrays, and
the kernels take float32 or float64 arrays, all of one dtype per call. The stubs
say so. tests/test_typing.py checks them against the module (mypy.stubtest).

Layer indices are positional (pybind11 names them arg0).
"""

from typing import (Any, Dict, List, Literal, Optional, Sequence, Tuple, TypedDict, TypeVar, Union,
                    overload)

import numpy as np
import numpy.typing as npt

_F32 = npt.NDArray[np.float32]
_F64 = npt.NDArray[np.float64]
_Labels = npt.NDArray[np.int64]
# One dtype per call: every array argument of a kernel has the parameter's dtype.
_Floats = TypeVar("_Floats", npt.NDArray[np.float32], npt.NDArray[np.float64])

#: (in_features, out_features, activation, negative_slope)
_LayerSpec = Tuple[int, int, str, float]

#: A sparse batch in CSR form, scipy's arrays: (data, indices, indptr, n_features);
#: indices and indptr both int32 or both int64.
_Index = Union[npt.NDArray[np.int32], npt.NDArray[np.int64]]
_Csr32 = Tuple[_F32, _Index, _Index, int]
_Csr64 = Tuple[_F64, _Index, _Index, int]

class _BuildInfo(TypedDict):
    version: str
    eigen_version: str
    simd: str
    arch_flags: str
    build_type: str
    gemm: str
    openmp: bool
    compiler: str

# (a, b, c) state arrays of one parameter: momentum buffer (sgd); exp_avg,
# exp_avg_sq (adam); square_avg, grad_avg, momentum_buffer (rmsprop); None
# where the rule needs none.
_State32 = Dict[str, _F32]  # a parameter's state arrays by name
_State64 = Dict[str, _F64]  # a parameter's state arrays by name

class UpdatePlan32:
    """An optimizer's update (rule, hyperparameters and state arrays of each
    parameter), applied by ``Network32.train_step`` inside the backward sweep."""

    def __init__(
        self,
        rule: Literal["sgd", "adam", "rmsprop"],
        hyperparameters: dict[str, Union[float, bool]],
        sizes: Sequence[int],
        states: Sequence[_State32],
        step_count: int = 0,
    ) -> None: ...
    @property
    def step_count(self) -> int:
        """Steps taken; the core counts a step in the call that makes it."""
    @step_count.setter
    def step_count(self, value: int) -> None: ...

class UpdatePlan64:
    """``UpdatePlan32`` for float64 networks."""

    def __init__(
        self,
        rule: Literal["sgd", "adam", "rmsprop"],
        hyperparameters: dict[str, Union[float, bool]],
        sizes: Sequence[int],
        states: Sequence[_State64],
        step_count: int = 0,
    ) -> None: ...
    @property
    def step_count(self) -> int:
        """Steps taken; the core counts a step in the call that makes it."""
    @step_count.setter
    def step_count(self, value: int) -> None: ...

class Network32:
    """Network<float>: the layers' parameters, gradients and caches in C++."""

    def __init__(self, layers: Sequence[Union[_LayerSpec, Dict[str, Any]]]) -> None: ...
    def parameter_views(self) -> List[Tuple[str, _F32, _F32, bool]]: ...
    def buffer_views(self) -> List[Tuple[str, _F32]]: ...
    @property
    def training(self) -> bool: ...
    @training.setter
    def training(self, value: bool) -> None: ...
    @property
    def dropout_seed(self) -> int: ...
    @dropout_seed.setter
    def dropout_seed(self, value: int) -> None: ...
    @property
    def dropout_step(self) -> int: ...
    @dropout_step.setter
    def dropout_step(self, value: int) -> None: ...
    def layer_kind(self, i: int, /) -> str: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_parameters(self) -> int: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def has_forward(self) -> bool: ...
    @property
    def has_backward(self) -> bool: ...
    @property
    def batch(self) -> int: ...
    def forward(self, X: Union[_F32, _Csr32]) -> _F32:
        """(batch, in_features) -> (batch, out_features); caches a and z per layer."""
    @overload
    def backward(self, grad_output: _F32, accumulate: bool = False,
                 input_grad: Literal[False] = False) -> None: ...
    @overload
    def backward(self, grad_output: _F32, accumulate: bool,
                 input_grad: Literal[True]) -> _F32: ...
    @overload
    def backward(self, grad_output: _F32, accumulate: bool = False, *,
                 input_grad: Literal[True]) -> _F32: ...
    @overload
    def backward(self, grad_output: _F32, accumulate: bool = False,
                 input_grad: bool = False) -> Optional[_F32]: ...
    def train_step(
        self,
        X: Union[_F32, _Csr32],
        y: Union[_Labels, _F32],
        loss: Literal["softmax_cross_entropy", "binary_cross_entropy_with_logits",
                      "mean_squared_error", "huber",
                      "mean_absolute_error", "poisson_nll"],
        sample_weight: Optional[_F32] = None,
        sgd_lr: float = -1.0,
        plan: Optional[UpdatePlan32] = None,
        loss_scale: float = 1.0,
        grad_scale: float = 1.0,
        l2: float = 0.0,
        max_grad_norm: float = -1.0,
    ) -> float:
        """Forward, loss and backward (and the update, counted in the plan) in one
        call; returns the loss."""
    def clip_grad_norm(self, max_norm: float) -> float: ...
    def clip_grad_value(self, clip_value: float) -> None: ...
    def apply_plan(self, plan: UpdatePlan32) -> None:
        """The optimizer's update from the stored gradients, counted in the plan."""
    def step(self, lr: float) -> None: ...
    def predict(self, X: Union[_F32, _Csr32], batch_size: int = 0) -> _F32: ...
    def clear_cache(self) -> None: ...
    def _begin_training(self, where: str) -> None:
        """fit's claim: other threads' calls (but predict) raise RuntimeError."""
    def _end_training(self) -> None: ...
    def layer_caches(self, path: List[int]) -> Dict[str, Optional[_F32]]: ...

class Network64:
    """Network<double>: ``Network32`` in float64."""

    def __init__(self, layers: Sequence[Union[_LayerSpec, Dict[str, Any]]]) -> None: ...
    def parameter_views(self) -> List[Tuple[str, _F64, _F64, bool]]: ...
    def buffer_views(self) -> List[Tuple[str, _F64]]: ...
    @property
    def training(self) -> bool: ...
    @training.setter
    def training(self, value: bool) -> None: ...
    @property
    def dropout_seed(self) -> int: ...
    @dropout_seed.setter
    def dropout_seed(self, value: int) -> None: ...
    @property
    def dropout_step(self) -> int: ...
    @dropout_step.setter
    def dropout_step(self, value: int) -> None: ...
    def layer_kind(self, i: int, /) -> str: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_parameters(self) -> int: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def has_forward(self) -> bool: ...
    @property
    def has_backward(self) -> bool: ...
    @property
    def batch(self) -> int: ...
    def forward(self, X: Union[_F64, _Csr64]) -> _F64:
        """(batch, in_features) -> (batch, out_features); caches a and z per layer."""
    @overload
    def backward(self, grad_output: _F64, accumulate: bool = False,
                 input_grad: Literal[False] = False) -> None: ...
    @overload
    def backward(self, grad_output: _F64, accumulate: bool,
                 input_grad: Literal[True]) -> _F64: ...
    @overload
    def backward(self, grad_output: _F64, accumulate: bool = False, *,
                 input_grad: Literal[True]) -> _F64: ...
    @overload
    def backward(self, grad_output: _F64, accumulate: bool = False,
                 input_grad: bool = False) -> Optional[_F64]: ...
    def train_step(
        self,
        X: Union[_F64, _Csr64],
        y: Union[_Labels, _F64],
        loss: Literal["softmax_cross_entropy", "binary_cross_entropy_with_logits",
                      "mean_squared_error", "huber",
                      "mean_absolute_error", "poisson_nll"],
        sample_weight: Optional[_F64] = None,
        sgd_lr: float = -1.0,
        plan: Optional[UpdatePlan64] = None,
        loss_scale: float = 1.0,
        grad_scale: float = 1.0,
        l2: float = 0.0,
        max_grad_norm: float = -1.0,
    ) -> float:
        """Forward, loss and backward (and the update, counted in the plan) in one
        call; returns the loss."""
    def clip_grad_norm(self, max_norm: float) -> float: ...
    def clip_grad_value(self, clip_value: float) -> None: ...
    def apply_plan(self, plan: UpdatePlan64) -> None:
        """The optimizer's update from the stored gradients, counted in the plan."""
    def step(self, lr: float) -> None: ...
    def predict(self, X: Union[_F64, _Csr64], batch_size: int = 0) -> _F64: ...
    def clear_cache(self) -> None: ...
    def _begin_training(self, where: str) -> None:
        """fit's claim: other threads' calls (but predict) raise RuntimeError."""
    def _end_training(self) -> None: ...
    def layer_caches(self, path: List[int]) -> Dict[str, Optional[_F64]]: ...

# ---- losses: (mean loss, dL/d(output)) ------------------------------------------------

def softmax_cross_entropy(logits: _Floats, target: Union[_Labels, _Floats],
                          sample_weight: Optional[_Floats] = None) -> Tuple[float, _Floats]: ...
def binary_cross_entropy_with_logits(logits: _Floats, target: _Floats,
                                     sample_weight: Optional[_Floats] = None
                                     ) -> Tuple[float, _Floats]: ...
def mean_squared_error(output: _Floats, target: _Floats,
                       sample_weight: Optional[_Floats] = None) -> Tuple[float, _Floats]: ...
def huber(output: _Floats, target: _Floats, sample_weight: Optional[_Floats] = None,
          delta: float = 1.0) -> Tuple[float, _Floats]: ...
def mean_absolute_error(output: _Floats, target: _Floats,
                        sample_weight: Optional[_Floats] = None) -> Tuple[float, _Floats]: ...
def poisson_nll(output: _Floats, target: _Floats,
                sample_weight: Optional[_Floats] = None) -> Tuple[float, _Floats]: ...
def loss_names() -> List[str]: ...

# ---- optimizer updates, in place on param and the state arrays ------------------------

def activation_names() -> List[str]: ...
def update_state_names(rule: Literal["sgd", "adam", "rmsprop"], hyperparameters: dict[str, Union[float, bool]]) -> List[str]: ...
def all_finite(a: _Floats) -> bool: ...

# ---- configuration --------------------------------------------------------------------

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def _set_spin_microseconds(us: int) -> None: ...
def _spin_microseconds() -> int: ...
def _set_contention_backoff(on: bool) -> None: ...
def _contention_backoff() -> bool: ...
def _contended_loops() -> int: ...
def _worker_tasks() -> int: ...
def _check_loops(loops: int, max_count: int) -> int: ...
def _set_tile_params(min_work: int, max_tiles: int, min_side: int, max_repack_two: int,
                     max_repack: int, align: int) -> None: ...
def _tile_params() -> Tuple[int, int, int, int, int, int]: ...
def _gemm_tiles(m: int, n: int, k: int, element_size: int, trans_a: bool = ...,
                trans_b: bool = ...) -> Tuple[int, int, int, int]: ...
def _gemm(A: _Floats, B: _Floats, C: _Floats, trans_a: bool = ..., trans_b: bool = ...,
          alpha: float = ..., beta: float = ..., untiled_threads: int = ...,
          tile: Tuple[int, int] = ...) -> None: ...
def interrupt_polling(interval: Optional[float] = None,
                      min_work: Optional[int] = None) -> Tuple[float, int]:
    """Ctrl-C inside long calls: forward, backward and train_step with batch *
    parameters >= min_work, on the main thread, run the signal handlers between
    layers at most every interval seconds. Sets what is given; returns the
    previous (interval, min_work)."""
def _signal_at_poll(n: int) -> int: ...
def build_info() -> _BuildInfo: ...
