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


SENTENCES = [
    "the optimizer refreshes its preconditioner at powers of two",
    "a tiny model learns to continue short sentences",
    "gamma one is adam like and gamma zero is sgd like",
    "every rank steps together and refreshes together",
]


def save_tiny_causal_lm(directory) -> str:
    """Save a tiny Llama and a byte-level BPE tokenizer (eos/pad/bos set) to ``directory``, as from the hub.

    What ``--model_name_or_path`` of a CLI such as ``trl sft`` loads, offline. Returns ``str(directory)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(SENTENCES * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    model = tiny_llama(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def save_text_dataset(directory, kind: str = "sft") -> str:
    """A local data set folder ``load_dataset(directory)`` reads (a ``train.jsonl``): ``text`` rows for SFT,
    ``prompt``/``chosen``/``rejected`` rows for DPO. Returns ``str(directory)``."""
    import json
    import os

    os.makedirs(directory, exist_ok=True)
    rows = []
    for index, sentence in enumerate(SENTENCES * 4):
        words = sentence.split()
        if kind == "sft":
            rows.append({"text": sentence})
        else:
            other = SENTENCES[(index + 1) % len(SENTENCES)].split()
            rows.append(
                {
                    "prompt": " ".join(words[:3]),
                    "chosen": " " + " ".join(words[3:]),
                    "rejected": " " + " ".join(other[3:]),
                }
            )
    with open(os.path.join(directory, "train.jsonl"), "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return str(directory)
