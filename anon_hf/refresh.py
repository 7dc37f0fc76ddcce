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
New state holds ``v = 0`` ("not seen yet"); a refresh that sees the element's gradient starts its mean there, as the
whole tensor does at step 1.

Between refreshes, :class:`StepRule` (:func:`step_rule`, computed by :func:`step_preconditioners`) says what a step
multiplies the first moment by, per element. Both of its parts use the estimate ``est = sigma_t**(-gamma / 2)``,
``sigma_t`` the same estimate as a refresh's, taken over the gradients since the last refresh:

* **late-seen** (with ``keep_unseen``): where ``v`` is still 0 and a gradient has arrived since the last refresh
  (``s > 0``), the step uses ``est``, Adam-like, so a weight first seen at step T moves from T (an embedding row of a
  token that appears late, rows added by ``resize_token_embeddings``, an expert the router starts using) instead of
  standing still until the next refresh, which may be T steps away. ``v`` itself still changes only at refreshes.
* **the limit** (``max_precond_ratio``, 10 by default, where :func:`limit_applies`: ``gamma > 0``): elsewhere the
  step uses ``min(v, max_ratio * est)``. ``v`` is the mean over earlier intervals; an element whose gradients were
  tiny then and are large now (an embedding row of a rare token, the output row of a token that appears late) would
  otherwise step by ``v * m``, thousands of times lr, until the next refresh. Adam's per-step second moment bounds
  such a step; this is the same bound, applied only where ``v`` exceeds it by the ratio.

The published rule (``keep_unseen=False, max_precond_ratio=None``) uses ``v`` unchanged.

Nothing here imports anything but torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .distributed.dtensor import full, local, local_shards
from .hyper import NONFINITE_POLICIES
from .schedule import RefreshSchedule, previous_refresh_step

