"""Blockwise 8-bit storage of Anon's state: encode/decode pairs around the one fp32 update (used by ``Anon8bit``).

A tensor is flattened and cut into blocks of :data:`BLOCK` elements (the last block may be shorter: ZeRO's flat
partitions need not be a multiple of the block). Each block keeps fp32 side values; each element one byte.

* ``exp_avg`` (m, signed): an 8-bit float with a sign bit, 4 exponent and 3 mantissa bits (as E4M3), relative to the
  block's absmax. Codes are ``int8`` in [-127, 127]; magnitudes cover [2**-16 * 1.25, 1] * absmax (4.7 decades) with
  a relative spacing of 1/8 to 1/16 (rounding error <= 6.3 %); smaller magnitudes round to the nearer of 0 and the
  smallest code. The range matters more than the spacing: with gamma near 1 the update m * v does not shrink with
  the gradient's scale, so a small-gradient element whose m rounds to 0 stops moving.
* ``exp_avg_sq`` (s, unsigned): 5 exponent and 3 mantissa bits relative to the block's max, ``uint8`` codes, over
  [2**-32 * 1.25, 1] * max (9.5 decades, rounding error <= 6.3 %). Code 0 is exactly 0 and only 0: a positive value
  below the smallest code takes the smallest code, so "no gradient since the last refresh" (s == 0) survives
  quantization exactly, as the refresh rule reads it.
* ``precond`` (v, positive, many decades): ``log2(v)`` quantized linearly between the block's min and max of
  ``log2(v)`` over its nonzero elements, codes 1..255; code 0 is exactly 0 (an element never refreshed with a
  gradient). The relative error is at most ``(max - min) * ln(2) / 508`` (1.3 % for a block spanning 4 decades).

Rounding is to the nearest code, ties away from zero for m and s (the mantissa is rounded by adding half a unit
before truncating the float's bits) and half to even for v (``torch.round``); nothing is stochastic. The maps for m
and s are computed from the float's bits, with no table search and no transcendental function, which is what lets
the C++ kernel (``csrc/anon_cpu_8bit.cpp``, the same formulas) requantize m and s on every step cheaply.

Nothing here imports anything but torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BLOCK", "MIN_NUMEL", "QUANTIZED_KEYS", "dequantize", "dequantize_elements", "quantize", "state_bytes"]

#: Elements per block; one set of fp32 side values (scale, or log range) per block, as torchao and bitsandbytes.
BLOCK = 256
#: Tensors with fewer elements keep full-precision state (bitsandbytes' threshold): for them the side values and the
#: per-tensor overhead would outweigh the bytes saved.
MIN_NUMEL = 4096

# exp_avg: int8 magnitude = ((bits(x) + 2**19) >> 20) - 889, x = |m| / absmax in (0, 1]: x == 1 gives 127.
_M_SHIFT, _M_BASE = 20, 889
# exp_avg_sq: uint8 code = ((bits(x) + 2**19) >> 20) - 761, x = s / max in (0, 1]: x == 1 gives 255.
_S_SHIFT, _S_BASE = 20, 761
_V_LEVELS = 254  # codes 1..255 span [min, max] of log2(v) in 254 steps
# Half the smallest magnitude of exp_avg's code 1, 1.25 * 2**-16 (both exact in fp32): below it m rounds to 0.
_M_HALF_SMALLEST = 0.625 * 2.0**-16

#: State keys of a quantized tensor: codes under the plain names, fp32 side values per block under the others.
QUANTIZED_KEYS = {
    "exp_avg": ("exp_avg_absmax",),
    "exp_avg_sq": ("exp_avg_sq_max",),
    "precond": ("precond_log2_min", "precond_log2_max"),
}


def _blocks(flat: Tensor) -> Tensor:
    """``flat`` (1-D) zero-padded to whole blocks, as ``(n_blocks, BLOCK)`` (a view when no padding is needed)."""
    pad = (-flat.numel()) % BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK) if pad else flat.view(-1, BLOCK)


def _unblocked(blocks: Tensor, like: Tensor) -> Tensor:
    """``(n_blocks, BLOCK)`` back to the shape of ``like``, dropping the padding."""
    return blocks.reshape(-1)[: like.numel()].reshape(like.shape)


def _float_code(x: Tensor, shift: int, base: int) -> Tensor:
    """Round ``x`` in (0, 1] (fp32) to its 8-bit float code: ``((bits + half) >> shift) - base`` (int32)."""
    bits = x.view(torch.int32)
    return ((bits + (1 << (shift - 1))) >> shift) - base


def _float_value(code: Tensor, shift: int, base: int) -> Tensor:
    """Inverse of :func:`_float_code` for codes >= 1 (int32 in, fp32 out)."""
    return ((code + base) << shift).view(torch.float32)


def _inverse(scale: Tensor) -> Tensor:
    """``1 / scale`` per block as a column, 0 where the scale is 0 (a block of zeros)."""
    return torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale)).unsqueeze(1)


def _quantize_exp_avg(m: Tensor) -> tuple[Tensor, Tensor]:
    blocks = _blocks(m.reshape(-1).float())
    absmax = blocks.abs().amax(dim=1)
    x = blocks.abs() * _inverse(absmax)
    code = _float_code(x, _M_SHIFT, _M_BASE).clamp_(max=127)
    # Below code 1 the nearer of 0 and the smallest magnitude; x == 0 (absmax == 0 too) gives 0.
    code = torch.where(code >= 1, code, (x >= _M_HALF_SMALLEST).to(torch.int32))
    code = torch.where(blocks < 0, -code, code)
    return _unblocked(code.to(torch.int8), m), absmax


def _exp_avg_values(code: Tensor, absmax: Tensor) -> Tensor:
    """Values of int32 ``code`` against ``absmax`` (broadcast to it: per block, or per element)."""
    magnitude = _float_value(code.abs().clamp(min=1), _M_SHIFT, _M_BASE)
    return torch.where(code == 0, 0.0, torch.where(code < 0, -magnitude, magnitude)) * absmax


def _dequantize_exp_avg(code: Tensor, absmax: Tensor) -> Tensor:
    blocks = _blocks(code.reshape(-1)).to(torch.int32)
    return _unblocked(_exp_avg_values(blocks, absmax.unsqueeze(1)), code)


def _quantize_exp_avg_sq(s: Tensor) -> tuple[Tensor, Tensor]:
    blocks = _blocks(s.reshape(-1).float())
    top = blocks.amax(dim=1)
    x = blocks * _inverse(top)
    code = _float_code(x, _S_SHIFT, _S_BASE).clamp_(1, 255)
    code = torch.where(blocks > 0, code, 0)
    return _unblocked(code.to(torch.uint8), s), top


def _exp_avg_sq_values(code: Tensor, top: Tensor) -> Tensor:
    return torch.where(code == 0, 0.0, _float_value(code.clamp(min=1), _S_SHIFT, _S_BASE)) * top


def _dequantize_exp_avg_sq(code: Tensor, top: Tensor) -> Tensor:
    blocks = _blocks(code.reshape(-1)).to(torch.int32)
    return _unblocked(_exp_avg_sq_values(blocks, top.unsqueeze(1)), code)


def _quantize_precond(v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    blocks = _blocks(v.reshape(-1).float())
    positive = blocks > 0
    log_v = torch.where(positive, blocks.clamp(min=torch.finfo(torch.float32).tiny).log2(), 0.0)
    low = torch.where(positive, log_v, float("inf")).amin(dim=1)
    high = torch.where(positive, log_v, float("-inf")).amax(dim=1)
    empty = ~positive.any(dim=1)  # a block of zeros only: any range will do
    low, high = torch.where(empty, 0.0, low), torch.where(empty, 0.0, high)
    span = high - low
    scale = torch.where(span > 0, _V_LEVELS / torch.where(span > 0, span, 1.0), 0.0)
    position = (log_v - low.unsqueeze(1)) * scale.unsqueeze(1)
    code = torch.where(positive, 1 + position.round().clamp(0, _V_LEVELS).to(torch.int32), 0)
    return _unblocked(code.to(torch.uint8), v), low, high


def _precond_values(code: Tensor, low: Tensor, high: Tensor) -> Tensor:
    step = (high - low) * (1.0 / _V_LEVELS)
    return torch.where(code == 0, 0.0, torch.exp2(low + (code - 1).float() * step))


def _dequantize_precond(code: Tensor, low: Tensor, high: Tensor) -> Tensor:
    blocks = _blocks(code.reshape(-1)).to(torch.int32)
    return _unblocked(_precond_values(blocks, low.unsqueeze(1), high.unsqueeze(1)), code)


_CODECS = {
    "exp_avg": (_quantize_exp_avg, _dequantize_exp_avg),
    "exp_avg_sq": (_quantize_exp_avg_sq, _dequantize_exp_avg_sq),
    "precond": (_quantize_precond, _dequantize_precond),
}
_ELEMENT_DECODERS = {"exp_avg": _exp_avg_values, "exp_avg_sq": _exp_avg_sq_values, "precond": _precond_values}


def quantize(key: str, value: Tensor) -> dict[str, Tensor]:
    """The 8-bit entries of state ``key`` (``exp_avg``, ``exp_avg_sq`` or ``precond``) for the float tensor ``value``.

    Returns ``{key: codes shaped like value (int8 for exp_avg, uint8 otherwise), side key: fp32 tensor of shape
    (ceil(numel / BLOCK),), ...}`` with the side keys of :data:`QUANTIZED_KEYS`. ``value`` must be finite.
    """
    encoded = _CODECS[key][0](value.detach())
    return dict(zip((key, *QUANTIZED_KEYS[key]), encoded, strict=True))


def dequantize(key: str, entries: dict[str, Tensor]) -> Tensor:
    """The fp32 tensor that the 8-bit entries of state ``key`` stand for (shaped like its codes)."""
    return _CODECS[key][1](*(entries[name] for name in (key, *QUANTIZED_KEYS[key])))


def dequantize_elements(key: str, codes: Tensor, sides: tuple[Tensor, ...]) -> Tensor:
    """:func:`dequantize` with the side values given per element: ``sides`` (those of :data:`QUANTIZED_KEYS` [key], in
    order) shaped like ``codes``, each element's holding the side value of the block it was encoded in. The same
    arithmetic per element as :func:`dequantize`, for codes whose blocks are not this tensor's own (another shard's).

    The elements are laid out in rows of :data:`BLOCK` as :func:`dequantize` lays them out: torch's CPU ``exp2`` can
    round a last bit differently in its scalar tail than in its vector body, and so v decodes to the same bits here
    as there (with one thread; several split a large tensor at other places, and a last bit of v may then differ).
    """
    blocks = _blocks(codes.reshape(-1)).to(torch.int32)
    values = _ELEMENT_DECODERS[key](blocks, *(_blocks(side.reshape(-1).float()) for side in sides))
    return _unblocked(values, codes)


def state_bytes(numel: int) -> int:
    """Bytes of 8-bit state (m, s, v and their side values) for a tensor of ``numel`` elements."""
    blocks = -(-numel // BLOCK)
    return 3 * numel + 4 * 4 * blocks
