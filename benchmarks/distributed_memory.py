"""Per-rank optimizer-state bytes of Anon, Anon8bit and AdamW under DDP, ZeRO-1/2/3 and FSDP2 (2 gloo CPU ranks).

Usage::

    python benchmarks/distributed_memory.py            # launches itself with torchrun, 2 processes
    python benchmarks/distributed_memory.py --out-dir benchmarks/results

Each engine wraps the same small Llama, takes one training step (optimizers create their state lazily), and
each rank sums the bytes of the tensors its optimizer holds in ``optimizer.state``: for DeepSpeed the inner
optimizer's state on the rank's flat partition, for FSDP2 the local shards of the DTensor state. DeepSpeed's
own fp32 master partition is the same for every optimizer and is reported in its own column. Writes
``distributed_memory.json`` and ``distributed_memory.md`` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OPTIMIZERS = {
    "Anon (gamma=1)": ("anon", dict(lr=1e-3, gamma=1.0)),
    "Anon (gamma=0)": ("anon", dict(lr=1e-3, gamma=0.0)),
    "Anon8bit (gamma=1)": ("anon8bit", dict(lr=1e-3, gamma=1.0)),
    "AdamW": ("adamw", dict(lr=1e-3)),
}
ENGINES = ["ddp", "zero1", "zero2", "zero3", "fsdp2"]


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).float()


def make_optimizer(kind: str, params, kwargs: dict):
    from anon_hf import Anon, Anon8bit

    classes = {"anon": Anon, "anon8bit": Anon8bit, "adamw": torch.optim.AdamW}
    return classes[kind](params, **kwargs)


def state_bytes(optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def one_step(model, optimizer_step, backward, rank: int) -> None:
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(rank))
    backward(model(input_ids=ids, labels=ids).loss)
    optimizer_step()


def measure(engine: str, kind: str, kwargs: dict, rank: int) -> dict:
    model = small_llama()
    n_params = sum(p.numel() for p in model.parameters())
    master = 0
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        optimizer = make_optimizer(kind, model.parameters(), kwargs)
        wrapped = DDP(model)
        one_step(wrapped, optimizer.step, lambda loss: loss.backward(), rank)
        inner = optimizer
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = make_optimizer(kind, model.parameters(), kwargs)
        one_step(model, optimizer.step, lambda loss: loss.backward(), rank)
        inner = optimizer
    else:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": int(engine[-1])},
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
        }
        optimizer = make_optimizer(kind, model.parameters(), kwargs)
        wrapped, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        one_step(wrapped, wrapped.step, wrapped.backward, rank)
        inner = wrapped.optimizer.optimizer
        zero = wrapped.optimizer
        flats = zero.fp32_partitioned_groups_flat if engine == "zero3" else zero.single_partition_of_fp32_groups
        master = sum(flat.numel() * flat.element_size() for flat in flats)
    return {"params": n_params, "state_bytes": state_bytes(inner), "fp32_master_bytes": master}


def worker(out_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    import deepspeed

    import anon_hf  # noqa: F401  (registers Anon with ZeRO)

    deepspeed.init_distributed(dist_backend="gloo")
    rows = []
    for engine in ENGINES:
        for label, (kind, kwargs) in OPTIMIZERS.items():
            result = measure(engine, kind, kwargs, rank)
            gathered = [None] * world
            dist.all_gather_object(gathered, result)
            rows.append({"engine": engine, "optimizer": label, "world_size": world, "per_rank": gathered})
    if rank == 0:
        write_results(rows, out_dir)
    dist.barrier()
    dist.destroy_process_group()


def write_results(rows: list[dict], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    full = {row["engine"]: row for row in rows if row["optimizer"] == "AdamW"}
    lines = [
        "| engine | optimizer | state bytes, rank 0 | rank 1 | vs AdamW, same engine | fp32 master partition, rank 0 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        ranks = [r["state_bytes"] for r in row["per_rank"]]
        adamw = full[row["engine"]]["per_rank"][0]["state_bytes"]
        master = row["per_rank"][0]["fp32_master_bytes"]
        master_text = f"{master:,}" if master else "-"
        lines.append(
            f"| {row['engine']} | {row['optimizer']} | {ranks[0]:,} | {ranks[1]:,} | {ranks[0] / adamw:.2f}x "
            f"| {master_text} |"
        )
    params = rows[0]["per_rank"][0]["params"]
    header = (
        f"Per-rank optimizer-state bytes, 2 gloo CPU ranks, a Llama of {params:,} fp32 parameters "
        f"(`python benchmarks/distributed_memory.py`, torch {torch.__version__}).\n\n"
    )
    with open(os.path.join(out_dir, "distributed_memory.md"), "w") as handle:
        handle.write(header + "\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "distributed_memory.json"), "w") as handle:
        json.dump({"params": params, "torch": torch.__version__, "rows": rows}, handle, indent=1)
    print(header + "\n".join(lines))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.out_dir)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        os.path.abspath(__file__), "--worker", "--out-dir", args.out_dir,
    ]  # fmt: skip
    sys.exit(subprocess.call(command, env=env))


if __name__ == "__main__":
    main()
