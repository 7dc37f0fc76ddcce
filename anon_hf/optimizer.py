"""``anon_hf.Anon``: the optimizer class. It owns param groups and state; the arithmetic is in ``functional``."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._docs import (
    eps_doc,
    foreach_doc,
    fused_doc,
    gamma_doc,
    keep_unseen_doc,
    max_precond_ratio_doc,
    maximize_doc,
    moments_dtype_doc,
    precond_dtype_doc,
    refresh_doc,
    weight_decay_doc,
)
from .distributed.dtensor import local
from .distributed.sync import RefreshSyncChecker, upcoming_collective_refresh
from .functional import anon
from .hyper import DEFAULTS, HYPERPARAMETERS, as_python_numbers, is_real_number, update_kwargs
from .hyper import state_dtype as _state_dtype
from .hyper import validate as _validate_hyperparameters
from .refresh import NonFinitePreconditionerError
from .schedule import RefreshSchedule

try:
    from torch.optim.optimizer import _get_scalar_dtype, _use_grad_for_differentiable
except ImportError:  # private torch helpers; small local stand-ins keep the class importable

    def _get_scalar_dtype() -> torch.dtype:
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32

    def _use_grad_for_differentiable(func):
        def wrapper(self, *args, **kwargs):
            with torch.no_grad():
                return func(self, *args, **kwargs)

        return wrapper


__all__ = ["Anon"]

logger = logging.getLogger(__name__)

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]
Bounds = tuple[float | None, float | None] | None

# Keys each tensor's state may hold; `exp_avg_sq` and `precond` exist only where gamma != 0 (or once did).
STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "precond"})
# Per-block side values of anon_hf.Anon8bit's 8-bit state (see _quant8.QUANTIZED_KEYS).
_QUANTIZED_SIDE_KEYS = frozenset({"exp_avg_absmax", "exp_avg_sq_max", "precond_log2_min", "precond_log2_max"})
# Devices fused=True runs on: the C++ kernel or compiled graphs on CPU, compiled graphs (inductor) on the others.
FUSED_DEVICES = ("cpu", "cuda", "xpu")
# Group keys that tell Anon's state dicts from other optimizers' (AdamW has lr/betas/eps/weight_decay too).
_ANON_GROUP_KEYS = ("gamma", "refresh", "beta3")


class Anon(torch.optim.Optimizer):
    __doc__ = (
        r"""Implements the Anon algorithm.

    .. math::
       \begin{aligned}
            &\textbf{input}: \eta \text{ (lr)}, \beta_1, \beta_2 \text{ (betas)}, \gamma \text{ (power)},
                \beta_3, \epsilon, \lambda \text{ (weight decay)}, \text{refresh set } R
                \text{ (default } \{1, 2, 4, 8, \dots\}) \\
            &\textbf{initialize}: m_0 \leftarrow 0, \; s_0 \leftarrow 0, \; t_{prev} \leftarrow 0 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do} \\
            &\hspace{5mm} g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
                \hspace{5mm}(+\lambda\theta_{t-1} \text{ if not decoupled}) \\
            &\hspace{5mm} \theta_{t-1} \leftarrow (1 - \eta\lambda)\,\theta_{t-1}
                \hspace{5mm}\text{(if decoupled)} \\
            &\hspace{5mm} m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
            &\hspace{5mm} s_t \leftarrow \beta_2 s_{t-1} + (1 - \beta_2) g_t^2 \\
            &\hspace{5mm} \textbf{if} \: t \in R: \\
            &\hspace{10mm} \sigma \leftarrow s_t / (1 - \beta_2^{\,t - t_{prev}}) + \epsilon \\
            &\hspace{10mm} u \leftarrow \sigma^{\gamma} \:\text{ at the first refresh, else }\:
                \beta_3 u + (1 - \beta_3)\,\sigma^{\gamma} \\
            &\hspace{10mm} v \leftarrow u^{-1/2}, \quad s_t \leftarrow 0, \quad t_{prev} \leftarrow t \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1} - \eta \, v \, m_t / (1 - \beta_1^t)
                \hspace{5mm}(\text{then clamp to } [lo, hi] \text{ if bounds}) \\
            &\rule{110mm}{0.4pt} \\[-1.ex]
            &\bf{return} \: \theta_t
       \end{aligned}

    With the default ``refresh="pow2"`` and ``beta3=0.5``, :math:`u` is the mean of :math:`v^{-2}` over
    refreshes, i.e. :math:`v^2` is their harmonic mean. The refresh runs before the step's update, so step 1
    already uses :math:`v` built from :math:`g_1`. With ``keep_unseen`` (the default) the refresh is taken per
    element: one whose :math:`s_t = 0` (no gradient since :math:`t_{prev}`) keeps its :math:`u`, and one no refresh
    has seen a gradient of yet starts at :math:`u = \sigma^{\gamma}`; until then such an element steps with
    :math:`\sigma_t^{-\gamma/2}` over its gradients since :math:`t_{prev}`. Between refreshes a step uses at most
    ``max_precond_ratio`` times the preconditioner its gradients since :math:`t_{prev}` alone would give. For the
    details, see `Anon: Extrapolating Adaptivity Beyond
    SGD and Adam <https://arxiv.org/abs/2605.02317>`_ and ``docs/algorithm.md``.

    Args:
        params (iterable): iterable of parameters or named_parameters to optimize, or of dicts defining
            param groups; every hyperparameter below may differ per group.
        lr (float or Tensor, optional): learning rate :math:`\eta`, >= 0; a 1-element tensor works with LR
            schedulers (default: 1e-3)
        betas (tuple[float, float], optional): :math:`\beta_1` for the momentum and :math:`\beta_2` for the
            second-moment accumulator, each in [0, 1) (default: (0.9, 0.999))
        """
        + gamma_doc
        + r"""
        """
        + eps_doc
        + r"""
        """
        + weight_decay_doc
        + r"""
        decoupled_weight_decay (bool, optional): AdamW-style decay if True, L2 added to the gradient if
            False (default: True)
        """
        + refresh_doc
        + r"""
        beta3 (float, optional): weight of the previous preconditioner when a refresh averages it with the new
            estimate, in [0, 1); 0.5 is the paper's mean, 0 keeps only the newest estimate (default: 0.5)
        bounds (tuple[float | None, float | None], optional): a box ``(lo, hi)`` the parameters are projected
            onto after each update (the projection in the :math:`V^{-1}` metric is an elementwise clamp);
            ``None`` on either side means unbounded on that side, ``None`` for the whole means unconstrained
            (default: None)
        """
        + keep_unseen_doc
        + r"""
        """
        + max_precond_ratio_doc
        + r"""
        """
        + maximize_doc
        + r"""
        """
        + foreach_doc
        + r"""
        """
        + fused_doc
        + r"""
        """
        + precond_dtype_doc
        + r"""
        """
        + moments_dtype_doc
        + r"""
        on_nonfinite (str, optional): what a refresh does when the new preconditioner of a tensor holds nan or
            inf (a non-finite gradient since the previous refresh). ``"raise"`` stops with
            :class:`~anon_hf.NonFinitePreconditionerError` naming the group, the tensor and the step, before
            that preconditioner is stored; ``"skip"`` keeps the previous preconditioner and resets the
            accumulator. Either way the check costs one reduction per tensor per refresh, O(log T) in all.
            Between refreshes a non-finite gradient flows into the momentum and the weights as in AdamW
            (default: "raise")
        verify_sync (bool, optional): in a distributed run, check at each refresh that the neighbouring ranks
            refreshed at the same step, raising :class:`~anon_hf.RefreshOutOfSyncError` if not. Costs a few
            key-value store round trips per refresh and never blocks (default: True)

    State, per parameter (``optimizer.state[p]``), created lazily in :meth:`step` (never in ``__init__``, so
    FSDP2 can swap the parameters of an optimizer built before wrapping):

    * ``step``: 0-d float32 CPU tensor, steps taken by this tensor (a parameter whose grad is None is skipped
      and its step does not advance);
    * ``exp_avg``: first moment :math:`m`, shaped like the parameter, in ``moments_dtype`` (default: the
      parameter's dtype, float32 for float16 parameters; ``exp_avg_sq`` likewise, ``precond`` in ``precond_dtype``);
    * ``exp_avg_sq``: the accumulator :math:`s` since the last refresh (reset to zero at each refresh);
    * ``precond``: the preconditioner :math:`v`, reused between refreshes; 0 where no refresh has seen a gradient
      yet (with ``keep_unseen``); such elements step with the estimate of their gradients since the last refresh.

    Non-scalar state is shaped like its parameter, so it follows ZeRO's flat partitions and FSDP2's DTensor
    shards. With ``gamma == 0`` the preconditioner is all ones and ``exp_avg_sq``/``precond`` are not
    allocated: the state dict then holds only ``step`` and ``exp_avg`` per tensor, like SGD with momentum.
    Setting a group's gamma to a non-zero value later allocates them then, with ``precond`` all ones (the
    preconditioner gamma = 0 was using).

    Example:
        >>> optimizer = anon_hf.Anon(model.parameters(), lr=1e-3, gamma=1.0)
        >>> loss_fn(model(input), target).backward()
        >>> optimizer.step()
        >>> optimizer.zero_grad()
    """
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = DEFAULTS["lr"],
        betas: tuple[float, float] = DEFAULTS["betas"],
        gamma: float = DEFAULTS["gamma"],
        eps: float = DEFAULTS["eps"],
        weight_decay: float = DEFAULTS["weight_decay"],
        decoupled_weight_decay: bool = DEFAULTS["decoupled_weight_decay"],
        refresh: RefreshSchedule = DEFAULTS["refresh"],
        beta3: float = DEFAULTS["beta3"],
        bounds: Bounds = DEFAULTS["bounds"],
        keep_unseen: bool = DEFAULTS["keep_unseen"],
        max_precond_ratio: float | None = DEFAULTS["max_precond_ratio"],
        *,
        maximize: bool = DEFAULTS["maximize"],
        foreach: bool | None = DEFAULTS["foreach"],
        fused: bool | None = DEFAULTS["fused"],
        precond_dtype: torch.dtype | str | None = DEFAULTS["precond_dtype"],
        moments_dtype: torch.dtype | str | None = DEFAULTS["moments_dtype"],
        on_nonfinite: str = DEFAULTS["on_nonfinite"],
        verify_sync: bool = True,
    ):
        arguments = locals()
        defaults = {row.name: _as_stored(row.name, arguments[row.name]) for row in HYPERPARAMETERS}
        defaults["differentiable"] = False  # read by torch's step decorator; Anon's step always runs under no_grad
        _validate_hyperparameters(defaults)
        as_python_numbers(defaults)
        if not isinstance(verify_sync, bool):
            raise ValueError(f"Invalid verify_sync value: {verify_sync!r} (allowed: True or False)")
        super().__init__(params, defaults)
        self.verify_sync = verify_sync
        self._sync = RefreshSyncChecker()
        self.refresh_history: list[int] = []

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its own hyperparameters are validated like the constructor's, before it is added."""
        if isinstance(param_group, dict):
            for name in ("precond_dtype", "moments_dtype"):
                if name in param_group:
                    param_group[name] = _state_dtype(param_group[name])
            overrides = {key: value for key, value in param_group.items() if key != "params"}
            _validate_hyperparameters({**self.defaults, **overrides})
            as_python_numbers(param_group)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Keys added after a state dict was written get their defaults, as torch.optim does.
        for group in self.param_groups:
            for row in HYPERPARAMETERS:
                group.setdefault(row.name, row.default)
            group.setdefault("differentiable", False)
        # A step saved as a plain number (hand-made or older state dicts) becomes the tensor step() expects.
        for tensor_state in self.state.values():
            step = tensor_state.get("step") if isinstance(tensor_state, dict) else None
            if step is not None and not torch.is_tensor(step):
                tensor_state["step"] = torch.tensor(float(step), dtype=_get_scalar_dtype())
        self.__dict__.setdefault("verify_sync", True)
        self.__dict__.setdefault("refresh_history", [])
        if "_sync" not in self.__dict__:
            self._sync = RefreshSyncChecker()

    def _validate_saved(self, state_dict: dict[str, Any], validate_tensor_state) -> None:
        """Check the saved groups, then each saved tensor state with ``validate_tensor_state(state, param, id)``,
        before anything is loaded (when the saved groups hold as many params as this optimizer's)."""
        self._check_saved_groups(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        state = state_dict["state"]
        if len(saved_ids) == len(params):
            for param, saved_id in zip(params, saved_ids, strict=True):
                if saved_id in state:
                    validate_tensor_state(state[saved_id], param, saved_id)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict written by :meth:`state_dict`; refuse one from another optimizer or model.

        Raises:
            ValueError: the state dict lacks Anon's group keys (``gamma``, ``refresh``, ``beta3``): it was
                written by another optimizer, e.g. AdamW; a saved group holds a hyperparameter outside its range;
                or a tensor's state has the wrong keys, types, shapes or values.
        """
        self._validate_saved(state_dict, _validate_tensor_state)
        super().load_state_dict(state_dict)
        # torch casts loaded state to each param's dtype; put state kept in precond_dtype / moments_dtype back.
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    _cast_state(self.state[p], group, p)

    def _check_saved_groups(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless ``state_dict`` has Anon's layout and its groups hold valid hyperparameters."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            found = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"Invalid state dict for {type(self).__name__}: expected a dict with 'state' and 'param_groups' (what "
                f"optimizer.state_dict() returns), got {found}."
            )
        saved_groups = state_dict["param_groups"]
        for index, group in enumerate(saved_groups):
            missing = [key for key in _ANON_GROUP_KEYS if key not in group]
            if missing:
                raise ValueError(
                    f"This state dict was not written by Anon: param group {index} has no {', '.join(missing)}. "
                    "Loading another optimizer's state (e.g. AdamW's exp_avg_sq) into Anon would be silently "
                    "wrong; start Anon from fresh state instead, or load the checkpoint with the optimizer that "
                    "wrote it."
                )
            # The saved hyperparameters replace the constructor's on load: hold them to the same ranges.
            try:
                _validate_hyperparameters({**self.defaults, **{k: v for k, v in group.items() if k != "params"}})
            except ValueError as err:
                raise ValueError(f"Param group {index} of the state dict: {err}") from None

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        preconds: list[Tensor],
        state_steps: list[Tensor],
    ) -> bool:
        """Gather the tensors of ``group`` that have gradients; create missing state. Returns has_complex."""
        has_complex = False
        preconditioned = group["gamma"] != 0 or any(
            "precond" in self.state[p] for p in group["params"] if p.grad is not None
        )
        if group.get("moments_dtype") is not None or group.get("precond_dtype") is not None:
            for p in group["params"]:
                if torch.is_complex(p):
                    raise ValueError(
                        f"precond_dtype/moments_dtype ({group['precond_dtype']}, {group['moments_dtype']}) apply to real "
                        f"parameters, but this group holds a {p.dtype} parameter of shape {tuple(p.shape)}: put "
                        "complex parameters in a param group with precond_dtype=None and moments_dtype=None."
                    )
        dtypes: dict[torch.dtype, tuple[torch.dtype, torch.dtype]] = {}  # _storage_dtypes per param dtype
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Anon does not support sparse gradients, consider SparseAdam instead")
            has_complex |= torch.is_complex(p)
            state = self.state[p]
            moments_dtype, precond_dtype = dtypes.get(p.dtype) or dtypes.setdefault(p.dtype, _storage_dtypes(group, p))
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, dtype=moments_dtype, memory_format=torch.preserve_format)
            if preconditioned and "precond" not in state:
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=moments_dtype, memory_format=torch.preserve_format)
                # 0 marks "not seen by a refresh yet" (see anon_hf.refresh); a tensor that has stepped with gamma = 0
                # starts from the preconditioner it was using, ones.
                fill = 1.0 if state["step"] > 0 else 0.0
                state["precond"] = torch.full_like(p, fill, dtype=precond_dtype, memory_format=torch.preserve_format)
            if state["exp_avg"].dtype != moments_dtype or (preconditioned and state["precond"].dtype != precond_dtype):
                _cast_state(state, group, p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            state_steps.append(state["step"])
            if preconditioned:
                exp_avg_sqs.append(state["exp_avg_sq"])
                preconds.append(state["precond"])
        return has_complex

    def _check_fused_devices(self) -> None:
        """torch.optim's check for ``fused=True``, in its wording, before any state is created."""
        for group in self.param_groups:
            if not group["fused"]:
                continue
            for p in group["params"]:
                if (
                    p.grad is not None
                    and p not in self.state
                    and not (  # a param with state passed already
                        p.device.type in FUSED_DEVICES and (p.is_floating_point() or p.is_complex())
                    )
                ):
                    raise RuntimeError(
                        "`fused=True` requires all the params to be floating point Tensors of "
                        f"supported devices: {list(FUSED_DEVICES)} but {p.dtype} and {p.device.type}"
                    )

    def _step_group(self, group: dict[str, Any]) -> list[int]:
        """Step the tensors of ``group`` that have gradients; returns the steps at which a refresh happened."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        preconds: list[Tensor] = []
        state_steps: list[Tensor] = []
        self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, preconds, state_steps)
        return anon(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            preconds,
            state_steps,
            foreach=group["foreach"],
            fused=group["fused"],
            **update_kwargs(group),
        )

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): a closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self._check_fused_devices()
        self._sync.count_call()
        # A refresh on DTensor shards runs collectives: check the ranks agree before entering them, or a rank
        # refreshing alone would block there and never reach the check below.
        checked_before = False
        if self.verify_sync:
            upcoming = upcoming_collective_refresh(self.param_groups, self.state)
            if upcoming is not None:
                self._sync.check(upcoming, wait=True)
                checked_before = True
        refreshed_steps: list[int] = []
        for index, group in enumerate(self.param_groups):
            try:
                refreshed = self._step_group(group)
            except NonFinitePreconditionerError as err:
                err.place(group_index=index)
                raise
            refreshed_steps += refreshed
        if refreshed_steps:
            last = max(refreshed_steps)
            if not self.refresh_history or self.refresh_history[-1] < last:
                self.refresh_history.append(last)
            if self.verify_sync and not checked_before:
                self._sync.check(last)
        return loss


def _as_stored(name: str, value: Any) -> Any:
    """A constructor argument as the param group stores it: lists as tuples, dtype names as torch dtypes."""
    if name in ("betas", "bounds") and isinstance(value, list):
        return tuple(value)
    return _state_dtype(value) if name in ("precond_dtype", "moments_dtype") else value


def _storage_dtypes(group: dict[str, Any], param: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes ``(moments, precond)`` that ``param``'s state is stored in: the group's ``moments_dtype`` and
    ``precond_dtype``, where ``None`` means the param's dtype, except float32 for float16 params (float16 cannot hold
    ``(1 - beta2) * g**2`` for ``|g| < 8e-3``, nor a preconditioner above 65504)."""
    default = torch.float32 if param.dtype == torch.float16 else param.dtype
    return group.get("moments_dtype") or default, group.get("precond_dtype") or default


def _cast_state(tensor_state: dict[str, Any], group: dict[str, Any], param: Tensor) -> None:
    """Keep ``exp_avg``/``exp_avg_sq`` and ``precond`` in the dtypes of :func:`_storage_dtypes`.

    Converts only what differs: state just loaded (torch casts it to the param dtype) or written before the group's
    option changed.
    """
    moments_dtype, precond_dtype = _storage_dtypes(group, param)
    for key, dtype in (("exp_avg", moments_dtype), ("exp_avg_sq", moments_dtype), ("precond", precond_dtype)):
        value = tensor_state.get(key)
        if isinstance(value, Tensor) and value.dtype != dtype and not torch.is_complex(value):
            tensor_state[key] = value.to(dtype)


def _validate_tensor_state(tensor_state: dict[str, Any], param: Tensor, saved_id: Any) -> None:
    if not isinstance(tensor_state, dict):
        raise ValueError(
            f"State of param {saved_id} is a {type(tensor_state).__name__}, not a dict of tensors: not a state dict "
            "written by Anon."
        )
    if not tensor_state:  # no state yet (torch.optim writes one for a param merely looked up in `state`)
        return
    unknown = set(tensor_state) - STATE_KEYS
    if unknown & _QUANTIZED_SIDE_KEYS:
        raise ValueError(
            f"State of param {saved_id} is 8-bit state written by anon_hf.Anon8bit (keys {sorted(unknown)}): load it "
            "into Anon8bit, or convert it first with anon_hf.dequantize_state_dict(state_dict), which returns the "
            "fp32 state dict Anon loads."
        )
    if unknown:
        raise ValueError(
            f"State of param {saved_id} has keys {sorted(unknown)} that Anon does not use "
            f"(Anon keeps {sorted(STATE_KEYS)}): the state dict was written by another optimizer."
        )
    if "step" not in tensor_state or "exp_avg" not in tensor_state:
        raise ValueError(f"State of param {saved_id} lacks 'step' or 'exp_avg': not a state dict written by Anon.")
    if ("exp_avg_sq" in tensor_state) != ("precond" in tensor_state):
        raise ValueError(
            f"State of param {saved_id} has only one of 'exp_avg_sq' and 'precond'. AdamW's state has exp_avg_sq "
            "but no precond; Anon's has both (or neither when gamma == 0). Start Anon from fresh state instead."
        )
    step = tensor_state["step"]
    if isinstance(step, Tensor):
        step = local(step).item() if step.numel() == 1 else None
    if not is_real_number(step) or not (math.isfinite(step) and step >= 0 and step == int(step)):
        raise ValueError(
            f"State 'step' of param {saved_id} is {tensor_state['step']!r} (allowed: a whole number >= 0, as a "
            "0-d tensor or a number): the state dict is corrupted or was not written by Anon."
        )
    for key in ("exp_avg", "exp_avg_sq", "precond"):
        if key not in tensor_state:
            continue
        value = tensor_state[key]
        if not isinstance(value, Tensor) or not (value.is_floating_point() or value.is_complex()):
            kind = f"a tensor of dtype {value.dtype}" if isinstance(value, Tensor) else f"a {type(value).__name__}"
            raise ValueError(
                f"State '{key}' of param {saved_id} is {kind} (allowed: a floating-point tensor, complex for a "
                "complex parameter): the state dict is corrupted or was not written by Anon."
            )
        if value.shape != param.shape:
            raise ValueError(
                f"State '{key}' of param {saved_id} has shape {tuple(value.shape)} but the parameter has shape "
                f"{tuple(param.shape)}: the state dict belongs to another model or another sharding."
            )
    precond = tensor_state.get("precond")
    if precond is not None:
        precond = local(precond)
        precond = torch.view_as_real(precond) if precond.is_complex() else precond  # complex: both parts real v
    # A refresh never stores a non-finite preconditioner (see on_nonfinite), and u ** -0.5 is never negative.
    if precond is not None and not bool((torch.isfinite(precond) & (precond >= 0)).all()):
        raise ValueError(
            f"State 'precond' of param {saved_id} holds nan, inf or negative values, which Anon never stores: the "
            "state dict is corrupted or was not written by Anon. Resume from an earlier checkpoint."
        )
