"""The sweep's ``late_vocab`` task: one run whose second half is a new domain with tokens of its own.

A tiny Llama (``recipes/causal_lm/train.py``'s model) is trained from scratch by one Trainer, with one optimizer, on a
curriculum: the first half of the steps on the Python docs (``pydoc_data.topics``), the second half on tweets. The
tokenizer is trained on both, so the tokens that only the tweets use (``@``-names, emoji bytes, slang) have embedding
rows that get no gradient at all until the switch: weights first seen late, as in continued pre-training on a new
domain or a data mixture that changes. The metric is the loss on held-out tweets after the last step: what the second
domain was learnt with.

Flags are ``recipes/causal_lm/train.py``'s (``--corpus`` and ``--dataset_name`` are ignored), plus
``--switch_fraction`` (default 0.5): the share of the steps spent on the first domain.

    python recipes/sweep/late_vocab.py --optim anon --learning_rate 3e-3 --max_steps 300 --output_dir /tmp/late
"""

from __future__ import annotations

import logging
import math
import random
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import Trainer, default_data_collator, set_seed  # noqa: E402

from recipes.causal_lm import train as causal_lm  # noqa: E402

logger = logging.getLogger(__name__)


class CurriculumTrainer(Trainer):
    """A Trainer that takes the training examples in the order given (the curriculum), not shuffled."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def _split(examples: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    train = [ex for i, ex in enumerate(examples) if not causal_lm._held_out(i, fraction)]
    evals = [ex for i, ex in enumerate(examples) if causal_lm._held_out(i, fraction)]
    return train, evals


def _cycled(examples: list[dict], count: int, rng: random.Random) -> list[dict]:
    """``count`` examples: shuffled passes over ``examples`` (the seed sets the order, as the Trainer's would)."""
    out: list[dict] = []
    while len(out) < count:
        batch = list(examples)
        rng.shuffle(batch)
        out += batch
    return out[:count]


def build(argv: list[str] | None, switch_fraction: float):
    """(model args, training args, tokenizer, curriculum features, tweet eval features, first-domain steps, the
    number of tokens that occur in the tweets' training text only)."""
    model_args, data_args, training_args = causal_lm.parse_args(argv)
    block = data_args.block_size
    pydoc_train, _ = _split(causal_lm.pydoc_examples(max_chars=max(64, int(3.5 * block))), data_args.eval_fraction)
    tweet_train, tweet_eval = _split(causal_lm.tweet_examples(), data_args.eval_fraction)
    if data_args.max_train_samples is not None:
        tweet_train = tweet_train[: data_args.max_train_samples]
        pydoc_train = pydoc_train[: data_args.max_train_samples]
    if data_args.max_eval_samples is not None:
        tweet_eval = tweet_eval[: data_args.max_eval_samples]
    texts = [ex["prompt"] + ex["response"] for ex in pydoc_train + tweet_train]
    tokenizer = causal_lm.train_tokenizer(texts, model_args.vocab_size, block)
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    first_steps = round(training_args.max_steps * switch_fraction)
    rng = random.Random(training_args.seed)
    first = causal_lm.encode(_cycled(pydoc_train, first_steps * batch, rng), tokenizer, block, True)
    second_count = (training_args.max_steps - first_steps) * batch
    second = causal_lm.encode(_cycled(tweet_train, second_count, rng), tokenizer, block, True)
    evals = causal_lm.encode(tweet_eval, tokenizer, block, True)
    seen_first = {i for ex in first for i in ex["input_ids"]}
    late_tokens = len({i for ex in second for i in ex["input_ids"]} - seen_first)
    return model_args, training_args, tokenizer, first + second, evals, first_steps, late_tokens


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train on the curriculum, evaluate on held-out tweets; the same result dict as ``recipes/causal_lm/train.py``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    switch_fraction = 0.5
    if "--switch_fraction" in argv:
        at = argv.index("--switch_fraction")
        switch_fraction = float(argv[at + 1])
        del argv[at : at + 2]
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, training_args, tokenizer, train, evals, first_steps, late_tokens = build(argv, switch_fraction)
    logger.info("%d steps on pydoc, then tweets; %d tokens first seen after the switch", first_steps, late_tokens)
    set_seed(training_args.seed)
    model = causal_lm.build_model(model_args, tokenizer, len(train[0]["input_ids"]))
    trainer = CurriculumTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    train_metrics = trainer.train().metrics
    eval_metrics = trainer.evaluate()
    eval_metrics["eval_perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50.0))
    return {
        "train": train_metrics,
        "eval": eval_metrics,
        "log_history": trainer.state.log_history,
        "first_domain_steps": first_steps,
        "late_tokens": late_tokens,
    }


if __name__ == "__main__":
    print(main())
