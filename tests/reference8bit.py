"""A literal 8-bit Anon: ``tests/reference.py``'s ReferenceAnon whose state goes through 8-bit codes after each step.

Written from the format description in ``docs/performance.md`` ("8-bit state"), sharing no code with ``anon_hf``:
the code tables are listed value by value, a value is rounded to the nearest table entry by search (ties to the
larger magnitude), and all arithmetic is in Python floats. Quantization follows each step as the optimizer does it:
m and s after every step, the preconditioner after each refresh (the step that refreshes uses the fresh v; the
8-bit copy serves the steps until the next refresh and is the ``u_prev`` of that refresh).
"""

from __future__ import annotations

import bisect
import math

from reference import ReferenceAnon

BLOCK = 256


def _float8_magnitudes(mantissa_bits: int, smallest_exponent: int, first_mantissa: int) -> list[float]:
    """Ascending magnitudes in (0, 1]: (1 + k / 2**mantissa_bits) * 2**e for e from ``smallest_exponent`` to -1,
    starting at mantissa ``first_mantissa`` in the lowest binade, then 1.0."""
    values = []
    for e in range(smallest_exponent, 0):
        for k in range(first_mantissa if e == smallest_exponent else 0, 2**mantissa_bits):
            values.append((1 + k / 2**mantissa_bits) * 2.0**e)
    return values + [1.0]


# exp_avg: sign + 127 magnitudes from 1.25 * 2**-16 to 1; exp_avg_sq: 255 from 1.25 * 2**-32 to 1.
M_TABLE = [0.0] + _float8_magnitudes(3, -16, 2)
S_TABLE = _float8_magnitudes(3, -32, 2)
assert len(M_TABLE) == 128 and len(S_TABLE) == 255


def _nearest(x: float, table: list[float]) -> float:
    i = bisect.bisect_left(table, x)
    candidates = table[max(i - 1, 0) : i + 1]
    return min(candidates, key=lambda c: (abs(c - x), -c))


def roundtrip_exp_avg(values: list[float]) -> list[float]:
    out = []
    for start in range(0, len(values), BLOCK):
        block = values[start : start + BLOCK]
        absmax = max(abs(x) for x in block)
        for x in block:
            magnitude = _nearest(abs(x) / absmax, M_TABLE) * absmax if absmax > 0 else 0.0
            out.append(-magnitude if x < 0 else magnitude)
    return out


def roundtrip_exp_avg_sq(values: list[float]) -> list[float]:
    out = []
    for start in range(0, len(values), BLOCK):
        block = values[start : start + BLOCK]
        top = max(block)
        # Exactly 0 stays 0; any positive value, however small, keeps at least the smallest code.
        out += [_nearest(x / top, S_TABLE) * top if x > 0 else 0.0 for x in block]
    return out


def roundtrip_precond(values: list[float]) -> list[float]:
    out = []
    for start in range(0, len(values), BLOCK):
        block = values[start : start + BLOCK]
        logs = [math.log2(v) for v in block if v > 0]
        low, high = (min(logs), max(logs)) if logs else (0.0, 0.0)
        step = (high - low) / 254
        for v in block:
            if v <= 0:
                out.append(0.0)
                continue
            code = 1 + (round((math.log2(v) - low) / step) if step > 0 else 0)
            out.append(2.0 ** (low + (code - 1) * step))
    return out


class ReferenceAnon8bit(ReferenceAnon):
    """ReferenceAnon with 8-bit state for tensors of at least ``min_8bit_size`` elements."""

    def __init__(self, params, *, min_8bit_size: int = 4096, **kwargs):
        super().__init__(params, **kwargs)
        self.quantized = [len(p) >= min_8bit_size for p in params]

    def step(self, grads):
        before = len(self.refreshes)
        super().step(grads)
        refreshed = len(self.refreshes) > before
        for k, quantized in enumerate(self.quantized):
            if not quantized:
                continue
            self.m[k] = roundtrip_exp_avg(self.m[k])
            self.s[k] = roundtrip_exp_avg_sq(self.s[k])
            if refreshed:
                # An element without a preconditioner yet (u None) or with v == 0 (u inf) has the exact-zero code.
                known = [u is not None and u < math.inf for u in self.u[k]]
                v = roundtrip_precond([u**-0.5 if ok else 0.0 for u, ok in zip(self.u[k], known, strict=True)])
                self.u[k] = [x**-2 if ok else u for u, x, ok in zip(self.u[k], v, known, strict=True)]
