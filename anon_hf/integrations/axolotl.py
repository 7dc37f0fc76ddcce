"""axolotl: check ``optimizer: anon`` and its ``optim_args`` when axolotl validates its config, before any work.

axolotl builds ``TrainingArguments`` (where anon_hf's own check of ``optim_args`` runs) in
``axolotl/core/builders``, after it has tokenised the data sets and loaded the model, so a typo in ``optim_args``
would surface minutes into a run. Its config is validated much earlier, by
``axolotl.utils.config.validate_config`` from ``axolotl.cli.config.load_cfg``, in every process that
``axolotl train`` starts. Wrapping that function runs the same check there, with the same message.

The check uses what axolotl hands to transformers: ``optim_args`` as a dict (joined into ``key=value,...``) or
as that text.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ._patches import wrap_once
from .optim_args import anon_name_for_optim, parse_optim_args

__all__ = ["check_axolotl_config", "on_axolotl_config_imported"]


def check_axolotl_config(cfg: Any) -> None:
    """Raise ``ValueError`` for a bad ``optim_args`` when ``cfg["optimizer"]`` is ``anon`` or ``anon_8bit``.

    Args:
        cfg: axolotl's validated config (a dict-like ``DictDefault``).
    """
    named = anon_name_for_optim(cfg.get("optimizer"))
    if named is not None:
        parse_optim_args(cfg.get("optim_args"), named.optimizer_cls, named.optim)


def _checking(validate_config):
    def validate_config_and_anon(cfg, *args, **kwargs):
        validated = validate_config(cfg, *args, **kwargs)
        check_axolotl_config(validated)
        return validated

    return validate_config_and_anon


def on_axolotl_config_imported(module: ModuleType) -> None:
    """``axolotl.utils.config``: wrap ``validate_config`` (before ``axolotl.cli.config`` imports the name)."""
    wrap_once(module, "validate_config", _checking)
