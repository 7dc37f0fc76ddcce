"""DeepSpeed: ``"optimizer": {"type": "Anon", "params": {...}}`` in a DeepSpeed config, under ZeRO 1, 2 and 3.

DeepSpeed builds an optimizer it does not know as ``getattr(torch.optim, type)(model_parameters, **params)``
(``import anon_hf`` sets ``torch.optim.Anon``), and ZeRO refuses an optimizer whose type is not in
``deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS`` unless ``zero_allow_untested_optimizer`` is set.
Its ``on_*_imported`` functions, rows of the table in ``_patches.py`` (each runs when the user's code imports the
module it patches), do five things:

* adds Anon to ``ZERO_SUPPORTED_OPTIMIZERS`` (its state is elementwise, so ZeRO's flat partitions are fine);
* checks a config's ``optimizer.params`` for Anon before DeepSpeed builds it: an unknown key or a leftover
  ``"auto"`` stops with a ``ValueError`` listing the valid keys;
* under the Trainer (``--deepspeed ds.json``), keeps its ``"auto"`` filling to lr, betas and weight_decay:
  ``"eps": "auto"`` would become Adam's ``adam_epsilon`` (1e-8) while Anon's eps sits inside the power
  (default 1e-16), so it is refused, and an explicit eps is not compared with ``adam_epsilon``;
* stops accelerate from swapping a client Anon for ``DeepSpeedCPUAdam`` under ``offload_optimizer`` (it does
  so silently while ``"zero_force_ds_cpu_optimizer"`` is true, its default), with an error naming the setting;
* makes ``deepspeed.initialize`` with Anon (client optimizer or config block) raise if one of these patches, or
  those of ``deepspeed_universal.py``, could not be applied to the installed DeepSpeed.

Nothing here imports DeepSpeed, accelerate or transformers: each patch receives the module it patches.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch

from ..optimizer import Anon
from ._patches import require, wrap_once
from .optim_args import ANON_NAMES, anon_name_for_config_type
from .routes import reconcile_deepspeed_block

__all__ = ["OFFLOAD_SWAP_MESSAGE", "anon_param_keys", "validate_anon_params"]

logger = logging.getLogger(__name__)

# The keys the Trainer fills when they are "auto" (transformers.integrations.deepspeed.trainer_config_process).
TRAINER_AUTO_KEYS = ("lr", "betas", "weight_decay")

OFFLOAD_SWAP_MESSAGE = (
    "accelerate would silently replace the Anon optimizer by DeepSpeedCPUAdam: the DeepSpeed config offloads "
    "the optimizer (zero_optimization.offload_optimizer.device = {device!r}) and leaves "
    '"zero_force_ds_cpu_optimizer" at true (its default). Either set "zero_force_ds_cpu_optimizer": false in the '
    "DeepSpeed config (Anon then runs on the CPU partitions), or name Anon in the config's optimizer block "
    '({{"optimizer": {{"type": "Anon", "params": {{...}}}}}}), or remove offload_optimizer.'
)


def anon_param_keys(optimizer_cls: type = Anon) -> tuple[str, ...]:
    """The keyword arguments ``optimizer_cls`` (Anon or Anon8bit) takes besides ``params``: what ``optimizer.params``
    may hold."""
    signature = inspect.signature(optimizer_cls.__init__)
    return tuple(name for name in signature.parameters if name not in ("self", "params"))


def validate_anon_params(
    params: Mapping[str, Any], *, allow_auto: bool = False, where: str = "optimizer.params", optimizer_cls: type = Anon
):
    """Raise ``ValueError`` if ``params`` (a config's Anon ``optimizer.params``) has an unknown key or a bad "auto".

    Args:
        params: the mapping DeepSpeed will pass to ``Anon(model_parameters, **params)``.
        allow_auto: whether ``"auto"`` may stand for lr, betas and weight_decay (the Trainer fills those).
        where: how the error names the block.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"Invalid {where}: {params!r} (allowed: a JSON object of Anon arguments)")
    valid = anon_param_keys(optimizer_cls)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        hint = ""
        if "max_grad_norm" in unknown:
            hint = ' Gradient clipping is the top-level DeepSpeed setting "gradient_clipping".'
        raise ValueError(
            f"Unknown key(s) {unknown} in the DeepSpeed config's {where} for Anon (valid keys: {', '.join(valid)}).{hint}"
        )
    if params.get("eps") == "auto":
        raise ValueError(
            f'"eps": "auto" in {where} for Anon would be filled with the Trainer\'s adam_epsilon (1e-8, Adam\'s eps), '
            "but Anon's eps sits inside the power (sigma = s / bias_correction + eps; default 1e-16). Remove eps to "
            "keep Anon's default, or give a number."
        )
    autos = sorted(key for key, value in params.items() if value == "auto")
    if autos and not allow_auto:
        raise ValueError(
            f'{where} for Anon still holds "auto" for {autos}: only the Trainer (--deepspeed) fills "auto", and only '
            f"for {', '.join(TRAINER_AUTO_KEYS)}. Give numbers when calling deepspeed.initialize yourself."
        )
    bad_autos = sorted(set(autos) - set(TRAINER_AUTO_KEYS))
    if bad_autos:
        raise ValueError(
            f'{where} for Anon holds "auto" for {bad_autos}, which the Trainer does not fill (it fills only '
            f"{', '.join(TRAINER_AUTO_KEYS)}). Give numbers for them, or pass them with --optim anon --optim_args "
            'KEY=VALUE (anon-hf fills a block\'s "auto" from --optim_args).'
        )


