"""``create_anon_optimizer``: Anon over a model with AdamW-style decay / no-decay param groups (torch only)."""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

from .optimizer import Anon

__all__ = ["create_anon_optimizer", "decay_param_groups"]

# The same name rules as transformers' Trainer.get_decay_parameter_names, so both paths build the same groups.
_NO_DECAY_NAME_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)


def _is_norm_module(module: nn.Module) -> bool:
    # Model code defines its own norms (LlamaRMSNorm, T5LayerNorm): their class names say so.
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def decay_param_groups(
    model: nn.Module, weight_decay: float, *, no_decay_patterns: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a decayed group and a group with ``weight_decay=0``.

    A parameter goes without decay when it belongs to a normalization module (torch's norm layers, or a module
    whose class name contains "norm") or its name matches one of ``no_decay_patterns`` (regular expressions,
    searched case-insensitively; default: transformers' Trainer patterns ``bias``, ``layernorm``, ``rmsnorm``,
    ``norm`` as a name component). Embeddings keep their decay, as in the Trainer. Frozen parameters
    (``requires_grad=False``) are left out; tied parameters appear once.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]``; a group
        with no parameters is omitted.
    """
    patterns = [re.compile(p, re.IGNORECASE) for p in (no_decay_patterns or _NO_DECAY_NAME_PATTERNS)]
    norm_params = {id(p) for module in model.modules() if _is_norm_module(module) for p in module.parameters()}
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in norm_params or any(pattern.search(name) for pattern in patterns):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def create_anon_optimizer(
    model: nn.Module,
    *,
    lr: float | Tensor,
    weight_decay: float = 0.0,
    no_decay_patterns: tuple[str, ...] | None = None,
    **anon_kwargs: Any,
) -> Anon:
    """Create an :class:`~anon_hf.Anon` for ``model`` with decoupled weight decay off biases and norm weights.

    Anon is the optimizer of Zhang et al., "Anon: Extrapolating Adaptivity Beyond SGD and Adam",
    https://arxiv.org/abs/2605.02317. This factory builds the two param groups that transformers' ``Trainer``
    builds for ``--optim anon`` (see :func:`decay_param_groups`), for custom training loops and for
    ``Trainer(optimizers=(create_anon_optimizer(model, lr=...), None))``.

    Args:
        model: the module whose trainable parameters are optimized.
        lr: learning rate, as for :class:`~anon_hf.Anon`.
        weight_decay: decay of the first group; biases and norm weights get 0 (default: 0.0).
        no_decay_patterns: name patterns for parameters without decay (default: the Trainer's).
        **anon_kwargs: every other :class:`~anon_hf.Anon` argument (``betas``, ``gamma``, ``eps``,
            ``decoupled_weight_decay``, ``refresh``, ``beta3``, ``bounds``, ``foreach``, ...).

    Example:
        >>> optimizer = anon_hf.create_anon_optimizer(model, lr=1e-3, weight_decay=0.1, gamma=1.0)
    """
    if "params" in anon_kwargs:
        raise TypeError("create_anon_optimizer builds the param groups from `model`; do not pass `params`")
    groups = decay_param_groups(model, weight_decay, no_decay_patterns=no_decay_patterns)
    if not groups:
        raise ValueError("create_anon_optimizer: the model has no parameter with requires_grad=True")
    return Anon(groups, lr=lr, weight_decay=weight_decay, **anon_kwargs)
