"""Registration in every interpreter a run starts (anon_hf/launcher/startup.py): `anon-hf run`'s children, spawned
workers, the `anon-hf enable` .pth, turning it off, and a regular wheel install."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

from anon_hf.integrations.import_utils import is_transformers_available
from anon_hf.launcher import cli
from anon_hf.launcher import startup as _startup

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
requires_transformers = pytest.mark.skipif(not is_transformers_available(), reason="transformers is not installed")

# A child's view: can it parse --optim anon, and what did start-up alone import?
PROBE = textwrap.dedent(
    """
    import json, sys
    at_start = sorted(m for m in ("torch", "anon_hf", "transformers") if m in sys.modules)
    from transformers import HfArgumentParser, TrainingArguments
    try:
        (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", "unused", "--optim", "anon", "--optim_args", "gamma=1.1"]
        )
        parsed = args.optim.value
    except SystemExit:
        parsed = None
    anon_hf = sys.modules.get("anon_hf")
    print(json.dumps({"at_start": at_start, "parsed": parsed, "anon_hf": getattr(anon_hf, "__file__", None)}))
    """
)


def clean_env(**extra):
    """The environment of a process that did not ask for anything (no ANON_HF_AUTO_REGISTER)."""
    environment = {k: v for k, v in os.environ.items() if k != _startup.ENV_VAR}
    environment.update(OMP_NUM_THREADS="1", **extra)
    return environment


def probe(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.fixture
def parent_script(tmp_path):
    """A script that knows nothing of anon_hf and starts two child interpreters running PROBE."""
    (tmp_path / "probe.py").write_text(PROBE)
    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys\n"
        f"probe = {str(tmp_path / 'probe.py')!r}\n"
        "for _ in range(2):\n"
        "    out = subprocess.run([sys.executable, probe], capture_output=True, text=True)\n"
        "    sys.stdout.write(out.stdout); sys.stderr.write(out.stderr)\n"
    )
    return script


@pytest.fixture(autouse=True)
def _restore_environment(monkeypatch):
    # cli.run() exports the variables for its children into os.environ; keep them out of the other tests.
    monkeypatch.delenv(_startup.ENV_VAR, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))


# --- the switch -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, default, expected",
    [(None, False, False), (None, True, True), ("1", False, True), ("on", False, True), ("0", True, False)],
)
def test_wanted_reads_the_variable_then_the_default(value, default, expected):
    environ = {} if value is None else {_startup.ENV_VAR: value}
    assert _startup.wanted(default, environ) is expected


def test_an_unreadable_value_warns_and_counts_as_off():
    with pytest.warns(UserWarning, match=r"ANON_HF_AUTO_REGISTER='maybe' is neither"):
        assert _startup.wanted(True, {_startup.ENV_VAR: "maybe"}) is False


def test_run_exports_the_switch_and_the_site_dir_unless_turned_off(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    script = tmp_path / "target.py"
    script.write_text("")
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    assert cli.main(["run", str(script)]) == 0
    assert os.environ[_startup.ENV_VAR] == "1"
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [_startup.site_dir(), "/somewhere"]
    assert cli.main(["run", str(script)]) == 0  # not added twice
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [_startup.site_dir(), "/somewhere"]

    monkeypatch.setenv(_startup.ENV_VAR, "0")
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    assert cli.main(["run", str(script)]) == 0
    assert os.environ[_startup.ENV_VAR] == "0" and os.environ["PYTHONPATH"] == "/somewhere"


# --- child interpreters -----------------------------------------------------------------------------------------


@requires_transformers
def test_children_of_anon_hf_run_register_and_start_light(parent_script):
    children = probe([sys.executable, "-m", "anon_hf", "run", str(parent_script)], env=clean_env())
    assert len(children) == 2
    for child in children:
        assert child["parsed"] == "anon"
        assert child["at_start"] == []  # start-up imported neither torch nor anon_hf
        assert child["anon_hf"] is not None


@requires_transformers
def test_turned_off_children_do_not_register(parent_script):
    children = probe(
        [sys.executable, "-m", "anon_hf", "run", str(parent_script)], env=clean_env(**{_startup.ENV_VAR: "0"})
    )
    assert [child["parsed"] for child in children] == [None, None]
    assert [child["anon_hf"] for child in children] == [None, None]


@requires_transformers
def test_a_process_that_did_not_ask_is_untouched(tmp_path):
    # The site dir on PYTHONPATH without the switch (e.g. left over in a shell): nothing registers.
    env = clean_env(PYTHONPATH=os.pathsep.join([_startup.site_dir(), os.environ.get("PYTHONPATH", "")]))
    (child,) = probe([sys.executable, "-c", PROBE], env=env)
    assert child == {"at_start": [], "parsed": None, "anon_hf": None}


def test_an_existing_sitecustomize_still_runs(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import os\nos.environ['THEIR_SITECUSTOMIZE_RAN'] = __file__\n")
    pythonpath = os.pathsep.join([_startup.site_dir(), str(theirs), os.environ.get("PYTHONPATH", "")])
    code = "import os, sys; print(os.environ.get('THEIR_SITECUSTOMIZE_RAN'), sys.modules['sitecustomize'].__file__)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=clean_env(PYTHONPATH=pythonpath, **{_startup.ENV_VAR: "1"}),
    )
    assert result.returncode == 0, result.stderr
    ran, module_file = result.stdout.split()
    assert ran == module_file == str(theirs / "sitecustomize.py")


@requires_transformers
def test_spawned_dataloader_workers_register(tmp_path):
    script = tmp_path / "loader.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch

            class Probe(torch.utils.data.Dataset):
                def __len__(self):
                    return 1

                def __getitem__(self, index):
                    from transformers.training_args import OptimizerNames  # in the spawned worker
                    return torch.tensor(OptimizerNames("anon").value == "anon")

            if __name__ == "__main__":
                loader = torch.utils.data.DataLoader(Probe(), num_workers=1, multiprocessing_context="spawn")
                print("worker registered:", bool(next(iter(loader)).item()))
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "anon_hf", "run", str(script)], capture_output=True, text=True, env=clean_env()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "worker registered: True" in result.stdout


# --- anon-hf enable / disable -----------------------------------------------------------------------------------


@requires_transformers
def test_enable_writes_a_pth_that_registers_everywhere_and_disable_removes_it(tmp_path, capsys):
    site = tmp_path / "site"
    site.mkdir()
    assert cli.main(["enable", "--site-packages", str(site)]) == 0
    pth = site / _startup.PTH_NAME
    assert f"wrote {pth}" in capsys.readouterr().out
    # site.addsitedir runs a site dir's .pth files as interpreter start-up does for site-packages.
    code = f"import site; site.addsitedir({str(site)!r})\n" + PROBE
    (child,) = probe([sys.executable, "-c", code], env=clean_env())
    assert child["parsed"] == "anon" and child["at_start"] == []
    (off,) = probe([sys.executable, "-c", code], env=clean_env(**{_startup.ENV_VAR: "0"}))
    assert off["parsed"] is None and off["anon_hf"] is None

    assert cli.main(["disable", "--site-packages", str(site)]) == 0
    assert not pth.exists()
    assert "removed" in capsys.readouterr().out
    assert cli.main(["disable", "--site-packages", str(site)]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    assert cli.main(["enable", "--site", str(site)]) == 2
    assert "allowed: --site-packages DIR" in capsys.readouterr().err


def test_a_pth_left_behind_by_an_uninstall_is_harmless(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / _startup.PTH_NAME).write_text(_startup.pth_line(str(tmp_path / "gone" / "_startup.py")))
    code = f"import site, sys; site.addsitedir({str(site)!r}); print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env())
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "ok", "")


# --- a regular (non-editable) install ---------------------------------------------------------------------------


@requires_transformers
@pytest.mark.slow
def test_wheel_install_registers_children_and_enables(tmp_path, parent_script):
    """Build the wheel, install it with --no-deps into a fresh venv that sees this environment's packages through
    a plain path entry (so this environment's editable anon_hf is not visible there), and run both routes."""
    source, wheels = tmp_path / "source", tmp_path / "wheels"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):  # what the build reads, copied so the checkout is left alone
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "anon_hf", source / "anon_hf", ignore=shutil.ignore_patterns("__pycache__"))
    # Without setuptools here, pip fetches the build requirements from the registry into an isolated build.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(wheels), str(source)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("anon_hf-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env = clean_env()
    env.pop("PYTHONPATH", None)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # After the install, or pip would find this environment's anon-hf there and install nothing.
    (Path(purelib) / "shared_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = Path(purelib) / "anon_hf"
    assert (installed / "launcher" / "_startup_site" / "sitecustomize.py").is_file()

    children = probe([str(env_dir / "bin" / "anon-hf"), "run", str(parent_script)], env=env)
    assert [child["parsed"] for child in children] == ["anon", "anon"]
    assert all(child["anon_hf"].startswith(str(installed)) for child in children)

    subprocess.run([str(env_dir / "bin" / "anon-hf"), "enable"], check=True, env=env, capture_output=True)
    assert (Path(purelib) / _startup.PTH_NAME).is_file()
    (child,) = probe([str(python), "-c", PROBE], env=env, cwd=tmp_path)  # not ROOT: `-c` puts the cwd on sys.path
    assert child["parsed"] == "anon" and child["at_start"] == [] and child["anon_hf"].startswith(str(installed))
    subprocess.run([str(env_dir / "bin" / "anon-hf"), "disable"], check=True, env=env, capture_output=True)
    (child,) = probe([str(python), "-c", PROBE], env=env, cwd=tmp_path)
    assert child["parsed"] is None


def test_a_command_that_is_not_python_runs_as_a_child_with_the_switch(tmp_path, monkeypatch):
    """`anon-hf run python ...` (or any executable on PATH): a child process that inherits the switch."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    out = tmp_path / "env.txt"
    code = (
        f"import os; open({str(out)!r}, 'w').write(os.environ['{_startup.ENV_VAR}'] + ' ' + os.environ['PYTHONPATH'])"
    )
    assert cli.main(["run", Path(sys.executable).name, "-c", code]) == 0
    switch, pythonpath = out.read_text().split(" ", 1)
    assert switch == "1" and pythonpath.split(os.pathsep)[0] == _startup.site_dir()
    assert cli.main(["run", Path(sys.executable).name, "-c", "raise SystemExit(3)"]) == 3
