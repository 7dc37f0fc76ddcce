"""`anon-hf run` / `python -m anon_hf run`: scripts, modules and console commands, single- and multi-process."""

import json
import os
import shutil
import sys
from pathlib import Path

import launch
import pytest

from anon_hf.integrations.import_utils import (
    is_accelerate_available,
    is_deepspeed_available,
    is_transformers_available,
)
from anon_hf.launcher import cli

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "scripts"
TRAIN = SCRIPTS / "train_tiny_llama.py"
BIN = Path(sys.executable).parent
ANON_HF = BIN / "anon-hf"

requires_transformers = pytest.mark.skipif(not is_transformers_available(), reason="transformers is not installed")
TRAIN_ARGS = [
    "--optim", "anon", "--optim_args", "gamma=0.5", "--max_steps", "3", "--per_device_train_batch_size", "4",
    "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "100",
    "--use_cpu", "true",
]  # fmt: skip


def env(**extra):
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    environment.update(extra)
    return environment


def run(command, **kwargs):
    return launch.run(command, env=kwargs.pop("env", env()), **kwargs)


def read_results(output_dir, world_size):
    return [json.loads((output_dir / f"result_rank{rank}.json").read_text()) for rank in range(world_size)]


def assert_trained_with_anon(result, world_size):
    assert result["optimizer"] == "Anon"
    assert result["optim"] == "anon"
    assert result["world_size"] == world_size
    assert [g["gamma"] for g in result["groups"]] == [0.5, 0.5]
    assert result["callbacks"][0] == "AnonCallback"
    assert [h["anon/refresh_step"] for h in result["log_history"] if "anon/refresh_step" in h] == [1, 2]


@pytest.fixture(autouse=True)
def _restore_environment(monkeypatch):
    # cli.run() exports ANON_HF_AUTO_REGISTER and PYTHONPATH for its children; keep them out of later tests.
    monkeypatch.delenv("ANON_HF_AUTO_REGISTER", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))


@pytest.fixture
def fake_console_script(tmp_path):
    """A console script `anon-hf-test-parse` -> parse_args:main, declared by a throwaway dist-info on sys.path."""
    site = tmp_path / "site"
    dist_info = site / "anon_hf_test_fake-0.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: anon-hf-test-fake\nVersion: 0.0\n")
    (dist_info / "entry_points.txt").write_text("[console_scripts]\nanon-hf-test-parse = parse_args:main\n")
    return site


# --- in process ------------------------------------------------------------------------------------------------


def test_usage_version_and_errors(capsys):
    assert cli.main([]) == 2
    assert "usage: anon-hf run SCRIPT.py" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert "anon-hf run -m MODULE" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("anon-hf 0.")
    assert cli.main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err
    assert cli.main(["run"]) == 2
    assert "missing the script" in capsys.readouterr().err
    assert cli.main(["run", "-m"]) == 2
    assert "missing the module name" in capsys.readouterr().err
    assert cli.main(["run", "--optim", "anon"]) == 2
    assert "unknown option '--optim'" in capsys.readouterr().err
    assert cli.main(["run", "no-such-command-anon-hf"]) == 2
    assert "neither a file nor an installed console script" in capsys.readouterr().err


