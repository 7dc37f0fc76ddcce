"""The functional API: :func:`anon` takes the parameters, their gradients and their state as parallel lists and
dispatches to one backend, as ``torch.optim.adam.adam`` does: :func:`~anon_hf.backends.eager._single_tensor_anon`
(a per-tensor loop), :func:`~anon_hf.backends.eager._multi_tensor_anon` (``torch._foreach_*`` kernels) or
:func:`~anon_hf.backends.fused._fused_anon` (one pass per tensor: a C++ kernel on CPU, compiled graphs elsewhere).

Nothing here imports anything but torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends.eager import _multi_tensor_anon, _single_tensor_anon
from .refresh import NONFINITE_POLICIES, NonFinitePreconditionerError
from .schedule import RefreshSchedule

__all__ = ["NonFinitePreconditionerError", "anon"]


def anon(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr: float,
    beta1: float,
    beta2: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool = True,
    refresh: RefreshSchedule = "pow2",
    beta3: float = 0.5,
    keep_unseen: bool = True,
    max_precond_ratio: float | None = 10.0,
    bounds: tuple[float | None, float | None] | None = None,
    maximize: bool = False,
    on_nonfinite: str = "raise",
) -> list[int]:
    r"""Functional API that performs the Anon computation; see :class:`anon_hf.Anon` for the math.

    All lists are parallel. ``exp_avg_sqs`` and ``preconds`` are either as long as ``params`` or both empty,
    which means the preconditioner is all ones (``gamma == 0`` from the start: SGD with EMA momentum).
    ``state_steps`` holds one 0-d CPU tensor per parameter and is incremented in place; refreshes follow each
    tensor's own step. Returns the sorted distinct steps at which a refresh happened in this call.

    ``fused=True`` updates each tensor in one pass (``anon_hf.backends.fused``: a C++ kernel on CPU, ``torch.compile``'d
    graphs elsewhere), falling back to foreach where it cannot; ``None`` never builds or compiles anything (see
    :class:`anon_hf.Anon`).
    """
    if preconds and len(preconds) != len(params):
        raise ValueError(
            f"preconds must be empty or have one tensor per param: got {len(preconds)} for {len(params)} params"
        )
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"Invalid on_nonfinite value: {on_nonfinite!r} (allowed: 'raise', 'skip')")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if fused:
        from .backends.fused import _fused_anon

        func = _fused_anon
    else:
        if foreach is None:
            foreach = _default_foreach(params)
        if foreach and torch.jit.is_scripting():
            raise RuntimeError("torch.jit.script not supported with foreach optimizers")
        func = _multi_tensor_anon if foreach else _single_tensor_anon
    return func(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        preconds,
        state_steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        gamma=gamma,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        refresh=refresh,
        beta3=beta3,
        keep_unseen=keep_unseen,
        max_precond_ratio=max_precond_ratio,
        bounds=bounds,
        maximize=maximize,
        on_nonfinite=on_nonfinite,
    )


def _default_foreach(params: list[Tensor]) -> bool:
    """torch.optim's rule: foreach when every tensor lives on a device with foreach kernels, never fused."""
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
    except ImportError:  # a private helper; fall back to its rule for the common devices
        return all(p.device.type in ("cuda", "cpu", "xpu", "mps") for p in params)
    _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return foreach
