"""Issue 12, item 2: models that do not fit one GPU's memory in DDP: ``--strategy fsdp`` (Lightning's FSDP, one unit
per transformer layer, sharded checkpoints) and ``--activation-checkpointing``.

What a CPU can run, on the demo models: one ``torchrun`` launch of two gloo processes trains, in turn, HuBERT under
DDP and under FSDP, resumes the FSDP run from a sharded checkpoint, and trains wav2vec 2.0 under both; the test then
compares the exported bundles (FSDP = DDP to float rounding; a resumed FSDP run = the uninterrupted one) and exports
a sharded checkpoint offline, in this one process. Activation checkpointing is checked on one process: the same
loss and gradients as without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]

_CLUSTER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "RANK")

_SCRIPT = '''
import os, signal, sys, warnings
from pathlib import Path
import lightning.pytorch as pl
from continue_pt.interruption import RunInterrupted
from continue_pt.options import PretrainOptions
from continue_pt.pretrain import run_pretraining

hubert, w2v, w2v_drop, audio, out = sys.argv[1:6]
warnings.simplefilter("ignore")


class SignalInStep1(pl.Callback):
    """What SLURM sends before the time limit, to rank 0 only, during optimizer step 1 (after its first of two
    micro-batches): the run stops after step 1, in the middle of the epoch's 2 steps."""
    sent = False

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 0 and trainer.global_rank == 0 and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR1)


def run(name, bundle, callbacks=None, **overrides):
    values = dict(train_data=audio, output_dir=str(Path(out) / name), init_from=bundle, max_steps=3,
                  warmup_steps=1, lr=1e-3, max_batch_seconds=2.0, min_seconds=1.0, val_fraction=0, num_workers=0,
                  checkpoint_every=2, log_every=1, progress_bar=False, accelerator="cpu", devices=2,
                  gradient_clip_val=1.0)  # below these steps' gradient norms (2.5-3): clipping acts
    values.update(overrides)
    run_pretraining(PretrainOptions(**values), callbacks)


run("hubert_ddp", hubert, strategy="ddp", accumulate=2, activation_checkpointing=True)
run("hubert_fsdp", hubert, strategy="fsdp", accumulate=2)
try:
    run("hubert_fsdp_stopped", hubert, [SignalInStep1()], strategy="fsdp", accumulate=2)
    raise SystemExit("SIGUSR1 did not stop the run")
except RunInterrupted:
    pass
run("hubert_fsdp_stopped", None, strategy="fsdp", accumulate=2,
    resume=str(Path(out) / "hubert_fsdp_stopped" / "checkpoints" / "last.ckpt"))
