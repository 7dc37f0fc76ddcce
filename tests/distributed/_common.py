"""Shared pieces of the torchrun worker scripts: the tiny Llama, its fixed data, the single-process reference.

Every worker runs as ``torchrun --nproc_per_node N tests/distributed/<worker>.py <out_dir> ...`` on gloo (CPU).
Each rank writes what it measured to ``<out_dir>/<name>.rank<r>.json``; ``tests/test_distributed.py`` reads
those files and asserts, so a failing check is reported by name with its numbers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from anon_hf import Anon  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny import tiny_llama, tiny_llama_config  # noqa: E402, F401  (workers import both from here)

GLOBAL_BATCH = 4
SEQ_LEN = 16
STEPS = 20
SAVE_AT = 6
# Anon's hyperparameters in every run: decoupled weight decay on, gamma = 1 (the Adam-like end).
ANON_KWARGS = dict(lr=1e-3, betas=(0.9, 0.999), gamma=1.0, weight_decay=0.01)


def global_batches(steps: int = STEPS) -> list[torch.Tensor]:
    """``steps`` fixed batches of token ids, shape (GLOBAL_BATCH, SEQ_LEN), int64."""
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 256, (GLOBAL_BATCH, SEQ_LEN), generator=generator) for _ in range(steps)]


def local_rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's equal slice of a global batch: the mean of the ranks' mean losses is the global mean loss."""
    per_rank = batch.shape[0] // world
    return batch[rank * per_rank : (rank + 1) * per_rank]


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, labels=input_ids).loss


def reference_run(steps: int = STEPS, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Single-process Anon on the full global batch: the final parameters by name (fp32, on CPU)."""
    model = tiny_llama().to(device)
    opt = Anon(model.parameters(), **ANON_KWARGS, verify_sync=False)
    for batch in global_batches(steps):
        causal_lm_loss(model, batch.to(device)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


def max_abs_diff(params: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest elementwise |a - b| and the largest |b| over all parameters, and how many names matched."""
    missing = sorted(set(reference) - set(params))
    if missing:
        raise KeyError(f"parameters missing from the distributed run: {missing[:5]}")
    diff = max((params[n].float() - reference[n].float()).abs().max().item() for n in reference)
    scale = max(reference[n].abs().max().item() for n in reference)
    return {"max_abs_diff": diff, "max_abs_ref": scale, "compared": len(reference)}


def init_process_group() -> tuple[int, int]:
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("torch.distributed").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    return dist.get_rank(), dist.get_world_size()


def finish() -> None:
    """A barrier before tearing the group down: without it gloo sometimes aborts at exit."""
    dist.barrier()
    dist.destroy_process_group()


def run_cases(runs: dict[str, Callable[[], None]], only: list[str], report: Report) -> None:
    """Run the cases named in ``only`` (all when empty) in order, each followed by a barrier; a failing case's
    traceback goes to ``report["<name>_error"]`` and the others still run. Then :func:`finish`."""
    for name, run in runs.items():
        if only and name not in only:
            continue
        try:
            run()
        except Exception:
            report[f"{name}_error"] = traceback.format_exc()
            traceback.print_exc()
        dist.barrier()
    finish()


class Report:
    """Collects one rank's measurements and writes them as JSON (one file per worker and rank)."""

    def __init__(self, out_dir: str, name: str, rank: int):
        self.path = os.path.join(out_dir, f"{name}.rank{rank}.json")
        self.data: dict = {}

    def __setitem__(self, key, value):
        self.data[key] = value
        self.write()  # written at once, so a crash later still leaves what was measured

    def write(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(self.data, handle, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