def test_run_script_gets_its_own_argv_name_and_path(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    script = tmp_path / "target.py"
    out = tmp_path / "out.json"
    script.write_text(
        "import json, sys\n"
        "import helper_next_to_target\n"  # the script's own folder is importable, as with `python target.py`
        f"json.dump({{'argv': sys.argv, 'name': __name__}}, open({str(out)!r}, 'w'))\n"
    )
    (tmp_path / "helper_next_to_target.py").write_text("")
    assert cli.main(["run", str(script), "--optim", "anon", "-x"]) == 0
    assert json.loads(out.read_text()) == {"argv": [str(script), "--optim", "anon", "-x"], "name": "__main__"}


def test_a_launchers_local_rank_is_handed_to_the_target(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    script = tmp_path / "target.py"
    out = tmp_path / "argv.json"
    script.write_text(f"import json, sys\njson.dump(sys.argv[1:], open({str(out)!r}, 'w'))\n")
    # The DeepSpeed launcher runs `python -u -m anon_hf --local_rank=N run ...`.
    assert cli.main(["--local_rank=1", "run", str(script), "--optim", "anon"]) == 0
    assert json.loads(out.read_text()) == ["--local_rank=1", "--optim", "anon"]
    assert cli.main(["--local-rank", "0", "run", str(script)]) == 0
    assert json.loads(out.read_text()) == ["--local-rank", "0"]


def test_run_propagates_the_targets_exit_status(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    script = tmp_path / "fails.py"
    script.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(SystemExit) as info:
        cli.main(["run", str(script)])
    assert info.value.code == 3


# --- real processes: the registration must happen in the target's own process ----------------------------------


@requires_transformers
def test_plain_python_rejects_optim_anon_but_the_launcher_accepts_it(tmp_path):
    argv = [str(SCRIPTS / "parse_args.py"), "--output_dir", str(tmp_path), "--optim", "anon"]
    plain = run([sys.executable, *argv])
    assert plain.returncode == 2
    assert "invalid choice: 'anon'" in plain.stderr
    launched = run([sys.executable, "-m", "anon_hf", "run", *argv, "--optim_args", "gamma=0"])
    assert launched.returncode == 0, launched.stderr
    assert json.loads(launched.stdout.splitlines()[-1]) == {
        "optim": "anon",
        "optim_args": "gamma=0",
        "argv0": argv[0],
    }


@requires_transformers
def test_run_module_and_console_command(tmp_path, fake_console_script):
    pythonpath = os.pathsep.join([str(fake_console_script), str(SCRIPTS), os.environ.get("PYTHONPATH", "")])
    module = run(
        [sys.executable, "-m", "anon_hf", "run", "-m", "parse_args", "--output_dir", str(tmp_path), "--optim", "anon"],
        cwd=SCRIPTS,
    )
    assert module.returncode == 0, module.stderr
    result = json.loads(module.stdout.splitlines()[-1])
    assert result["optim"] == "anon" and result["argv0"] == str(SCRIPTS / "parse_args.py")

    command = run(
        [
            sys.executable,
            "-m",
            "anon_hf",
            "run",
            "anon-hf-test-parse",
            "--output_dir",
            str(tmp_path),
            "--optim",
            "anon",
        ],
        env=env(PYTHONPATH=pythonpath),
    )
    assert command.returncode == 0, command.stderr
    assert json.loads(command.stdout.splitlines()[-1]) == {
        "optim": "anon",
        "optim_args": None,
        "argv0": "anon-hf-test-parse",
    }


@requires_transformers
@pytest.mark.skipif(not ANON_HF.is_file(), reason="the anon-hf console script is not installed in this environment")
def test_console_script_trains_an_unmodified_trainer_script(tmp_path):
    result = run(
        [str(ANON_HF), "run", str(TRAIN), "--output_dir", str(tmp_path), *TRAIN_ARGS[:-2], "--max_steps", "2"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_trained_with_anon(read_results(tmp_path, 1)[0], world_size=1)


@requires_transformers
@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun is not installed")
def test_torchrun_two_processes_each_register(tmp_path):
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29511", "-m", "anon_hf", "run"]
    result = run([*command, str(TRAIN), "--output_dir", str(tmp_path), *TRAIN_ARGS], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = read_results(tmp_path, 2)
    for rank in ranks:
        assert_trained_with_anon(rank, world_size=2)
    # The statistics are all-reduced, so every rank logs the same numbers.
    refresh_logs = [[h for h in rank["log_history"] if "anon/refresh_step" in h] for rank in ranks]
    assert refresh_logs[0] == refresh_logs[1]


@requires_transformers
@pytest.mark.distributed
@pytest.mark.skipif(not is_accelerate_available() or not ANON_HF.is_file(), reason="accelerate or anon-hf missing")
def test_accelerate_launch_runs_the_console_script_on_two_processes(tmp_path):
    command = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "29512",
    ]
    result = run([*command, str(ANON_HF), "run", str(TRAIN), "--output_dir", str(tmp_path), *TRAIN_ARGS], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in read_results(tmp_path, 2):
        assert_trained_with_anon(rank, world_size=2)


@requires_transformers
@pytest.mark.distributed
@pytest.mark.skipif(
    not is_deepspeed_available() or not (BIN / "deepspeed").is_file(), reason="the deepspeed launcher is not installed"
)
def test_deepspeed_launcher_runs_the_module_on_two_processes(tmp_path):
    command = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29513", "--module", "anon_hf", "run"]
    result = run(
        [*command, str(TRAIN), "--output_dir", str(tmp_path), *TRAIN_ARGS], timeout=600, env=env(DS_ACCELERATOR="cpu")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in read_results(tmp_path, 2):
        assert_trained_with_anon(rank, world_size=2)


@requires_transformers
@pytest.mark.distributed
@pytest.mark.skipif(not is_deepspeed_available(), reason="deepspeed is not installed")
def test_zero2_under_torchrun_trains_with_anon_and_the_callback_finds_it(tmp_path):
    """The Trainer builds Anon (no optimizer block in the config) and DeepSpeed wraps it twice; stats still log."""
    config = tmp_path / "zero2.json"
    config.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            }
        )
    )
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29514", "-m", "anon_hf", "run"]
    out = tmp_path / "out"
    result = run(
        [*command, str(TRAIN), "--output_dir", str(out), *TRAIN_ARGS, "--deepspeed", str(config)],
        timeout=600,
        env=env(DS_ACCELERATOR="cpu"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = read_results(out, 2)
    for rank in ranks:
        assert_trained_with_anon(rank, world_size=2)
    refresh_logs = [[h for h in rank["log_history"] if "anon/refresh_step" in h] for rank in ranks]
    assert refresh_logs[0] == refresh_logs[1]
    assert all(0 < h["anon/group0/precond_min"] <= h["anon/group0/precond_median"] for h in refresh_logs[0])


@pytest.mark.parametrize(
    "argv, processes",
    [
        (["accelerate", "launch", "--cpu", "--num_processes", "2", "train.py", "--x"], 2),
        (["accelerate", "launch", "--num_processes=4", "--cpu", "train.py"], 4),
        (["accelerate", "launch", "--cpu", "--num_processes", "1", "train.py"], None),
        (["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "train.py", "--cpu"], None),
        (["torchrun", "--cpu", "--num_processes", "2", "train.py"], None),
    ],
)
def test_accelerate_launch_cpu_with_several_processes_is_flagged(argv, processes):
    # accelerate launch --cpu --num_processes 2 runs one process; `anon-hf run` says so on stderr before it starts.
    assert cli.accelerate_cpu_processes(argv) == processes


@requires_transformers
def test_the_launcher_accepts_optim_anon_8bit(tmp_path):
    argv = [str(SCRIPTS / "parse_args.py"), "--output_dir", str(tmp_path), "--optim", "anon_8bit"]
    launched = run([sys.executable, "-m", "anon_hf", "run", *argv, "--optim_args", "gamma=0.5"])
    assert launched.returncode == 0, launched.stderr
    assert json.loads(launched.stdout.splitlines()[-1])["optim"] == "anon_8bit"


# --- build-kernels ---------------------------------------------------------------------------------------------


def test_build_kernels_rejects_unknown_arguments(capsys):
    assert cli.main(["build-kernels", "--out", "DIR"]) == 2
    assert "unexpected arguments ['--out', 'DIR'] (allowed: --dir DIR)" in capsys.readouterr().err


def test_build_kernels_says_where_the_kernels_are_and_how_to_use_them(tmp_path, monkeypatch, capsys):
    # The builds themselves are replaced here (tests/test_kernel_cache.py builds for real, marked slow).
    from anon_hf.backends import cpu_kernel

    def build_all():
        root = cpu_kernel.cache_root()
        return [
            cpu_kernel.BuiltKernel(k, root / f"{k.prefix}_x", s)
            for k, s in zip(cpu_kernel.KERNELS, (97.0, None), strict=True)
        ]

    monkeypatch.setattr(cpu_kernel, "build_all", build_all)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "elsewhere"))  # restored after: --dir exports it
    assert cli.main(["build-kernels", "--dir", str(tmp_path / "kernels")]) == 0
    out = capsys.readouterr().out
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "kernels")
    assert f"Anon's fused=True step: built in 97 s: {tmp_path / 'kernels' / 'anon_hf_cpu_x'}" in out
    assert f"Anon8bit's step: already built: {tmp_path / 'kernels' / 'anon_hf_cpu8_x'}" in out
    assert f"export TORCH_EXTENSIONS_DIR={tmp_path / 'kernels'}" in out


def test_build_kernels_reports_a_failed_build(monkeypatch, capsys):
    from anon_hf.backends import cpu_kernel

    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernel, "build_all", no_compiler)
    assert cli.main(["build-kernels"]) == 1
    assert "a kernel could not be built: RuntimeError: Ninja is required" in capsys.readouterr().err