__all__ = [
    "NONFINITE_POLICIES",
    "REFRESH_MODES",
    "NonFinitePreconditionerError",
    "StepRule",
    "as_real",
    "inverse_bias_correction",
    "limit_applies",
    "refresh_mode",
    "refreshed_preconditioner",
    "step_preconditioners",
    "step_rule",
    "unseen_flags",
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
    """Whether steps between refreshes take the limit of :class:`StepRule`: a ratio is set and ``gamma > 0``. For
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

    ``est`` is the estimate the next refresh starts such an element's mean from (over fewer gradients), so the step
    does not jump when the refresh comes. That holds for every gamma: for ``gamma <= 0`` ``est = sigma_t**(|gamma|/2)``
    grows with the gradient's size, as ``v`` does at a refresh (at gamma = 0 it is 1, SGD's step); only the limit is
    off there (:func:`limit_applies`).
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


def step_preconditioners(
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    inv_bias2s: list[float],
    unseen: list[bool],
    *,
    rule: StepRule,
    gamma: float,
    eps: float,
    max_ratio: float | None,
    skip_unbound: bool = False,
) -> list[Tensor]:
    """What each tensor's step between refreshes multiplies its first moment by, as :class:`StepRule` defines it.

    Parallel lists of one device and dtype (at least fp32): ``exp_avg_sqs[i]`` the accumulator ``n_i >= 1`` gradients
    after its last reset (this step's included), ``preconds[i]`` the stored ``v``, ``inv_bias2s[i]`` its
    :func:`inverse_bias_correction`, ``unseen[i]`` whether ``v`` holds a 0 (:func:`unseen_flags`; only there can the
    late-seen rule change anything). Returns a list of that length: ``preconds[i]`` itself where the rule leaves
    ``v`` as it is, else a new tensor; the inputs are untouched.

    The work is batched: the limit is a few ``torch._foreach_*`` ops over every tensor, and the late-seen rule a few
    more over the tensors with a 0 in ``v`` only. With ``skip_unbound`` (for the eager paths' CPU pieces, which hold
    their data in cache; elsewhere the test's read-back would stall the device), the limit first tests, per tensor,
    whether it can bind anywhere (:func:`_limit_cannot_bind`, gamma == 1 only) and leaves ``v`` itself to the tensors
    where it cannot: the same bits, without a root per element.
    """
    used = list(preconds)
    if rule.estimate_mode is None:
        return used
    late = [i for i, flag in enumerate(unseen) if flag and rule.late_seen]
    limited = [i for i in range(len(preconds)) if i not in set(late)] if rule.limit else []
    estimate = dict(mode=rule.estimate_mode, gamma=gamma, eps=eps)
    if limited and skip_unbound and rule.estimate_mode == "one":
        unbound = _limit_cannot_bind(*_picker(limited, exp_avg_sqs, preconds, inv_bias2s), eps=eps, scale=max_ratio)
        limited = [i for i, skip in zip(limited, unbound, strict=True) if not skip]
    if limited:
        pick = _picker(limited, exp_avg_sqs, preconds, inv_bias2s)
        bounds = _estimates(pick[0], pick[2], scale=max_ratio, **estimate)
        torch._foreach_minimum_(bounds, pick[1])
        for i, bound in zip(limited, bounds, strict=True):
            used[i] = bound
    if late:
        sqs, late_preconds, late_inv_bias2s = _picker(late, exp_avg_sqs, preconds, inv_bias2s)
        estimates = _estimates(sqs, late_inv_bias2s, scale=1.0, **estimate)
        # est where s > 0, exactly 0 where s == 0 (est is finite, so 0 * est is 0, never nan).
        chosen = torch._foreach_sign(sqs)
        torch._foreach_mul_(chosen, estimates)
        # v where v > 0: lerp with a weight of exactly 1 returns its end and with 0 its start, bit for bit.
        torch._foreach_lerp_(chosen, late_preconds, torch._foreach_sign(late_preconds))
        if rule.limit:
            # The bound computed as for the tensors above, so that an element's bits do not depend on whether its
            # tensor holds a 0; min(est, bound) is est up to rounding (max_ratio >= 1), and min(0, .) is 0.
            torch._foreach_minimum_(chosen, _estimates(sqs, late_inv_bias2s, scale=max_ratio, **estimate))
        for i, value in zip(late, chosen, strict=True):
            used[i] = value
    return used


# How far below 1 _limit_cannot_bind keeps v**2 * x, x the value the limit takes rsqrt of. The test's w carries at
# most 7 roundings (v*v and the floor added to it, c/eps to the dtype, the two products of addcmul and its sum, all
# of terms >= 0; a product that falls below the smallest normal errs by at most 2**-149 against w >= 2**-126, one
# rounding more) and x at most 4, each a relative 2**-24 in fp32 (6e-8; fp64's are smaller). A passing element
# thus has v**2 * x < (1 - 1e-5) * (1 + 1e-6) < 1 - 8e-6, i.e. v < (1 - 4e-6) * x**-0.5, while torch's rsqrt
# (1 / sqrt: two correctly rounded ops on every ISA) lies within 2 roundings of x**-0.5. So v < rsqrt(x) strictly,
# and minimum returns v's own bits. An element within the margin of binding only sends its tensor down the full
# computation.
_UNBOUND_MARGIN = 1e-5


def _limit_cannot_bind(
    exp_avg_sqs: list[Tensor], preconds: list[Tensor], inv_bias2s: list[float], *, eps: float, scale: float
) -> list[bool]:
    """Per tensor, whether the limit of mode "one" (gamma == 1), ``min(v, rsqrt(x))`` with
    ``x = s * (c / scale**2) + eps / scale**2``, is exactly ``v`` in every element, so that its root and minimum can
    be skipped.

    Parallel lists as :func:`step_preconditioners`' (``s``, ``v`` of one device and dtype, at least fp32; ``c`` the
    inverse bias corrections); reads them, writes nothing. A DTensor answers for its local shard, with no collective
    (the limit is elementwise). Costs two elementwise passes and two reductions, read back to the host.
    """
    if eps * scale**-2 < _SMALLEST_DIRECT_EPS:  # _estimates' other form (x unscaled, times scale after the root)
        return [False] * len(preconds)
    sqs, precs = local_shards(exp_avg_sqs), local_shards(preconds)
    # w = (floor + v**2) * (1 + s * c / eps) >= v**2 * x * scale**2 / eps: the limit binds where v**2 * x > 1. The
    # floor (the smallest normal) keeps w normal, and makes w at least 4 * scale**2 / eps wherever s * c / scale**2
    # reaches the dtype's largest value, x is inf and rsqrt(x) == 0 (which min would pick over v, or tie with it), even
    # where v == 0. nan in s or v makes w nan, and amax propagates it.
    floor = torch.tensor(torch.finfo(precs[0].dtype).tiny, dtype=precs[0].dtype, device=precs[0].device)
    w = [torch.addcmul(floor, v, v) for v in precs]
    torch._foreach_addcmul_(w, w, sqs, [c / eps for c in inv_bias2s])
    # s >= 0 keeps x >= eps / scale**2 > 0 (eps >= 1e-30 in mode "one"): a negative accumulator, whose x may be
    # negative (rsqrt nan), is computed as before. An empty tensor has no element where the limit could bind.
    stats = [[float(q.amax()), float(s.amin())] if q.numel() else [0.0, 0.0] for q, s in zip(w, sqs, strict=True)]
    bound = (1 - _UNBOUND_MARGIN) * scale**2 / eps
    return [peak <= bound and low >= 0 for peak, low in stats]


def _picker(indices: list[int], *lists: list) -> list[list]:
    return [[values[i] for i in indices] for values in lists]


def _estimates(
    exp_avg_sqs: list[Tensor], inv_bias2s: list[float], *, mode: str, gamma: float, eps: float, scale: float
) -> list[Tensor]:
    """``scale * sigma_t**(-gamma / 2)`` per tensor (new tensors), computed as :func:`refresh_mode` ``mode`` says;
    never inf (the largest finite value instead), so that multiplying it by 0 gives 0."""
    if mode == "one" and eps * scale**-2 >= _SMALLEST_DIRECT_EPS:
        # scale / sqrt(sigma) == 1 / sqrt(sigma / scale**2): the scale costs no pass of its own.
        factor = scale**-2
        sigmas = torch._foreach_mul(exp_avg_sqs, [c * factor for c in inv_bias2s])
        torch._foreach_add_(sigmas, eps * factor)
        torch._foreach_rsqrt_(sigmas)
        return sigmas
    sigmas = torch._foreach_mul(exp_avg_sqs, inv_bias2s)
    torch._foreach_add_(sigmas, eps)
    if mode == "one":
        torch._foreach_rsqrt_(sigmas)
    elif mode == "pow":
        torch._foreach_pow_(sigmas, -0.5 * gamma)
    else:
        torch._foreach_log_(sigmas)
        torch._foreach_mul_(sigmas, -0.5 * gamma)
        torch._foreach_exp_(sigmas)
    if scale != 1.0:
        torch._foreach_mul_(sigmas, scale)
    if mode == "log":  # the only mode whose estimate can overflow fp32 (|gamma| > 1 or eps < 1e-30)
        torch._foreach_clamp_max_(sigmas, torch.finfo(sigmas[0].dtype).max)
    return sigmas


# Per stored preconditioner: (its version counter, the piece size asked for, the answer). v changes only at refreshes,
# so the check runs once per refresh interval, not once per step.
_unseen_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()


def unseen_flags(preconds: list[Tensor], piece_numel: int | None = None) -> list:
    """Per stored preconditioner, whether it holds a 0 ("not seen yet"): one pass over ``v`` after each time ``v``
    changes (in place or by a new tensor), a cached answer otherwise. With ``piece_numel``, per preconditioner a tuple
    instead: whether each consecutive flat piece of ``piece_numel`` elements (the last one shorter) holds a 0, so that
    the pieces without one skip the late-seen rule's work. A DTensor answers for its local shard, with no collective:
    the late-seen rule is elementwise, so each rank may decide for its own elements."""
    flags = []
    for precond in preconds:
        try:
            version = precond._version
        except RuntimeError:  # an inference-mode tensor keeps no version counter
            version = None
        cached = _unseen_cache.get(precond)
        if version is not None and cached is not None and cached[:2] == (version, piece_numel):
            flags.append(cached[2])
            continue
        answer = _holds_zero(local(precond), piece_numel)
        if version is not None:
            _unseen_cache[precond] = (version, piece_numel, answer)
        flags.append(answer)
    return flags


def _holds_zero(precond: Tensor, piece_numel: int | None) -> bool | tuple[bool, ...]:
    zero = torch.eq(precond, 0)
    if piece_numel is None:
        return bool(zero.any())
    flat = zero.reshape(-1)
    return tuple(
        bool(flat[start : start + piece_numel].any()) for start in range(0, max(flat.numel(), 1), piece_numel)
    )


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
    ``args`` is ``(step, tensor_index, shape, group_index)``.
    """

    def __init__(self, step: int, tensor_index: int, shape: tuple, group_index: int | None = None):
        self.step = step
        self.tensor_index = tensor_index
        self.shape = shape
        self.group_index = group_index
        super().__init__(step, tensor_index, shape, group_index)

    def place(
        self, *, tensor_index: int | None = None, shape: tuple | None = None, group_index: int | None = None
    ) -> None:
        """Say where the tensor is in the caller's terms, as the error passes up from a sub-list, a shard or a
        group's step: each field given replaces the one held, and ``args`` follows."""
        if tensor_index is not None:
            self.tensor_index = tensor_index
        if shape is not None:
            self.shape = shape
        if group_index is not None:
            self.group_index = group_index
        self.args = (self.step, self.tensor_index, self.shape, self.group_index)

    def __str__(self) -> str:
        group = "?" if self.group_index is None else self.group_index
        return (
            f"Anon: the preconditioner refreshed at step {self.step} for param group {group}, tensor "
            f"{self.tensor_index} (shape {tuple(self.shape)}) is not finite: a gradient since the previous refresh "
            "held nan or inf. Fix the gradients (gradient clipping, loss scaling, a lower lr), or pass "
            "on_nonfinite='skip' to keep the previous preconditioner for such tensors."
        )


def all_finite(tensor: Tensor) -> bool:
    """Whether every element is finite. A sum is one vectorized pass with no temporary (``isfinite().all()`` writes a
    bool per element first) and is finite whenever every element is, unless it overflows; only then, or with a nan or
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
    **hyper,
) -> dict[int, bool]:
    """Per tensor index, whether refreshing it at ``step`` with this step's gradient gives a finite accumulator and
    preconditioner as stored; writes nothing. ``hyper``: the update's keyword arguments (those of
    :func:`anon_hf.functional.anon`, defaults filled in; the others are ignored). The fused path asks this of the
    tensors it hands to the eager path, and FSDP2's eager path of every tensor, so that a raise leaves the whole step
    unwritten."""
    refresh_kwargs = {key: hyper[key] for key in ("refresh", "beta2", "gamma", "eps", "beta3", "keep_unseen")}
    weight_decay = hyper["weight_decay"] if not hyper["decoupled_weight_decay"] else 0.0
    verdicts = {}
    for i in indices:
        precond = as_real(preconds[i])
        compute = torch.promote_types(precond.dtype, torch.float32)
        grad = as_real(grads[i]).to(compute)
        grad = grad.neg() if hyper["maximize"] else grad
        if weight_decay != 0:
            grad = grad.add(as_real(params[i]).to(compute), alpha=weight_decay)
        exp_avg_sq = (
            as_real(exp_avg_sqs[i]).to(compute).mul(hyper["beta2"]).addcmul_(grad, grad, value=1 - hyper["beta2"])
        )
        new_precond = stored_refresh(exp_avg_sq, precond, step, **refresh_kwargs)
        verdicts[i] = all_finite(exp_avg_sq) and all_finite(new_precond)
    return verdicts


def as_real(tensor: Tensor) -> Tensor:
    """A complex tensor as its real view (every rule here is elementwise over real and imaginary parts), another
    tensor as it is."""
    return torch.view_as_real(tensor) if torch.is_complex(tensor) else tensor