run("hubert_head_only_ddp", hubert, strategy="ddp", max_steps=2, reinit_label_head=True, head_only_steps=1)
run("hubert_head_only_fsdp", hubert, strategy="fsdp", max_steps=2, reinit_label_head=True, head_only_steps=1)
run("w2v_ddp", w2v, strategy="ddp", max_steps=2)
run("w2v_fsdp", w2v, strategy="fsdp", max_steps=2, activation_checkpointing=True)
run("w2v_fsdp_layer_drop", w2v_drop, strategy="fsdp", max_steps=2, val_fraction=0.25, val_check_interval=1)
'''


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _CLUSTER_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_", "LSB_"))}
    # one thread: a fixed summation order in every process
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _with_layer_drop(bundle: Path, out: Path, layer_drop: float) -> Path:
    """``bundle`` with another layer drop (the weights linked, not copied)."""
    import json

    out.mkdir()
    for item in bundle.iterdir():
        if item.name != "config.json":
            os.link(item, out / item.name)
    config = json.loads((bundle / "config.json").read_text())
    config["encoder_args"]["encoder_layer_drop"] = layer_drop
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def w2v_without_layer_drop(w2v_bundle_dir, tmp_path_factory) -> Path:
    """The demo wav2vec 2.0 (layer drop 0.05) without layer drop: under DDP and FSDP alike every layer runs, so
    the two runs draw the same numbers (with layer drop FSDP draws the layers' fates on rank 0, see
    ``continue_pt.sharding.same_layers_dropped_everywhere``)."""
    return _with_layer_drop(w2v_bundle_dir, tmp_path_factory.mktemp("w2v_no_drop") / "tiny", 0.0)


@pytest.fixture(scope="module")
def runs(bundle_dir, w2v_without_layer_drop, w2v_bundle_dir, audio_dir, tmp_path_factory) -> Path:
    """The 2-process runs of ``_SCRIPT`` (one launch: starting processes costs more than these steps)."""
    out = tmp_path_factory.mktemp("fsdp")
    script = out / "runs.py"
    script.write_text(_SCRIPT)
    w2v_drop = _with_layer_drop(w2v_bundle_dir, out / "w2v_layer_drop_bundle", 0.5)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
                           "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-backend", "c10d", str(script),
                           str(bundle_dir), str(w2v_without_layer_drop), str(w2v_drop), str(audio_dir), str(out)],
                          env=_clean_env(), capture_output=True, text=True, timeout=300, cwd=out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    (out / "launch.log").write_text(proc.stdout + proc.stderr)
    return out


def _assert_same_weights(ours: Path, reference: Path, start: Path, rtol: float, atol: float) -> None:
    a, b, s = (load_file(p / "model.safetensors") for p in (ours, reference, start))
    assert set(a) == set(b)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)
    assert any(not torch.equal(b[k], s[k]) for k in s), "nothing was trained"


def _logged(run: Path, column: str) -> list[float]:
    from tests.training_helpers import logged_rows

    return [float(row[column]) for row in logged_rows(run / "metrics.csv")]


@pytest.mark.slow
def test_fsdp_steps_equal_ddp_steps_for_both_families(runs, bundle_dir, w2v_without_layer_drop):
    """Same data, seeds and global batch: FSDP's sharded update is DDP's, to float rounding (gradients are
    reduce-scattered instead of all-reduced; on one CPU thread per process they came out bit-identical), with
    gradient accumulation (HuBERT), clipping by norm (both), activation checkpointing (HuBERT under DDP, wav2vec
    2.0 under FSDP: the recomputation redraws the same dropout) and a new label head trained alone first. The
    logged gradient norm, summed over the shards, is DDP's, and so is wav2vec 2.0's Gumbel temperature."""
    _assert_same_weights(runs / "hubert_fsdp/bundle", runs / "hubert_ddp/bundle", bundle_dir, rtol=1e-5, atol=1e-6)
    _assert_same_weights(runs / "w2v_fsdp/bundle", runs / "w2v_ddp/bundle", w2v_without_layer_drop, rtol=1e-5,
                         atol=1e-6)
    # a new label head trained alone for a step: the other parameters' gradients dropped (as for a skipped step)
    _assert_same_weights(runs / "hubert_head_only_fsdp/bundle", runs / "hubert_head_only_ddp/bundle", bundle_dir,
                         rtol=1e-5, atol=1e-6)
    for family, column in (("hubert", "train/grad_norm"), ("hubert", "train/loss"), ("w2v", "train/grad_norm"),
                           ("w2v", "train/gumbel_temperature")):
        fsdp, ddp = _logged(runs / f"{family}_fsdp", column), _logged(runs / f"{family}_ddp", column)
        assert len(fsdp) == len(ddp) > 0 and fsdp == pytest.approx(ddp, rel=1e-6), (family, column)
    assert min(_logged(runs / "hubert_ddp", "train/grad_norm")) > 1.0  # so the clipping at 1.0 acted
    log = (runs / "launch.log").read_text()  # the demo models have 2 layers
    assert "activation checkpointing: 2 transformer layers recompute" in log  # DDP
    assert "activation checkpointing: 2 transformer layers (FSDP units) recompute" in log


@pytest.mark.slow
def test_under_fsdp_every_process_drops_the_same_layers_and_validates(runs):
    """Layer drop 0.5 over 2 steps (2 layers): had the processes drawn their own layers' fates (torchaudio's draw,
    seeded per process), their all-gathers would have stopped pairing up as soon as one skipped a layer the other
    ran; the run ends normally."""
    assert (runs / "w2v_fsdp_layer_drop/bundle/model.safetensors").is_file()
    assert len(_logged(runs / "w2v_fsdp_layer_drop", "train/loss")) == 2
    import csv

    with open(runs / "w2v_fsdp_layer_drop/metrics.csv", newline="") as f:  # validation runs under FSDP too
        assert [row for row in csv.DictReader(f) if row.get("val/loss")]


def test_kept_layers_are_rank_0s_draw_and_none_without_layer_drop():
    from continue_pt.sharding import kept_layers

    torch.manual_seed(0)
    draws = torch.rand(1000)
    torch.manual_seed(0)
    kept = kept_layers(1000, 0.3, torch.device("cpu"))  # one process: its own draw, no broadcast
    assert kept == (draws > 0.3).tolist() and 600 < sum(kept) < 800
    state = torch.get_rng_state()
    assert kept_layers(12, 0.0, torch.device("cpu")) == [True] * 12
    assert torch.equal(torch.get_rng_state(), state)  # no layer drop: no draw, the run's numbers are DDP's


@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_directories_and_a_stopped_run_resumes_exactly(runs, bundle_dir):
    """SIGUSR1 (to rank 0 only) during step 1: both processes stop after it, in the middle of an epoch, and save
    a sharded checkpoint, which becomes last.ckpt; resumed from it (data position, optimizer, schedule, seeds), the
    run ends with the uninterrupted run's weights, bit for bit."""
    checkpoints = runs / "hubert_fsdp/checkpoints"
    for name in ("step-step=2.ckpt", "last.ckpt", "final.ckpt"):
        assert (checkpoints / name / "meta.pt").is_file() and list((checkpoints / name).glob("*.distcp")), name
    stopped = runs / "hubert_fsdp_stopped/checkpoints"
    assert (stopped / "interrupted-step=1.ckpt" / "meta.pt").is_file()
    assert not [p for p in stopped.iterdir() if p.name.startswith(".")]  # no temporary copy left
    assert torch.load(stopped / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == 3
    _assert_same_weights(runs / "hubert_fsdp_stopped/bundle", runs / "hubert_fsdp/bundle", bundle_dir,
                         rtol=0, atol=0)


@pytest.mark.slow
def test_export_of_a_sharded_checkpoint_is_the_ddp_runs_bundle(runs, bundle_dir, tmp_path):
    """``continue-pt export`` of the FSDP run's last.ckpt (a directory), in one process, no process group: the DDP
    run's weights and config (the label set included); ``inspect`` and ``export --to fairseq`` take it too."""
    import json

    from click.testing import CliRunner

    from bundles.loading import load_bundle
    from continue_pt.cli import cli

    result = CliRunner().invoke(cli, ["export", str(runs / "hubert_fsdp/checkpoints/last.ckpt"),
                                      "-o", str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    _assert_same_weights(tmp_path / "exported", runs / "hubert_ddp/bundle", bundle_dir, rtol=1e-5, atol=1e-6)
    exported, ddp = load_bundle(tmp_path / "exported"), load_bundle(runs / "hubert_ddp/bundle")
    ours, theirs = (json.loads((path / "config.json").read_text()) for path in (tmp_path / "exported",
                                                                              runs / "hubert_ddp/bundle"))
    assert {k: v for k, v in ours.items() if k != "provenance"} == {k: v for k, v in theirs.items()
                                                                     if k != "provenance"}
    assert exported.num_updates == ddp.num_updates
    assert torch.equal(exported.get_kmeans().centroids, ddp.get_kmeans().centroids)

    facts = CliRunner().invoke(cli, ["inspect", str(runs / "hubert_fsdp/checkpoints/last.ckpt"), "--json"])
    assert facts.exit_code == 0, facts.output
    assert json.loads(facts.output)["step"] == 3
    fairseq = CliRunner().invoke(cli, ["export", str(runs / "hubert_fsdp/checkpoints/last.ckpt"), "--to", "fairseq",
                                       "-o", str(tmp_path / "continued.pt")])
    assert fairseq.exit_code == 0 and (tmp_path / "continued.pt").is_file(), fairseq.output


@pytest.mark.slow
def test_export_refuses_a_sharded_checkpoint_whose_index_would_run_code(runs, tmp_path):
    """``torch.distributed.checkpoint`` reads its ``.metadata`` with ``pickle.load``; export reads it with an
    allow-list: a planted ``.metadata`` that would run a command is one ``Error:`` line and runs nothing."""
    import pickle
    import shutil

    from click.testing import CliRunner

    from continue_pt.cli import cli

    planted = tmp_path / "ckpt"
    shutil.copytree(runs / "hubert_fsdp/checkpoints/last.ckpt", planted)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (planted / ".metadata").write_bytes(pickle.dumps(Payload()))
    result = CliRunner().invoke(cli, ["export", str(planted), "-o", str(tmp_path / "bundle")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "model shards are not readable" in lines[0] and "is not allowed" in lines[0], lines[0]
    assert not marker.exists() and not (tmp_path / "bundle").exists()


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.slow
@pytest.mark.parametrize("flags, expected", [
    (["--strategy", "fsdp", "--precision", "bf16-mixed"],
     "precision bf16-mixed with strategy fsdp needs CUDA GPUs"),
    (["--strategy", "fsdp_cpu_offload"], "use --strategy fsdp (one unit per transformer layer"),
])
def test_what_fsdp_cannot_do_here_is_one_error_line(flags, expected, bundle_dir, audio_dir,
                                                                           tmp_path):
    from click.testing import CliRunner

    from continue_pt.cli import cli

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["pretrain", "--init-from", str(bundle_dir), "--train-data", str(audio_dir),
                                      "--output-dir", str(out), "--accelerator", "cpu", "--max-steps", "2",
                                      "--warmup-steps", "1", *flags])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert expected in lines[0], lines[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------ activation checkpointing


def _loss_and_grads(module, family: str, batch: dict, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's unnormalised loss (what the training step backwards) and its gradients, with dropout on."""
    import numpy as np

    from continue_pt.hubert.loss import unnormalized_loss as hubert_loss
    from continue_pt.wav2vec2.objective import unnormalized_loss as w2v_loss

    module.train()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout, Gumbel noise
    if family == "hubert":
        terms, _ = module._forward_terms(batch, np.random.default_rng(seed), module.feature_grad_mult)
        loss = hubert_loss(terms, module.weights, "fairseq")
    else:
        _, terms = module._forward(batch, (seed, 0, 0, 0), module.objective.feature_grad_mult)
        loss = w2v_loss(terms, module.objective.weights)
    loss.backward()
    return loss.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                           for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["hubert", "wav2vec2"])
def test_activation_checkpointing_keeps_the_loss_and_every_gradient(family, bundle_dir, w2v_bundle_dir):
    """Each student layer recomputed in the backward (it runs twice), the teacher's not wrapped, parameter names
    unchanged, and the same loss and gradients to 1e-6 with dropout on (the recomputation redraws the same
    dropout masks: torch's checkpoint restores the RNG state)."""
    import copy

    from continue_pt.demo import demo_audio
    from continue_pt.options import PretrainOptions
    from continue_pt.pretrain import MODULES
    from continue_pt.sharding import checkpoint_layers
    from torchaudio.models.wav2vec2.components import EncoderLayer

    bundle = bundle_dir if family == "hubert" else w2v_bundle_dir
    options = PretrainOptions(train_data="unused", output_dir="unused", init_from=str(bundle)).module_options()
    plain = MODULES[family](options)
    checkpointed = copy.deepcopy(plain)
    names = list(checkpointed.state_dict())
    student_layers = [m for m in checkpointed.student.modules() if isinstance(m, EncoderLayer)]
    assert checkpoint_layers(checkpointed) == len(student_layers) > 0
    assert list(checkpointed.state_dict()) == names
    if family == "hubert":  # the frozen teacher runs without a graph: nothing to recompute, left as it is
        assert not [m for m in checkpointed.targets.modules() if type(m).__name__ == "CheckpointWrapper"]

    calls = []
    # a pre-hook: the recomputation stops (torch's early stop) once it has what the backward needs
    student_layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
    batch = {"waveforms": torch.stack([demo_audio(1.0, seed=i)[0] for i in range(2)]), "lengths": None}
    loss, grads = _loss_and_grads(plain, family, batch, seed=3)
    ours, our_grads = _loss_and_grads(checkpointed, family, batch, seed=3)
    assert len(calls) == 2  # forward, then again in the backward

    torch.testing.assert_close(ours, loss, rtol=1e-6, atol=1e-6)
    assert set(our_grads) == set(grads) and grads
    for name, grad in grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)
    other, _ = _loss_and_grads(plain, family, batch, seed=4)
    assert not torch.equal(other, loss)  # the draws matter: equal losses above are not a coincidence


def test_a_sharded_checkpoint_is_swapped_in_whole(tmp_path):
    """``last.ckpt`` as a directory replaces an older one (or a ``.ckpt`` file of an earlier run) by renames, with
    hard links, and leaves no temporary sibling; a leftover of a killed save is cleared first."""
    from continue_pt.sharding import replace_directory

    final = tmp_path / "final.ckpt"
    final.mkdir()
    (final / "meta.pt").write_bytes(b"new")
    (final / "__0_0.distcp").write_bytes(b"shard")
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"a file from a DDP run")
    (tmp_path / ".last.ckpt.tmp").mkdir()  # what a killed save left
    replace_directory(final, last)
    assert sorted(p.name for p in last.iterdir()) == ["__0_0.distcp", "meta.pt"]
    assert (last / "meta.pt").read_bytes() == b"new"
    assert (last / "meta.pt").stat().st_ino == (final / "meta.pt").stat().st_ino  # linked, not copied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.ckpt", "last.ckpt"]
    (final / "meta.pt").unlink()
    (final / "meta.pt").write_bytes(b"newer")
    replace_directory(final, last)  # over an existing directory
    assert (last / "meta.pt").read_bytes() == b"newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.ckpt", "last.ckpt"]
