"""``benchmarks/gpu_check.py`` (``make gpu-check``): it runs on CUDA and passes (``gpu`` marker), says SKIPPED and
exits 0 without CUDA, and its parity, Trainer and table logic is exercised here on CPU tensors.

The CPU run (``--device cpu --tiny``) steps the same rows on a ~0.15M-param set with ``ANON_HF_CPU_KERNEL=0``, so
``fused=True`` runs the torch.compile'd graphs that CUDA tensors run; its timings mean nothing and are not checked.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
CHECKS = {"first compile", "parity", "trainer", "step time", "peak memory"}

_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look the module up
_spec.loader.exec_module(gpu_check)

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def run_script(*args, timeout=900):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


# --------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (run `make gpu-check` on a GPU machine)"
)
def test_the_gpu_check_passes_on_cuda(tmp_path):
    proc = run_script("--json", str(tmp_path / "gpu_check.json"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert {row["check"] for row in rows} == CHECKS
    assert not [row for row in rows if row["verdict"] in ("FAIL", "FAILED")]
    assert sum(row["check"] == "parity" and row["verdict"] == "pass" for row in rows) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check runs instead of skipping")
def test_without_cuda_it_says_why_and_exits_0():
    proc = run_script(timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("gpu-check: SKIPPED: no CUDA device"), proc.stdout


def test_make_gpu_check_runs_the_script():
    proc = subprocess.run(["make", "-n", "gpu-check"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "benchmarks/gpu_check.py" in proc.stdout


def test_cpu_needs_the_tiny_self_test_mode():
    proc = run_script("--device", "cpu", timeout=300)
    assert proc.returncode == 2 and "add --tiny" in proc.stderr


# --------------------------------------------------------------------------------------- its logic, on CPU


def _tensors(*values):
    return [torch.tensor(values, dtype=torch.float32)]


def test_parity_passes_within_tolerance_and_fails_outside_it():
    initial, foreach = _tensors(0.0, 0.0, 0.0, 0.0), _tensors(1.0, -1.0, 0.5, 2.0)
    close = _tensors(1.0 + 5e-6, -1.0, 0.5, 2.0)
    assert gpu_check.parity_row("s", close, foreach, initial, 1e-5, 1e-5, 1.0).verdict == "pass"
    far = _tensors(1.0 + 1e-3, -1.0, 0.5, 2.0)
    row = gpu_check.parity_row("s", far, foreach, initial, 1e-5, 1e-5, 1.0)
    assert row.verdict == "FAIL" and math.isclose(row.numbers["fraction_within"], 0.75)
    assert gpu_check.parity_row("s", far, foreach, initial, 1e-5, 1e-5, 0.75).verdict == "pass"  # 8-bit's allowance
    nan = _tensors(float("nan"), -1.0, 0.5, 2.0)
    assert gpu_check.parity_row("s", nan, foreach, initial, 1e-5, 1e-5, 0.75).verdict == "FAIL"
    assert gpu_check.parity_row("s", initial, initial, initial, 1e-5, 1e-5, 1.0).verdict == "FAIL"  # nothing moved


def test_trainer_row_needs_exit_0_anon_every_step_and_finite_losses():
    def result(optimizer="Anon", losses=(5.5, 5.2, 5.0, 4.9), steps=20):
        history = [{"loss": loss, "step": 5 * (i + 1)} for i, loss in enumerate(losses)]
        return {"optimizer": optimizer, "log_history": history + [{"train_loss": 5.1, "step": steps}]}

    assert gpu_check.trainer_row("s", 0, "", result(), 9.0).verdict == "pass"
    failed = gpu_check.trainer_row("s", 1, "Traceback ...\nValueError: invalid choice 'anon'\n", None, 9.0)
    assert failed.verdict == "FAIL" and "invalid choice" in failed.result
    assert gpu_check.trainer_row("s", 0, "", result(optimizer="AdamW"), 9.0).verdict == "FAIL"
    assert gpu_check.trainer_row("s", 0, "", result(losses=(5.5, float("nan"))), 9.0).verdict == "FAIL"
    assert gpu_check.trainer_row("s", 0, "", result(losses=(5.5, 5.2), steps=12), 9.0).verdict == "FAIL"


def test_a_row_that_raises_becomes_a_failed_row_and_the_table_goes_on(monkeypatch, capsys):
    def broken():
        raise RuntimeError("CUDA out of memory | on the 1B set")

    def missing():
        raise gpu_check.Unavailable("bitsandbytes not importable")

    def fine():
        return [gpu_check.Row("parity", "fine", result="ok", verdict="pass")]

    sections = [("parity", fine), ("step time", broken), ("step time", missing), ("trainer", fine)]
    monkeypatch.setattr(gpu_check, "sections", lambda ctx: iter(sections))
    # main() on CPU sets ANON_HF_CPU_KERNEL=0 for its process; here that is pytest's, so it is restored afterwards.
    monkeypatch.setenv("ANON_HF_CPU_KERNEL", "0")
    assert gpu_check.main(["--device", "cpu", "--tiny"]) == 1
    out = capsys.readouterr().out
    table = out[out.index("| check |") :].split("\n\n")[0].splitlines()
    assert len(table) == 2 + 4
    assert table[3].endswith("| FAILED |") and "RuntimeError: CUDA out of memory / on the 1B set" in table[3]
    assert table[4].endswith("| skipped |") and "bitsandbytes not importable" in table[4]
    assert table[2].startswith("| parity | fine | ok |") and table[5].startswith("| parity | fine | ok |")
    assert "gpu-check: FAILED: 1 rows" in out


def test_the_budget_skips_what_is_left(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "sections", lambda ctx: iter([("step time", lambda: [])]))
    monkeypatch.setenv("ANON_HF_CPU_KERNEL", "0")  # restored afterwards (main() sets it for its process)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--budget-s", "0"]) == 0
    assert "| step time | - | time budget of 0 s spent |" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="the Trainer row needs transformers installed")
def test_every_row_runs_on_cpu_tensors_in_tiny_mode(tmp_path):
    proc = run_script("--device", "cpu", "--tiny", "--json", str(tmp_path / "rows.json"))
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    by_check = {check: [row for row in rows if row["check"] == check] for check in CHECKS}
    assert [row["verdict"] for row in by_check["parity"]] == ["pass"] * 4
    for row in by_check["parity"]:  # the compiled graphs ran, not a fallback
        ran = row["numbers"]["paths_run"]
        assert ran["fallback"] == 0 and ran["compiled_8bit" if "Anon8bit" in row["setting"] else "compiled"] > 0
    assert [row["verdict"] for row in by_check["trainer"]] == ["pass"]
    assert [row["verdict"] for row in by_check["first compile"]] == ["measured"] * 2
    measured = {row["setting"].split(",")[0] for row in by_check["step time"] if row["verdict"] == "measured"}
    assert {"Anon(fused=True)", "Anon8bit(fused=True)", "Anon(foreach=True)"} <= measured
    assert all(row["numbers"]["ratio"] > 0 for row in by_check["step time"] if row["verdict"] == "measured")
    memory = {row["setting"].split(",")[0]: row for row in by_check["peak memory"]}
    assert memory["AdamW(fused=True)"]["ratio"] == "1.00x"
    # state bytes per param on CPU: AdamW 8, Anon 12 (+4 B per tensor for the step), Anon8bit about 3 on 8-bit tensors
    adamw, anon = (memory[k]["numbers"]["state_bytes"] for k in ("AdamW(fused=True)", "Anon(fused=True)"))
    assert 1.45 < anon / adamw < 1.55
    assert "| check | setting | result | reference | ratio / tolerance | verdict |" in proc.stdout
