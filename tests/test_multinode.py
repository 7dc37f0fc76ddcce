"""Beyond one machine, simulated on one: two torchrun agents ("nodes") meeting at a c10d rendezvous on 127.0.0.1.

Each agent is started as on a real node (``torchrun --nnodes 2 --nproc_per_node N --rdzv_backend c10d
--rdzv_endpoint HOST:PORT --rdzv_id JOB``; the commands of docs/distributed.md#multi-node with 127.0.0.1 for the
host) and runs its gloo CPU ranks under ``-m anon_hf run``, so every rank of both agents is registered by the
launcher wrapper, not by the worker. What runs (see ``tests/distributed/multinode_worker.py``):

* world size 4 (2 agents x 2): FSDP2, ZeRO-2 and ZeRO-3 against one process; their step-6 checkpoints;
* world size 2 (2 agents x 1): DDP, FSDP2, ZeRO-2 and ZeRO-3 against one process, and the world-4 checkpoints
  resumed on 2 ranks (FSDP2 by DCP resharding, ZeRO through ``python -m anon_hf.integrations.deepspeed_universal``);
* world size 1: the same resumes on one rank;
* the refresh sync check across agents: one node's ranks stepping differently, and one rank stopped (SIGSTOP);
* the other multi-machine launchers, one per simulated node: ``accelerate launch --config_file
  recipes/configs/accelerate_2nodes.yaml --machine_rank N`` (DDP) and ``deepspeed --hostfile ... --no_ssh --node_rank N`` (ZeRO-2).

Tolerances are those of tests/test_distributed.py: ``PARITY_ATOL`` against one process on the same global batch
(all-reduce round-off, amplified for elements whose gradient is ~1e-8; measured up to 1e-5 here), ``RESUME_ATOL``
for a resumed run against the unresized one (fp32 round-off of a differently split batch; measured up to 2.4e-7).
The resumed preconditioner must equal the saved one exactly.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types

import pytest
import torch.distributed as dist
from crash.ports import free_port
from test_distributed import PARITY_ATOL, REFRESHES, RESUME_ATOL, _section, read_reports, requires_stack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "distributed")
PORTS = range(29650, 29690)
BIN = os.path.dirname(sys.executable)
TORCHRUN = os.path.join(BIN, "torchrun")
SYNC_TIMEOUT_S = 5  # ANON_HF_SYNC_TIMEOUT for the stopped-rank test (60 s by default)


def torchrun_agents(program: list[str], *, nnodes: int, nproc_per_node: int) -> list[list[str]]:
    """One torchrun command per node: a c10d rendezvous at 127.0.0.1 (a plain single-node launch for 1 node)."""
    port = str(free_port(ports=PORTS))
    if nnodes == 1:
        return [[TORCHRUN, "--nproc_per_node", str(nproc_per_node), "--master_port", port, *program]]
    rendezvous = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"anon-hf-{port}"]
    command = [TORCHRUN, "--nnodes", str(nnodes), "--nproc_per_node", str(nproc_per_node), *rendezvous, *program]
    return [command] * nnodes


def accelerate_machines(program: list[str]) -> list[list[str]]:
    """The 2-machine recipe (2 x 8 GPUs at node0:29500), scaled to 1 process per simulated machine on 127.0.0.1."""
    config = os.path.join(ROOT, "recipes", "configs", "accelerate_2nodes.yaml")
    port = str(free_port(ports=PORTS))
    return [
        [os.path.join(BIN, "accelerate"), "launch", "--config_file", config, "--machine_rank", str(node)]
        + ["--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port, *program]
        for node in (0, 1)
    ]


def deepspeed_nodes(program: list[str], folder) -> list[list[str]]:
    """The deepspeed launcher once per node, without ssh; the hostfile's names are only labels then."""
    hostfile = os.path.join(folder, "hostfile")
    with open(hostfile, "w") as handle:
        handle.write("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port(ports=PORTS))
    return [
        [os.path.join(BIN, "deepspeed"), "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node)]
        + ["--master_addr", "127.0.0.1", "--master_port", port, *program]
        for node in (0, 1)
    ]


def launch(commands: list[list[str]], out_dir, *, env=None, timeout: float = 600, grace=None) -> types.SimpleNamespace:
    """Start one launcher per simulated node and wait for all of them.

    Each launcher gets its own process group (session), so that one still running at ``timeout``, or ``grace``
    seconds after the first launcher ended, is killed with its ranks; ``killed`` lists those. Returns the exit
    codes, the output of every launcher and the seconds taken.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT, **(env or {})}
    logs = [open(os.path.join(out_dir, f"node{node}.log"), "w+") for node in range(len(commands))]
    start = time.monotonic()
    agents = [
        subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT, start_new_session=True)
        for command, log in zip(commands, logs, strict=True)
    ]
    first_exit = None
    while any(agent.poll() is None for agent in agents):
        now = time.monotonic()
        if first_exit is None and any(agent.poll() is not None for agent in agents):
            first_exit = now
        if now - start > timeout or (grace is not None and first_exit is not None and now - first_exit > grace):
            break
        time.sleep(0.5)
    killed = [node for node, agent in enumerate(agents) if agent.poll() is None]
    for node in killed:
        os.killpg(agents[node].pid, signal.SIGKILL)
        agents[node].wait()
    output = []
    for log in logs:
        log.seek(0)
        output.append(log.read())
        log.close()
    return types.SimpleNamespace(
        codes=[agent.returncode for agent in agents],
        output="\n".join(output),
        seconds=time.monotonic() - start,
        killed=killed,
    )


def worker(script: str, out_dir, *args) -> list[str]:
    """``anon_hf run`` of a worker script: the program after ``-m`` (torchrun, accelerate) or ``--module``."""
    return ["anon_hf", "run", os.path.join(WORKERS, script), str(out_dir), *args]


def _job(tmp_path_factory, name: str, runs: list[str], *, nnodes: int, nproc_per_node: int, source=None):
    out_dir = tmp_path_factory.mktemp(name)
    args = ["--from", str(source.out_dir), *runs] if source else runs
    program = ["-m", *worker("multinode_worker.py", out_dir, *args)]
    run = launch(torchrun_agents(program, nnodes=nnodes, nproc_per_node=nproc_per_node), out_dir)
    return _with_reports(run, out_dir, nnodes * nproc_per_node)


def _with_reports(run, out_dir, world: int):
    """Attach what test_distributed's ``_section`` reads: every rank's report and the sections that raised."""
    run.out_dir, run.code = out_dir, run.codes
    run.reports = read_reports(out_dir, "multinode", world)
    run.errors = {key: value for report in run.reports for key, value in report.items() if key.endswith("_error")}
    return run


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    """2 agents x 2 ranks: FSDP2, ZeRO-2 and ZeRO-3, with step-6 checkpoints; the ZeRO ones then converted."""
    run = _job(tmp_path_factory, "world4", ["fsdp2", "zero2", "zero3"], nnodes=2, nproc_per_node=2)
    run.conversions = {
        stage: convert_to_universal(os.path.join(run.out_dir, f"{stage}_ckpt", "step6"))
        for stage in ("zero2", "zero3")
    }
    return run


@pytest.fixture(scope="module")
def world2(world4, tmp_path_factory):
    """2 agents x 1 rank: the engines against one process, then the world-4 checkpoints resumed."""
    runs = ["ddp", "fsdp2", "zero2", "zero3", "resize_fsdp2", "resize_zero2", "resize_zero3", "refuse_zero2"]
    return _job(tmp_path_factory, "world2", runs, nnodes=2, nproc_per_node=1, source=world4)


@pytest.fixture(scope="module")
def world1(world4, tmp_path_factory):
    runs = ["resize_fsdp2", "resize_zero2", "resize_zero3", "refuse_zero2", "gamma0_zero2", "gamma0_zero3"]
    return _job(tmp_path_factory, "world1", runs, nnodes=1, nproc_per_node=1, source=world4)


def convert_to_universal(step_folder: str) -> subprocess.CompletedProcess:
    """anon_hf's converter, as the docs run it, writing ``<step_folder>_universal``."""
    command = [sys.executable, "-m", "anon_hf.integrations.deepspeed_universal", "--input_folder", step_folder]
    command += ["--output_folder", f"{step_folder}_universal"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)


# --------------------------------------------------------------------------------------- parity across agents


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero2", "zero3"])
@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_two_agents_match_one_process_refresh_together_and_resume(world2, engine):
    for rank, result in enumerate(_section(world2, engine)):
        assert result["parity"]["compared"] == 20
        assert result["parity"]["max_abs_diff"] <= PARITY_ATOL, (rank, result["parity"])
        assert result["refresh_history"] == REFRESHES, rank
        resume = result["resume_sharded" if engine == "fsdp2" else "resume"]
        assert resume["max_abs_diff"] <= RESUME_ATOL, (rank, resume)


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_two_agents_of_two_ranks_match_one_process(world4, engine):
    for rank, result in enumerate(_section(world4, engine)):
        assert result["parity"]["max_abs_diff"] <= PARITY_ATOL, (rank, result["parity"])
        assert result["refresh_history"] == REFRESHES, rank


@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_each_agent_is_a_node_and_anon_hf_run_registers_every_rank(world4, world2):
    # torchrun numbers the ranks node by node: ranks 0, 1 on the agent of group rank 0, ranks 2, 3 on the other.
    where4, where2 = _section(world4, "where"), _section(world2, "where")
    assert [(w["group_rank"], w["local_rank"]) for w in where4] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert [w["group_rank"] for w in where2] == ["0", "1"]
    # Recorded before the worker imports anything of anon_hf: the `-m anon_hf run` wrapper registered Anon.
    assert all(w["preloaded"] for w in where4 + where2)


# --------------------------------------------------------------------------------------- resizing


@pytest.mark.parametrize("world", [2, 1])
@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_world_4_checkpoint_resumes_on_fewer_ranks_with_its_preconditioner_and_schedule(
    world4, world2, world1, engine, world
):
    for stage, conversion in world4.conversions.items():
        assert conversion.returncode == 0, (stage, conversion.stdout[-3000:] + conversion.stderr[-3000:])
    run = {2: world2, 1: world1}[world]
    for rank, result in enumerate(_section(run, f"resize_{engine}")):
        assert result["steps_after_load"] == [6], rank
        assert result["precond"]["compared"] == 20
        assert result["precond"]["max_abs_diff"] == 0.0, (rank, result["precond"])  # moved, not recomputed
        # The next refreshes are those of the unresized run: steps 8 and 16.
        assert result["refreshes_after_load"] == [8, 16], rank
        assert result["resume"]["compared"] == 20
        assert result["resume"]["max_abs_diff"] <= RESUME_ATOL, (rank, result["resume"])


@pytest.mark.parametrize("world", [2, 1])
@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_unconverted_zero_checkpoint_is_refused_on_another_world_size(world2, world1, world):
    run = {2: world2, 1: world1}[world]
    for error in _section(run, "refuse_zero2"):
        assert error.startswith("ZeRORuntimeException"), error
        assert f"DP world size of 4 but the current world size is {world}" in error


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_gamma_0_zero_checkpoint_is_refused_by_the_converter_before_writing(world1, stage):
    step3 = _section(world1, f"gamma0_{stage}")[0]
    conversion = convert_to_universal(step3)
    assert conversion.returncode != 0
    assert (
        "to a universal checkpoint: its optimizer state has no exp_avg_sq (it has ['exp_avg', 'step']), which "
        "DeepSpeed's converter requires. Anon keeps no exp_avg_sq with gamma=0."
    ) in conversion.stderr, conversion.stderr[-3000:]
    assert not os.path.exists(f"{step3}_universal")


# --------------------------------------------------------------------------------------- sync check across agents


@pytest.mark.distributed
@requires_stack
def test_one_nodes_ranks_stepping_differently_fail_naming_both_nodes(tmp_path):
    program = [os.path.join(WORKERS, "desync_worker.py"), str(tmp_path), "ddp", "1", "node1"]
    run = launch(torchrun_agents(program, nnodes=2, nproc_per_node=2), tmp_path, timeout=240)
    reports = read_reports(tmp_path, "desync_ddp", 4)
    assert run.killed == [] and all(code != 0 for code in run.codes), (run.codes, run.output[-4000:])
    errors = {rank: r["error"] for rank, r in enumerate(reports) if "error" in r}
    # Node 1's ranks (2, 3) run one step ahead; each node-0 rank meets one of them as its ring neighbour.
    assert sorted(errors) == [0, 1], (errors, run.output[-4000:])
    host = socket.gethostname()
    assert f"rank 0 (node 0, host {host}, local rank 0) at step 8 (its step() call 8)" in errors[0]
    assert f"rank 3 (node 1, host {host}, local rank 1) at step 8 (its step() call 7)" in errors[0]
    assert f"rank 2 (node 1, host {host}, local rank 0)" in errors[1]
    assert all(r["error_at_step"] == 8 for r in reports if "error" in r)
    assert not any(r.get("finished") for r in reports)


@pytest.mark.distributed
@requires_stack
def test_stopped_rank_on_the_other_node_fails_the_job_within_the_sync_timeout(tmp_path):
    # FSDP2: the check before a refresh waits for the neighbours. Rank 1, alone on node 1, stops itself (SIGSTOP)
    # after the backward pass of step 8, so its sockets stay open and no collective fails: only the time-out can
    # end rank 0's wait.
    program = [os.path.join(WORKERS, "desync_worker.py"), str(tmp_path), "fsdp2", "stop"]
    run = launch(
        torchrun_agents(program, nnodes=2, nproc_per_node=1),
        tmp_path,
        env={"ANON_HF_SYNC_TIMEOUT": str(SYNC_TIMEOUT_S)},
        timeout=240,
        grace=5,
    )
    first, stopped = read_reports(tmp_path, "desync_fsdp2", 2)
    assert "stopped_at" in stopped and "error" in first, run.output[-4000:]
    host = socket.gethostname()
    assert (
        f"rank 0 (node 0, host {host}, local rank 0) is about to run refresh #4 at step 8 (its step() call 8), but "
        f"rank 1 (node 1, host {host}, local rank 0) did not reach its refresh #4 within {SYNC_TIMEOUT_S} s"
    ) in first["error"]
    # Rank 0 may start waiting a moment before rank 1 records the time it stops.
    waited = first["error_time"] - stopped["stopped_at"]
    assert SYNC_TIMEOUT_S - 1 <= waited < SYNC_TIMEOUT_S + 30, waited
    # Rank 0's failure ends its agent. The other agent ends its stopped rank only if it loses the rendezvous store
    # with it (when rank 0's agent hosted that store), so it may be left to the job's scheduler (see the docs).
    ended = [code for node, code in enumerate(run.codes) if node not in run.killed]
    assert ended and all(code != 0 for code in ended), (run.codes, run.killed, run.output[-4000:])


# --------------------------------------------------------------------------------------- other launchers


@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_accelerate_two_machine_config_runs_ddp_like_one_process(tmp_path):
    program = ["-m", *worker("multinode_worker.py", tmp_path, "ddp")]
    run = _with_reports(launch(accelerate_machines(program), tmp_path, timeout=300), tmp_path, 2)
    where = _section(run, "where")
    assert [w["group_rank"] for w in where] == ["0", "1"] and all(w["preloaded"] for w in where)
    for rank, result in enumerate(_section(run, "ddp")):
        assert result["parity"]["max_abs_diff"] <= PARITY_ATOL, (rank, result["parity"])
        assert result["refresh_history"] == REFRESHES
        assert result["resume"]["max_abs_diff"] <= RESUME_ATOL, (rank, result["resume"])


@pytest.mark.slow
@pytest.mark.distributed
@requires_stack
def test_deepspeed_hostfile_two_nodes_run_zero2_like_one_process(tmp_path):
    program = ["--module", *worker("multinode_worker.py", tmp_path, "zero2")]
    run = _with_reports(launch(deepspeed_nodes(program, tmp_path), tmp_path, timeout=300), tmp_path, 2)
    where = _section(run, "where")
    assert [w["group_rank"] for w in where] == ["0", "1"] and all(w["preloaded"] for w in where)
    for rank, result in enumerate(_section(run, "zero2")):
        assert result["inner_type"] == "Anon"
        assert result["parity"]["max_abs_diff"] <= PARITY_ATOL, (rank, result["parity"])
        assert result["refresh_history"] == REFRESHES
        assert result["resume"]["max_abs_diff"] <= RESUME_ATOL, (rank, result["resume"])


# --------------------------------------------------------------------------------------- the docs run these


def _options(command: list[str]) -> list[str]:
    """The launcher's own options (up to the program), without values: ``["--nnodes", "--rdzv_backend", ...]``."""
    end = next(i for i, token in enumerate(command) if token in ("-m", "--module"))
    return sorted(token.split("=")[0] for token in command[1:end] if token.startswith("--"))


def _documented(launcher: str) -> list[list[str]]:
    """Every ``launcher ...`` command line of the Multi-node section of docs/distributed.md, as tokens."""
    text = open(os.path.join(ROOT, "docs", "distributed.md"), encoding="utf-8").read()
    section = text[text.index("## Multi-node") : text.index("## Memory, measured per rank")]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if launcher in tokens:
                commands.append(tokens[tokens.index(launcher) :])
    return commands


def test_docs_multinode_commands_are_the_tested_ones():
    program = ["-m", "anon_hf", "run", "train.py"]
    tested = _options(torchrun_agents(program, nnodes=2, nproc_per_node=1)[0])
    documented = _documented("torchrun")
    assert len(documented) == 2  # torchrun on each node, and the same under srun
    assert all(_options(command) == tested for command in documented), documented
    assert all(command[command.index("-m") :][:3] == ["-m", "anon_hf", "run"] for command in documented)

    tested = _options(accelerate_machines(program)[0][1:])  # [1:]: "accelerate launch" is one launcher
    config_form = [c for c in _documented("accelerate") if "--config_file" in c]
    assert config_form and all(set(_options(c[1:])) <= set(tested) for c in config_form), config_form

    tested = _options(deepspeed_nodes(["--module", "anon_hf", "run", "train.py"], tempfile.mkdtemp())[0])
    no_ssh = [c for c in _documented("deepspeed") if "--no_ssh" in c]
    assert no_ssh and all(_options(c) == tested for c in no_ssh), no_ssh


# --------------------------------------------------------------------------------------- the check's parts, in one process


def test_node_identity_reads_each_launchers_node_rank(monkeypatch):
    from anon_hf.distributed import sync as _sync

    for name in ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    host = socket.gethostname()
    assert _sync._node_identity() == f"node ?, host {host}"
    monkeypatch.setenv("SLURM_NODEID", "3")
    monkeypatch.setenv("CROSS_RANK", "2")  # the deepspeed launcher's, preferred to SLURM's
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert _sync._node_identity() == f"node 2, host {host}, local rank 5"
    monkeypatch.setenv("GROUP_RANK", "1")  # torchrun's (and accelerate's)
    assert _sync._node_identity() == f"node 1, host {host}, local rank 5"


def _checker_on(store):
    from anon_hf.distributed import sync as _sync

    checker = _sync.RefreshSyncChecker()
    checker._store = dist.PrefixStore("anon_hf/optimizer0/", store)
    checker._ranks = dist.PrefixStore("anon_hf/ranks/", store)
    checker.calls = 8
    return checker


def test_wait_for_a_missing_rank_ends_after_the_timeout_naming_its_node(monkeypatch):
    from anon_hf import RefreshOutOfSyncError

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    checker = _checker_on(store)
    checker._ranks.set("rank1", "node 1, host gpu-02, local rank 0")
    checker._store.set("refresh2/rank1", "4,4")
    monkeypatch.setenv("ANON_HF_SYNC_TIMEOUT", "0.5")
    start = time.monotonic()
    with pytest.raises(RefreshOutOfSyncError) as caught:
        checker._wait_for(checker._store, "refresh3/rank1", 3, 0, 1, 8)
    assert time.monotonic() - start >= 0.5
    assert (
        "but rank 1 (node 1, host gpu-02, local rank 0) did not reach its refresh #4 within 0.5 s (its last refresh, "
        "#3, was at step 4 (its step() call 4))"
    ) in str(caught.value)
    assert "rank 2 (its node is unknown: it never reached its first refresh)" == checker._describe(2)


def test_a_lost_store_fails_at_once_naming_the_store():
    from anon_hf.distributed import sync as _sync

    class LostStore:
        def wait(self, *args):
            raise RuntimeError("Connection reset by peer")

        check = get = wait

    checker = _checker_on(dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False))
    lost = r"lost the job's key-value store \(MASTER_ADDR:MASTER_PORT .*reset by peer"
    with pytest.raises(RuntimeError, match=lost):  # FSDP2: the wait before a refresh
        checker._wait_for(LostStore(), "refresh3/rank1", 3, 0, 1, 8)
    with pytest.raises(RuntimeError, match=lost):  # DDP, ZeRO: reading what a neighbour published
        _sync._published(LostStore(), "refresh3/rank1", 0)
