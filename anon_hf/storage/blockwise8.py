"""8-bit state as a storage strategy: what :func:`anon_hf.functional.anon` receives as ``storage=Blockwise8(...)``, so
that ``Anon8bit``'s tensors take the one dispatcher and its backends.

With it, the dispatcher's ``exp_avgs``, ``exp_avg_sqs`` and ``preconds`` hold codes (:mod:`.quant8`: ``int8``,
``uint8``, ``uint8``, shaped like the param) and :attr:`Blockwise8.sides` their fp32 side values, one per block of
:data:`~.quant8.BLOCK` elements. Backends that read 8-bit state natively (the 8-bit C++ kernel, the compiled 8-bit
graph) take :meth:`Blockwise8.entries`; every other step decodes one tensor to fp32 temporaries
(:meth:`Blockwise8.decoded`), steps them and encodes the result in place (:meth:`Blockwise8.encode_`).

Nothing here imports anything but torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import quant8

__all__ = ["Blockwise8"]

# The C++ codecs' numbering of the three maps (``anon_cpu_8bit.cpp``: decode/encode take it first).
_CODEC_KINDS = {"exp_avg": 0, "exp_avg_sq": 1, "precond": 2}


@dataclass(frozen=True)
class Blockwise8:
    """The side values of each tensor's 8-bit state: ``sides[i]`` maps the side keys of
    :data:`~.quant8.QUANTIZED_KEYS` present for tensor ``i`` (``exp_avg_absmax``, and with a preconditioner
    ``exp_avg_sq_max``, ``precond_log2_min``, ``precond_log2_max``) to fp32 tensors of ``ceil(numel / 256)`` values.

    ``codec`` arguments below are the 8-bit C++ extension (``anon_hf.backends.cpu_kernel.kernel8()``, whose
    ``decode``/``encode`` run the same maps vectorized on CPU tensors), or ``None`` for :mod:`.quant8`'s torch maps.
    """

    sides: list[dict[str, Tensor]]

    @staticmethod
    def codes_of(i: int, state_lists: tuple[list[Tensor], ...] | list[list[Tensor]]) -> dict[str, Tensor]:
        """Tensor ``i``'s codes by state key, from the dispatcher's ``[exp_avgs, exp_avg_sqs, preconds]`` (the last
        two empty without a preconditioner)."""
        return {key: codes[i] for key, codes in zip(quant8.QUANTIZED_KEYS, state_lists, strict=True) if codes}

    def entries(self, i: int, codes: dict[str, Tensor]) -> dict[str, Tensor]:
        """Tensor ``i``'s whole 8-bit state: ``codes`` (``{key: codes}``) and its side values."""
        return {**codes, **self.sides[i]}

    def decoded(self, i: int, codes: dict[str, Tensor], codec=None) -> dict[str, Tensor]:
        """``{key: fp32 tensor shaped like codes[key]}``: what tensor ``i``'s codes stand for."""
        if codec is None:
            return {key: quant8.dequantize(key, self.entries(i, {key: value})) for key, value in codes.items()}
        out = {}
        for key, value in codes.items():
            out[key] = torch.empty(value.shape, dtype=torch.float32)
            codec.decode(_CODEC_KINDS[key], value, *self._ends(i, key), out[key])
        return out

    def encode_(self, i: int, key: str, codes: Tensor, value: Tensor, codec=None) -> None:
        """Encode the fp32 ``value`` (shaped like ``codes``, finite) into ``codes`` and tensor ``i``'s side values of
        ``key``, in place."""
        if codec is not None:
            codec.encode(_CODEC_KINDS[key], value.contiguous(), codes, *self._ends(i, key))
            return
        encoded = quant8.quantize(key, value)
        codes.copy_(encoded.pop(key))
        for name, side in encoded.items():
            self.sides[i][name].copy_(side)

    def _ends(self, i: int, key: str) -> tuple[Tensor, Tensor]:
        """The C++ codecs' two side arguments of ``key``: its one side value twice, or v's low and high ends."""
        names = quant8.QUANTIZED_KEYS[key]
        return self.sides[i][names[0]], self.sides[i][names[-1]]
