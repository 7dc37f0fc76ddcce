"""``anon_hf.Anon8bit``: Anon with its state stored blockwise in 8 bits, a thin face over :class:`anon_hf.Anon`.

The update is Anon's, unchanged, and so is its dispatcher: the 8-bit tensors step through :func:`anon_hf.anon` with
``storage=Blockwise8(...)`` (``anon_hf.storage.blockwise8``), which runs the 8-bit kernel or graph between refreshes
with ``fused=True`` and otherwise steps fp32 temporaries decoded from the codes. This module keeps what is the
optimizer's: which tensors get 8-bit state, creating it, and its state dict (FSDP2 shards included).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .distributed.dtensor import is_dtensor, local
from .functional import NonFinitePreconditionerError, anon
from .hyper import update_kwargs
from .optimizer import (
    STATE_KEYS,
    Anon,
    ParamsT,
    _cast_state,
    _validate_tensor_state,
)
from .storage import quant8, shard8
from .storage.blockwise8 import Blockwise8

__all__ = ["Anon8bit", "dequantize_state_dict"]

_SIDE_KEYS = frozenset(key for keys in quant8.QUANTIZED_KEYS.values() for key in keys)


class Anon8bit(Anon):
    r"""Anon with ``exp_avg``, ``exp_avg_sq`` and ``precond`` stored blockwise in 8 bits: about 3.06 bytes of state
    per parameter instead of 12 (fp32 ``Anon``) or 8 (fp32 AdamW).

    The update, its arguments and param-group behaviour are those of :class:`anon_hf.Anon` (see there for the math
    and every argument below); only the storage differs. The arithmetic stays in fp32 and every quantization is
    deterministic (round to nearest, no stochastic rounding). Blocks of 256 elements of the flattened tensor, the last
    one possibly shorter, each keep fp32 side values:

    * ``exp_avg``: ``int8`` codes, an 8-bit float (sign, 3 exponent, 4 mantissa bits) relative to the block's absmax
      (side value ``exp_avg_absmax``);
    * ``exp_avg_sq``: ``uint8`` codes, 5 exponent and 3 mantissa bits relative to the block's max
      (``exp_avg_sq_max``); code 0 is exactly 0 and only 0, so "no gradient since the last refresh" is kept exactly;
    * ``precond``: ``uint8`` codes of ``log2(v)``, linear between the block's min and max of ``log2(v)``
      (``precond_log2_min``, ``precond_log2_max``); code 0 is exactly 0.

    ``docs/performance.md`` gives the error bounds and why these maps. Tensors with fewer than ``min_8bit_size``
    elements (default 4,096, bitsandbytes' threshold) and complex tensors keep Anon's full-precision state.

    With ``fused=True`` the steps between refreshes of contiguous fp32 CPU tensors run one C++ pass per block that
    dequantizes, updates and requantizes (the preconditioner is only read there: 17 bytes moved per parameter), and
    those of other tensors (CUDA; CPU with ``ANON_HF_CPU_KERNEL=0``) one ``torch.compile``'d graph per tensor that does
    the same with ``_quant8``'s maps;
    refresh steps, and every step otherwise, decode the state of one tensor at a time into fp32 temporaries, run
    :func:`anon_hf.anon` on them and encode the result: the extra memory is one tensor's fp32 state. The kernel
    computes ``max_precond_ratio``'s limit at every gamma above 0 (gamma <= 0 has none). Full-precision tensors take
    Anon's own paths (``foreach``/``fused`` as given).

    Args:
        min_8bit_size (int, optional): tensors with at least this many elements get 8-bit state, >= 1
            (default: 4096)

    The other arguments are :class:`anon_hf.Anon`'s, except ``precond_dtype`` and ``moments_dtype`` (the state is
    8-bit) and ``keep_unseen`` (always on). ``state_dict()`` holds the codes and side values (it loads with
    ``torch.load(weights_only=True)`` and resumes bitwise); :meth:`load_state_dict` also takes an fp32 ``Anon`` state
    dict, quantizing it, and :func:`anon_hf.dequantize_state_dict` turns an ``Anon8bit`` state dict into one ``Anon``
    loads.

    Under FSDP2 a tensor's 8-bit state describes this rank's local shard (``local_shard``, int64: mesh coordinates,
    mesh shape, local numel). :meth:`state_dict` gives it as DTensors whose global shapes do not depend on the world
    size (``anon_hf.storage.shard8``), so ``torch.distributed.checkpoint`` saves every rank's own and loads it on any
    number of ranks: bitwise on the world size that wrote it, and bitwise on any other for tensors whose rows are a
    multiple of 256 elements; other tensors' blocks straddle rows and are encoded again in the new shards' blocks
    (one more rounding: ``docs/distributed.md``, "Resizing a job"). A per-rank file loaded on another rank is
    refused.

    Example:
        >>> optimizer = anon_hf.Anon8bit(model.parameters(), lr=1e-3, gamma=1.0, fused=True)
    """

    def __init__(self, params: ParamsT, *args: Any, **kwargs: Any):
        # Positions follow Anon8bit's own signature (Anon's less FULL_PRECISION_ONLY), so that max_precond_ratio is the
        # 11th argument here as it has always been; every keyword goes on to Anon by name.
        refused = {name: kwargs.pop(name) for name in FULL_PRECISION_ONLY if name in kwargs}
        _refuse_full_precision_options(refused)
        arguments = _SIGNATURE.bind(params, *args, **kwargs).arguments
        min_8bit_size = arguments.pop("min_8bit_size", quant8.MIN_NUMEL)
        _validate_min_8bit_size(min_8bit_size)
        self._min_8bit_size = min_8bit_size  # read by add_param_group while Anon.__init__ adds the groups
        super().__init__(**arguments)
        self.defaults["min_8bit_size"] = min_8bit_size

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, validated as :class:`Anon`'s plus ``min_8bit_size``; 8-bit storage is fixed."""
        if isinstance(param_group, dict):
            _refuse_full_precision_options({**self.defaults, **param_group})
            param_group.setdefault("min_8bit_size", self._min_8bit_size)
            _validate_min_8bit_size(param_group["min_8bit_size"])
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_min_8bit_size", self.defaults.get("min_8bit_size", quant8.MIN_NUMEL))
        for group in self.param_groups:
            group.setdefault("min_8bit_size", self._min_8bit_size)

    def _is_8bit(self, param: Tensor, group: dict[str, Any]) -> bool:
        return param.numel() >= group["min_8bit_size"] and not torch.is_complex(param)

    def _step_group(self, group: dict[str, Any]) -> list[int]:
        """Full-precision tensors through :class:`Anon`, then the 8-bit ones through :func:`anon_hf.anon` with
        8-bit storage (one call for those with a preconditioner, one for those without)."""
        small, large = [], []
        for param in group["params"]:
            if param.grad is not None:
                (large if self._is_8bit(param, group) else small).append(param)
        refreshed: list[int] = []
        if small:
            with _positions_in(group, small):
                refreshed += super()._step_group({**group, "params": small})
        for param in large:
            self._ensure_state(param, group)
        for preconditioned in (True, False):
            subset = [p for p in large if ("precond" in self.state[p]) == preconditioned]
            if subset:
                with _positions_in(group, subset):
                    refreshed += self._step_8bit(group, subset)
        return sorted(set(refreshed))

    def _step_8bit(self, group: dict[str, Any], params: list[Tensor]) -> list[int]:
        """Step ``params`` (8-bit state, all with a preconditioner or all without) through the one dispatcher."""
        states = [self.state[p] for p in params]
        codes = [[state[key] for state in states] if key in states[0] else [] for key in quant8.QUANTIZED_KEYS]
        return anon(
            params,
            [p.grad for p in params],
            *codes,
            [state["step"] for state in states],
            foreach=group["foreach"],
            fused=group["fused"],
            storage=Blockwise8([{key: state[key] for key in _SIDE_KEYS if key in state} for state in states]),
            **update_kwargs(group),
        )

    def _ensure_state(self, param: Tensor, group: dict[str, Any]) -> None:
        """Create the missing state of an 8-bit tensor with :class:`Anon`'s own rule, then quantize it."""
        state = self.state[param]
        if len(state) > 0 and ("precond" in state or group["gamma"] == 0):
            return
        # Anon decides which keys exist and their initial values; this tensor's fp32 state lives only meanwhile.
        self.state[param] = _decoded(state)
        super()._init_group({**group, "params": [param]}, [], [], [], [], [], [])
        self.state[param] = _encoded(self.state[param], param)

    def _with_local_shards(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with the DTensor 8-bit entries that :meth:`state_dict` wrote for FSDP2 shards back as this
        rank's plain tensors (a shallow copy; the caller's dict is kept)."""
        state = dict(state_dict.get("state", {}))
        for param, saved_id, entries in self._sharded_8bit_entries(state_dict, state):
            state[saved_id] = shard8.as_local(entries, param, saved_id)
        return {**state_dict, "state": state}

    def _sharded_8bit_entries(
        self, state_dict: dict[str, Any], state: dict[Any, Any]
    ) -> Iterator[tuple[Tensor, Any, dict[str, Any]]]:
        """``(param, saved_id, entries)`` for each FSDP2 (DTensor) param whose entries in ``state`` (``state_dict``'s
        per-param state, or a copy of it) are 8-bit; params are matched to saved ids by position, as
        :meth:`torch.optim.Optimizer.load_state_dict` does."""
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict.get("param_groups", []) for i in group.get("params", [])]
        for param, saved_id in zip(params, saved_ids, strict=False):
            entries = state.get(saved_id)
            if is_dtensor(param) and isinstance(entries, dict) and _SIDE_KEYS & set(entries):
                yield param, saved_id, entries

    def state_dict(self) -> dict[str, Any]:
        """:meth:`torch.optim.Optimizer.state_dict`, with the 8-bit entries of FSDP2 shards as DTensors of a global
        shape that does not depend on the world size (``anon_hf.storage.shard8``): ``torch.distributed.checkpoint``
        saves every rank's own codes and scales and reshards them to another world size."""
        state_dict = super().state_dict()
        state = state_dict["state"]
        for param, saved_id, entries in self._sharded_8bit_entries(state_dict, state):
            state[saved_id] = shard8.as_dtensors(entries, param)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict written by :meth:`state_dict`, or an fp32 one written by :class:`Anon` (quantized here).

        8-bit entries come back bitwise (``torch.optim.Optimizer`` would cast codes and side values to the param's
        dtype), so a run resumes exactly. The DTensor entries of FSDP2 shards (:meth:`state_dict`, loaded through
        ``torch.distributed.checkpoint`` on any world size) become this rank's: bitwise where the blocks are the
        writer's, encoded again in this shard's blocks where they straddle rows cut elsewhere.

        Raises:
            ValueError: as :meth:`Anon.load_state_dict`, and for 8-bit entries of the wrong dtype or size, or of
                another shard than this rank's (a per-rank file loaded on another rank).
        """
        state_dict = self._with_local_shards(state_dict)
        self._validate_saved(state_dict, _validate_saved)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        saved = state_dict["state"]
        torch.optim.Optimizer.load_state_dict(self, state_dict)
        groups = {p: group for group in self.param_groups for p in group["params"]}
        for param, saved_id in zip(params, saved_ids, strict=False):
            if param not in self.state or saved_id not in saved:
                continue
            state, group = self.state[param], groups[param]
            quantized = bool(_SIDE_KEYS & set(state))
            if quantized:  # torch casts every entry, codes too, to the param's dtype: take them as saved
                for key in set(state) - {"step"}:
                    value = saved[saved_id][key].detach()
                    dtype = torch.float32 if key in _SIDE_KEYS else value.dtype
                    state[key] = value.to(device=local(param).device, dtype=dtype, copy=True)
            if self._is_8bit(param, group) and not quantized:
                self.state[param] = _encoded(state, param)  # an fp32 Anon checkpoint: quantized once, here
            elif not self._is_8bit(param, group):
                if quantized:
                    self.state[param] = state = _decoded(state)
                _cast_state(state, group, param)


def _refuse_full_precision_options(group: dict[str, Any]) -> None:
    """Anon's options that only full-precision state has, refused for a group (constructor keywords included)."""
    for name in ("precond_dtype", "moments_dtype"):
        if group.get(name) is not None:
            raise ValueError(
                f"Invalid {name} value: {group[name]!r} (allowed: None; Anon8bit stores its state in 8 bits, use "
                "anon_hf.Anon for fp32/bf16 state)"
            )
    if group.get("keep_unseen") is False:
        raise ValueError(
            "Invalid keep_unseen value: False (allowed: True; Anon8bit keeps the preconditioner of elements no refresh "
            "has seen at 0; use anon_hf.Anon for the published rule)"
        )


