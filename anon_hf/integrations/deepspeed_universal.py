"""DeepSpeed universal checkpoints that keep Anon's whole state, so a ZeRO run can resume on another world size.

DeepSpeed's converter (``deepspeed.checkpoint.ds_to_universal``) writes, per parameter, ``fp32.pt``,
``exp_avg.pt``, ``exp_avg_sq.pt`` and ``step.pt``, and nothing else: Anon's preconditioner ``precond`` would be
lost, and a resumed Anon would rebuild it as all ones (a different optimizer until its next refresh). This module

* converts: it runs DeepSpeed's converter, then writes ``zero/<param>/precond.pt`` (and any other per-tensor state
  key the converter skipped) from the same ZeRO-1/2 fragments or ZeRO-3 partitions, in DeepSpeed's own format;
* loads: ZeRO-1/2 already read every ``*.pt`` of a parameter's folder; ZeRO-3 reads only its three fixed keys, so
  its universal loader is extended to read the others too;
* refuses a universal checkpoint without ``precond`` (one made by the stock converter) when loading it into Anon,
  instead of resetting the preconditioner without a word.

Command line (the same arguments as DeepSpeed's ``ds_to_universal``)::

    python -m anon_hf.integrations.deepspeed_universal \\
        --input_folder ckpt/global_step6 --output_folder ckpt/global_step6_universal

then resume with ``"checkpoint": {"load_universal": true}`` in the DeepSpeed config and
``engine.load_checkpoint("ckpt", tag="global_step6_universal")``.
Supported: ZeRO stages 1, 2 and 3 with data parallelism only (no tensor or pipeline parallelism).
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
from collections.abc import Sequence
from types import ModuleType

import torch

from ..optimizer import _QUANTIZED_SIDE_KEYS, Anon
from ..optimizer8bit import Anon8bit
from ._patches import wrap_once

__all__ = ["ANON_EXTRA_STATE_KEYS", "convert", "main"]

logger = logging.getLogger(__name__)

# Per-tensor state keys DeepSpeed's converter already handles; everything else of Anon's is added here.
_STOCK_KEYS = frozenset({"exp_avg", "exp_avg_sq", "step"})
ANON_EXTRA_STATE_KEYS = ("precond",)


def convert(
    input_folder: str,
    output_folder: str,
    *,
    num_extract_workers: int = 1,
    num_merge_workers: int = 1,
    keep_temp_folder: bool = False,
    strict: bool = True,
    inject_missing_state: bool = True,
) -> list[str]:
    """Convert a ZeRO checkpoint folder (e.g. ``ckpt/global_step6``) to a universal one keeping Anon's state.

    ``inject_missing_state`` (default True, unlike DeepSpeed's flag) adds the universal-checkpoint metadata that
    plain ``deepspeed.initialize`` runs do not write. Returns the extra state keys written (``["precond"]`` for
    Anon with gamma != 0, ``[]`` for another optimizer).

    Raises:
        NotImplementedError: the checkpoint uses tensor or pipeline parallelism.
        FileNotFoundError: ``input_folder`` holds no ZeRO optimizer files.
        ValueError: the optimizer state has no ``exp_avg_sq`` (Anon with ``gamma=0``), which DeepSpeed's converter
            requires; nothing is written then.
    """
    from deepspeed.checkpoint import ds_to_universal as stock

    optim_files = stock._get_optim_files(input_folder)
    if not optim_files:
        raise FileNotFoundError(f"No ZeRO optimizer files (*_optim_states.pt) in {input_folder}")
    zero3_files = stock._filter_zero3_optim_files(optim_files)
    stage = stock._get_zero_stage(zero3_files or optim_files)

    args = argparse.Namespace(
        input_folder=input_folder,
        output_folder=output_folder,
        num_extract_workers=num_extract_workers,
        num_merge_workers=num_merge_workers,
        keep_temp_folder=keep_temp_folder,
        strict=strict,
        inject_missing_state=inject_missing_state,
    )
    if stage <= 2:
        extra, keys = _extra_fragments_zero12(input_folder)
    else:
        extra, keys = _extra_fragments_zero3(stock, zero3_files or optim_files)
    if "exp_avg_sq" not in keys:
        raise ValueError(
            f"Cannot convert {input_folder} to a universal checkpoint: its optimizer state has no exp_avg_sq (it has "
            f"{sorted(keys)}), which DeepSpeed's converter requires. Anon keeps no exp_avg_sq with gamma=0. Resume "
            "this checkpoint on the world size that wrote it."
        )
    stock.main(args)
    written = sorted({key for per_key in extra.values() for key in per_key})
    zero_dir = os.path.join(output_folder, "zero")
    for name, per_key in extra.items():
        template_path = os.path.join(zero_dir, name, "exp_avg.pt")
        template = torch.load(template_path, weights_only=False) if os.path.isfile(template_path) else None
        for key, pieces in per_key.items():
            flat = torch.cat([piece for _, piece in sorted(pieces, key=lambda item: item[0])])
            if isinstance(template, dict):
                record = {**template, "param": flat.view_as(template["param"])}
            else:
                shape = template.shape if isinstance(template, torch.Tensor) else flat.shape
                record = {"param": flat.view(shape)}
            torch.save(record, os.path.join(zero_dir, name, f"{key}.pt"))
    if written:
        logger.info("Added Anon's %s to the universal checkpoint in %s", ", ".join(written), output_folder)
    return written


def _extra_fragments_zero12(input_folder: str) -> tuple[dict[str, dict[str, list]], set[str]]:
    """ZeRO-1/2: each rank's flat partition holds fragments of parameters; gather the extra keys' fragments.

    Returns the fragments by parameter name and key, and every state key the partitions hold.
    """
    from deepspeed.checkpoint import DeepSpeedCheckpoint
    from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT, PARAM_SLICE_MAPPINGS

    checkpoint = DeepSpeedCheckpoint(input_folder)
    if checkpoint.tp_degree != 1 or checkpoint.pp_degree != 1:
        raise NotImplementedError(
            f"anon_hf converts data-parallel ZeRO checkpoints only; this one has tensor parallel degree "
            f"{checkpoint.tp_degree} and pipeline degree {checkpoint.pp_degree}."
        )
    extra: dict[str, dict[str, list]] = {}
    keys: set[str] = set()
    for dp_index in range(checkpoint.dp_degree):
        optim_sd = checkpoint.get_zero_checkpoint_state(pp_index=0, tp_index=0, dp_index=dp_index)[
            OPTIMIZER_STATE_DICT
        ]
        states = optim_sd[BASE_OPTIMIZER_STATE]["state"]
        for group_id, mapping in enumerate(optim_sd[PARAM_SLICE_MAPPINGS]):
            flat_state = states.get(group_id, {})
            _refuse_8bit(flat_state, input_folder)
            keys.update(flat_state)
            for key, flat in flat_state.items():
                if key in _STOCK_KEYS or not isinstance(flat, torch.Tensor) or flat.dim() != 1:
                    continue
                for name, fragment in mapping.items():
                    piece = flat.narrow(0, fragment.start, fragment.numel).clone()
                    extra.setdefault(name, {}).setdefault(key, []).append((dp_index, piece))
    return extra, keys


def _extra_fragments_zero3(stock: ModuleType, optim_files: list[str]) -> tuple[dict[str, dict[str, list]], set[str]]:
    """ZeRO-3: each rank holds a padded 1/dp slice of every parameter, laid out sub-group by sub-group.

    Returns the fragments by parameter name and key, and every state key the partitions hold.
    """
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

    model_files = stock._get_zero3_model_state_files(os.path.dirname(optim_files[0]))
    model_grid, tp_degree, dp_degree = stock._build_zero3_rank_grid(model_files)
    optim_grid, _, _ = stock._build_zero3_rank_grid(optim_files)
    if tp_degree != 1:
        raise NotImplementedError(
            f"anon_hf converts data-parallel ZeRO-3 checkpoints only; this one has tensor parallel degree {tp_degree}."
        )
    param_shapes = stock._parse_model_states_stage3([model_grid[0][0]])
    extra: dict[str, dict[str, list]] = {}
    keys: set[str] = set()
    for dp_index, path in enumerate(optim_grid[0]):
        optim_sd = torch.load(path, map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT]
        states = optim_sd[OPTIMIZER_STATE_DICT]["state"]
        for sub_group, shapes in enumerate(param_shapes):
            flat_state = states.get(sub_group, {})
            _refuse_8bit(flat_state, path)
            keys.update(flat_state)
            offset = 0
            for name, shape in shapes.items():
                numel = stock._shape_numel(shape)
                partitioned, _ = stock._zero_partitioned_param_info(numel, dp_degree)
                unpadded = max(0, min(partitioned, numel - dp_index * partitioned))
                for key, flat in flat_state.items():
                    if key in _STOCK_KEYS or not isinstance(flat, torch.Tensor) or flat.dim() != 1:
                        continue
                    piece = flat.narrow(0, offset, unpadded).clone()
                    extra.setdefault(name, {}).setdefault(key, []).append((dp_index, piece))
                offset += partitioned
    return extra, keys


# ------------------------------------------------------------------------------------------- loading


_UNIVERSAL_8BIT_MESSAGE = (
    "{where} holds Anon8bit's 8-bit state (keys {keys}): universal checkpoints of 8-bit state are not supported (its "
    "blocks of 256 follow each rank's flat partition, which another world size cuts differently). Resume it with the "
    "same ZeRO stage and world size, or train with Anon (fp32 or bf16 state) when the world size must change."
)


def _refuse_8bit(flat_state: dict, where: str) -> None:
    """Raise ``NotImplementedError`` before converting anything when a partition holds Anon8bit's state."""
    eight_bit = sorted(set(flat_state) & _QUANTIZED_SIDE_KEYS)
    if eight_bit:
        raise NotImplementedError(_UNIVERSAL_8BIT_MESSAGE.format(where=where, keys=eight_bit))


def _missing_precond_error(where: str) -> RuntimeError:
    return RuntimeError(
        f"The universal checkpoint loaded into Anon ({where}) has exp_avg_sq but no precond: it was converted by "
        "DeepSpeed's ds_to_universal, which drops Anon's preconditioner, and Anon would rebuild it as all ones. "
        "Convert the ZeRO checkpoint with `python -m anon_hf.integrations.deepspeed_universal --input_folder ... "
        "--output_folder ...` instead."
    )


def _check_anon_state(optimizer, where: str) -> None:
    if not isinstance(optimizer, Anon):
        return
    for state in optimizer.state.values():
        if "exp_avg_sq" in state and "precond" not in state:
            raise _missing_precond_error(where)


def on_zero12_imported(module: ModuleType) -> None:
    """``deepspeed.runtime.zero.stage_1_and_2``: refuse a universal checkpoint that lost Anon's precond."""

    def make_wrapper(original):
        def _load_universal_checkpoint(self, checkpoint_folder, *args, **kwargs):
            if isinstance(self.optimizer, Anon8bit):
                raise NotImplementedError(
                    _UNIVERSAL_8BIT_MESSAGE.format(where=checkpoint_folder, keys="into Anon8bit")
                )
            result = original(self, checkpoint_folder, *args, **kwargs)
            _check_anon_state(self.optimizer, checkpoint_folder)
            return result

        return _load_universal_checkpoint

    wrap_once(module.DeepSpeedZeroOptimizer, "_load_universal_checkpoint", make_wrapper)


def on_zero3_imported(module: ModuleType) -> None:
    """``deepspeed.runtime.zero.stage3``: also load the state keys its universal loader does not know."""

    def make_wrapper(original):
        def load_hp_checkpoint_state_from_checkpoint_dir_stage3(self, checkpoint_dir, *args, **kwargs):
            result = original(self, checkpoint_dir, *args, **kwargs)
            if isinstance(self.optimizer, Anon):
                _load_extra_zero3_keys(self, os.path.join(checkpoint_dir, "zero"))
                _check_anon_state(self.optimizer, checkpoint_dir)
            return result

        return load_hp_checkpoint_state_from_checkpoint_dir_stage3

    wrap_once(
        module.DeepSpeedZeroOptimizer_Stage3, "load_hp_checkpoint_state_from_checkpoint_dir_stage3", make_wrapper
    )


def _load_extra_zero3_keys(zero_optimizer, zero_dir: str) -> None:
    """Fill ``state[key]`` of each ZeRO-3 sub-group from ``<param>/<key>.pt``, as DeepSpeed does for exp_avg."""
    keys = _extra_keys_in(
        zero_dir, [zero_optimizer.param_names[p] for group in zero_optimizer.fp16_groups for p in group]
    )
    for key in keys:
        for sub_group_id, fp16_group in enumerate(zero_optimizer.fp16_groups):
            fp32_param = zero_optimizer.fp32_partitioned_groups_flat[sub_group_id]
            value = torch.zeros_like(fp32_param)
            offset = 0
            for param in fp16_group:
                folder = os.path.join(zero_dir, zero_optimizer.param_names[param])
                part = zero_optimizer.load_hp_checkpoint_state(folder, key, param=param)
                value.narrow(0, offset, part.numel()).copy_(part)
                offset += part.numel()
            zero_optimizer.optimizer.state[fp32_param][key] = value


def _extra_keys_in(zero_dir: str, names: Sequence[str]) -> list[str]:
    """The extra state keys present for every one of ``names`` (a key some parameters lack cannot be loaded)."""
    common = None
    for name in names:
        found = {os.path.basename(path)[: -len(".pt")] for path in glob.glob(os.path.join(zero_dir, name, "*.pt"))}
        found -= _STOCK_KEYS | {"fp32"}
        common = found if common is None else common & found
    return sorted(common or ())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m anon_hf.integrations.deepspeed_universal",
        description="DeepSpeed's ds_to_universal, keeping Anon's preconditioner (precond).",
    )
    parser.add_argument("--input_folder", required=True, help="a ZeRO checkpoint folder, e.g. ckpt/global_step6")
    parser.add_argument("--output_folder", required=True, help="where to write the universal checkpoint")
    parser.add_argument("--num_extract_workers", type=int, default=1)
    parser.add_argument("--num_merge_workers", type=int, default=1)
    parser.add_argument("--keep_temp_folder", action="store_true")
    parser.add_argument("--no_strict", dest="strict", action="store_false")
    parser.add_argument(
        "--no_inject_missing_state",
        dest="inject_missing_state",
        action="store_false",
        help="do not add the universal-checkpoint metadata plain deepspeed.initialize runs lack",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    convert(**vars(args))


if __name__ == "__main__":
    main()