def _is_anon_type(name: object) -> bool:
    return anon_name_for_config_type(name) is not None


def _check_type_spelling(name: str) -> type:
    """The class a config's ``"type"`` names; raise if it is spelled in another case than DeepSpeed looks up."""
    spelled = anon_name_for_config_type(name).config_type
    if name != spelled:
        raise ValueError(
            f'Invalid optimizer type {name!r} in the DeepSpeed config: write "{spelled}" (DeepSpeed looks names '
            "it does not know up as attributes of torch.optim, case-sensitively)."
        )
    return anon_name_for_config_type(name).optimizer_cls


def _uses_anon(optimizer: Any, config: Any) -> bool:
    if isinstance(optimizer, Anon):
        return True
    if isinstance(config, str) and config.endswith(".json"):
        try:
            with open(config) as file:
                config = json.load(file)
        except (OSError, ValueError):  # DeepSpeed reports an unreadable config itself
            return False
    block = config.get("optimizer") if isinstance(config, Mapping) else None
    return isinstance(block, Mapping) and _is_anon_type(block.get("type"))


def on_deepspeed_imported(module: ModuleType) -> None:
    """``deepspeed``: ``initialize`` with Anon raises if one of anon_hf's DeepSpeed patches could not be applied."""

    def make_wrapper(original):
        signature = inspect.signature(original)

        def initialize(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            config = bound.get("config") or bound.get("config_params")
            if config is None:
                config = getattr(bound.get("args"), "deepspeed_config", None)
            if _uses_anon(bound.get("optimizer"), config):
                require(("deepspeed", "deepspeed_universal"), "deepspeed.initialize with Anon")
            return original(*args, **kwargs)

        return initialize

    wrap_once(module, "initialize", make_wrapper)


def on_zero_utils_imported(module: ModuleType) -> None:
    """``deepspeed.runtime.zero.utils``: ZeRO 1/2/3 accept Anon without ``zero_allow_untested_optimizer``."""
    supported = module.ZERO_SUPPORTED_OPTIMIZERS
    for name in reversed(ANON_NAMES):  # Anon, then Anon8bit: the table lists the subclass first for lookups
        if name.optimizer_cls not in supported:
            supported.append(name.optimizer_cls)


def on_engine_imported(module: ModuleType) -> None:
    """``deepspeed.runtime.engine``: validate a config-named Anon before DeepSpeed builds it."""

    def make_wrapper(original):
        def _configure_basic_optimizer(self, model_parameters, *args, **kwargs):
            name = self.optimizer_name()
            if _is_anon_type(name):
                optimizer_cls = _check_type_spelling(name)
                validate_anon_params(self.optimizer_params() or {}, optimizer_cls=optimizer_cls)
                if getattr(torch.optim, name, None) is not optimizer_cls:
                    setattr(torch.optim, name, optimizer_cls)
            return original(self, model_parameters, *args, **kwargs)

        return _configure_basic_optimizer

    wrap_once(module.DeepSpeedEngine, "_configure_basic_optimizer", make_wrapper)


def on_accelerator_imported(module: ModuleType) -> None:
    """``accelerate.accelerator``: refuse to let accelerate turn a client Anon into DeepSpeedCPUAdam."""

    def make_wrapper(original):
        def map_pytorch_optim_to_deepspeed(optimizer, *args, **kwargs):
            if isinstance(getattr(optimizer, "optimizer", optimizer), Anon) or isinstance(optimizer, Anon):
                device = "cpu"
                try:
                    from accelerate.state import AcceleratorState

                    config = AcceleratorState().deepspeed_plugin.deepspeed_config
                    device = config["zero_optimization"]["offload_optimizer"]["device"]
                except Exception:  # the message only quotes the device; "cpu" is what reaches this path
                    pass
                raise ValueError(OFFLOAD_SWAP_MESSAGE.format(device=device))
            return original(optimizer, *args, **kwargs)

        return map_pytorch_optim_to_deepspeed

    wrap_once(module, "map_pytorch_optim_to_deepspeed", make_wrapper)


def on_hf_deepspeed_imported(module: ModuleType) -> None:
    """``transformers.integrations.deepspeed``: the Trainer's "auto" filling leaves Anon's eps alone."""

    def make_wrapper(original):
        def trainer_config_process(self, args, *rest, **kwargs):
            block = self.config.get("optimizer") if isinstance(self.config, dict) else None
            reconcile_deepspeed_block(block, args)  # the block against --optim/--optim_args: fill or refuse
            if not (isinstance(block, dict) and _is_anon_type(block.get("type"))):
                return original(self, args, *rest, **kwargs)
            optimizer_cls = _check_type_spelling(block["type"])
            params = block.get("params") or {}
            validate_anon_params(params, allow_auto=True, optimizer_cls=optimizer_cls)
            # The Trainer compares a numeric eps with adam_epsilon and reports a mismatch; Anon's eps is not
            # Adam's, so it is kept out of that comparison and put back untouched.
            has_eps = "eps" in params
            eps = params.pop("eps", None)
            try:
                return original(self, args, *rest, **kwargs)
            finally:
                if has_eps:
                    params["eps"] = eps

        return trainer_config_process

    wrap_once(module.HfTrainerDeepSpeedConfig, "trainer_config_process", make_wrapper)
