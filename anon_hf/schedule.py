"""When Anon refreshes its preconditioner, and the bias-correction arithmetic that goes with it.

Steps count from 1. A schedule is one of:

* ``"pow2"``: refresh at steps 1, 2, 4, 8, ... (the paper's schedule);
* ``"every"``: refresh at every step;
* an ``int`` N >= 1: refresh at step 1 and at every multiple of N (``1`` is the same as ``"every"``).

Everything here is plain Python on integers, so a refresh test never touches a device.
"""

from __future__ import annotations

__all__ = [
    "RefreshSchedule",
    "gradients_since_refresh",
    "is_refresh_step",
    "previous_refresh_step",
    "refresh_steps",
    "validate_refresh",
]

RefreshSchedule = str | int

_NAMED_SCHEDULES = ("pow2", "every")


def validate_refresh(refresh: object) -> RefreshSchedule:
    """Return ``refresh`` if it names a schedule, else raise ``ValueError`` listing the allowed values."""
    if isinstance(refresh, str) and refresh in _NAMED_SCHEDULES:
        return refresh
    if isinstance(refresh, int) and not isinstance(refresh, bool) and refresh >= 1:
        return refresh
    raise ValueError(
        f"Invalid refresh value: {refresh!r} (allowed: 'pow2', 'every', or an integer N >= 1 to refresh every N steps)"
    )


def is_refresh_step(step: int, refresh: RefreshSchedule) -> bool:
    """Whether the preconditioner is rebuilt at ``step`` (1-based), before that step's update."""
    if step < 1:
        return False
    if refresh == "pow2":
        return step & (step - 1) == 0
    if refresh == "every":
        return True
    return step == 1 or step % refresh == 0


def previous_refresh_step(step: int, refresh: RefreshSchedule) -> int:
    """The last refresh strictly before ``step`` (0 when there was none).

    ``step - previous_refresh_step(step)`` is the number of gradients the accumulator ``exp_avg_sq`` has seen
    since it was last reset, which is what its bias correction ``1 - beta2**n`` needs.
    """
    if step <= 1:
        return 0
    if refresh == "pow2":
        return 1 << ((step - 1).bit_length() - 1)
    if refresh == "every":
        return step - 1
    return max(1, ((step - 1) // refresh) * refresh)


def gradients_since_refresh(step: int, refresh: RefreshSchedule) -> int:
    """How many gradients the accumulator holds at ``step`` (this step's included): ``n`` in its bias correction
    ``1 - beta2**n``."""
    return step - previous_refresh_step(step, refresh)


def refresh_steps(last_step: int, refresh: RefreshSchedule) -> list[int]:
    """All refresh steps in ``1..last_step``; for documentation, logging and tests."""
    return [t for t in range(1, last_step + 1) if is_refresh_step(t, refresh)]
