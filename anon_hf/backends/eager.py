"""The eager backends: :func:`_single_tensor_anon` (a per-tensor loop) and :func:`_multi_tensor_anon`
(``torch._foreach_*`` kernels over tensors grouped by device and dtype), in the shape of ``torch.optim.adam``.

Both share one signature and one refresh routine, :func:`anon_hf.refresh.refreshed_preconditioner`, so they differ
only in how the per-step arithmetic is batched. :func:`anon_hf.functional.anon` dispatches to them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..refresh import inverse_bias_correction, refresh_tensors_, step_preconditioners, step_rule, unseen_flags
from ..schedule import RefreshSchedule, gradients_since_refresh, is_refresh_step

__all__ = ["_multi_tensor_anon", "_single_tensor_anon"]


def _single_tensor_anon(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    refresh: RefreshSchedule,
    beta3: float,
    keep_unseen: bool,
    max_precond_ratio: float | None,
    bounds: tuple[float | None, float | None] | None,
    maximize: bool,
    on_nonfinite: str,
) -> list[int]:
    preconditioned = len(preconds) > 0
    refreshed = []
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        exp_avg = exp_avgs[i]
        step_t = state_steps[i]
        if torch.is_complex(param):
            param, grad, exp_avg = torch.view_as_real(param), torch.view_as_real(grad), torch.view_as_real(exp_avg)

        step_t += 1
        step = int(step_t.item())

        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        # State stored in another dtype than its param (precond_dtype / moments_dtype) is updated in `compute`
        # and rounded once into its storage; `update` is the first moment in the dtype the param update uses.
        compute = _compute_dtype(params[i], [exp_avgs[i]] + ([exp_avg_sqs[i], preconds[i]] if preconditioned else []))
        if compute is None:
            exp_avg.lerp_(grad, 1 - beta1)
            update = exp_avg
        else:
            grad = grad.to(compute)
            update = exp_avg.to(compute).lerp_(grad, 1 - beta1)
            exp_avg.copy_(update)
        step_size = lr / (1 - beta1**step)
        if not preconditioned:
            param.add_(update, alpha=-step_size)
        else:
            exp_avg_sq, precond = exp_avg_sqs[i], preconds[i]
            if torch.is_complex(exp_avg_sq):
                exp_avg_sq, precond = torch.view_as_real(exp_avg_sq), torch.view_as_real(precond)
            if compute is None:
                exp_avg_sq_c = exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            else:
                exp_avg_sq_c = exp_avg_sq.to(compute).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                exp_avg_sq.copy_(exp_avg_sq_c)
            used = precond if compute is None else precond.to(compute)
            if is_refresh_step(step, refresh):
                refresh_tensors_(
                    [exp_avg_sq],
                    [precond],
                    [0],
                    step,
                    refresh=refresh,
                    beta2=beta2,
                    gamma=gamma,
                    eps=eps,
                    beta3=beta3,
                    keep_unseen=keep_unseen,
                    on_nonfinite=on_nonfinite,
                    tensor_positions=[i],
                )
                refreshed.append(step)
                used = precond if compute is None else precond.to(compute)
            else:
                rule = dict(beta2=beta2, gamma=gamma, eps=eps, keep_unseen=keep_unseen, max_ratio=max_precond_ratio)
                used = _between_refreshes([exp_avg_sq_c], [used], [precond], [step], refresh=refresh, **rule)[0]
            param.addcmul_(update, used, value=-step_size)

        if bounds is not None:
            param.clamp_(min=bounds[0], max=bounds[1])
    return sorted(set(refreshed))


def _refresh_due_(
    exp_avg_sqs: list[Tensor], preconds: list[Tensor], steps: list[int], positions: list[int], **refresh_kwargs
) -> set[int]:
    """Refresh the tensors whose step (``steps[i]``, already advanced) is a refresh step, those at one step together;
    ``positions`` maps list indices to the caller's, for error messages. Returns the steps refreshed."""
    refresh_at: dict[int, list[int]] = {}
    for i, step in enumerate(steps):
        if is_refresh_step(step, refresh_kwargs["refresh"]):
            refresh_at.setdefault(step, []).append(i)
    for step, indices in refresh_at.items():
        refresh_tensors_(exp_avg_sqs, preconds, indices, step, tensor_positions=positions, **refresh_kwargs)
    return set(refresh_at)


