"""The functional API: :func:`anon` takes the parameters, their gradients and their state as parallel lists and
dispatches to one backend, as ``torch.optim.adam.adam`` does: :func:`~anon_hf.backends.eager._single_tensor_anon`
(a per-tensor loop), :func:`~anon_hf.backends.eager._multi_tensor_anon` (``torch._foreach_*`` kernels) or
:func:`~anon_hf.backends.fused._fused_anon` (one pass per tensor: a C++ kernel on CPU, compiled graphs elsewhere),
whose leftovers (what neither covers) it hands to the foreach path. State stored in 8 bits arrives with its storage
strategy (``storage=``, :class:`~anon_hf.storage.blockwise8.Blockwise8`): the fused backend steps what its 8-bit
kernel and graph take, and the rest is decoded, stepped here as fp32 state and encoded again. No backend imports
another or this module.

Nothing here imports anything but torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .backends.eager import _multi_tensor_anon, _single_tensor_anon
from .distributed.dtensor import agreed_verdicts, device_meshes, local_shards, shards_of
from .hyper import HYPERPARAMETERS, NONFINITE_POLICIES
from .refresh import NonFinitePreconditionerError, refresh_verdicts
from .schedule import is_refresh_step
from .storage.blockwise8 import Blockwise8
from .storage.quant8 import QUANTIZED_KEYS

__all__ = ["NonFinitePreconditionerError", "anon"]

# The hyperparameters the update reads besides lr, beta1 and beta2, with Anon's defaults.
_UPDATE_DEFAULTS = {row.name: row.default for row in HYPERPARAMETERS if row.functional}


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
    storage: Blockwise8 | None = None,
    **hyper: Any,
) -> list[int]:
    r"""Functional API that performs the Anon computation; see :class:`anon_hf.Anon` for the math.

    All lists are parallel. ``exp_avg_sqs`` and ``preconds`` are either as long as ``params`` or both empty,
    which means the preconditioner is all ones (``gamma == 0`` from the start: SGD with EMA momentum).
    ``state_steps`` holds one 0-d CPU tensor per parameter and is incremented in place; refreshes follow each
    tensor's own step. Returns the sorted distinct steps at which a refresh happened in this call.

    ``hyper``: ``lr``, ``beta1`` and ``beta2`` (required, floats), and any hyperparameter of
    :data:`anon_hf.hyper.HYPERPARAMETERS` that the update reads (``gamma``, ``eps``, ``weight_decay``,
    ``decoupled_weight_decay``, ``refresh``, ``beta3``, ``bounds``, ``keep_unseen``, ``max_precond_ratio``,
    ``maximize``, ``on_nonfinite``), each defaulting as in :class:`anon_hf.Anon`; the ranges are the class's to check.

    ``fused=True`` updates each tensor in one pass (``anon_hf.backends.fused``: a C++ kernel on CPU,
    ``torch.compile``'d graphs elsewhere), falling back to foreach where it cannot; ``None`` never builds or compiles
    anything (see :class:`anon_hf.Anon`). DTensor (FSDP2) tensors step on their local shards.

    ``storage=Blockwise8(sides)`` (``anon_hf.storage.blockwise8``, what :class:`anon_hf.Anon8bit` passes) says the
    state is 8-bit: the state lists hold codes, every tensor with a preconditioner or none does, and the steps are
    those of fp32 state decoded from the codes (see :func:`_run_8bit`).
    """
    hyper = _with_defaults(hyper)
    if preconds and len(preconds) != len(params):
        raise ValueError(
            f"preconds must be empty or have one tensor per param: got {len(preconds)} for {len(params)} params"
        )
    if hyper["on_nonfinite"] not in NONFINITE_POLICIES:
        raise ValueError(f"Invalid on_nonfinite value: {hyper['on_nonfinite']!r} (allowed: 'raise', 'skip')")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    backend = _backend(params, foreach, fused)
    if storage is not None:
        return _run_8bit(backend, [params, grads, exp_avgs, exp_avg_sqs, preconds], state_steps, hyper, storage)
    meshes = device_meshes(params)
    if not meshes:
        return _run(backend, [params, grads, exp_avgs, exp_avg_sqs, preconds], state_steps, hyper)
    # FSDP2 (DTensor) tensors step on their local shards: the update is elementwise, and only a refresh's verdict
    # needs the other ranks, so that all of them raise together or none does. The fused path agrees on the verdicts
    # it gathers before writing; the eager paths decide per tensor while writing, so they are asked first.
    lists = [local_shards(tensors) for tensors in (params, grads, exp_avgs, exp_avg_sqs, preconds)]
    with shards_of(meshes):
        if hyper["on_nonfinite"] == "raise" and not fused:
            _raise_if_any_rank_refreshes_nonfinite(lists, params, state_steps, hyper)
        try:
            return _run(backend, lists, state_steps, hyper)
        except NonFinitePreconditionerError as err:  # name the tensor by its whole shape, not this rank's shard's
            err.place(shape=tuple(params[err.tensor_index].shape))
            raise


def _with_defaults(hyper: dict[str, Any]) -> dict[str, Any]:
    """``hyper`` completed with the table's defaults; a missing ``lr``/``beta1``/``beta2`` or an unknown keyword raises
    ``TypeError`` as a Python signature would."""
    missing = [name for name in ("lr", "beta1", "beta2") if name not in hyper]
    if missing:
        raise TypeError(f"anon() missing required keyword argument {missing[0]!r}")
    unknown = sorted(set(hyper) - {"lr", "beta1", "beta2"} - set(_UPDATE_DEFAULTS))
    if unknown:
        raise TypeError(f"anon() got an unexpected keyword argument {unknown[0]!r}")
    return {**_UPDATE_DEFAULTS, **hyper}


def _run(backend: str, lists: list[list[Tensor]], state_steps: list[Tensor], hyper: dict[str, Any]) -> list[int]:
    """Step with ``backend`` (:func:`_backend`'s name). The fused backend returns the tensors it left over, which the
    foreach path steps next; it has already checked their refresh, so a raise still comes before any write."""
    if backend != "fused":
        step = _multi_tensor_anon if backend == "foreach" else _single_tensor_anon
        return step(*lists, state_steps, **hyper)
    from .backends.fused import _fused_anon  # imported on the first fused step: it pulls in torch.compile's machinery

    refreshed, left_over = _fused_anon(*lists, state_steps, **hyper)
    if not left_over:
        return refreshed
    picked = [[tensors[i] for i in left_over] if tensors else [] for tensors in lists]
    refreshed_eager = _multi_tensor_anon(*picked, [state_steps[i] for i in left_over], **hyper)
    return sorted(set(refreshed) | set(refreshed_eager))


def _run_8bit(
    backend: str, lists: list[list[Tensor]], state_steps: list[Tensor], hyper: dict[str, Any], storage: Blockwise8
) -> list[int]:
    """Step tensors with 8-bit state. With the fused backend, the tensors its 8-bit kernel and graphs take step there
    between refreshes, on their local shards (no collective is needed then); every other tensor is decoded to fp32
    temporaries, stepped by :func:`anon` and encoded again, one tensor at a time, so the extra memory is one tensor's
    fp32 state."""
    left_over: list[int] = list(range(len(lists[0])))
    if backend == "fused" and left_over:
        from .backends.fused import _fused_anon_8bit  # as in _run: imported on the first fused step

        left_over = _fused_anon_8bit(*(local_shards(t) for t in lists), state_steps, storage, **hyper)
    refreshed: list[int] = []
    for i in left_over:
        refreshed += _step_decoded(i, lists, state_steps, hyper, storage, fused=backend == "fused")
    return sorted(set(refreshed))


def _step_decoded(i, lists, state_steps, hyper, storage: Blockwise8, *, fused: bool) -> list[int]:
    """Tensor ``i`` of 8-bit ``lists``: decode, step through :func:`anon` (DTensors agree on a refresh's verdict
    there), encode. With ``fused``, CPU state is decoded and encoded by the 8-bit C++ extension's codecs and stepped by
    the fused backend; otherwise by ``anon_hf.storage.quant8``'s torch maps and the for-loop."""
    params, grads, *state = lists
    codes = storage.codes_of(i, state)
    codec = _cpu_codec() if fused and codes["exp_avg"].device.type == "cpu" else None
    decoded = storage.decoded(i, codes, codec)
    fp32_state = [[decoded[key]] if key in decoded else [] for key in QUANTIZED_KEYS]
    try:
        refreshed = anon(
            [params[i]],
            [grads[i]],
            *fp32_state,
            [state_steps[i]],
            foreach=False if codec is None else None,
            fused=codec is not None,
            **hyper,
        )
    except NonFinitePreconditionerError as err:  # name the tensor by its place in these lists
        err.place(tensor_index=i)
        raise
    # Between refreshes v is only read: its codes stay as they are, as in the kernel.
    for key, value in decoded.items():
        if key != "precond" or refreshed:
            storage.encode_(i, key, codes[key], value, codec)
    return refreshed


def _cpu_codec():
    """The 8-bit C++ extension if it runs here (its codecs decode and encode CPU state), else ``None``."""
    from .backends import cpu_kernel

    return cpu_kernel.kernel8() if cpu_kernel.kernel8_unavailable_reason() is None else None


def _backend(params: list[Tensor], foreach: bool | None, fused: bool | None) -> str:
    """The backend for these flags, ``"fused"``, ``"foreach"`` or ``"forloop"``: torch.optim's choice, with the fused
    path only when asked for."""
    if fused:
        return "fused"
    if foreach is None:
        foreach = _default_foreach(params)
    if foreach and torch.jit.is_scripting():
        raise RuntimeError("torch.jit.script not supported with foreach optimizers")
    return "foreach" if foreach else "forloop"


def _raise_if_any_rank_refreshes_nonfinite(lists, params, state_steps, hyper) -> None:
    """At a refresh, raise :class:`NonFinitePreconditionerError` on every rank when any rank's shard of a tensor
    would store a non-finite accumulator or preconditioner (one all-reduce per mesh dimension, within
    :func:`~anon_hf.distributed.dtensor.shards_of`; nothing written).

    ``lists``: the local shards of params, grads, exp_avgs, exp_avg_sqs, preconds; ``params`` the DTensors."""
    preconds = lists[4]
    due_at: dict[int, list[int]] = {}
    for i, step in enumerate(state_steps):
        if preconds and is_refresh_step(int(step.item()) + 1, hyper["refresh"]):
            due_at.setdefault(int(step.item()) + 1, []).append(i)
    if not due_at:
        return
    verdicts: dict[int, bool] = {}
    for step, indices in due_at.items():
        verdicts.update(refresh_verdicts(*lists, indices, step, **hyper))
    verdicts = agreed_verdicts(verdicts, lists[0][0].device)
    bad = sorted(i for i, ok in verdicts.items() if not ok)
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
