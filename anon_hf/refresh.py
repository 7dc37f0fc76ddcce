"""How a refresh rebuilds the preconditioner: the one place that decides the arithmetic, and its eager form.

Every path obeys :func:`refresh_mode`: the eager paths compute with :func:`refreshed_preconditioner` below, the
compiled graphs (``anon_hf.backends.fused.graphs``) and the C++ kernel (``csrc/anon_cpu.cpp``) receive the mode as an
argument and never choose one themselves. Per element, with ``s`` the accumulator at the refresh and ``v`` the
stored preconditioner:

* ``sigma = s / (1 - beta2**n) + eps``, ``n`` the steps since the previous refresh;
* ``u = sigma**gamma`` where the mean starts (the tensor's first refresh, ``beta3 == 0``, or, with
  ``keep_unseen``, an element whose ``v`` is still 0), else ``u = beta3 * v**-2 + (1 - beta3) * sigma**gamma``;
* the new preconditioner is ``u**-0.5``, except that with ``keep_unseen`` an element with ``s == 0`` (no gradient
  since the previous refresh) keeps ``v``.

``keep_unseen`` (the default) is what keeps sparse gradients safe: in the published rule an element with no gradient
gets ``sigma = eps`` and ``v = eps**(-gamma / 2)`` (1e8 at the defaults), which its first gradient then multiplies.
New state holds ``v = 0`` ("not seen yet"): such an element takes no step until a refresh has seen its gradient, then
starts its mean from that refresh, as the whole tensor does at step 1.

Between refreshes, :func:`limited_preconditioner` is what a step multiplies the first moment by (where
:func:`limit_applies`: ``gamma > 0``): ``v``, but at most
``max_ratio`` times ``sigma_t**(-gamma / 2)``, where ``sigma_t`` is the same estimate as a refresh's, taken over the
gradients since the last refresh (``max_precond_ratio``, 10 by default). ``v`` is the mean over earlier intervals; an
element whose gradients were tiny then and are large now (an embedding row of a rare token, the output row of a token
that appears late) would otherwise step by ``v * m``, thousands of times lr, until the next refresh. Adam's per-step
second moment bounds such a step; this is the same bound, applied only where ``v`` exceeds it by the ratio.

Nothing here imports anything but torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .distributed.dtensor import full
from .hyper import NONFINITE_POLICIES
from .schedule import RefreshSchedule, previous_refresh_step

__all__ = [
    "NONFINITE_POLICIES",
    "REFRESH_MODES",
    "NonFinitePreconditionerError",
    "StepRule",
    "inverse_bias_correction",
    "limit_applies",
    "limit_mode",
    "limited_preconditioner",
    "refresh_mode",
    "refreshed_preconditioner",
    "step_rule",
]

#: The ways to compute ``sigma**gamma``: ``"one"`` (gamma == 1: no power), ``"pow"`` (directly) and ``"log"`` (in log
#: space). The C++ kernel exports the same names with its own codes and is checked against this tuple when it loads.
REFRESH_MODES = ("one", "pow", "log")

# Below this eps, sigma can underflow fp32 (1e-46 is zero there) and u**-0.5 becomes inf.
_SMALLEST_DIRECT_EPS = 1e-30


def refresh_mode(gamma: float, eps: float) -> str:
    """How every path computes ``sigma**gamma`` for a group: one of :data:`REFRESH_MODES`.

    Directly when no intermediate can leave fp32's range: with ``|gamma| <= 1`` and ``eps >= 1e-30``, ``sigma**gamma``
    lies between ``1e-30`` and fp32's largest value. Otherwise in log space: for gamma = 3 and sigma near
    eps = 1e-16, ``sigma**gamma`` is 1e-48, which fp32 flushes to zero (and then ``v`` is inf), while its logarithm
    is an ordinary number.
    """
    if abs(gamma) <= 1.0 and eps >= _SMALLEST_DIRECT_EPS:
        return "one" if gamma == 1.0 else "pow"
    return "log"


def inverse_bias_correction(beta2: float, steps_since_refresh: int) -> float:
    """``1 / (1 - beta2**n)``: what the accumulator, ``n`` gradients after its last reset, is multiplied by to estimate
    the mean of ``g**2`` (``sigma = s * inverse_bias_correction + eps``)."""
    return 1.0 / (1.0 - beta2**steps_since_refresh)


def limit_applies(gamma: float, max_ratio: float | None) -> bool:
    """Whether steps between refreshes use :func:`limited_preconditioner`: a ratio is set and ``gamma > 0``. For
    ``gamma <= 0`` the preconditioner does not grow as gradients shrink (``v = sigma**(-gamma/2)``), so there is no
    large ``v`` for a large gradient to meet; the limit would instead stop the momentum of weights whose gradient
    paused."""
    return max_ratio is not None and gamma > 0.0


class StepRule(NamedTuple):
    """How a step between refreshes chooses, per element, the preconditioner it multiplies the first moment by.

    With ``est = sigma_t**(-gamma / 2)``, ``sigma_t = s / (1 - beta2**n) + eps`` (``s`` the accumulator ``n >= 1``
    gradients after its last reset, this step's included), an element uses:

    * ``est`` where ``late_seen`` and ``v == 0`` and ``s > 0`` (a weight no refresh has seen a gradient of yet steps
      from its first gradient, Adam-like; ``v`` itself still changes only at refreshes);
    * ``0`` where ``late_seen`` and ``v == 0`` and ``s == 0`` (no gradient yet: no step, and no ``0 * inf``);
    * ``min(v, max_ratio * est)`` elsewhere when ``limit``;
    * ``v`` otherwise.
    """

    estimate_mode: str | None  # how est is computed (one of REFRESH_MODES), None when no element needs it
    limit: bool
    late_seen: bool


def step_rule(gamma: float, eps: float, max_ratio: float | None, keep_unseen: bool) -> StepRule:
    """The :class:`StepRule` of a group: the limit where :func:`limit_applies`, the late-seen rule with
    ``keep_unseen`` (only then does ``v == 0`` mean "not seen yet"; the published rule, ``keep_unseen=False``, never
    stores 0 after step 1), and the group's :func:`refresh_mode` for ``est`` when either needs it."""
    limit = limit_applies(gamma, max_ratio)
    late_seen = bool(keep_unseen)
    return StepRule(refresh_mode(gamma, eps) if limit or late_seen else None, limit, late_seen)


def limit_mode(gamma: float, eps: float, max_ratio: float | None) -> str | None:
    """How the fused paths compute the limit's ``sigma**(-gamma / 2)`` between refreshes: the group's
    :func:`refresh_mode` where :func:`limit_applies`, else None (no limit)."""
    return refresh_mode(gamma, eps) if limit_applies(gamma, max_ratio) else None


def limited_preconditioner(
    exp_avg_sq: Tensor,
    precond: Tensor,
    *,
    steps_since_refresh: int,
    beta2: float,
    gamma: float,
    eps: float,
    max_ratio: float,
) -> Tensor:
    """The preconditioner a step between refreshes uses: ``min(v, max_ratio * sigma_t**(-gamma / 2))``.

    ``sigma_t = s / (1 - beta2**n) + eps`` with ``s`` the accumulator ``n >= 1`` gradients after its last reset (this
    step's included). ``exp_avg_sq`` and ``precond`` are of one shape (any dtypes); a new tensor in
    ``promote_types(precond.dtype, float32)``, the inputs are untouched. ``sigma_t**(-gamma / 2)`` may overflow to inf
    or underflow to 0 (gamma far from 0, tiny sigma): the minimum then keeps ``v``, or gives 0 where ``v`` is as small.
    """
    compute_dtype = torch.promote_types(precond.dtype, torch.float32)
    sigma = exp_avg_sq.to(compute_dtype).mul(inverse_bias_correction(beta2, steps_since_refresh)).add_(eps)
    limit = sigma.rsqrt_() if gamma == 1.0 else sigma.pow_(-0.5 * gamma)
    return torch.minimum(precond.to(compute_dtype), limit.mul_(max_ratio))


def refreshed_preconditioner(
    exp_avg_sq: Tensor,
    precond: Tensor,
    *,
    mode: str,
    steps_since_refresh: int,
    first: bool,
    beta2: float,
    gamma: float,
    eps: float,
    beta3: float,
    keep_unseen: bool,
) -> Tensor:
    """The new preconditioner (see the module docstring); a new tensor, the inputs are untouched.

    ``exp_avg_sq`` and ``precond`` are of one shape (any dtypes); ``first`` says whether this is the tensor's first
    refresh. Computes in ``promote_types(precond.dtype, float32)`` and returns a tensor of that dtype.
    """
    compute_dtype = torch.promote_types(precond.dtype, torch.float32)
    accumulator = exp_avg_sq.to(compute_dtype)
    previous = precond.to(compute_dtype)
    sigma = accumulator.mul(inverse_bias_correction(beta2, steps_since_refresh)).add_(eps)
    averaged = not first and beta3 > 0.0
    # Where v is still 0 the mean starts here: the averaged formula would read u_prev = 0**-2 = inf.
    seen = previous > 0 if averaged and keep_unseen else None
    if mode == "log":
        log_u = sigma.log_().mul_(gamma)
        if averaged:
            log_prev = previous.log().mul_(-2.0).add_(math.log(beta3))
            log_mean = torch.logaddexp(log_prev, log_u + math.log1p(-beta3))
            log_u = log_mean if seen is None else torch.where(seen, log_mean, log_u)
        new = log_u.mul_(-0.5).exp_()
    else:
        u = sigma if mode == "one" else sigma.pow_(gamma)
        if averaged:
            mean = u.mul(1.0 - beta3).add_(previous.pow(-2.0), alpha=beta3)
            u = mean if seen is None else torch.where(seen, mean, u)
        new = u.rsqrt_()
    return torch.where(accumulator == 0, previous, new) if keep_unseen else new


class NonFinitePreconditionerError(FloatingPointError):
    """A refresh produced a preconditioner with ``nan`` or ``inf`` entries.

    Raised before the bad preconditioner is stored (``on_nonfinite="raise"``, the default). ``group_index`` is
    filled in by :class:`anon_hf.Anon`; ``tensor_index`` is the position of the tensor in its param group.
    """

    def __init__(self, step: int, tensor_index: int, shape: tuple, group_index: int | None = None):
        self.step = step
        self.tensor_index = tensor_index
        self.shape = shape
        self.group_index = group_index
        super().__init__(step, tensor_index, shape, group_index)

    def __str__(self) -> str:
        group = "?" if self.group_index is None else self.group_index
        return (
            f"Anon: the preconditioner refreshed at step {self.step} for param group {group}, tensor "
            f"{self.tensor_index} (shape {tuple(self.shape)}) is not finite: a gradient since the previous refresh "
            "held nan or inf. Fix the gradients (gradient clipping, loss scaling, a lower lr), or pass "
            "on_nonfinite='skip' to keep the previous preconditioner for such tensors."
        )


def all_finite(tensor: Tensor) -> bool:
    """Whether every element is finite. A sum is one vectorized pass with no temporary (on CPU ~25x faster than
    ``isfinite().all()``) and is finite whenever every element is, unless it overflows; only then, or with a nan or
    inf present, does the elementwise check decide."""
    # On a DTensor a reduction is Partial: every rank must see the same verdict, so it is made whole.
    if bool(torch.isfinite(full(tensor.sum()))):
        return True
    return bool(full(torch.isfinite(tensor).all()))


def stored_refresh(
    exp_avg_sq: Tensor,
    precond: Tensor,
    step: int,
    *,
    refresh: RefreshSchedule,
    beta2: float,
    gamma: float,
    eps: float,
    beta3: float,
    keep_unseen: bool,
) -> Tensor:
    """The preconditioner a refresh at ``step`` stores: :func:`refreshed_preconditioner` in ``precond``'s dtype."""
    prev = previous_refresh_step(step, refresh)
    return refreshed_preconditioner(
        exp_avg_sq,
        precond,
        mode=refresh_mode(gamma, eps),
        steps_since_refresh=step - prev,
        first=prev == 0,
        beta2=beta2,
        gamma=gamma,
        eps=eps,
        beta3=beta3,
        keep_unseen=keep_unseen,
    ).to(precond.dtype)


def refresh_tensors_(
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    indices: list[int],
    step: int,
    *,
    on_nonfinite: str,
    tensor_positions: list[int] | None = None,
    **refresh_kwargs,
) -> None:
    """Refresh ``preconds[i]`` for ``i in indices`` (all at ``step``) and reset their accumulators.

    ``refresh_kwargs``: the keyword arguments of :func:`stored_refresh`.
    """
    for i in indices:
        new_precond = stored_refresh(exp_avg_sqs[i], preconds[i], step, **refresh_kwargs)
        # A non-finite accumulator poisons the running mean for good even where the power maps it to a finite
        # number (inf**-0.5 == 0), so both the input and the result, as it will be stored, are checked.
        if not (all_finite(exp_avg_sqs[i]) and all_finite(new_precond)):
            if on_nonfinite == "raise":
                position = i if tensor_positions is None else tensor_positions[i]
                raise NonFinitePreconditionerError(step, position, tuple(preconds[i].shape))
        else:
            preconds[i].copy_(new_precond)
        exp_avg_sqs[i].zero_()


def refresh_verdicts(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    indices: list[int],
    step: int,
    *,
    refresh: RefreshSchedule,
    beta2: float,
    gamma: float,
    eps: float,
    beta3: float,
    keep_unseen: bool,
    weight_decay: float,
    l2: bool,
    maximize: bool,
) -> dict[int, bool]:
    """Per tensor index, whether refreshing it at ``step`` with this step's gradient gives a finite accumulator and
    preconditioner as stored; writes nothing. The fused path asks this of the tensors it hands to the eager path, so
    that a raise leaves the whole step unwritten."""
    verdicts = {}
    for i in indices:
        precond = torch.view_as_real(preconds[i]) if torch.is_complex(preconds[i]) else preconds[i]
        compute = torch.promote_types(precond.dtype, torch.float32)
        grad = torch.view_as_real(grads[i]) if torch.is_complex(grads[i]) else grads[i]
        grad = grad.to(compute).neg() if maximize else grad.to(compute)
        if l2 and weight_decay != 0:
            param = torch.view_as_real(params[i]) if torch.is_complex(params[i]) else params[i]
            grad = grad.add(param.to(compute), alpha=weight_decay)
        exp_avg_sq = torch.view_as_real(exp_avg_sqs[i]) if torch.is_complex(exp_avg_sqs[i]) else exp_avg_sqs[i]
        exp_avg_sq = exp_avg_sq.to(compute).mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        new_precond = stored_refresh(
            exp_avg_sq,
            precond,
            step,
            refresh=refresh,
            beta2=beta2,
            gamma=gamma,
            eps=eps,
            beta3=beta3,
            keep_unseen=keep_unseen,
        )
        verdicts[i] = all_finite(exp_avg_sq) and all_finite(new_precond)
    return verdicts
