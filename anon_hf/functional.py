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
from .distributed.dtensor import all_ranks_agree, device_meshes, local_shards
from .hyper import NONFINITE_POLICIES
from .refresh import NonFinitePreconditionerError, refresh_verdicts
from .schedule import RefreshSchedule, is_refresh_step

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
    hyper = dict(
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
    lists = [params, grads, exp_avgs, exp_avg_sqs, preconds]
    meshes = device_meshes(params)
    if meshes:
        # FSDP2 (DTensor) tensors step on their local shards: the update is elementwise, and only a refresh's
        # verdict needs the other ranks, so that all of them raise together or none does.
        lists = [local_shards(tensors) for tensors in lists]
        if on_nonfinite == "raise":
            _raise_if_any_rank_refreshes_nonfinite(lists, params, state_steps, meshes, hyper)
    return _backend(lists[0], foreach, fused)(*lists, state_steps, **hyper)


def _backend(params: list[Tensor], foreach: bool | None, fused: bool | None):
    """The backend function for these flags: torch.optim's choice, with the fused path only when asked for."""
    if fused:
        from .backends.fused import _fused_anon

        return _fused_anon
    if foreach is None:
        foreach = _default_foreach(params)
    if foreach and torch.jit.is_scripting():
        raise RuntimeError("torch.jit.script not supported with foreach optimizers")
    return _multi_tensor_anon if foreach else _single_tensor_anon


def _raise_if_any_rank_refreshes_nonfinite(lists, params, state_steps, meshes, hyper) -> None:
    """At a refresh, raise :class:`NonFinitePreconditionerError` on every rank when any rank's shard of a tensor
    would store a non-finite accumulator or preconditioner (one all-reduce per mesh dimension; nothing written).

    ``lists``: the local shards of params, grads, exp_avgs, exp_avg_sqs, preconds; ``params`` the DTensors."""
    preconds = lists[4]
    due_at: dict[int, list[int]] = {}
    for i, step in enumerate(state_steps):
        if preconds and is_refresh_step(int(step.item()) + 1, hyper["refresh"]):
            due_at.setdefault(int(step.item()) + 1, []).append(i)
    if not due_at:
        return
    keys = ("refresh", "beta2", "gamma", "eps", "beta3", "keep_unseen", "weight_decay", "maximize")
    decay = {key: hyper[key] for key in keys} | {"l2": not hyper["decoupled_weight_decay"]}
    verdicts: dict[int, bool] = {}
    for step, indices in due_at.items():
        verdicts.update(refresh_verdicts(*lists, indices, step, **decay))
    order = sorted(verdicts)
    agreed = all_ranks_agree([verdicts[i] for i in order], meshes, lists[0][0].device)
    bad = [i for i, ok in zip(order, agreed, strict=True) if not ok]
    if bad:
        raise NonFinitePreconditionerError(int(state_steps[bad[0]].item()) + 1, bad[0], tuple(params[bad[0]].shape))


def _default_foreach(params: list[Tensor]) -> bool:
    """torch.optim's rule: foreach when every tensor lives on a device with foreach kernels, never fused."""
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
    except ImportError:  # a private helper; fall back to its rule for the common devices
        return all(p.device.type in ("cuda", "cpu", "xpu", "mps") for p in params)
    _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return foreach
