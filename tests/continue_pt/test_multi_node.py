"""Issue 12, item 1: multi-node training on Lightning's own strategies (``--num-nodes N``).

Two "nodes" of one CPU process each on 127.0.0.1 (gloo), started through the real CLI by each launcher Lightning
detects (its own MASTER_ADDR/MASTER_PORT/NODE_RANK environment, torchrun, SLURM's srun variables), end with the
weights of one process that accumulates the same global batch, and only node 0 writes the run's outputs; a
multi-node run that cannot start is refused in one ``Error:`` line before anything starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from tests.training_helpers import SignalAfterMicroBatch

ROOT = Path(__file__).resolve().parents[2]

_CLUSTER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "RANK")
"""What a launcher sets; removed from the test's own environment (the suite may itself run in a SLURM job)."""

_RUN = ("max_steps: 3\nwarmup_steps: 1\nlr: 0.001\nmax_batch_seconds: 2.0\nmin_seconds: 1.0\nval_fraction: 0\n"
        "num_workers: 0\ncheckpoint_every: 100\nlog_every: 1\nprogress_bar: false\naccelerator: cpu\n")
"""Eight 2-second files, one per micro-batch: 8 batches an epoch, 4 per node, 3 optimizer steps of 2 files."""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _CLUSTER_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_", "LSB_"))}
    # one thread: a fixed summation order, so node and one-process runs compute alike (see test_pretrain's DDP test)
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain(config: Path, bundle: Path, audio: Path, out: Path, *flags: str) -> list[str]:
    return ["pretrain", "--config", str(config), "--init-from", str(bundle), "--train-data", str(audio),
            "--output-dir", str(out), *flags]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("multi_node") / "run.yaml"
    path.write_text(_RUN)
    return path


