"""FSDP2 (raw ``fully_shard``, DTensor params) training steps with each optimizer, counting Python objects.

``torchrun --nproc_per_node 2 tests/distributed/fsdp2_growth_worker.py <out_dir> [steps] [warmup] [names]``: per
optimizer (``names``, comma-separated, default all of :data:`OPTIMIZERS`), the tiny Llama under ``fully_shard`` (each
layer, then the model) trains ``steps`` steps (forward, backward, ``step()``, ``zero_grad``) on fixed batches. After
``warmup`` steps, every 50 steps from there and after the last one, each rank runs ``gc.collect()`` and records ``len(gc.get_objects())``.
Writes ``fsdp2_growth.rank<r>.json``: ``{name: {"objects": {step: count}, "refresh_history": [...]}}``.
"""

from __future__ import annotations

import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    ANON_KWARGS,
    Report,
    causal_lm_loss,
    global_batches,
    init_process_group,
    local_rows,
    run_cases,
    tiny_llama,
)

from anon_hf import Anon, Anon8bit  # noqa: E402

OPTIMIZERS = {
    "anon_fused": (Anon, dict(fused=True)),
    "anon8bit_fused": (Anon8bit, dict(fused=True)),
    "anon_defaults": (Anon, dict()),
}


def object_count() -> int:
    gc.collect()
    return len(gc.get_objects())


def train_counting(name: str, rank: int, world: int, steps: int, warmup: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama(0)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    cls, kwargs = OPTIMIZERS[name]
    optimizer = cls(model.parameters(), **ANON_KWARGS, **kwargs)
    batches = [local_rows(batch, rank, world) for batch in global_batches(8)]
    objects = {}
    for step in range(1, steps + 1):
        causal_lm_loss(model, batches[step % len(batches)]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == steps or (step >= warmup and (step - warmup) % 50 == 0):
            objects[step] = object_count()
    return {"objects": objects, "refresh_history": list(optimizer.refresh_history)}


def main() -> None:
    out_dir = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    warmup = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    names = sys.argv[4].split(",") if len(sys.argv) > 4 else list(OPTIMIZERS)
    rank, world = init_process_group()
    report = Report(out_dir, "fsdp2_growth", rank)

    def case(name):
        return lambda: report.__setitem__(name, train_counting(name, rank, world, steps, warmup))

    run_cases({name: case(name) for name in names}, [], report)


if __name__ == "__main__":
    main()