def _between_refreshes(
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    stored_preconds: list[Tensor],
    steps: list[int],
    *,
    refresh: RefreshSchedule,
    beta2: float,
    gamma: float,
    eps: float,
    keep_unseen: bool,
    max_ratio: float | None,
) -> list[Tensor]:
    """``preconds`` (in the compute dtype) with each tensor not refreshed at its step (``steps[i]``, already advanced)
    replaced by what :class:`anon_hf.refresh.StepRule` makes of it, all in one batch; a refreshed one is used as
    stored (its accumulator was just reset, and ``v`` was built from this interval's gradients). ``stored_preconds``
    are the state tensors themselves (for :func:`anon_hf.refresh.unseen_flags`'s cache)."""
    rule = step_rule(gamma, eps, max_ratio, keep_unseen)
    if rule.estimate_mode is None:
        return list(preconds)
    between = [i for i, step in enumerate(steps) if not is_refresh_step(step, refresh)]
    if not between:
        return list(preconds)
    inv_bias2s = [inverse_bias_correction(beta2, gradients_since_refresh(steps[i], refresh)) for i in between]
    unseen = unseen_flags([stored_preconds[i] for i in between]) if rule.late_seen else [False] * len(between)
    chosen = step_preconditioners(
        [exp_avg_sqs[i] for i in between],
        [preconds[i] for i in between],
        inv_bias2s,
        unseen,
        rule=rule,
        gamma=gamma,
        eps=eps,
        max_ratio=max_ratio,
    )
    used = list(preconds)
    for i, value in zip(between, chosen, strict=True):
        used[i] = value
    return used


# Elements per chunk of the param update when a step computes preconditioners: the temporaries of one chunk are
# freed before the next is computed, so the allocator hands the same memory back instead of mapping fresh pages.
_CHUNK_NUMEL = 1 << 21


def _chunks(params: list[Tensor], estimate_mode: str | None) -> list[list[int]]:
    """Indices of ``params`` in consecutive runs of at most :data:`_CHUNK_NUMEL` elements (a larger tensor alone),
    or all in one run when the step computes no estimate (no temporaries)."""
    if estimate_mode is None:
        return [list(range(len(params)))]
    chunks: list[list[int]] = [[]]
    numel = 0
    for i, param in enumerate(params):
        if chunks[-1] and numel + param.numel() > _CHUNK_NUMEL:
            chunks.append([])
            numel = 0
        chunks[-1].append(i)
        numel += param.numel()
    return chunks


def _foreach_update_params_(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    preconds: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    bounds: tuple[float | None, float | None] | None,
) -> None:
    """``p -= lr * v * m / (1 - beta1**t)`` (``v = 1`` when ``preconds`` is empty), then the clamp to ``bounds``."""
    if len(set(steps)) == 1:
        step_size = lr / (1 - beta1 ** steps[0])
        if preconds:
            torch._foreach_addcmul_(params, exp_avgs, preconds, value=-step_size)
        else:
            torch._foreach_add_(params, exp_avgs, alpha=-step_size)
    else:
        # Tensors skipped on earlier steps (grad None) lag behind: each needs its own bias correction.
        neg_step_sizes = [-lr / (1 - beta1**step) for step in steps]
        updates = torch._foreach_mul(exp_avgs, preconds) if preconds else list(exp_avgs)
        updates = torch._foreach_mul(updates, neg_step_sizes)
        torch._foreach_add_(params, updates)
    if bounds is not None:
        if bounds[0] is not None:
            torch._foreach_clamp_min_(params, bounds[0])
        if bounds[1] is not None:
            torch._foreach_clamp_max_(params, bounds[1])


