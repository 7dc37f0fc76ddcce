"""The tiny Llama and token data that the tests and their worker scripts share; built from a config, no download.

Worker scripts started by torchrun import this after putting ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import torch


def tiny_llama_config(**overrides):
    """A 2-layer Llama of ~50k parameters. Embeddings are tied by default: every embedding row then gets a gradient
    at every step. An untied row of a token absent from the batch has a zero gradient, so a refresh sets its
    preconditioner to eps**-0.5 = 1e8 and the row jumps when the token shows up, which makes any comparison of two
    runs ill-conditioned."""
    from transformers import LlamaConfig

    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaConfig(**{**kwargs, **overrides})


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    """The same fp32 weights in every process and call with the same ``seed``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.config.use_cache = False
    return model.float()


class TokenDataset(torch.utils.data.Dataset):
    """``size`` fixed sequences of ``length`` token ids in [0, 256), as causal-LM examples (labels = inputs)."""

    def __init__(self, size: int = 64, length: int = 16):
        self.ids = torch.randint(0, 256, (size, length), generator=torch.Generator().manual_seed(1234))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}
