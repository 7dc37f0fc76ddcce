"""Anon through accelerate's FSDP2 path (GPU only): ``accelerate launch --config_file
recipes/configs/accelerate_fsdp2.yaml tests/distributed/accelerate_fsdp2_worker.py OUT_DIR``.

The optimizer is built before ``accelerator.prepare`` (accelerate then points its param groups at the sharded
parameters), which works because Anon creates its state in ``step()``. Each rank records whether accelerate
really used FSDP2, whether every state tensor is a DTensor, the refresh steps, and the largest difference of
the final parameters from single-process Anon on the same device and global batch.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    ANON_KWARGS,
    Report,
    causal_lm_loss,
    global_batches,
    local_rows,
    max_abs_diff,
    reference_run,
    tiny_llama,
)

from anon_hf import Anon  # noqa: E402


def main(out_dir: str) -> None:
    from accelerate import Accelerator
    from torch.distributed.tensor import DTensor

    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    report = Report(out_dir, "accelerate_fsdp2", rank)
    plugin = accelerator.state.fsdp_plugin
    report["fsdp_version"] = getattr(plugin, "fsdp_version", None)

    model = tiny_llama()
    optimizer = Anon(model.parameters(), **ANON_KWARGS)
    model, optimizer = accelerator.prepare(model, optimizer)
    for batch in global_batches():
        loss = causal_lm_loss(model, local_rows(batch, rank, world).to(accelerator.device))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    inner = optimizer.optimizer
    tensors = [v for state in inner.state.values() for k, v in state.items() if k != "step"]
    report["all_state_dtensor"] = bool(tensors) and all(isinstance(t, DTensor) for t in tensors)
    report["refresh_history"] = inner.refresh_history
    final = {n: p.full_tensor().detach().cpu() for n, p in model.named_parameters()}
    report["parity"] = max_abs_diff(final, reference_run(device=accelerator.device))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