def _multi_tensor_anon(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    refresh: RefreshSchedule,
    beta3: float,
    keep_unseen: bool,
    max_precond_ratio: float | None,
    bounds: tuple[float | None, float | None] | None,
    maximize: bool,
    on_nonfinite: str,
) -> list[int]:
    if len(params) == 0:
        return []
    preconditioned = len(preconds) > 0
    tensor_lists = [params, grads, exp_avgs, state_steps]
    if preconditioned:
        tensor_lists += [exp_avg_sqs, preconds]
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(tensor_lists, with_indices=True)

    refreshed: set[int] = set()
    for device_lists, original_indices in grouped.values():
        device_params, device_grads, device_exp_avgs, device_steps = device_lists[:4]
        device_exp_avg_sqs, device_preconds = device_lists[4:] if preconditioned else ([], [])
        compute = _compute_dtype(device_params[0], device_exp_avgs + device_exp_avg_sqs + device_preconds)
        if any(torch.is_complex(p) for p in device_params):
            views = [device_params, device_grads, device_exp_avgs, device_exp_avg_sqs, device_preconds]
            device_params, device_grads, device_exp_avgs, device_exp_avg_sqs, device_preconds = (
                [torch.view_as_real(t) if torch.is_complex(t) else t for t in tensors] for tensors in views
            )

        if maximize:
            device_grads = torch._foreach_neg(device_grads)

        torch._foreach_add_(device_steps, 1)
        steps = [int(s.item()) for s in device_steps]

        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(device_params, 1 - lr * weight_decay)
            elif maximize:
                torch._foreach_add_(device_grads, device_params, alpha=weight_decay)
            else:
                device_grads = torch._foreach_add(device_grads, device_params, alpha=weight_decay)

        # State stored in another dtype than the params (precond_dtype / moments_dtype) is updated in `compute`
        # and rounded once into its storage; the param update reads the `compute` copies.
        if compute is not None:
            device_grads = [g.to(compute) for g in device_grads]
        exp_avgs_c = device_exp_avgs if compute is None else [m.to(compute) for m in device_exp_avgs]
        torch._foreach_lerp_(exp_avgs_c, device_grads, 1 - beta1)
        if compute is not None:
            torch._foreach_copy_(device_exp_avgs, exp_avgs_c)

        if preconditioned:
            sqs_c = device_exp_avg_sqs if compute is None else [s.to(compute) for s in device_exp_avg_sqs]
            torch._foreach_mul_(sqs_c, beta2)
            torch._foreach_addcmul_(sqs_c, device_grads, device_grads, value=1 - beta2)
            if compute is not None:
                torch._foreach_copy_(device_exp_avg_sqs, sqs_c)
            refreshed |= _refresh_due_(
                device_exp_avg_sqs,
                device_preconds,
                steps,
                original_indices,
                refresh=refresh,
                beta2=beta2,
                gamma=gamma,
                eps=eps,
                beta3=beta3,
                keep_unseen=keep_unseen,
                on_nonfinite=on_nonfinite,
            )
        rule = dict(beta2=beta2, gamma=gamma, eps=eps, keep_unseen=keep_unseen, max_ratio=max_precond_ratio)
        mode = step_rule(gamma, eps, max_precond_ratio, keep_unseen).estimate_mode if preconditioned else None
        for chunk in _chunks(device_params, mode):
            preconds_c = []
            if preconditioned:
                preconds_c = [device_preconds[i] if compute is None else device_preconds[i].to(compute) for i in chunk]
                sqs_chunk, stored = [sqs_c[i] for i in chunk], [device_preconds[i] for i in chunk]
                steps_chunk = [steps[i] for i in chunk]
                preconds_c = _between_refreshes(sqs_chunk, preconds_c, stored, steps_chunk, refresh=refresh, **rule)
            _foreach_update_params_(
                [device_params[i] for i in chunk],
                [exp_avgs_c[i] for i in chunk],
                preconds_c,
                [steps[i] for i in chunk],
                lr=lr,
                beta1=beta1,
                bounds=bounds,
            )
    return sorted(refreshed)


def _compute_dtype(param: Tensor, state: list[Tensor]) -> torch.dtype | None:
    """``None`` when ``param`` and all of ``state`` share a dtype of at least fp32 (update in place), else the dtype
    to compute in: at least fp32, so 16-bit params and state are updated in fp32 and rounded once on store, as the
    fused paths do."""
    if all(tensor.dtype == param.dtype for tensor in state) and param.dtype not in (torch.float16, torch.bfloat16):
        return None
    return torch.promote_types(param.dtype, torch.float32)
