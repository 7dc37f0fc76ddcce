"""Crash and resume: a Trainer run with Anon, SIGKILLed after its checkpoint at step 6 and resumed in a fresh process
with ``resume_from_checkpoint``, ends at step 20 bitwise where the uninterrupted run ends: the weights and Anon's
whole state (``precond``, ``exp_avg``, ``exp_avg_sq``, ``step``), on CPU, in one process and under DeepSpeed ZeRO-2
with two processes.

The runs happen in ``tests/crash/trainer_worker.py``; one launch runs the uninterrupted run and then the run that
gets killed (the transformers import is paid once), a second launch resumes. See that file for the kill points.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from crash.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "crash" / "trainer_worker.py"
ZERO2_CONFIG = ROOT / "recipes" / "configs" / "ds_zero2.json"
TORCHRUN = Path(sys.executable).parent / "torchrun"
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "precond")

HAS_TRANSFORMERS = all(importlib.util.find_spec(name) for name in ("transformers", "accelerate"))
HAS_DEEPSPEED = HAS_TRANSFORMERS and importlib.util.find_spec("deepspeed") is not None
requires_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers and accelerate installed")


def launch(command: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def tail(result: subprocess.CompletedProcess, chars: int = 4000) -> str:
    return (result.stdout + result.stderr)[-chars:]


def load(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return torch.load(path, weights_only=True)


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [name for name in a if not torch.equal(a[name], b[name])]


def assert_bitwise_same_run(full: dict, resumed: dict, state_keys=STATE_KEYS) -> None:
    assert full["optimizer"] == resumed["optimizer"] == "Anon"
    assert full["global_step"] == resumed["global_step"] == 20
    assert full["steps"] == resumed["steps"] == [20]
    assert full["refresh_history"] == [1, 2, 4, 8, 16]
    # The resumed Anon refreshed only at 8 and 16: the schedule continued from the checkpoint's step 6.
    assert resumed["refresh_history"] == [8, 16]
    assert differences(full["params"], resumed["params"]) == []
    assert full["state"].keys() == resumed["state"].keys()
    for name in full["state"]:
        assert tuple(sorted(full["state"][name])) == tuple(sorted(state_keys)), name
        assert differences(full["state"][name], resumed["state"][name]) == [], name


def assert_killed_at(out: Path, rank: int, step: int) -> None:
    marker = json.loads((out / f"killed.rank{rank}.json").read_text())
    assert marker["global_step"] == step
    # The crashed run got no further than its first checkpoint and wrote no result.
    assert sorted(p.name for p in (out / "crash").iterdir()) == ["checkpoint-6"]


@requires_transformers
def test_sigkill_after_checkpoint_then_resume_is_bitwise_exact(tmp_path):
    first = launch([sys.executable, str(WORKER), str(tmp_path), "full", "crash-in-step8"], timeout=600)
    assert first.returncode == -signal.SIGKILL, tail(first)
    # Killed inside step 8, after optimizer.step() had refreshed the preconditioner in memory: two steps of work
    # past checkpoint-6 are lost, and nothing of them may leak into the resumed run.
    assert_killed_at(tmp_path, rank=0, step=8)

    second = launch([sys.executable, str(WORKER), str(tmp_path), "resume", "resume-without-optimizer"], timeout=600)
    assert second.returncode == 0, tail(second)
    full = load(tmp_path / "full" / "result.rank0.pt")
    resumed = load(tmp_path / "crash" / "result.rank0.pt")
    assert full["world_size"] == resumed["world_size"] == 1
    assert_bitwise_same_run(full, resumed)

    # The control: the same resume without optimizer.pt (which the Trainer accepts without a word) restarts Anon
    # from nothing, and the comparison above would have caught it.
    control = load(tmp_path / "no_optimizer" / "result.rank0.pt")
    assert control["global_step"] == 20 and control["steps"] == [14]
    assert control["refresh_history"] == [1, 2, 4, 8]
    assert len(differences(full["params"], control["params"])) == len(full["params"])
    # AnonCallback says so, once: for the control, not for the real resume.
    assert (second.stdout + second.stderr).count("Resuming at step 6 with no Anon optimizer state") == 1, tail(second)


@pytest.mark.distributed  # 35-55 s on the 2-core machine: two torchrun launches of 2 ranks
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed, transformers and accelerate installed")
@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is not installed next to this Python")
def test_zero2_sigkill_after_checkpoint_then_resume_is_bitwise_exact(tmp_path):
    def torchrun(port: int, *phases: str) -> subprocess.CompletedProcess:
        command = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(port), str(WORKER), str(tmp_path)]
        return launch([*command, *phases, "--deepspeed", str(ZERO2_CONFIG)], timeout=600)

    port = free_port()
    first = torchrun(port, "full", "crash-at-save")
    # Both ranks SIGKILLed themselves in on_save at step 6, once every rank had checked its files and passed a barrier.
    assert first.returncode != 0
    assert "Signal 9 (SIGKILL) received by PID" in first.stderr, tail(first)
    for rank in (0, 1):
        assert_killed_at(tmp_path, rank=rank, step=6)
    checkpoint = tmp_path / "crash" / "checkpoint-6"
    assert sorted(p.name for p in (checkpoint / "global_step6").iterdir()) == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]

    second = torchrun(free_port(used={port}), "resume")
    assert second.returncode == 0, tail(second)
    for rank in (0, 1):
        full = load(tmp_path / "full" / f"result.rank{rank}.pt")
        resumed = load(tmp_path / "crash" / f"result.rank{rank}.pt")
        assert full["world_size"] == resumed["world_size"] == 2
        assert full["zero_stage"] == resumed["zero_stage"] == 2
        # Bitwise, not within round-off: same world size, so the same flat partitions, the fp32 master partitions
        # come back exactly from the checkpoint, and gloo's reductions of the same inputs in the same order are
        # deterministic. The gathered state holds no "step" (ZeRO keeps one per flat partition, compared below).
        assert_bitwise_same_run(full, resumed, state_keys=("exp_avg", "exp_avg_sq", "precond"))
        assert differences(full["fp32_params"], resumed["fp32_params"]) == []
        # This rank's flat partitions, as Anon holds them: half of the parameters each, state shaped alike.
        partitions = full["partition_state"]
        total = sum(p.numel() for p in full["params"].values())
        assert sum(s["precond"].numel() for s in partitions) < total
        assert len(partitions) == len(resumed["partition_state"])
        for before, after in zip(partitions, resumed["partition_state"], strict=True):
            assert sorted(before) == sorted(after) == sorted(STATE_KEYS)
            assert int(before["step"]) == int(after["step"]) == 20
            assert differences(before, after) == []
