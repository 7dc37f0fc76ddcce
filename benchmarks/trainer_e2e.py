"""End to end: ``Trainer`` on a tiny Llama, ``--optim anon`` against ``--optim adamw_torch_fused``, in one process.

Each round trains the same freshly initialised tiny ``LlamaForCausalLM`` for a fixed number of steps once per
optimizer, in alternating order, and reads ``train_samples_per_second`` from ``Trainer.train()``'s metrics. A first
round (discarded) pays for imports, first-use allocations and, for ``fused=true``, compiling. The ratio reported
for each Anon variant is the median over rounds of its samples/s divided by AdamW's in the same round, and beside
it the ratio of the two fastest rounds (other load only ever slows a run down).

    python benchmarks/trainer_e2e.py                       # CPU, 1 thread, 3 timed rounds of 200 steps
    python benchmarks/trainer_e2e.py --rounds 5 --steps 100

Writes ``benchmarks/results/trainer_e2e_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import anon_hf  # noqa: E402, F401  (registers --optim anon when transformers is imported)

VARIANTS = {
    "adamw_torch_fused": dict(optim="adamw_torch_fused"),
    "anon": dict(optim="anon"),
    "anon_foreach": dict(optim="anon", optim_args="foreach=true"),
    "anon_fused": dict(optim="anon", optim_args="fused=true"),
}


class Blocks(torch.utils.data.Dataset):
    """Fixed random byte blocks: the model and the data cost the same for every optimizer."""

    def __init__(self, count: int, length: int):
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, 256, (count, length), generator=generator)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def tiny_llama(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def train_once(variant: str, args, output_dir: str) -> dict:
    from transformers import Trainer, TrainingArguments

    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-3,
        weight_decay=0.01,
        logging_steps=args.steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
        seed=0,
        **VARIANTS[variant],
    )
    trainer = Trainer(
        model=tiny_llama(args.hidden, args.layers),
        args=training_args,
        train_dataset=Blocks(args.batch * args.steps, args.length),
    )
    metrics = trainer.train().metrics
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    return dict(
        samples_per_second=metrics["train_samples_per_second"],
        train_loss=metrics["train_loss"],
        optimizer=type(optimizer).__name__,
        fused=getattr(optimizer, "param_groups", [{}])[0].get("fused"),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (one more is run first and discarded)")
    parser.add_argument("--steps", type=int, default=200, help="per run; Anon refreshes at 1, 2, 4, ..., 128")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    variants = args.variants.split(",")
    started = time.perf_counter()
    rounds = []
    with tempfile.TemporaryDirectory() as output_dir:
        for number in range(args.rounds + 1):
            order = variants if number % 2 == 0 else variants[::-1]
            result = {variant: train_once(variant, args, output_dir) for variant in order}
            rounds.append(result)
            tag = "warm-up (discarded)" if number == 0 else f"round {number}"
            print(tag, {v: round(r["samples_per_second"], 2) for v, r in result.items()}, flush=True)  # noqa: T201
    timed = rounds[1:]
    summary = {}
    for variant in variants:
        ratios = [r[variant]["samples_per_second"] / r["adamw_torch_fused"]["samples_per_second"] for r in timed]
        best = max(r[variant]["samples_per_second"] for r in timed)
        summary[variant] = dict(
            samples_per_second_median=statistics.median(r[variant]["samples_per_second"] for r in timed),
            ratio_to_adamw_torch_fused_median=statistics.median(ratios),
            # Load from other jobs only ever slows a run down: the fastest round of each is the least disturbed.
            ratio_of_best_rounds=best / max(r["adamw_torch_fused"]["samples_per_second"] for r in timed),
            ratios=ratios,
            optimizer=timed[0][variant]["optimizer"],
            fused=timed[0][variant]["fused"],
        )
    from transformers import __version__ as transformers_version

    result = dict(
        command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        args=vars(args),
        machine=dict(
            torch=torch.__version__,
            transformers=transformers_version,
            threads=torch.get_num_threads(),
            load_average_at_end=os.getloadavg(),
        ),
        summary=summary,
        rounds=rounds,
        wall_s=round(time.perf_counter() - started, 1),
    )
    out = Path(args.out or Path(__file__).parent / "results" / f"trainer_e2e_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for variant, s in summary.items():
        print(
            f"{variant:18s} {s['samples_per_second_median']:8.2f} samples/s  {s['ratio_to_adamw_torch_fused_median']:.3f}x "
            f"adamw_torch_fused, best rounds {s['ratio_of_best_rounds']:.3f}x  "
            f"(rounds: {', '.join(f'{r:.3f}' for r in s['ratios'])})"
        )
    print(f"wall {result['wall_s']} s; wrote {out}")


if __name__ == "__main__":
    main()