@pytest.fixture(scope="module")
def one_process(config, bundle_dir, audio_dir, tmp_path_factory) -> Path:
    """The reference: one process accumulating the 2 micro-batches that the two nodes run at once."""
    out = tmp_path_factory.mktemp("one_process") / "run"
    proc = subprocess.run([sys.executable, "-m", "continue_pt.cli",
                           *_pretrain(config, bundle_dir, audio_dir, out, "--accumulate", "2")],
                          env=_clean_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _node_command(launcher: str, node: int, port: int, pretrain: list[str]) -> tuple[list[str], dict[str, str]]:
    """Node ``node``'s command line and environment as each launcher would give them."""
    cli = [sys.executable, "-m", "continue_pt.cli"]
    if launcher == "lightning":  # Lightning's own environment: one command per node (LOCAL_RANK: no spawning)
        return [*cli, *pretrain, "--strategy", "ddp"], _clean_env(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node), WORLD_SIZE="2", LOCAL_RANK="0")
    if launcher == "torchrun":  # strategy auto: DDP because of --num-nodes 2
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--node-rank", str(node), "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "continue_pt.cli",
                *pretrain], _clean_env()
    assert launcher == "slurm"  # what srun sets in each task of `sbatch --nodes 2 --ntasks-per-node 1`
    return [*cli, *pretrain], _clean_env(
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="continue-pt", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
        SLURM_NNODES="2", SLURM_PROCID=str(node), SLURM_NODEID=str(node), SLURM_LOCALID="0",
        SLURM_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _run_two_nodes(launcher: str, config: Path, bundle: Path, audio: Path, tmp_path: Path) -> list[Path]:
    """Both nodes at once; each gets its own --output-dir, so that what node 1 writes can be seen."""
    port, outs, procs = _free_port(), [tmp_path / f"node{n}" for n in (0, 1)], []
    for node, out in enumerate(outs):
        command, env = _node_command(launcher, node, port,
                                     _pretrain(config, bundle, audio, out, "--num-nodes", "2", "--devices", "1"))
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                      start_new_session=True))
    try:
        codes = [proc.wait(timeout=180) for proc in procs]
    finally:
        for proc in procs:  # a node left waiting for the other one: end its whole process group
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    logs = [(tmp_path / f"node{n}.log").read_text(errors="replace") for n in (0, 1)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]  # one world of two processes, node 1 holding global rank 1
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["lightning", "torchrun", "slurm"])
def test_two_nodes_equal_one_process_and_only_node_0_writes(launcher, config, bundle_dir, audio_dir, one_process,
                                                            tmp_path):
    node0, node1 = _run_two_nodes(launcher, config, bundle_dir, audio_dir, tmp_path)
    for name in ("bundle/model.safetensors", "checkpoints/last.ckpt", "metrics.csv", "curves.png"):
        assert (node0 / name).is_file(), name
    assert not [p for p in node1.rglob("*") if p.is_file()], "node 1 wrote outputs"

    ours, reference = load_file(node0 / "bundle/model.safetensors"), load_file(one_process / "bundle/model.safetensors")
    start = load_file(bundle_dir / "model.safetensors")
    assert set(ours) == set(reference)
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.equal(reference[k], start[k]) for k in start), "nothing was trained"
    steps = torch.load(node0 / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert steps == 3


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("flags, expected", [
    (["--num-nodes", "0"], "num_nodes must be >= 1, got 0"),
    (["--num-nodes", "2"], "num_nodes 2 needs a launcher on every node, and none was found"),
    (["--num-nodes", "2", "--strategy", "single_device"], "strategy 'single_device' runs on a single node"),
])
def test_a_multi_node_run_that_cannot_start_is_one_error_line(flags, expected, config, bundle_dir, audio_dir,
                                                              tmp_path, monkeypatch):
    from click.testing import CliRunner

    from continue_pt.cli import cli

    for name in [*_CLUSTER_VARIABLES, *(k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_")))]:
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, _pretrain(config, bundle_dir, audio_dir, out, *flags))
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.output
    assert not out.exists()


def test_nodes_and_launcher_settings_that_disagree_are_refused(monkeypatch):
    """Lightning checks SLURM's --nodes / --ntasks-per-node and torchrun's world size only once training starts
    (``validate_settings``); here they are option problems, and NODE_RANK must name one of the nodes."""
    from continue_pt.options import PretrainOptions
    from continue_pt.trainer_config import trainer_problems

    for name in [*_CLUSTER_VARIABLES, *(k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_")))]:
        monkeypatch.delenv(name, raising=False)
    options = PretrainOptions(train_data="", output_dir="", accelerator="cpu", num_nodes=2)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("NODE_RANK", "2")
    assert trainer_problems(options) == ["NODE_RANK is '2'; with num_nodes 2 each node needs its own NODE_RANK, 0 "
                                         "to 1 (0 on the node at MASTER_ADDR)"]
    monkeypatch.setenv("NODE_RANK", "1")
    assert trainer_problems(options) == []
    for name, value in dict(SLURM_JOB_ID="7", SLURM_JOB_NAME="run", SLURM_NTASKS="3", SLURM_NTASKS_PER_NODE="1",
                            SLURM_NNODES="3", SLURM_PROCID="0", SLURM_NODEID="0", SLURM_LOCALID="0").items():
        monkeypatch.setenv(name, value)
    problems = trainer_problems(options)
    assert len(problems) == 1 and "SLURMEnvironment" in problems[0] and "--nodes=3" in problems[0], problems
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert trainer_problems(options) == []


def test_under_slurm_sigusr1_stops_at_a_step_boundary_without_lightnings_auto_requeue(monkeypatch, tmp_path,
                                                                                      bundle_dir, audio_dir):
    """Lightning's SLURM auto-requeue would save hpc_ckpt_N.ckpt mid-step on SIGUSR1 (``#SBATCH --signal=USR1@T``),
    call scontrol and restore that file silently in the requeued job. The Trainer is built without it, and SIGUSR1
    stops the run as SIGTERM does: after the optimizer step, with checkpoints/last.ckpt and the resume command."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from continue_pt.interruption import RunInterrupted
    from continue_pt.pretrain import PretrainOptions, run_pretraining

    for name in [*_CLUSTER_VARIABLES, *(k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_")))]:
        monkeypatch.delenv(name, raising=False)
    for name, value in dict(SLURM_JOB_ID="7", SLURM_JOB_NAME="run", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1",
                            SLURM_NNODES="1", SLURM_PROCID="0", SLURM_NODEID="0", SLURM_LOCALID="0").items():
        monkeypatch.setenv(name, value)
    environments = []

    class Environment(pl.Callback):
        def on_train_start(self, trainer, module) -> None:
            environments.append(trainer._accelerator_connector.cluster_environment)

    out = tmp_path / "run"
    options = PretrainOptions(train_data=str(audio_dir), output_dir=str(out), init_from=str(bundle_dir), max_steps=4,
                              accumulate=2, max_batch_seconds=2.0, min_seconds=1.0, val_fraction=0, num_workers=0,
                              warmup_steps=1, checkpoint_every=100, progress_bar=False, accelerator="cpu")
    with pytest.raises(RunInterrupted) as info:
        run_pretraining(options, callbacks=[SignalAfterMicroBatch(signal.SIGUSR1, 1), Environment()])
    assert isinstance(environments[0], SLURMEnvironment) and environments[0].auto_requeue is False
    assert info.value.step == 2 and info.value.exit_code == 128 + signal.SIGUSR1
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
    assert not list(out.rglob("hpc_ckpt*")) and (out / "resume.yaml").is_file()


def test_data_workers_under_srun_use_the_tasks_own_cpus(monkeypatch):
    """srun gives each task (one device) --cpus-per-task CPUs of its own: they are not divided by the node's
    devices again (8 GPUs with 8 CPUs each would otherwise get 1 worker each)."""
    from continue_pt.options import PretrainOptions

    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    options = PretrainOptions(train_data="", output_dir="", devices=8, num_nodes=2)
    assert options.resolved_num_workers() == 1  # one process's 8 CPUs shared by the 8 processes it starts
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    assert options.resolved_num_workers() == 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert options.resolved_num_workers() == 2


# ------------------------------------------------------------------------------------------------ resume


def test_resuming_with_another_world_size_says_it_is_not_exact(caplog):
    """The sampler's position is counted per process: a checkpoint of 2 processes resumed by 1 continues, with a
    warning that names both counts (the generic 'batching settings changed' one is not what happened)."""
    import logging

    from continue_pt.batching import BucketBatchSampler

    lengths = [32000] * 8
    two = BucketBatchSampler(lengths, 2.0, 16000, 250000, shuffle=True, seed=0, num_replicas=2, rank=0)
    iterator = iter(two)
    [next(iterator) for _ in range(3)]
    state = two.state_dict()
    assert state["num_replicas"] == 2
    one = BucketBatchSampler(lengths, 2.0, 16000, 250000, shuffle=True, seed=0)
    with caplog.at_level(logging.WARNING, logger="continue_pt.batching"):
        one.load_state_dict(state)
    assert "written by a run of 2 processes (devices x nodes), this one has 1" in caplog.text
    assert "batching settings changed" not in caplog.text
    caplog.clear()
    again = BucketBatchSampler(lengths, 2.0, 16000, 250000, shuffle=True, seed=0, num_replicas=2, rank=1)
    with caplog.at_level(logging.WARNING, logger="continue_pt.batching"):
        again.load_state_dict(state)
    assert not caplog.text  # the same world size: an exact continuation, nothing to say


def test_per_term_resume_with_another_accumulate_plans_the_steps_lightning_takes(bundle_dir, audio_dir, tmp_path):
    """Keeping the global batch while the world size changes means another --accumulate on resume. Lightning then
    steps when the epoch's batch count reaches a multiple of it, so a step can start off that grid; per-term's
    plan of the step's masks follows (it raised a RuntimeError before) and matches what the step draws."""
    import warnings

    from continue_pt.pretrain import PretrainOptions, run_pretraining

    def options(out, **extra):
        return PretrainOptions(**{**dict(train_data=str(audio_dir), output_dir=str(out), init_from=str(bundle_dir),
                                         max_steps=2, max_batch_seconds=2.0, min_seconds=1.0, val_fraction=0,
                                         num_workers=0, warmup_steps=1, checkpoint_every=1, progress_bar=False,
                                         accelerator="cpu", loss_norm="per-term"), **extra})

    first = run_pretraining(options(tmp_path / "a"))  # one micro-batch a step: checkpoint after 1 batch
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*per-term normalisation is approximate")
        resumed = run_pretraining(options(tmp_path / "b", init_from=None, accumulate=2, max_steps=3,
                                          resume=str(first.checkpoint_dir / "step-step=1.ckpt")))
    assert torch.load(resumed.checkpoint_dir / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3


# ------------------------------------------------------------------------------------------------ random keys


@pytest.mark.parametrize("world_size, accumulate", [(2, 1), (4, 1), (2, 2), (3, 2)])
def test_every_batch_gets_the_same_random_key_however_the_global_batch_is_split(world_size, accumulate):
    """Both families seed masks, dropout, noise and negatives from ``micro_batch_key``: for every batch of an
    epoch, the key it gets on rank r of ``world_size`` accumulating ``accumulate`` equals the key one process
    accumulating ``world_size * accumulate`` gives it (the sampler deals batch i to rank i % world_size)."""
    from continue_pt.batching import BucketBatchSampler
    from continue_pt.module_base import micro_batch_key

    lengths = [16000] * 48  # 24 batches of two 1-second files: divisible by every world size here
    global_batch = world_size * accumulate

    def keys(replicas: int, per_step: int) -> dict[tuple[int, ...], tuple[int, int, int]]:
        found = {}
        for rank in range(replicas):
            sampler = BucketBatchSampler(lengths, 2.0, 16000, 250000, shuffle=True, seed=3, num_replicas=replicas,
                                         rank=rank)
            for i, batch in enumerate(sampler):
                found[tuple(batch)] = micro_batch_key(i // per_step, i % per_step, rank, replicas)
        return found

    one = keys(1, global_batch)
    split = keys(world_size, accumulate)
    assert len(one) == 24 and split == one
    assert len(set(one.values())) == 24  # every micro-batch of the epoch draws from its own stream
