"""Optimizers and learning-rate schedules.

An optimizer is bound to one network. ``step()`` updates every parameter in
place from the gradient of the last ``backward``: one C++ call, under the
network's lock, that makes one fused pass per parameter (cpp/src/kernels.cpp),
with no NumPy temporaries. The same update runs inside the backward sweep when training goes
through ``Network.train_step`` or ``fit``. The update rules follow the papers as
``torch.optim`` implements them (same defaults, same state).

    opt = bprop.optim.Adam(net, lr=1e-3)
    out = net.forward(Xb)
    value, grad = bprop.losses.softmax_cross_entropy(out, yb)
    net.backward(grad)
    opt.step()

``state_dict()`` returns plain data (copies of the state arrays);
``load_state_dict()`` checks a whole dict before changing anything.

Schedules change ``optimizer.lr``: ``StepLR``, ``CosineAnnealingLR``,
``LinearLR`` and ``OneCycleLR`` once per ``step()``, ``ReduceLROnPlateau`` from a
monitored value. Each one is also a fit callback: a schedule's ``interval`` says
whether fit steps it after each epoch (``"epoch"``: ``on_epoch_end``) or after each
minibatch step (``"step"``: ``on_batch_end``). OneCycleLR is per step by default,
as torch's is meant to be called; the others per epoch. So
``bprop.fit(..., callbacks=[StepLR(opt, 10)])`` steps StepLR once per epoch, and
``OneCycleLR(opt, max_lr=0.1, epochs=E, steps_per_epoch=B)`` once per minibatch.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _core
from ._memory import check_fits_in_memory
from ._validation import check_float, check_int, type_name
from .network import _DELEGATES, Network

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "OPTIMIZERS",
           "StepLR", "CosineAnnealingLR", "LinearLR", "OneCycleLR", "ReduceLROnPlateau"]


def _check_bool(where: str, name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"[{where}] {name} must be a bool, but got {type_name(value)} {value!r}")
    return bool(value)


def _check_betas(where: str, betas: object) -> Tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"[{where}] betas must be a pair (beta1, beta2), but got "
                        f"{type_name(betas)} {betas!r}")
    b1 = check_float(where, "betas[0]", betas[0], minimum=0.0, maximum=1.0,
                     exclusive_maximum=True)
    b2 = check_float(where, "betas[1]", betas[1], minimum=0.0, maximum=1.0,
                     exclusive_maximum=True)
    return (b1, b2)


def _check_fits_dtype(where: str, hyper: Dict[str, Any], dtype: np.dtype) -> None:
    """The kernels compute in the network's dtype: a number that is finite in
    float64 but not in float32 (lr=1e39) would turn every weight into inf/NaN."""
    limit = float(np.finfo(dtype).max)
    for name, value in hyper.items():
        if isinstance(value, float) and abs(value) > limit:
            raise ValueError(f"[{where}] {name} must be <= {limit} (the largest "
                             f"{np.dtype(dtype).name}), but got {value}")


class Optimizer:
    """Base class: binds to a network and keeps the per-parameter state.

    Subclasses define ``_rule`` (the core's update rule), ``_rule_settings()`` (its
    settings from the hyperparameters) and ``_check(hyper)``; the core names the
    state each parameter keeps (``_state_names``) and applies the update (the
    UpdatePlan of ``_bind``).
    """

    def __init__(self, net: Network, hyper: Dict[str, Any]) -> None:
        where = type(self).__name__
        if not isinstance(net, Network):
            raise TypeError(f"[{where}] net must be a bprop.Network, but got {type_name(net)}")
        # Like torch.optim, hold the parameters (here the core that owns them), not
        # the network object: the network remembers the optimizer of its last fit,
        # and a strong reference back would make a cycle that keeps both alive
        # until the cycle collector runs.
        self._net_ref = weakref.ref(net)
        self._core = net._core
        self._dtype = net.dtype
        self._params = [(name, p, g) for name, p, g in net.parameters()]
        self._hyper = self._checked(where, hyper)
        self._plan = None
        slots = self._state_names()
        check_fits_in_memory(where, f"its state ({', '.join(slots)}: {len(slots)} arrays the "
                             "size of every parameter)",
                             len(slots) * sum(p.nbytes for _, p, _ in self._params))
        self._state = self._zero_state()
        self._bind()

    # ---- what subclasses provide -------------------------------------------------
    def _check(self, where: str, hyper: Dict[str, Any]) -> Dict[str, Any]:
        raise NotImplementedError

    def _checked(self, where: str, hyper: Dict[str, Any]) -> Dict[str, Any]:
        out = self._check(where, hyper)
        _check_fits_dtype(where, out, self._dtype)
        return out

    #: the core's update rule: "sgd", "adam" or "rmsprop"
    _rule: str

    #: hyperparameters added after the first release, with the value that a
    #: state_dict (or checkpoint) saved before them implies
    _added_hyperparameters: Dict[str, Any] = {}

    def _rule_settings(self) -> Dict[str, Any]:
        """The rule's settings from the hyperparameters, as the core names them."""
        raise NotImplementedError

    def _state_names(self) -> Tuple[str, ...]:
        """The state arrays each parameter needs under the current hyperparameters:
        the core's names (one list of them, in cpp/src/kernels.cpp)."""
        return tuple(_core.update_state_names(self._rule, self._rule_settings()))

    # ---- shared machinery -----------------------------------------------------------
    def _zero_state(self) -> Dict[str, Dict[str, np.ndarray]]:
        names = self._state_names()
        return {name: {k: np.zeros_like(p) for k in names} for name, p, _ in self._params}

    @property
    def net(self) -> Network:
        """The network this optimizer updates.

        The optimizer keeps the network's parameters alive, but not the Network
        object (as a torch.optim optimizer holds parameters, not the module): keep
        your own reference to the network while you use it.
        """
        net = self._net_ref()
        if net is None:
            raise RuntimeError(f"[{type(self).__name__}.net] the network this optimizer was "
                               "built on has been freed; keep a reference to the network")
        return net

    @property
    def lr(self) -> float:
        """The learning rate; settable (a schedule sets it once per epoch or step)."""
        return self._hyper["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        where = f"{type(self).__name__}.lr"
        lr = check_float(where, "lr", value, minimum=0.0)
        _check_fits_dtype(where, {"lr": lr}, self._dtype)
        self._hyper["lr"] = lr
        self._bind()

    def _set_hyperparameters(self, where: str, **values: Any) -> None:
        """Sets hyperparameters (checked as the constructor checks them) and rebinds
        the core's plan once; the state each parameter keeps must stay the same."""
        hyper = self._checked(where, {**self._hyper, **values})
        saved, names = self._hyper, self._state_names()
        self._hyper = hyper
        if self._state_names() != names:
            self._hyper = saved
            raise ValueError(f"[{where}] {values} would change the state the optimizer "
                             "keeps; set it in the optimizer's constructor")
        self._bind()

    @property
    def step_count(self) -> int:
        """How many steps have been taken (Adam's t). The core counts a step in the
        same C++ call that makes it, so an interrupted step (Ctrl-C) is either made
        and counted or neither."""
        return self._plan.step_count

    @property
    def _step_count(self) -> int:  # settable: bprop.distributed broadcasts it
        return self._plan.step_count

    @_step_count.setter
    def _step_count(self, value: int) -> None:
        self._plan.step_count = value

    @property
    def hyperparameters(self) -> Dict[str, Any]:
        """A copy of the hyperparameters, keyed as in the constructor."""
        return dict(self._hyper)

    def step(self) -> None:
        """Updates every parameter in place from the gradient of the last backward."""
        if not self._core.has_backward:
            raise RuntimeError(f"[{type(self).__name__}.step] the network has no gradients "
                               "yet: call net.forward and net.backward before step()")
        # one C++ call under the network's lock, which also counts the step: a
        # concurrent predict never sees a half-updated network, and Ctrl-C cannot
        # come between the update and the count
        self._core.apply_plan(self._plan)

    # ---- the fused path of Network.train_step / fit ------------------------------
    def _bind(self) -> None:
        """Builds the core's UpdatePlan for the current hyperparameters and state,
        which ``step()`` applies to every parameter and Network.train_step inside
        the backward sweep, layer by layer, right after each gradient is formed. Each
        parameter's state goes by name (``exp_avg``, ...). The plan holds the step
        count, which the core advances with each step it makes; a new plan takes
        over the old one's count."""
        plan_type = _core.UpdatePlan32 if self._dtype == np.float32 else _core.UpdatePlan64
        sizes = [p.size for _, p, _ in self._params]
        states = [self._state[name] for name, _, _ in self._params]
        steps = 0 if self._plan is None else self._plan.step_count
        self._plan = plan_type(self._rule, self._rule_settings(), sizes, states, steps)

    def state_dict(self) -> Dict[str, Any]:
        """Plain data: {"optimizer": class name, "step": int, "hyperparameters": {...},
        "state": {parameter name: {state name: array copy}}}."""
        return {
            "optimizer": type(self).__name__,
            "step": self._step_count,
            "hyperparameters": dict(self._hyper),
            "state": {name: {k: a.copy() for k, a in arrays.items()}
                      for name, arrays in self._state.items()},
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores a ``state_dict()`` (hyperparameters included).

        Raises:
            ValueError: the dict does not fit this optimizer and network (wrong
                class, keys, types, shapes, or non-finite values); nothing changes.
        """
        self._load_state_dict(state_dict, adopt=False)

    def _load_state_dict(self, state_dict: Dict[str, Any], adopt: bool) -> None:
        """load_state_dict; with ``adopt`` the arrays of the parameters' dtype and in C
        order become the state as they are, not copies (bprop.load gives up the
        arrays it has just read: no second copy of a checkpoint's state)."""
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict):
            raise ValueError(f"[{where}] expected a dict from state_dict(), but got "
                             f"{type_name(state_dict)}")
        expected = {"optimizer", "step", "hyperparameters", "state"}
        if set(state_dict) != expected:
            raise ValueError(f"[{where}] expected the keys {sorted(expected)}, but got "
                             f"{sorted(map(str, state_dict))}")
        if state_dict["optimizer"] != type(self).__name__:
            raise ValueError(f"[{where}] the state is of optimizer "
                             f"{state_dict['optimizer']!r}, not {type(self).__name__!r}")
        step = state_dict["step"]
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral) \
                or step < 0:
            raise ValueError(f"[{where}] step must be an int >= 0, but got {step!r}")
        hyper = state_dict["hyperparameters"]
        if isinstance(hyper, dict):  # a state_dict from before a hyperparameter was added
            hyper = {**{k: v for k, v in self._added_hyperparameters.items()
                        if k in self._hyper}, **hyper}
        if not isinstance(hyper, dict) or set(hyper) != set(self._hyper):
            got = sorted(map(str, hyper)) if isinstance(hyper, dict) else type_name(hyper)
            raise ValueError(f"[{where}] hyperparameters must be a dict with the keys "
                             f"{sorted(self._hyper)}, but got {got}")
        try:
            hyper = self._checked(where, dict(hyper))
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        # The state arrays needed depend on the hyperparameters (momentum, centered).
        saved = self._hyper
        self._hyper = hyper
        names = self._state_names()
        self._hyper = saved
        state = state_dict["state"]
        params = {name: p for name, p, _ in self._params}
        if not isinstance(state, dict) or set(state) != set(params):
            got = sorted(map(str, state)) if isinstance(state, dict) else type_name(state)
            raise ValueError(f"[{where}] state must be a dict keyed by the network's parameters "
                             f"{list(params)}, but got {got}")
        new_state = {}
        for name, p in params.items():
            arrays = state[name]
            if not isinstance(arrays, dict) or set(arrays) != set(names):
                got = sorted(map(str, arrays)) if isinstance(arrays, dict) else type_name(arrays)
                raise ValueError(f"[{where}] state[{name!r}] must hold {sorted(names)}, but got "
                                 f"{got}")
            new_state[name] = {}
            for k in names:
                a = arrays[k]
                if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
                    raise ValueError(f"[{where}] state[{name!r}][{k!r}] must be a floating "
                                     f"numpy array, but got {type_name(a)}"
                                     + (f" of dtype {a.dtype}" if isinstance(a, np.ndarray)
                                        else ""))
                if a.shape != p.shape:
                    raise ValueError(f"[{where}] state[{name!r}][{k!r}] has shape {a.shape}, "
                                     f"but the parameter has shape {p.shape}")
                copy = (a if adopt and a.dtype == p.dtype and a.flags.c_contiguous
                        else np.array(a, dtype=p.dtype, order="C", copy=True))
                if not np.isfinite(copy).all():
                    raise ValueError(f"[{where}] state[{name!r}][{k!r}] holds NaN or inf")
                new_state[name][k] = copy
        # All checked: commit.
        self._hyper = hyper
        self._state = new_state
        self._bind()
        self._plan.step_count = int(step)

    def __reduce__(self):
        """Pickles (and deep-copies) the optimizer with its network, as checkpoint
        bytes (the format of :func:`bprop.save`): unpickled together, e.g.
        ``pickle.loads(pickle.dumps((net, opt)))``, the optimizer is bound to the
        unpickled network. See :meth:`bprop.Network.__reduce__` on safety."""
        return _DELEGATES["reduce_optimizer"](self)

    def __copy__(self):
        # A shallow copy would share the state arrays the core's UpdatePlan points
        # into: two optimizers stepping one state.
        raise TypeError(f"[{type(self).__name__}.__copy__] copy.copy would share the "
                        "optimizer's state; use copy.deepcopy (which copies its network "
                        f"too) or {type(self).__name__}(net, **opt.hyperparameters) with "
                        "load_state_dict(opt.state_dict())")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hyper.items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (Polyak or Nesterov) and
    L2 weight decay, as torch.optim.SGD:

        g = dL/dp + weight_decay p
        buf = g (first step), else momentum buf + (1 - dampening) g
        g = g + momentum buf (nesterov) or buf
        p = p - lr g

    Args:
        net: the network to update.
        lr: learning rate (required).
        momentum: momentum factor >= 0.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening == 0).
        weight_decay: L2 penalty >= 0, added to the gradient.
        dampening: dampening of the momentum, in [0, 1].
    """

    def __init__(self, net: Network, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, dampening: float = 0.0) -> None:
        super().__init__(net, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                   weight_decay=weight_decay, dampening=dampening))

    def _check(self, where, h):
        out = dict(lr=check_float(where, "lr", h["lr"], minimum=0.0),
                   momentum=check_float(where, "momentum", h["momentum"], minimum=0.0),
                   nesterov=_check_bool(where, "nesterov", h["nesterov"]),
                   weight_decay=check_float(where, "weight_decay", h["weight_decay"],
                                            minimum=0.0),
                   dampening=check_float(where, "dampening", h["dampening"], minimum=0.0,
                                         maximum=1.0))
        if out["nesterov"] and (out["momentum"] <= 0 or out["dampening"] != 0):
            raise ValueError(f"[{where}] Nesterov momentum requires momentum > 0 and "
                             f"dampening == 0, but got momentum={out['momentum']}, "
                             f"dampening={out['dampening']}")
        return out

    _rule = "sgd"

    def _rule_settings(self):
        # Plain SGD (no momentum, no decay) is W -= lr dL/dW, which the core's
        # train_step applies inside the backward sweep without storing dL/dW.
        h = self._hyper
        return dict(lr=h["lr"], momentum=h["momentum"], dampening=h["dampening"],
                    nesterov=h["nesterov"], weight_decay=h["weight_decay"])


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015), as torch.optim.Adam:

        g = dL/dp + weight_decay p
        m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2
        p = p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

    Args:
        net: the network to update.
        lr: learning rate.
        betas: (beta1, beta2), each in [0, 1).
        eps: added to the denominator, >= 0.
        weight_decay: L2 penalty >= 0, added to the gradient (see AdamW for the
            decoupled form).
        lazy: for sparse input (see the README's "Sparse input"): after a
            batch in CSR form, update the first layer's weight only in the rows
            of the columns the batch stores, as torch.optim.SparseAdam does;
            the other rows keep their value and their m and v, where plain Adam
            decays m and v and moves the weight along them every step. Far
            cheaper for wide sparse input, and a different optimizer: the bias
            correction uses the optimizer's step count, not a per-row one. Every
            other parameter, and every parameter after a dense batch, gets the
            plain Adam update. Needs weight_decay == 0 (as SparseAdam), and a
            single process (not fit over MPI). A lazy ``train_step`` (or fit)
            over a sparse batch forms the first layer's dL/dW in the batch's
            rows only, so afterwards the network holds no complete gradient
            (``step()`` refuses, as after plain SGD's fused step).
    """

    _decoupled = False
    _added_hyperparameters = {"lazy": False}

    def __init__(self, net: Network, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, lazy: bool = False) -> None:
        super().__init__(net, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                   lazy=lazy))

    def _check(self, where, h):
        out = dict(lr=check_float(where, "lr", h["lr"], minimum=0.0),
                   betas=_check_betas(where, h["betas"]),
                   eps=check_float(where, "eps", h["eps"], minimum=0.0),
                   weight_decay=check_float(where, "weight_decay", h["weight_decay"],
                                            minimum=0.0))
        if "lazy" in h:  # Adam's own (AdamW has none)
            out["lazy"] = _check_bool(where, "lazy", h["lazy"])
            if out["lazy"] and out["weight_decay"] != 0:
                raise ValueError(f"[{where}] lazy=True takes no weight_decay (the rows a "
                                 f"batch does not touch would not decay), but got "
                                 f"weight_decay={out['weight_decay']}")
        return out

    _rule = "adam"

    def _rule_settings(self):
        h = self._hyper
        return dict(lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                    weight_decay=h["weight_decay"], decoupled=self._decoupled,
                    lazy=h.get("lazy", False))


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as
    torch.optim.AdamW: p = (1 - lr weight_decay) p before the Adam update, which
    sees the bare gradient.

    Args:
        net: the network to update.
        lr: learning rate.
        betas: (beta1, beta2), each in [0, 1).
        eps: added to the denominator, >= 0.
        weight_decay: decoupled decay factor >= 0.
    """

    _decoupled = True

    def __init__(self, net: Network, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        Optimizer.__init__(self, net, dict(lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay))


class RMSprop(Optimizer):
    """RMSprop (Hinton, lecture 6e), as torch.optim.RMSprop:

        g = dL/dp + weight_decay p
        s = alpha s + (1 - alpha) g^2
        centered: a = alpha a + (1 - alpha) g, denominator sqrt(s - a^2) + eps
        otherwise denominator sqrt(s) + eps
        momentum > 0: buf = momentum buf + g / denominator, p = p - lr buf
        otherwise p = p - lr g / denominator

    Args:
        net: the network to update.
        lr: learning rate.
        alpha: smoothing constant in [0, 1].
        eps: added to the denominator, >= 0.
        weight_decay: L2 penalty >= 0.
        momentum: momentum factor >= 0.
        centered: normalise by the estimated variance instead of the second moment.
    """

    def __init__(self, net: Network, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False) -> None:
        super().__init__(net, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                   momentum=momentum, centered=centered))

    def _check(self, where, h):
        return dict(lr=check_float(where, "lr", h["lr"], minimum=0.0),
                    alpha=check_float(where, "alpha", h["alpha"], minimum=0.0, maximum=1.0),
                    eps=check_float(where, "eps", h["eps"], minimum=0.0),
                    weight_decay=check_float(where, "weight_decay", h["weight_decay"],
                                             minimum=0.0),
                    momentum=check_float(where, "momentum", h["momentum"], minimum=0.0),
                    centered=_check_bool(where, "centered", h["centered"]))

    _rule = "rmsprop"

    def _rule_settings(self):
        h = self._hyper
        return dict(lr=h["lr"], alpha=h["alpha"], eps=h["eps"], weight_decay=h["weight_decay"],
                    momentum=h["momentum"], centered=h["centered"])


#: Optimizer classes by name (used by fit's warm start and by checkpoints).
OPTIMIZERS = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW, "RMSprop": RMSprop}


# ---- learning-rate schedules ------------------------------------------------------

class _Schedule:
    """Base of the schedules: a reference to the optimizer and plain-data state."""

    _fields: Tuple[str, ...] = ()

    #: the interval of a schedule pickled before schedules had one
    interval = "epoch"

    def __init__(self, optimizer: Optimizer, interval: str = "epoch") -> None:
        where = type(self).__name__
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"[{where}] optimizer must be a bprop.optim optimizer, but got "
                            f"{type_name(optimizer)}")
        if not isinstance(interval, str) or interval not in ("epoch", "step"):
            raise ValueError(f"[{where}] interval must be 'epoch' or 'step', but got "
                             f"{interval!r}")
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.last_epoch = 0
        #: when fit steps the schedule: "epoch" (after each epoch) or "step" (after
        #: each minibatch step); a setting, not part of state_dict()
        self.interval = interval

    def step(self) -> None:
        raise NotImplementedError

    def on_epoch_end(self, epoch: int, logs: Dict[str, float]) -> None:
        """fit's hook: steps the schedule if its interval is "epoch"."""
        if self.interval == "epoch":
            self.step()

    def on_batch_end(self, batch: int, logs: Dict[str, float]) -> None:
        """fit's hook: steps the schedule if its interval is "step"."""
        if self.interval == "step":
            self.step()

    @property
    def lr(self) -> float:
        """The optimizer's current learning rate."""
        return self.optimizer.lr

    def state_dict(self) -> Dict[str, Any]:
        """Plain data: the schedule's name, settings and position."""
        out = {"scheduler": type(self).__name__, "base_lr": self.base_lr,
               "last_epoch": self.last_epoch}
        out.update({k: getattr(self, k) for k in self._fields})
        return out

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores a ``state_dict()``; a dict that does not fit raises ValueError
        and changes nothing."""
        where = f"{type(self).__name__}.load_state_dict"
        expected = {"scheduler", "base_lr", "last_epoch", *self._fields}
        if not isinstance(state_dict, dict) or set(state_dict) != expected:
            got = sorted(map(str, state_dict)) if isinstance(state_dict, dict) \
                else type_name(state_dict)
            raise ValueError(f"[{where}] expected a dict with the keys {sorted(expected)}, but "
                             f"got {got}")
        if state_dict["scheduler"] != type(self).__name__:
            raise ValueError(f"[{where}] the state is of {state_dict['scheduler']!r}, not "
                             f"{type(self).__name__!r}")
        try:
            values = self._check_state(where, state_dict)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        for k, v in values.items():
            setattr(self, k, v)

    def _check_state(self, where: str, sd: Dict[str, Any]) -> Dict[str, Any]:
        return {"base_lr": check_float(where, "base_lr", sd["base_lr"], minimum=0.0),
                "last_epoch": check_int(where, "last_epoch", sd["last_epoch"], minimum=0)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._fields)
        return f"{type(self).__name__}({args}, last_epoch={self.last_epoch})"


class StepLR(_Schedule):
    """Step decay: lr = base_lr * gamma ** (epoch // step_size), with epoch the
    number of ``step()`` calls (as torch.optim.lr_scheduler.StepLR).

    Args:
        optimizer: whose ``lr`` is set; its current lr is base_lr.
        step_size: epochs between decays (>= 1).
        gamma: decay factor, > 0.
        interval: when fit steps it: "epoch" (default) or "step" (each minibatch).
    """

    _fields = ("step_size", "gamma")

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1,
                 interval: str = "epoch") -> None:
        super().__init__(optimizer, interval)
        self.step_size = check_int("StepLR", "step_size", step_size, minimum=1)
        self.gamma = check_float("StepLR", "gamma", gamma, minimum=0.0, exclusive_minimum=True)

    def _check_state(self, where, sd):
        out = super()._check_state(where, sd)
        out["step_size"] = check_int(where, "step_size", sd["step_size"], minimum=1)
        out["gamma"] = check_float(where, "gamma", sd["gamma"], minimum=0.0,
                                   exclusive_minimum=True)
        return out

    def step(self) -> None:
        """Advances one epoch and sets the optimizer's lr."""
        self.last_epoch += 1
        self.optimizer.lr = self.base_lr * self.gamma ** (self.last_epoch // self.step_size)


class CosineAnnealingLR(_Schedule):
    """Cosine annealing (Loshchilov & Hutter, SGDR without restarts):
    lr = eta_min + (base_lr - eta_min) (1 + cos(pi epoch / T_max)) / 2, the closed
    form of torch.optim.lr_scheduler.CosineAnnealingLR.

    Args:
        optimizer: whose ``lr`` is set; its current lr is base_lr.
        T_max: epochs from base_lr down to eta_min (>= 1).
        eta_min: the smallest learning rate, >= 0.
        interval: when fit steps it: "epoch" (default) or "step" (each minibatch).
    """

    _fields = ("T_max", "eta_min")

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0,
                 interval: str = "epoch") -> None:
        super().__init__(optimizer, interval)
        self.T_max = check_int("CosineAnnealingLR", "T_max", T_max, minimum=1)
        self.eta_min = check_float("CosineAnnealingLR", "eta_min", eta_min, minimum=0.0)

    def _check_state(self, where, sd):
        out = super()._check_state(where, sd)
        out["T_max"] = check_int(where, "T_max", sd["T_max"], minimum=1)
        out["eta_min"] = check_float(where, "eta_min", sd["eta_min"], minimum=0.0)
        return out

    def step(self) -> None:
        """Advances one epoch and sets the optimizer's lr."""
        self.last_epoch += 1
        cos = math.cos(math.pi * self.last_epoch / self.T_max)
        self.optimizer.lr = self.eta_min + (self.base_lr - self.eta_min) * (1 + cos) / 2


class LinearLR(_Schedule):
    """Linear warm-up (or decay) of the lr by a factor, as
    torch.optim.lr_scheduler.LinearLR: the factor goes from ``start_factor`` to
    ``end_factor`` in ``total_iters`` steps, then stays. Constructing it sets
    lr = base_lr * start_factor; step k (1 <= k <= total_iters) multiplies the
    current lr by 1 + (end - start) / (total_iters start + (k - 1) (end - start)),
    torch's chainable form (so another schedule's change of the lr carries over,
    and the values are torch's to the last bit).

    Args:
        optimizer: whose ``lr`` is set; its current lr is base_lr.
        start_factor: in (0, 1].
        end_factor: in [0, 1].
        total_iters: steps until the factor reaches end_factor (>= 1).
        interval: when fit steps it: "epoch" (default, as in torch's examples)
            or "step" (each minibatch: a warm-up over the first total_iters steps).
    """

    _fields = ("start_factor", "end_factor", "total_iters")

    def __init__(self, optimizer: Optimizer, start_factor: float = 1.0 / 3,
                 end_factor: float = 1.0, total_iters: int = 5,
                 interval: str = "epoch") -> None:
        where = "LinearLR"
        start_factor = check_float(where, "start_factor", start_factor, minimum=0.0,
                                   exclusive_minimum=True, maximum=1.0)
        end_factor = check_float(where, "end_factor", end_factor, minimum=0.0, maximum=1.0)
        total_iters = check_int(where, "total_iters", total_iters, minimum=1)
        super().__init__(optimizer, interval)
        self.start_factor, self.end_factor, self.total_iters = \
            start_factor, end_factor, total_iters
        optimizer.lr = optimizer.lr * start_factor

    def _check_state(self, where, sd):
        out = super()._check_state(where, sd)
        out["start_factor"] = check_float(where, "start_factor", sd["start_factor"],
                                          minimum=0.0, exclusive_minimum=True, maximum=1.0)
        out["end_factor"] = check_float(where, "end_factor", sd["end_factor"], minimum=0.0,
                                        maximum=1.0)
        out["total_iters"] = check_int(where, "total_iters", sd["total_iters"], minimum=1)
        return out

    def step(self) -> None:
        """Advances one step (or epoch) and sets the optimizer's lr."""
        self.last_epoch += 1
        k = self.last_epoch
        if k > self.total_iters:
            return
        change = self.end_factor - self.start_factor
        self.optimizer.lr = self.optimizer.lr * (
            1.0 + change / (self.total_iters * self.start_factor + (k - 1) * change))


def _anneal(strategy: str, start: float, end: float, pct: float) -> float:
    """torch's OneCycleLR annealing from start (pct 0) to end (pct 1)."""
    if strategy == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


class OneCycleLR(_Schedule):
    """The 1cycle policy (Smith & Topin, 2019), torch.optim.lr_scheduler.OneCycleLR's
    formulas and defaults: the lr rises from max_lr / div_factor to max_lr over
    the first pct_start of total_steps, then anneals to
    max_lr / (div_factor final_div_factor) (three_phase: back to the initial lr
    first, then down to the minimum). Constructing it sets the initial lr (the
    optimizer's own lr is not used); each ``step()`` advances one step. Stepping
    more than total_steps times raises ValueError, as torch does. The lr set by
    the last allowed step (step total_steps, after the cycle's last minibatch)
    is torch's extrapolation, except that a negative one (linear strategy) is 0.

    Momentum cycling (cycle_momentum=True, the default, as torch): the momentum
    moves inversely to the lr between max_momentum and base_momentum; it is
    Adam's and AdamW's beta1 (``betas[0]``), or the ``momentum`` of SGD and
    RMSprop, which must then have been built with momentum > 0 (momentum 0 keeps
    no momentum state to cycle: build the optimizer with momentum > 0, or pass
    cycle_momentum=False). The optimizer's hyperparameters are set (and its core
    plan rebound) at each step.

    Args:
        optimizer: whose ``lr`` (and momentum) is set.
        max_lr: the peak learning rate, > 0.
        total_steps: steps in the cycle (>= 1); or None, with epochs and
            steps_per_epoch (total_steps = epochs * steps_per_epoch; with fit,
            steps_per_epoch is ceil(training samples / batch_size)).
        epochs: see total_steps.
        steps_per_epoch: see total_steps.
        pct_start: fraction of the cycle spent raising the lr, in [0, 1].
        anneal_strategy: "cos" or "linear".
        cycle_momentum: cycle the momentum (see above).
        base_momentum: the momentum at the peak lr, in [0, 1).
        max_momentum: the momentum at the start and end of the cycle, in [0, 1).
        div_factor: initial lr = max_lr / div_factor, > 0.
        final_div_factor: minimum lr = initial lr / final_div_factor, > 0.
        three_phase: torch's three-phase variant.
        interval: when fit steps it: "step" (default: after each minibatch, as
            torch's OneCycleLR is meant to be called) or "epoch".
    """

    _fields = ("max_lr", "total_steps", "pct_start", "anneal_strategy", "cycle_momentum",
               "base_momentum", "max_momentum", "div_factor", "final_div_factor",
               "three_phase")

    def __init__(self, optimizer: Optimizer, max_lr: float, total_steps: Optional[int] = None,
                 epochs: Optional[int] = None, steps_per_epoch: Optional[int] = None,
                 pct_start: float = 0.3, anneal_strategy: str = "cos",
                 cycle_momentum: bool = True, base_momentum: float = 0.85,
                 max_momentum: float = 0.95, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False,
                 interval: str = "step") -> None:
        where = "OneCycleLR"
        if total_steps is not None:
            total_steps = check_int(where, "total_steps", total_steps, minimum=1)
        elif epochs is not None and steps_per_epoch is not None:
            epochs = check_int(where, "epochs", epochs, minimum=1)
            steps_per_epoch = check_int(where, "steps_per_epoch", steps_per_epoch, minimum=1)
            total_steps = epochs * steps_per_epoch
        else:
            raise ValueError(f"[{where}] give total_steps, or epochs and steps_per_epoch, but "
                             f"got total_steps={total_steps!r}, epochs={epochs!r}, "
                             f"steps_per_epoch={steps_per_epoch!r}")
        settings = self._check_settings(where, dict(
            max_lr=max_lr, total_steps=total_steps, pct_start=pct_start,
            anneal_strategy=anneal_strategy, cycle_momentum=cycle_momentum,
            base_momentum=base_momentum, max_momentum=max_momentum, div_factor=div_factor,
            final_div_factor=final_div_factor, three_phase=three_phase))
        super().__init__(optimizer, interval)
        if settings["cycle_momentum"]:
            self._check_momentum(where, optimizer)
        for k, v in settings.items():
            setattr(self, k, v)
        self.base_lr = self.max_lr / self.div_factor
        self._apply(where)

    @staticmethod
    def _check_settings(where: str, s: Dict[str, Any]) -> Dict[str, Any]:
        out = dict(max_lr=check_float(where, "max_lr", s["max_lr"], minimum=0.0,
                                      exclusive_minimum=True),
                   total_steps=check_int(where, "total_steps", s["total_steps"], minimum=1),
                   pct_start=check_float(where, "pct_start", s["pct_start"], minimum=0.0,
                                         maximum=1.0))
        if s["anneal_strategy"] not in ("cos", "linear"):
            raise ValueError(f"[{where}] anneal_strategy must be 'cos' or 'linear', but got "
                             f"{s['anneal_strategy']!r}")
        out["anneal_strategy"] = s["anneal_strategy"]
        out["cycle_momentum"] = _check_bool(where, "cycle_momentum", s["cycle_momentum"])
        for name in ("base_momentum", "max_momentum"):
            out[name] = check_float(where, name, s[name], minimum=0.0, maximum=1.0,
                                    exclusive_maximum=True)
        for name in ("div_factor", "final_div_factor"):
            out[name] = check_float(where, name, s[name], minimum=0.0, exclusive_minimum=True)
        out["three_phase"] = _check_bool(where, "three_phase", s["three_phase"])
        if OneCycleLR._phases(out)[0][0] == 0.0:  # torch divides 0 by 0 at step 0
            raise ValueError(f"[{where}] pct_start={out['pct_start']} of total_steps="
                             f"{out['total_steps']} makes a first phase of no steps; choose "
                             "another pct_start")
        return out

    @staticmethod
    def _phases(s: Dict[str, Any]):
        """(end_step, start lr, end lr, start momentum, end momentum) per phase, torch's."""
        T, pct = s["total_steps"], s["pct_start"]
        initial = s["max_lr"] / s["div_factor"]
        low = initial / s["final_div_factor"]
        top, bottom = s["max_momentum"], s["base_momentum"]
        if s["three_phase"]:
            return [(float(pct * T) - 1, initial, s["max_lr"], top, bottom),
                    (float(2 * pct * T) - 2, s["max_lr"], initial, bottom, top),
                    (T - 1, initial, low, top, top)]
        return [(float(pct * T) - 1, initial, s["max_lr"], top, bottom),
                (T - 1, s["max_lr"], low, bottom, top)]

    @staticmethod
    def _check_momentum(where: str, optimizer: Optimizer) -> None:
        hyper = optimizer.hyperparameters
        if "betas" not in hyper and hyper.get("momentum", 0.0) == 0.0:
            raise ValueError(f"[{where}] cycle_momentum=True cycles the optimizer's beta1 or "
                             f"momentum, but {optimizer!r} has momentum 0; build it with "
                             "momentum > 0 or pass cycle_momentum=False")

    def _values(self, step: int) -> Tuple[float, float]:
        """(lr, momentum) at `step`, torch's get_lr."""
        phases = self._phases({k: getattr(self, k) for k in self._fields})
        start = 0.0
        for i, (end, lr0, lr1, m0, m1) in enumerate(phases):
            if step <= end or i == len(phases) - 1:
                # a last phase of no steps (pct_start=1) is over: torch divides by
                # zero at that step (total_steps, after the cycle's last minibatch)
                pct = (step - start) / (end - start) if end != start else 1.0
                return (_anneal(self.anneal_strategy, lr0, lr1, pct),
                        _anneal(self.anneal_strategy, m0, m1, pct))
            start = end
        raise AssertionError("unreachable")

    def _apply(self, where: str) -> None:
        lr, momentum = self._values(self.last_epoch)
        # torch lets the final step (step total_steps, after the last minibatch of
        # the cycle) extrapolate, which the linear strategy takes below 0
        lr = max(lr, 0.0)
        if not self.cycle_momentum:
            self.optimizer.lr = lr
        elif "betas" in self.optimizer.hyperparameters:
            beta2 = self.optimizer.hyperparameters["betas"][1]
            self.optimizer._set_hyperparameters(where, lr=lr, betas=(momentum, beta2))
        else:
            self.optimizer._set_hyperparameters(where, lr=lr, momentum=momentum)

    def _check_state(self, where, sd):
        out = super()._check_state(where, sd)
        out.update(self._check_settings(where, {k: sd[k] for k in self._fields}))
        if out["last_epoch"] > out["total_steps"]:
            raise ValueError(f"[{where}] last_epoch must be <= total_steps="
                             f"{out['total_steps']}, but got {out['last_epoch']}")
        return out

    def step(self) -> None:
        """Advances one step and sets the optimizer's lr (and momentum).

        Raises:
            ValueError: the schedule has already made total_steps steps.
        """
        where = "OneCycleLR.step"
        if self.last_epoch + 1 > self.total_steps:
            raise ValueError(f"[{where}] tried to step {self.last_epoch + 1} times, but "
                             f"total_steps is {self.total_steps}; with fit, give "
                             "epochs and steps_per_epoch (ceil(samples / batch_size)) of the fit")
        self.last_epoch += 1
        self._apply(where)


class ReduceLROnPlateau(_Schedule):
    """Multiplies lr by ``factor`` when a monitored value has not improved for
    more than ``patience`` epochs (as torch.optim.lr_scheduler.ReduceLROnPlateau
    with threshold_mode="rel").

    Improvement means value < best (1 - threshold) in mode "min", value > best
    (1 + threshold) in mode "max". After a reduction the count starts again,
    after ``cooldown`` epochs in which bad epochs are not counted.

    Args:
        optimizer: whose ``lr`` is reduced.
        mode: "min" or "max".
        factor: in (0, 1).
        patience: bad epochs tolerated before a reduction (>= 0).
        threshold: relative improvement that counts, >= 0.
        min_lr: lower bound of the lr, >= 0.
        cooldown: epochs to wait after a reduction, >= 0.
        monitor: the fit log the callback watches; None watches "val_loss" when
            there is validation data, "loss" otherwise.
    """

    _fields = ("mode", "factor", "patience", "threshold", "min_lr", "cooldown", "best",
               "num_bad_epochs", "cooldown_counter")

    def __init__(self, optimizer: Optimizer, mode: str = "min", factor: float = 0.1,
                 patience: int = 10, threshold: float = 1e-4, min_lr: float = 0.0,
                 cooldown: int = 0, monitor: Optional[str] = None) -> None:
        super().__init__(optimizer)
        where = "ReduceLROnPlateau"
        if mode not in ("min", "max"):
            raise ValueError(f"[{where}] mode must be 'min' or 'max', but got {mode!r}")
        self.mode = mode
        self.factor = check_float(where, "factor", factor, minimum=0.0, exclusive_minimum=True,
                                  maximum=1.0, exclusive_maximum=True)
        self.patience = check_int(where, "patience", patience, minimum=0)
        self.threshold = check_float(where, "threshold", threshold, minimum=0.0)
        self.min_lr = check_float(where, "min_lr", min_lr, minimum=0.0)
        self.cooldown = check_int(where, "cooldown", cooldown, minimum=0)
        if monitor is not None and not isinstance(monitor, str):
            raise TypeError(f"[{where}] monitor must be a str or None, but got "
                            f"{type_name(monitor)}")
        self.monitor = monitor
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0

    def _check_state(self, where, sd):
        out = super()._check_state(where, sd)
        if sd["mode"] not in ("min", "max"):
            raise ValueError(f"[{where}] mode must be 'min' or 'max', but got {sd['mode']!r}")
        out["mode"] = sd["mode"]
        out["factor"] = check_float(where, "factor", sd["factor"], minimum=0.0,
                                    exclusive_minimum=True, maximum=1.0, exclusive_maximum=True)
        out["patience"] = check_int(where, "patience", sd["patience"], minimum=0)
        out["threshold"] = check_float(where, "threshold", sd["threshold"], minimum=0.0)
        out["min_lr"] = check_float(where, "min_lr", sd["min_lr"], minimum=0.0)
        out["cooldown"] = check_int(where, "cooldown", sd["cooldown"], minimum=0)
        best = sd["best"]
        if isinstance(best, (bool, np.bool_)) or not isinstance(best, numbers.Real) \
                or math.isnan(best):
            raise ValueError(f"[{where}] best must be a number, but got {best!r}")
        out["best"] = float(best)
        out["num_bad_epochs"] = check_int(where, "num_bad_epochs", sd["num_bad_epochs"],
                                          minimum=0)
        out["cooldown_counter"] = check_int(where, "cooldown_counter", sd["cooldown_counter"],
                                            minimum=0)
        return out

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best * (1 - self.threshold) if self.best != math.inf \
                else value < self.best
        return value > self.best * (1 + self.threshold) if self.best != -math.inf \
            else value > self.best

    def step(self, value: float) -> None:
        """Records one epoch's monitored value and reduces lr on a plateau."""
        value = check_float("ReduceLROnPlateau.step", "value", value)
        self.last_epoch += 1
        if self._improved(value):
            self.best = value
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs in the cooldown do not count
        if self.num_bad_epochs > self.patience:
            old = self.optimizer.lr
            new = max(old * self.factor, self.min_lr)
            if old - new > 1e-8:  # torch's eps: changes smaller than this are skipped
                self.optimizer.lr = new
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0

    def on_epoch_end(self, epoch: int, logs: Dict[str, float]) -> None:
        key = self.monitor or ("val_loss" if "val_loss" in logs else "loss")
        if key not in logs:
            raise KeyError(f"[ReduceLROnPlateau] monitor {key!r} is not among the fit logs "
                           f"{sorted(logs)}")
        self.step(logs[key])
