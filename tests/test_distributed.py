"""Anon under DDP, FSDP2 and DeepSpeed ZeRO 1/2/3 with 2 gloo CPU processes, and the DeepSpeed integration.

The multi-process checks run the worker scripts of ``tests/distributed/`` under torchrun, once per script (a
module-scoped fixture), and assert on the JSON each rank writes; see each worker's docstring for what it runs.

Tolerances (fp32):
* ``PARITY_ATOL``: 2 ranks against one process on the same global batch, after 20 steps at lr 1e-3. The
  gradients differ by the round-off of the all-reduce (~1e-9 absolute); Anon's update ``m / sqrt(s + eps)``
  turns that into O(lr) differences for the few elements whose gradient is itself ~1e-8, so the bound is a
  fraction of one step, 5e-5 (the largest measured is 1.4e-5; a real fault, e.g. DeepSpeed's default
  gradient clipping left on, gives 1.2e-2).
* ``RESUME_ATOL``: a resumed run against the uninterrupted one: the same arithmetic on the same data, so fp32
  round-off only (measured 0.0 on one world size, 1.2e-7 for the 2-rank -> 1-rank universal resume).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import types

import launch
import pytest
import torch
from crash.ports import free_port

import anon_hf
from anon_hf import Anon
from anon_hf.integrations import deepspeed as ds_integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "distributed")
PORTS = range(29530, 29570)
PARITY_ATOL = 5e-5
RESUME_ATOL = 1e-6
REFRESHES = [1, 2, 4, 8, 16]
STATE_KEYS = ["exp_avg", "exp_avg_sq", "precond", "step"]

HAS_STACK = all(importlib.util.find_spec(name) for name in ("deepspeed", "transformers", "accelerate"))
requires_stack = pytest.mark.skipif(not HAS_STACK, reason="needs deepspeed, transformers and accelerate installed")
distributed = [pytest.mark.distributed, requires_stack]


# --------------------------------------------------------------------------------------- launching workers


def torchrun(script: str, out_dir, *args, nproc: int = 2, timeout: float = 900, env: dict | None = None):
    """Run ``tests/distributed/<script>`` on ``nproc`` gloo CPU ranks; returns (returncode, output, seconds)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port(ports=PORTS)),
        os.path.join(WORKERS, script),
        str(out_dir),
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT, **(env or {})}
    start = time.monotonic()
    proc = launch.run(command, timeout=timeout, env=full_env, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def read_reports(out_dir, name: str, world: int) -> list[dict]:
    reports = []
    for rank in range(world):
        path = os.path.join(out_dir, f"{name}.rank{rank}.json")
        reports.append(json.load(open(path)) if os.path.exists(path) else {})
    return reports


def _launch(tmp_path_factory, script, name, *args, nproc=2):
    out_dir = tmp_path_factory.mktemp(name)
    code, output, seconds = torchrun(script, out_dir, *args, nproc=nproc)
    reports = read_reports(out_dir, name, nproc)
    errors = {key: value for report in reports for key, value in report.items() if key.endswith("_error")}
    return types.SimpleNamespace(
        code=code, output=output, seconds=seconds, reports=reports, errors=errors, out_dir=out_dir
    )


def _section(run, key: str) -> list[dict]:
    """One worker section from every rank, failing with the worker's own traceback or output if it is missing."""
    if f"{key}_error" in run.errors:
        pytest.fail(f"{key} raised in the worker:\n{run.errors[f'{key}_error']}")
    missing = [rank for rank, report in enumerate(run.reports) if key not in report]
    if missing:
        pytest.fail(
            f"{key}: no result from ranks {missing} (exit code {run.code}); output tail:\n{run.output[-6000:]}"
        )
    return [report[key] for report in run.reports]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return _launch(tmp_path_factory, "engines_worker.py", "engines")


@pytest.fixture(scope="module")
def universal(engines, tmp_path_factory):
    out_dir = engines.out_dir
    code, output, seconds = torchrun("universal_worker.py", out_dir, "zero2", "zero3", nproc=1)
    reports = read_reports(out_dir, "universal", 1)
    errors = {key: value for key, value in reports[0].items() if key.endswith("_error")}
    return types.SimpleNamespace(code=code, output=output, seconds=seconds, reports=reports, errors=errors)


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    return _launch(tmp_path_factory, "trainer_worker.py", "trainer")


# --------------------------------------------------------------------------------------- engine matrix

ENGINES = ["ddp", "fsdp2", "fsdp2_fused", "zero1", "zero2", "zero3", "zero2_offload", "zero2_offload_fused"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_two_ranks_match_one_process_and_refresh_together(engines, engine):
    for rank, result in enumerate(_section(engines, engine)):
        parity = result["parity"]
        assert parity["compared"] == 20, parity
        assert parity["max_abs_diff"] <= PARITY_ATOL, (rank, parity)
        assert result["refresh_history"] == REFRESHES, rank
        assert result["state_keys"] == STATE_KEYS, rank


@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3", "zero2_offload", "zero2_offload_fused"])
@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_zero_state_is_the_rank_partition(engines, engine):
    results = _section(engines, engine)
    for rank, result in enumerate(results):
        assert result["inner_type"] == "Anon"
        assert {row["key"] for row in result["state"]} == {"exp_avg", "exp_avg_sq", "precond"}
        for row in result["state"]:
            assert row["numel"] == row["partition"], (rank, row)
            # Each rank holds about half of the 90k parameters, never all of them.
            assert 2 * row["partition"] >= result["total_params"] > row["partition"], (rank, row)
    # ZeRO calls the inner step() once per param group per iteration, the same on every rank.
    assert [r["inner_step_calls_per_iteration"] for r in results] == [1, 1]


@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_fused_anon_steps_offloaded_partitions_with_the_cpu_kernel(engines):
    # "fused": true in the DeepSpeed block: the CPU partitions of ZeRO-Offload go through anon_hf's C++ kernel, one
    # call per inner step() (the parity with one process is checked with the other engines above).
    for rank, result in enumerate(_section(engines, "zero2_offload_fused")):
        assert result["partition_devices"] == ["cpu"], rank
        assert result["kernel_steps"] == 20 * result["inner_step_calls_per_iteration"], (rank, result["kernel_steps"])
    assert all(result["kernel_steps"] == 0 for result in _section(engines, "zero2_offload"))


@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_fsdp2_state_is_sharded_like_its_dtensor_parameter(engines):
    for rank, result in enumerate(_section(engines, "fsdp2")):
        rows = result["state"]
        assert rows and all(row["dtensor"] and row["same_placements"] for row in rows), rank
        assert all(row["numel"] == row["partition"] for row in rows), rank
        assert sum(row["partition"] for row in rows) < sum(row["full"] for row in rows), rank


@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_fsdp2_shards_step_through_the_cpu_kernel(engines):
    # Every step of every rank goes through the kernel on the DTensors' local shards; none falls back to eager.
    for rank, result in enumerate(_section(engines, "fsdp2_fused")):
        assert result["kernel_steps"] == 20, (rank, result)
        assert result["eager_fallbacks"] == 0, (rank, result)


@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_a_nonfinite_refresh_on_one_ranks_shard_raises_on_every_rank(engines):
    for rank, result in enumerate(_section(engines, "fsdp2_nonfinite")):
        assert result["raised"] == {"step": 4, "error_step": 4, "shape": result["full_shape"]}, rank


@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_ddp_state_is_full_size(engines):
    for result in _section(engines, "ddp"):
        assert all(row["numel"] == row["partition"] for row in result["state"])


@pytest.mark.parametrize(
    "engine, key",
    [
        ("ddp", "resume"),
        ("zero1", "resume"),
        ("zero2", "resume"),
        ("zero3", "resume"),
        ("zero2_offload", "resume"),
        ("zero2_offload_fused", "resume"),
        ("fsdp2", "resume_full"),
        ("fsdp2", "resume_sharded"),
    ],
)
@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_resume_at_step_6_matches_the_uninterrupted_run_at_step_20(engines, engine, key):
    for rank, result in enumerate(_section(engines, engine)):
        assert result[key]["compared"] == 20
        assert result[key]["max_abs_diff"] <= RESUME_ATOL, (rank, result[key])
        if engine.startswith("zero"):
            assert result["resume_refresh_history"] == [8, 16]


@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_fsdp2_dcp_state_dicts_and_the_zero_grad_init_step(engines):
    for rank, result in enumerate(_section(engines, "fsdp2")):
        # get_optimizer_state_dict on an empty Anon runs one zero-grad, lr = 0 step: every key must exist after it.
        assert result["init_step_state_keys"] == STATE_KEYS
        assert result["steps_after_load_full"] == [6] and result["steps_after_load_sharded"] == [6]
        if rank == 0:
            assert result["full_optim_sd_keys"] == STATE_KEYS


@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_client_anon_under_offload_needs_the_flag_and_then_runs(engines):
    for result in _section(engines, "client_offload"):
        assert "zero_force_ds_cpu_optimizer" in result["default_flag"]
        assert result["flag_false_inner_type"] == "Anon"
        assert result["flag_false_steps"] == [3]


# --------------------------------------------------------------------------------------- universal checkpoints


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_two_rank_zero_checkpoint_resumes_on_one_rank_with_its_preconditioner(universal, stage):
    if f"{stage}_error" in universal.errors:
        pytest.fail(universal.errors[f"{stage}_error"])
    result = universal.reports[0].get(stage)
    assert result is not None, universal.output[-6000:]
    assert result["written_keys"] == ["precond"]
    assert result["steps_after_load"] == [6]
    assert result["precond"]["compared"] == 20
    assert result["precond"]["max_abs_diff"] == 0.0, result["precond"]  # copied, not recomputed
    assert result["resume"]["max_abs_diff"] <= RESUME_ATOL, result["resume"]
    assert result["refresh_history"] == [8, 16]
    # DeepSpeed's own converter drops precond: loading its output into Anon must stop, naming the fix.
    assert result["stock_load"].startswith("RuntimeError") and "deepspeed_universal" in result["stock_load"]


# --------------------------------------------------------------------------------------- desynchronized ranks


@pytest.mark.parametrize("engine, shift", [("ddp", 1), ("fsdp2", 1), ("zero2", -1)])
@pytest.mark.distributed
@requires_stack
def test_desynchronized_rank_fails_with_the_clear_error_not_a_hang(tmp_path, engine, shift):
    # FSDP2's refresh runs collectives, so the check waits for the neighbours there: 5 s here, 60 s by default.
    code, output, seconds = torchrun(
        "desync_worker.py", tmp_path, engine, str(shift), timeout=240, env={"ANON_HF_SYNC_TIMEOUT": "5"}
    )
    reports = read_reports(tmp_path, f"desync_{engine}", 2)
    assert code != 0, output[-3000:]
    errors = [(rank, r) for rank, r in enumerate(reports) if "error" in r]
    assert errors, f"no rank raised RefreshOutOfSyncError (exit {code}):\n{output[-4000:]}"
    rank, report = errors[0]
    assert "out of sync across ranks" in report["error"]
    assert f"rank {rank}" in report["error"] and f"rank {1 - rank}" in report["error"]
    # Rank 1's counter moved after step 5; the next refresh (#4, at step 8) is where it must be caught.
    assert 7 <= report["error_at_step"] <= 9, report
    assert not any(r.get("finished") for r in reports)
    assert seconds < 120, f"took {seconds:.0f} s: the failing rank did not bring the job down promptly"


# --------------------------------------------------------------------------------------- Trainer + DeepSpeed


def _check_trainer_run(results, *, lr=2e-3, betas=(0.8, 0.99), weight_decay=0.05, eps=1e-16, gamma=1.0, groups=1):
    for rank, result in enumerate(results):
        assert result["inner_type"] == "Anon", rank
        assert result["global_step"] == 20
        assert torch.isfinite(torch.tensor(result["train_loss"]))
        assert result["refresh_history"] == REFRESHES, rank
        assert result["inner_step_calls_per_iteration"] == [groups], rank
        assert len(result["groups"]) == groups
        for group in result["groups"]:
            assert group["lr"] == pytest.approx(lr)
            assert tuple(group["betas"]) == pytest.approx(betas)
            assert group["eps"] == pytest.approx(eps, rel=1e-12)
            assert group["gamma"] == gamma
        assert result["groups"][0]["weight_decay"] == pytest.approx(weight_decay)


@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_trainer_zero2_config_optimizer_block_fills_auto_and_keeps_anon_eps(trainer_runs):
    _check_trainer_run(_section(trainer_runs, "zero2_block"))


ANON_STATS = (
    "precond_min",
    "precond_median",
    "precond_max",
    "step_size_median",
    "step_size_spread",
    "unseen_fraction",
)


@pytest.mark.parametrize(
    "case, groups", [("zero2_block", 1), ("zero3_block", 1), ("zero2_optim_anon", 2), ("zero3_optim_anon", 2)]
)
@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_trainer_under_deepspeed_logs_anon_telemetry_on_every_rank(trainer_runs, case, groups):
    """An Anon named only in the DeepSpeed config (no --optim anon) gets the AnonCallback as --optim anon does; it
    finds Anon inside DeepSpeed's wrappers, every rank joins the all-reduces and logs the same numbers."""
    results = _section(trainer_runs, case)
    expected = {"anon/refresh_step"} | {f"anon/group{g}/{stat}" for g in range(groups) for stat in ANON_STATS}
    for result in results:
        assert result["callbacks"][0] == "AnonCallback"
        assert [entry["anon/refresh_step"] for entry in result["anon_log"]] == REFRESHES
        assert {key for entry in result["anon_log"] for key in entry} == expected
    assert results[0]["anon_log"] == results[1]["anon_log"]


@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_trainer_zero3_config_optimizer_block(trainer_runs):
    _check_trainer_run(_section(trainer_runs, "zero3_block"))


@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_trainer_zero3_offload_config_runs_anon(trainer_runs):
    _check_trainer_run(_section(trainer_runs, "zero3_offload_block"))


@pytest.mark.parametrize("case", ["zero2_optim_anon", "zero3_optim_anon"])
@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_trainer_optim_anon_without_optimizer_block(trainer_runs, case):
    # The Trainer's decay / no-decay groups: ZeRO steps the inner optimizer once per group, on every rank.
    results = _section(trainer_runs, case)
    _check_trainer_run(results, gamma=0.5, groups=2)
    assert all(result["groups"][1]["weight_decay"] == 0.0 for result in results)


@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_accelerate_offload_swap_to_deepspeed_cpu_adam_is_refused(trainer_runs):
    for result in _section(trainer_runs, "offload_swap"):
        assert result["error"].startswith("ValueError")
        assert '"zero_force_ds_cpu_optimizer": false' in result["error"] and "DeepSpeedCPUAdam" in result["error"]
    for result in _section(trainer_runs, "offload_flag_false"):
        assert result["inner_type"] == "Anon" and result["global_step"] == 3


@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_trainer_config_checks_eps_auto_unknown_keys_and_explicit_eps(trainer_runs):
    for result in _section(trainer_runs, "config_checks"):
        # eps 1e-12 in the block is neither compared with adam_epsilon (1e-8) nor replaced by it.
        assert result["explicit_eps"] == {"eps": 1e-12, "lr": 2e-3, "betas": [0.8, 0.99]}
        assert result["eps_auto"].startswith("ValueError") and "adam_epsilon" in result["eps_auto"]
        assert result["unknown_key"].startswith("ValueError") and "['momentum']" in result["unknown_key"]
        assert "gamma" in result["unknown_key"] and "refresh" in result["unknown_key"]


# --------------------------------------------------------------------------------------- single-process checks


def test_config_params_validation_lists_valid_keys():
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['momentum'\].*valid keys: lr, betas, gamma, eps"):
        ds_integration.validate_anon_params({"lr": 1e-3, "momentum": 0.9})
    with pytest.raises(ValueError, match="gradient_clipping"):
        ds_integration.validate_anon_params({"max_grad_norm": 1.0})
    with pytest.raises(ValueError, match=r"only the Trainer .* fills \"auto\""):
        ds_integration.validate_anon_params({"lr": "auto"})
    with pytest.raises(ValueError, match=r"\"auto\" for \['gamma'\], which the Trainer does not fill"):
        ds_integration.validate_anon_params({"gamma": "auto"}, allow_auto=True)
    with pytest.raises(ValueError, match=r"adam_epsilon \(1e-8"):
        ds_integration.validate_anon_params({"eps": "auto"}, allow_auto=True)
    ds_integration.validate_anon_params({"lr": "auto", "betas": "auto", "weight_decay": "auto"}, allow_auto=True)
    ds_integration.validate_anon_params({"lr": 1e-3, "gamma": 0.5, "refresh": 8, "eps": 1e-12})


def test_zero_supported_list_gets_anon_once():
    module = types.SimpleNamespace(ZERO_SUPPORTED_OPTIMIZERS=[torch.optim.AdamW])
    ds_integration.on_zero_utils_imported(module)
    ds_integration.on_zero_utils_imported(module)
    assert module.ZERO_SUPPORTED_OPTIMIZERS == [torch.optim.AdamW, Anon, anon_hf.Anon8bit]


def test_accelerate_swap_guard_refuses_anon_and_passes_other_optimizers():
    swapped = []
    module = types.SimpleNamespace(map_pytorch_optim_to_deepspeed=lambda opt: swapped.append(opt) or "cpu-adam")
    ds_integration.on_accelerator_imported(module)
    ds_integration.on_accelerator_imported(module)  # idempotent: wrapped once
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"zero_force_ds_cpu_optimizer\": false"):
        module.map_pytorch_optim_to_deepspeed(Anon([param]))
    assert swapped == []
    adamw = torch.optim.AdamW([param])
    assert module.map_pytorch_optim_to_deepspeed(adamw) == "cpu-adam" and swapped == [adamw]


def test_engine_guard_checks_anon_blocks_and_spelling():
    calls = []

    class FakeEngine:
        def __init__(self, name, params):
            self._name, self._params = name, params

        def optimizer_name(self):
            return self._name

        def optimizer_params(self):
            return self._params

        def _configure_basic_optimizer(self, model_parameters):
            calls.append(self._name)
            return "built"

    ds_integration.on_engine_imported(types.SimpleNamespace(DeepSpeedEngine=FakeEngine))
    assert FakeEngine("Anon", {"lr": 1e-3})._configure_basic_optimizer([]) == "built"
    with pytest.raises(ValueError, match='write "Anon"'):
        FakeEngine("anon", {})._configure_basic_optimizer([])
    with pytest.raises(ValueError, match=r"\['foo'\]"):
        FakeEngine("Anon", {"foo": 1})._configure_basic_optimizer([])
    assert FakeEngine("adamw", {"foo": 1})._configure_basic_optimizer([]) == "built"  # not ours: untouched
    assert calls == ["Anon", "adamw"]
    assert torch.optim.Anon is Anon


def test_sync_timeout_setting_is_validated(monkeypatch):
    from anon_hf.distributed import sync as _sync

    monkeypatch.setenv(_sync.TIMEOUT_ENV, "0")
    with pytest.raises(ValueError, match="ANON_HF_SYNC_TIMEOUT"):
        _sync._wait_timeout()
    monkeypatch.setenv(_sync.TIMEOUT_ENV, "2.5")
    assert _sync._wait_timeout().total_seconds() == 2.5


def test_no_collective_refresh_is_expected_without_a_process_group():
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.ones(3)
    opt = Anon([param])
    assert anon_hf.distributed.sync.upcoming_collective_refresh(opt.param_groups, opt.state) is None


@pytest.mark.parametrize("name", ["ds_zero2.json", "ds_zero3.json", "ds_zero3_offload.json"])
def test_recipe_deepspeed_configs_name_anon_and_leave_eps_to_it(name):
    with open(os.path.join(ROOT, "recipes", "configs", name)) as handle:
        config = json.load(handle)
    block = config["optimizer"]
    assert block["type"] == "Anon"
    assert "eps" not in block["params"]  # the Trainer would fill "auto" with Adam's 1e-8
    assert {key for key, value in block["params"].items() if value == "auto"} == {"lr", "betas", "weight_decay"}
    ds_integration.validate_anon_params(block["params"], allow_auto=True)


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="needs accelerate installed")
@pytest.mark.parametrize("name, kind", [("accelerate_ddp.yaml", "MULTI_GPU"), ("accelerate_fsdp2.yaml", "FSDP")])
def test_recipe_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(os.path.join(ROOT, "recipes", "configs", name))
    assert config.distributed_type.value == kind and config.num_processes == 2
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2


# --------------------------------------------------------------------------------------- accelerate FSDP2 (GPU)


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="accelerate takes its FSDP2 path only on GPU backends (on CPU it silently runs plain DDP); needs 2 GPUs",
)
def test_accelerate_fsdp2_config_runs_anon_on_dtensor_shards(tmp_path):
    config = os.path.join(ROOT, "recipes", "configs", "accelerate_fsdp2.yaml")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config,
        "--main_process_port",
        str(free_port(ports=PORTS)),
        os.path.join(WORKERS, "accelerate_fsdp2_worker.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    reports = read_reports(tmp_path, "accelerate_fsdp2", 2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    for result in reports:
        assert result["fsdp_version"] == 2
        assert result["all_state_dtensor"] and result["refresh_history"] == REFRESHES
        assert result["parity"]["max_abs_diff"] <= PARITY_ATOL, result["parity"]