def _validate_min_8bit_size(value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Invalid min_8bit_size value: {value!r} (allowed: an integer >= 1; default 4096)")


def _without_8bit_bookkeeping(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` less the block side values and the shard record: what remains once the codes are decoded."""
    bookkeeping = {shard8.SHARD_KEY, shard8.ROWS_KEY}
    return {key: value for key, value in state.items() if key not in _SIDE_KEYS and key not in bookkeeping}


def _decoded(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with each 8-bit entry replaced by its fp32 tensor (full-precision entries as they are)."""
    out = _without_8bit_bookkeeping(state)
    for key, sides in quant8.QUANTIZED_KEYS.items():
        if sides[0] in state:
            out[key] = quant8.dequantize(key, state)
    return out


def _encoded(state: dict[str, Any], param: Tensor) -> dict[str, Any]:
    """``state`` (full precision, DTensor entries as this rank's shard) with every moment and ``precond`` in 8 bits;
    for a DTensor ``param``, with the shard the codes belong to (``anon_hf.storage.shard8.shard_identity``)."""
    out = {"step": state["step"]}
    for key in quant8.QUANTIZED_KEYS:
        if key in state:
            out.update(quant8.quantize(key, local(state[key])))
    identity = shard8.shard_identity(param)
    if identity is not None:
        out[shard8.SHARD_KEY] = identity
    return out


class _positions_in:
    """Context manager: a :class:`NonFinitePreconditionerError` raised for a sub-list reports the group position."""

    def __init__(self, group: dict[str, Any], subset: list[Tensor]):
        self.positions = [next(i for i, p in enumerate(group["params"]) if p is q) for q in subset]

    def __enter__(self):
        return self

    def __exit__(self, kind, err, traceback):
        if isinstance(err, NonFinitePreconditionerError) and err.tensor_index < len(self.positions):
            err.place(tensor_index=self.positions[err.tensor_index])
        return False


def _validate_saved(tensor_state: Any, param: Tensor, saved_id: Any) -> None:
    """Check one tensor's saved state: Anon's checks for full-precision entries, dtypes and sizes for 8-bit ones."""
    if not isinstance(tensor_state, dict) or not (_SIDE_KEYS & set(tensor_state)):
        _validate_tensor_state(tensor_state, param, saved_id)
        return
    if shard8.ROWS_KEY in tensor_state:  # the FSDP2 form, left as it is because this param is no DTensor
        raise ValueError(
            f"State of param {saved_id} is FSDP2 8-bit state (key '{shard8.ROWS_KEY}'), but this parameter is not a "
            "DTensor: load it into the model sharded with fully_shard (torch.distributed.checkpoint reshards it to "
            "any world size)."
        )
    unknown = set(tensor_state) - STATE_KEYS - _SIDE_KEYS - {shard8.SHARD_KEY}
    if unknown:
        raise ValueError(f"State of param {saved_id} has keys {sorted(unknown)} that Anon8bit does not use.")
    shard8.check_shard(tensor_state.get(shard8.SHARD_KEY), param, saved_id)
    numel = local(param).numel()
    blocks = -(-numel // quant8.BLOCK)
    for key, sides in quant8.QUANTIZED_KEYS.items():
        present = [name in tensor_state for name in (key, *sides)]
        if not any(present):
            continue
        code_dtype = torch.int8 if key == "exp_avg" else torch.uint8
        codes = tensor_state.get(key)
        if not all(present) or not isinstance(codes, Tensor) or codes.dtype != code_dtype or codes.numel() != numel:
            raise ValueError(
                f"State '{key}' of param {saved_id} is not 8-bit state of this parameter: expected {code_dtype} codes "
                f"of {numel} elements with side values {list(sides)}: the state dict belongs to another model, "
                "another sharding, or is corrupted."
            )
        for side in sides:
            value = tensor_state[side]
            if not isinstance(value, Tensor) or not value.is_floating_point() or value.numel() != blocks:
                raise ValueError(
                    f"State '{side}' of param {saved_id} must be a float tensor of {blocks} values (one per block of "
                    f"{quant8.BLOCK}): the state dict belongs to another model or another sharding, or is corrupted."
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"State '{side}' of param {saved_id} holds nan or inf: the state dict is corrupted.")


def dequantize_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """An ``Anon8bit`` state dict as the fp32 state dict :class:`anon_hf.Anon` loads (a new dict; the input is kept).

    Each 8-bit entry becomes an fp32 tensor shaped like its codes (under FSDP2, from :meth:`Anon8bit.state_dict`: an
    fp32 DTensor placed like its codes, this rank's shard decoded); full-precision entries, steps and param groups are
    copied as they are (``min_8bit_size`` is dropped from the groups). The reverse needs no function:
    :meth:`Anon8bit.load_state_dict` takes an ``Anon`` state dict and quantizes it.
    """
    state = {
        key: _decoded_entries(value) if isinstance(value, dict) else value
        for key, value in state_dict["state"].items()
    }
    groups = [{k: v for k, v in group.items() if k != "min_8bit_size"} for group in state_dict["param_groups"]]
    return {"state": state, "param_groups": groups}


def _decoded_entries(entries: dict[str, Any]) -> dict[str, Any]:
    """One tensor's state in a state dict, decoded: the FSDP2 DTensor form by its rows, other 8-bit state by blocks."""
    return shard8.dequantize_rows(entries) if shard8.ROWS_KEY in entries else _decoded(entries)


# Anon's keywords that only full-precision state has: refused when given (_refuse_full_precision_options) and left
# out of the signature that tools read.
FULL_PRECISION_ONLY = ("keep_unseen", "precond_dtype", "moments_dtype")


def _forwarded_signature() -> inspect.Signature:
    """Anon's signature less :data:`FULL_PRECISION_ONLY`, plus ``min_8bit_size``: Anon8bit forwards every keyword to
    Anon, and tools that read a signature (``optim_args``, DeepSpeed's ``optimizer.params``, ``help()``) see them."""
    anon = inspect.signature(Anon.__init__)
    kept = [p for name, p in anon.parameters.items() if name not in FULL_PRECISION_ONLY + ("self",)]
    extra = inspect.Parameter(
        "min_8bit_size", inspect.Parameter.KEYWORD_ONLY, default=quant8.MIN_NUMEL, annotation=int
    )
    return anon.replace(parameters=[*kept, extra])


_SIGNATURE = _forwarded_signature()
Anon8bit.__init__.__signature__ = _SIGNATURE.replace(
    parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *_SIGNATURE.parameters.values()]
)
# Resolved from Anon (its annotations name types of anon_hf.optimizer), for typing.get_type_hints(Anon8bit.__init__).
Anon8bit.__init__.__annotations__ = {
    name: hint for name, hint in typing.get_type_hints(Anon.__init__).items() if name not in FULL_PRECISION_ONLY
} | {"min_8bit_size": int}
