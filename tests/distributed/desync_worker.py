"""A deliberately desynchronized rank: after step 5, rank 1's per-tensor step counters are moved by ``SHIFT``.

Usage: ``torchrun --nproc_per_node 2 tests/distributed/desync_worker.py OUT_DIR ENGINE SHIFT [node1]``
with ENGINE in ``ddp``, ``fsdp2``, ``zero2`` and SHIFT a non-zero integer (``+1``: rank 1 runs ahead) or
``stop``: at step 8 (a refresh), after its backward pass, the last rank stops itself (SIGSTOP) instead of calling
``optimizer.step()``, as a hung process would. With ``node1`` (under two torchrun agents) every rank of the node
with GROUP_RANK 1 is moved, instead of rank 1 alone.

The healthy outcome is that some rank raises ``RefreshOutOfSyncError`` within a few steps and the job fails,
instead of hanging in a collective. The rank that raises writes ``desync.rank<r>.json`` with the message and the
time it was raised; every rank writes how far it got, so the test can tell a clean failure from a hang or a
silent pass.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from anon_hf import Anon, RefreshOutOfSyncError  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Report, init_process_group  # noqa: E402

STEPS = 20
SHIFT_AFTER = 5
STOP_AT = 8


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def main(out_dir: str, engine: str, shift: str, moved: str) -> None:
    rank, world = init_process_group()
    report = Report(out_dir, f"desync_{engine}", rank)
    moves = os.environ.get("GROUP_RANK") == "1" if moved == "node1" else rank == 1
    report["where"] = {"group_rank": os.environ.get("GROUP_RANK"), "local_rank": os.environ.get("LOCAL_RANK")}
    model = small_model()
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model)
        opt = Anon(model.parameters(), lr=1e-2)
        inner = opt
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        opt = Anon(model.parameters(), lr=1e-2)
        inner = opt
    elif engine == "zero2":
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": 2},
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
        }
        deepspeed.init_distributed(dist_backend="gloo")
        opt = Anon(model.parameters(), lr=1e-2)
        model, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        inner = model.optimizer.optimizer
    else:
        raise ValueError(f"unknown engine {engine!r}")

    generator = torch.Generator().manual_seed(rank)
    for step in range(1, STEPS + 1):
        report["reached_step"] = step
        x = torch.randn(2, 8, generator=generator)
        loss = model(x).pow(2).mean()
        try:
            if engine == "zero2":
                model.backward(loss)
                model.step()
            else:
                loss.backward()
                if shift == "stop" and step == STOP_AT and rank == world - 1:
                    report["stopped_at"] = time.time()
                    os.kill(os.getpid(), signal.SIGSTOP)
                opt.step()
                opt.zero_grad(set_to_none=True)
        except RefreshOutOfSyncError as err:
            report["error"] = str(err)
            report["error_at_step"] = step
            report["error_time"] = time.time()
            raise
        if step == SHIFT_AFTER and moves and shift != "stop":
            for state in inner.state.values():
                state["step"] += int(shift)
    report["finished"] = True
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "rank1")
