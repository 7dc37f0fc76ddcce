"""What storing Anon's state in bf16 (``precond_dtype`` / ``moments_dtype``) or in 8 bits (``Anon8bit``) does to the
loss of a tiny Llama.

Trains the same tiny ``LlamaForCausalLM`` (built from a config, fp32 weights) on the same byte-level text (the standard
library's ``pydoc_data.topics``) from the same initialisation, once per state-dtype option and seed, and reports the
mean training loss over the last 10% of steps, the mean held-out loss at the end, and the optimizer-state bytes per
parameter. The difference between seeds with fp32 state is the noise floor the bf16 options are compared with.

    python benchmarks/state_dtype_loss.py                    # 1,000 steps, seeds 0 and 1 (~10 min on 1 CPU thread)
    python benchmarks/state_dtype_loss.py --steps 300 --seeds 0
    python benchmarks/state_dtype_loss.py --seeds 0,1,2 --options fp32_state,8bit_state \
        --out benchmarks/results/state_dtype_loss_8bit.json

``8bit_state`` is ``Anon8bit(fused=True)``: blockwise 8-bit m, s and v for the tensors of 4,096 elements and more
(here all but the norms), the C++ kernel between refreshes.

Writes ``benchmarks/results/state_dtype_loss.json``. The run covers the refresh intervals up to 512 steps, where bf16
moments lose the increments of ``exp_avg_sq`` smaller than 2**-9 of its value (with beta2 = 0.999 that is the case
once an interval passes ~256 steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anon_hf import Anon, Anon8bit  # noqa: E402

OPTIONS = {
    "fp32_state": dict(),
    "bf16_precond": dict(precond_dtype="bf16"),
    "bf16_moments": dict(moments_dtype="bf16"),
    "bf16_all": dict(precond_dtype="bf16", moments_dtype="bf16"),
    "8bit_state": dict(fused=True),
}
EIGHT_BIT = {"8bit_state"}


def text_bytes() -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n".join(topics[key] for key in sorted(topics)).encode("utf-8", errors="ignore")
    return torch.tensor(list(text), dtype=torch.long)


def model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def batches(data: torch.Tensor, steps: int, batch: int, length: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=generator)
        yield torch.stack([data[s : s + length] for s in starts.tolist()])


def run(option: str, seed: int, data, held_out, args) -> dict:
    net = model(seed)
    optimizer_cls = Anon8bit if option in EIGHT_BIT else Anon
    optimizer = optimizer_cls(net.parameters(), lr=args.lr, eps=args.eps, weight_decay=0.01, **OPTIONS[option])
    losses = []
    started = time.perf_counter()
    for tokens in batches(data, args.steps, args.batch, args.length, seed):
        loss = net(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        eval_losses = [
            net(input_ids=t, labels=t).loss.item() for t in batches(held_out, 20, args.batch, args.length, 99)
        ]
    numel = sum(p.numel() for p in net.parameters())
    state = sum(v.nbytes for s in optimizer.state.values() for k, v in s.items() if k != "step")  # side values too
    tail = losses[-max(1, args.steps // 10) :]
    return dict(
        option=option,
        seed=seed,
        final_train_loss=statistics.mean(tail),
        held_out_loss=statistics.mean(eval_losses),
        state_bytes_per_param=state / numel,
        seconds=time.perf_counter() - started,
        loss_curve_every_50=[round(statistics.mean(losses[i : i + 50]), 4) for i in range(0, len(losses), 50)],
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eps", type=float, default=1e-8, help="1e-8: byte embeddings get sparse gradients")
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "state_dtype_loss.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = text_bytes()
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:]
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for option in args.options.split(","):
            row = run(option, seed, train, held_out, args)
            rows.append(row)
            print(
                f"seed {seed} {option:13s} train {row['final_train_loss']:.4f}  held-out {row['held_out_loss']:.4f}  "
                f"state {row['state_bytes_per_param']:.2f} B/param  ({row['seconds']:.0f} s)",
                flush=True,
            )
    summary = {}
    for option in args.options.split(","):
        mine = [r for r in rows if r["option"] == option]
        summary[option] = dict(
            held_out_loss_mean=statistics.mean(r["held_out_loss"] for r in mine),
            held_out_loss_delta_vs_fp32=statistics.mean(
                r["held_out_loss"]
                - next(b["held_out_loss"] for b in rows if b["option"] == "fp32_state" and b["seed"] == r["seed"])
                for r in mine
            ),
            state_bytes_per_param=mine[0]["state_bytes_per_param"],
        )
    seeds_fp32 = [r["held_out_loss"] for r in rows if r["option"] == "fp32_state"]
    result = dict(
        command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        args=vars(args),
        seed_spread_fp32=max(seeds_fp32) - min(seeds_fp32),
        summary=summary,
        runs=rows,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for option, s in summary.items():
        print(
            f"{option:13s} held-out {s['held_out_loss_mean']:.4f} ({s['held_out_loss_delta_vs_fp32']:+.4f} vs fp32)  {s['state_bytes_per_param']:.2f} B/param"
        )
    print(f"seed spread (fp32 state, held-out): {result['seed_spread_fp32']:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
