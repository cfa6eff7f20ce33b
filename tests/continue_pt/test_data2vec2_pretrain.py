"""Continued data2vec 2.0 pre-training (Data2Vec2ContinuedPretraining, run_pretraining, the CLI) on a tiny
fairseq-written data2vec 2.0 checkpoint, against fairseq's own Data2VecMultiModel on the same batch, masks and
teacher; on CPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import soundfile as sf
import torch

from tests.reference import require

require("fairseq")

from bundles import load_bundle  # noqa: E402
from continue_pt.data2vec2.module import CollapseWarning, Data2Vec2ContinuedPretraining  # noqa: E402
from continue_pt.data2vec2.options import parse_ema_decay, teacher_policy_warning  # noqa: E402
from continue_pt.demo import demo_audio  # noqa: E402
from continue_pt.module_options import ModuleOptions  # noqa: E402
from continue_pt.options import PretrainOptions, PretrainOptionsError, PretrainOptionsWarning  # noqa: E402
from continue_pt.pretrain import build_module, run_pretraining  # noqa: E402
from converters.convert import convert_checkpoint  # noqa: E402
from converters.families import data2vec2 as d2v_keys  # noqa: E402
from tests.data2vec2_reference import (  # noqa: E402
    build_data2vec2_model,
    load_data2vec2_config,
    prepare,
    save_data2vec2_checkpoint,
    shrunk,
)
from tests.training_helpers import FixedBatches, StopAt, assert_ddp_gradients_match, logged_rows  # noqa: E402

pytestmark = pytest.mark.fairseq

START_UPDATES = 1000  # the tiny checkpoint's num_updates: BASE's anneal (0.999 -> 0.99999 over 75k) is at 0.99913
SECONDS = 1.0
GRAD_TOLERANCE = 2e-5
_DROPOUTS = ("dropout_input", "encoder_dropout", "post_mlp_drop", "attention_dropout", "activation_dropout",
             "layerdrop")


def deterministic_config() -> dict:
    """The shrunk BASE config without dropout, layer drop or mask-token noise: fairseq's random draws (taken from
    its global RNG in its own order) then play no part, in train mode too."""
    stored = shrunk(load_data2vec2_config("data2vec2_base_libri"))
    model = stored["model"]
    model.update({name: 0.0 for name in _DROPOUTS})
    audio = model["modalities"]["audio"]
    audio.update(prenet_dropout=0.0, prenet_layerdrop=0.0, mask_noise_std=0.0)
    audio["decoder"]["input_dropout"] = 0.0
    return stored


def _reference():
    """A random-weight tiny fairseq data2vec 2.0 (teacher != student); the same weights on every call."""
    return build_data2vec2_model("data2vec2_base_libri", seed=11, stored=deterministic_config())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(fairseq model, bundle dir) of the same tiny data2vec 2.0."""
    ref = _reference()
    work = tmp_path_factory.mktemp("d2v_pretrain")
    save_data2vec2_checkpoint(ref, work / "tiny.pt", num_updates=START_UPDATES)
    return ref, convert_checkpoint(work / "tiny.pt", work / "bundle")


@pytest.fixture(scope="module")
def bundle_dir(pair) -> Path:
    return Path(pair[1])


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audio")
    for i in range(4):
        sf.write(out / f"utt{i}.wav", demo_audio(SECONDS, seed=i)[0].numpy(), 16000)
    return out


def _options(bundle_dir: Path, audio_dir: Path, out: Path, **overrides) -> PretrainOptions:
    values = dict(train_data=str(audio_dir), output_dir=str(out), init_from=str(bundle_dir), max_steps=4,
                  max_batch_seconds=2 * SECONDS, min_seconds=0.5, num_workers=0, warmup_steps=1,
                  checkpoint_every=2, log_every=1, lr=5e-4, progress_bar=False, val_fraction=0.0)
    values.update(overrides)
    return PretrainOptions(**values)


# ------------------------------------------------------------------------------------------------ one step


class _Recording(Data2Vec2ContinuedPretraining):
    """Records the gradients after the module's normalisation and the student after each optimizer step."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.recorded = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, *args):
        self.students = getattr(self, "students", [])
        if not self._micro_index:  # an optimizer step just ended
            self.students.append({k: v.detach().clone() for k, v in self.student.state_dict().items()})


def _waves() -> tuple[torch.Tensor, torch.Tensor]:
    """4 one-second utterances, normalised as the data pipeline (and fairseq's dataset) does, and their ids."""
    waves = torch.cat([demo_audio(SECONDS, seed=20 + i) for i in range(4)])
    return prepare(waves, None)[0], torch.tensor([3, 8, 5, 1])


def _batches(splits: list[list[int]]) -> list[dict]:
    waves, ids = _waves()
    return [{"waveforms": waves[torch.tensor(r)], "lengths": torch.full((len(r),), waves.shape[1]),
             "indices": ids[torch.tensor(r)]} for r in splits]


def _trained(bundle_dir: Path, splits: list[list[int]], accumulate: int = 1, steps: int = 1,
             **options) -> _Recording:
    pl.seed_everything(0, verbose=False)
    module = _Recording(ModuleOptions(bundle=str(bundle_dir), warmup_steps=0, lr=1e-3, **options))
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, accumulate_grad_batches=accumulate, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=None)
    trainer.fit(module, datamodule=FixedBatches(_batches(splits)))
    return module


def _fairseq_gradients(ref, rows: list[int], updates: int) -> tuple[float, int, dict[str, torch.Tensor]]:
    """fairseq's loss, sample size and gradients (divided by the sample size, as its trainer does) on ``rows``."""
    model = _reference().model.train()
    model.num_updates = updates
    waves, ids = _waves()
    result = model(source=waves[rows], padding_mask=None, id=ids[rows])
    loss = sum(v.float().sum() for v in result["losses"].values())
    loss.backward()
    size = int(result["sample_size"])
    return float(loss), size, {n: p.grad / size for n, p in model.named_parameters() if p.grad is not None}


def _our_names(ref) -> dict[str, str]:
    """fairseq parameter name -> the module's (``student.`` + the bundle's name)."""
    state = {k: v for k, v in ref.model.state_dict().items() if k != "_ema"}
    return {k: f"student.{v}" for k, v in d2v_keys.PRETRAIN_KEY_MAP.classify(state).mapped.items()}


def _assert_gradients_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], ref) -> None:
    names = _our_names(ref)
    assert len(theirs) == len(ours) > 20
    for name, grad in theirs.items():
        mine = ours[names[name]]
        error = float((mine - grad).abs().max() / grad.abs().max().clamp_min(1e-12))
        assert error <= GRAD_TOLERANCE, (name, error)


@pytest.mark.slow
def test_one_training_step_equals_fairseqs_loss_and_every_gradient(pair, bundle_dir):
    """Through the LightningModule's step (masks seeded by fairseq's MaskSeed with the bundle's num_updates, the
    EMA teacher's targets, 8 clone_batch copies, the decoder, the L2 loss divided by the masked frames): the logged
    loss and every gradient equal fairseq's Data2VecMultiModel on the same batch; the teacher gets none."""
    ref, _ = pair
    module = _trained(bundle_dir, [[0, 1, 2, 3]])
    loss, size, theirs = _fairseq_gradients(ref, [0, 1, 2, 3], START_UPDATES)
    _assert_gradients_equal(module.recorded, theirs, ref)
    assert not any(n.startswith("student.teacher.") for n in module.recorded)
    assert {id(p) for p in module.student.teacher.parameters()}.isdisjoint(
        {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]})
    assert float(module.trainer.callback_metrics["train/loss"]) == pytest.approx(loss / size, rel=1e-5)


@pytest.mark.slow
def test_accumulated_micro_batches_equal_fairseqs_accumulation(pair, bundle_dir):
    """Two micro-batches of two utterances in one optimizer step: the gradients equal fairseq's two forwards on the
    same micro-batches, summed and divided by the step's masked frames (its trainer's multiply_grads). (Not one batch
    of four: fairseq's require_same_masks cuts every row of a batch to the batch's smallest mask count, so masks
    depend on the batch; the seeded spans themselves follow each utterance's id.)"""
    ref, _ = pair
    split = _trained(bundle_dir, [[0, 1], [2, 3]], accumulate=2)
    _, size_a, first = _fairseq_gradients(ref, [0, 1], START_UPDATES)
    _, size_b, second = _fairseq_gradients(ref, [2, 3], START_UPDATES)
    theirs = {n: (first[n] * size_a + second[n] * size_b) / (size_a + size_b) for n in first}
    _assert_gradients_equal(split.recorded, theirs, ref)
    whole = _trained(bundle_dir, [[0, 1, 2, 3]])
    assert any(not torch.allclose(split.recorded[n], whole.recorded[n]) for n in whole.recorded)


@pytest.mark.slow
def test_teacher_after_n_steps_equals_fairseqs_ema(pair, bundle_dir):
    """3 optimizer steps (2 micro-batches each): after each, fairseq's set_num_updates moves its teacher towards the
    same student weights; both teachers end equal (and moved), one EMA update per optimizer step."""
    ref, _ = pair
    module = _trained(bundle_dir, [[0, 1], [2, 3]] * 3, accumulate=2, steps=3)
    assert len(module.students) == 3
    model = _reference().model.train()
    names = _our_names(ref)
    params = dict(model.named_parameters())
    for n, student in enumerate(module.students, start=1):
        with torch.no_grad():
            for name, ours in names.items():
                params[name].copy_(student[ours[len("student."):]])
        model.num_updates = START_UPDATES + n - 1
        model.set_num_updates(START_UPDATES + n)
    teacher_map = d2v_keys.PRETRAIN_KEY_MAP.classify(
        {f"_ema.{k}": v for k, v in model.ema.fp32_params.items()}).mapped
    ours = module.student.state_dict()
    start = load_bundle(bundle_dir).state_dict()
    for key, value in model.ema.fp32_params.items():
        name = teacher_map[f"_ema.{key}"]
        torch.testing.assert_close(ours[name], value, rtol=1e-6, atol=1e-7, msg=key)
        assert not torch.equal(ours[name], start[name]), key
    assert module.ema_decay == pytest.approx(model.ema.get_decay())


_DDP_SCRIPT = """
import sys
import lightning.pytorch as pl
import torch

torch.set_num_threads(1)
sys.path.insert(0, sys.argv[4])
from continue_pt.module_options import ModuleOptions
from tests.training_helpers import FixedBatches
from tests.continue_pt.test_data2vec2_pretrain import _Recording, _batches

bundle_dir, devices, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pl.seed_everything(0, verbose=False)
module = _Recording(ModuleOptions(bundle=bundle_dir, warmup_steps=0))
trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                     accumulate_grad_batches=1 if devices > 1 else 2, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, use_distributed_sampler=False)
batches = _batches([[0, 1], [2, 3]])  # one process accumulates both: the same micro-batches (masks follow them)
trainer.fit(module, datamodule=FixedBatches(batches[trainer.global_rank:trainer.global_rank + 1] if devices > 1
                                         else batches))
if trainer.is_global_zero:
    torch.save({"grads": module.recorded, "loss": float(trainer.callback_metrics["train/loss"])}, out)
"""


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(bundle_dir, tmp_path):
    """Two ranks of two utterances: the gradients after the all-reduced division equal one process accumulating the
    same two micro-batches."""
    assert_ddp_gradients_match(_DDP_SCRIPT, bundle_dir, tmp_path)


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def full_run(bundle_dir, audio_dir, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PretrainOptionsWarning)
        return run_pretraining(_options(bundle_dir, audio_dir, tmp_path_factory.mktemp("run") / "full"))


@pytest.mark.slow
def test_run_logs_the_collapse_signs_and_exports_the_trained_teacher(full_run, bundle_dir):
    assert isinstance(build_module(_options(bundle_dir, Path("."), Path("."))), Data2Vec2ContinuedPretraining)
    rows = logged_rows(full_run.metrics_csv)
    assert len(rows) == 4
    for row in rows:
        for column in ("train/loss", "train/ema_decay", "train/target_var", "train/pred_var", "train/grad_norm"):
            assert float(row[column]) > 0, column
    # the decay of the update after step n, on the checkpoint's schedule continued from its num_updates
    schedule = parse_ema_decay("0.999:0.99999:75000")
    assert [float(r["train/ema_decay"]) for r in rows] == pytest.approx(
        [schedule.decay_at(START_UPDATES + n) for n in (1, 2, 3, 4)])
    exported = load_bundle(full_run.bundle_dir)
    assert exported.family == "data2vec2" and exported.num_updates == START_UPDATES + 4
    checkpoint = torch.load(full_run.checkpoint_dir / "last.ckpt", map_location="cpu", weights_only=True)
    live = {k[len("student."):]: v for k, v in checkpoint["state_dict"].items()}
    after, before = exported.state_dict(), load_bundle(bundle_dir).state_dict()
    assert set(after) == set(live) == set(before)
    assert all(torch.equal(after[k], live[k]) for k in after)
    teacher = [k for k in after if k.startswith("teacher.")]
    assert teacher and all(not torch.equal(after[k], before[k]) for k in teacher)  # the trained EMA teacher
    record = exported.config.provenance["training"][-1]
    assert record["steps"] == 4 and "EMA teacher" in record["targets"]
    from continue_pt.checkpoint_facts import describe_training_checkpoint

    facts = describe_training_checkpoint(full_run.checkpoint_dir / "last.ckpt")  # what `inspect` shows
    assert facts["family"] == "data2vec2" and facts["ema_schedule"] == "0.999:0.99999:75000"
    assert facts["clone_batch"] == 8 and facts["ema_decay"] == pytest.approx(schedule.decay_at(START_UPDATES + 4))


@pytest.mark.slow
def test_resume_is_exact_teacher_included(full_run, bundle_dir, audio_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PretrainOptionsWarning)
        first = run_pretraining(_options(bundle_dir, audio_dir, tmp_path / "part"), callbacks=[StopAt(2)])
        resumed = run_pretraining(_options(bundle_dir, audio_dir, tmp_path / "part", init_from=None,
                                           resume=str(first.checkpoint_dir / "step-step=2.ckpt")))
    full_rows, resumed_rows = logged_rows(full_run.metrics_csv), logged_rows(resumed.metrics_csv)[-2:]
    for column in ("train/loss", "train/ema_decay", "train/target_var", "train/pred_var"):
        assert [r[column] for r in resumed_rows] == [r[column] for r in full_rows[2:]], column
    a, b = load_bundle(full_run.bundle_dir).state_dict(), load_bundle(resumed.bundle_dir).state_dict()
    assert set(a) == set(b) and any(k.startswith("teacher.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_cli_pretrain_and_export_end_to_end(bundle_dir, audio_dir, tmp_path):
    from click.testing import CliRunner

    from continue_pt.cli import cli

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "pretrain", "--init-from", str(bundle_dir), "--train-data", str(audio_dir), "--output-dir", str(out),
        "--max-steps", "2", "--warmup-steps", "1", "--max-batch-seconds", "2", "--min-seconds", "0.5",
        "--num-workers", "0", "--val-fraction", "0", "--ema-decay", "0.99:0.999:10", "--clone-batch", "2"])
    assert result.exit_code == 0, result.output
    rows = logged_rows(out / "metrics.csv")
    assert [float(r["train/ema_decay"]) for r in rows] == pytest.approx([0.99 + 0.009 * n / 10 for n in (1, 2)])
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["options"]["clone_batch"] == 2
    exported = CliRunner().invoke(cli, ["export", str(out / "checkpoints" / "last.ckpt"), "-o", str(tmp_path / "b")])
    assert exported.exit_code == 0, exported.output
    assert load_bundle(tmp_path / "b").num_updates == START_UPDATES + 2

    refused = CliRunner().invoke(cli, [
        "pretrain", "--init-from", str(bundle_dir), "--train-data", str(audio_dir), "--output-dir",
        str(tmp_path / "bad"), "--ema-decay", "0.999:2:x", "--num-negatives", "5"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "ema_decay '0.999:2:x': expected START:END:STEPS" in refused.output
    assert "num_negatives is a wav2vec 2.0 option; data2vec 2.0 regresses" in refused.output
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------ policy


def test_frozen_or_nearly_frozen_teacher_warns_naming_ema_decay(bundle_dir, audio_dir, tmp_path):
    base = {"ema_decay": 0.999, "ema_end_decay": 0.99999, "ema_anneal_end_step": 75000}
    large = {"ema_decay": 0.9997, "ema_end_decay": 1.0, "ema_anneal_end_step": 300000}
    assert teacher_policy_warning("b/", base, 1000, None) is None  # still annealing at 0.99913: no warning
    assert teacher_policy_warning("b/", base, 400000, None) == (
        "b/: the EMA teacher's decay is 0.99999 (the checkpoint's schedule (0.999:0.99999:75000) continued from its "
        "update 400,000), nearly frozen: each step moves the teacher 1e-05 of the way to the student, so the targets "
        "stay those of the starting model. To let the teacher follow the student on your audio, restart an anneal "
        "with --ema-decay START:END:STEPS, for example --ema-decay 0.999:0.9999:20000")
    assert "is 1 (the checkpoint's schedule (0.9997:1:300000)" in teacher_policy_warning("b/", large, 600000, None)
    assert "frozen: the teacher never moves" in teacher_policy_warning("b/", large, 600000, None)
    assert teacher_policy_warning("b/", large, 600000, "0.999:0.9999:20000") is None
    with pytest.warns(PretrainOptionsWarning, match="--ema-decay 0.999:0.9999:20000"):
        _options(bundle_dir, audio_dir, tmp_path / "o", ema_decay="1").validate()


def test_bad_ema_decay_and_foreign_options_are_refused_together(bundle_dir, audio_dir, tmp_path):
    options = _options(bundle_dir, audio_dir, tmp_path / "o", ema_decay="0.9:0.99", reinit_label_head=True,
                       clone_batch=0, freeze_feature_extractor_steps=5, masking={"mask_channel_prob": 0.1})
    with pytest.raises(PretrainOptionsError) as info:
        options.validate()
    text = str(info.value)
    for expected in ("ema_decay '0.9:0.99': expected START:END:STEPS", "clone_batch must be >= 1",
                     "reinit_label_head is a HuBERT option; data2vec 2.0 regresses",
                     "freeze_feature_extractor_steps does not apply to data2vec 2.0",
                     "masking ['mask_channel_prob'] do not apply to data2vec 2.0"):
        assert expected in text
    assert not (tmp_path / "o").exists()


def test_collapse_warns_once_with_what_to_try(bundle_dir):
    module = Data2Vec2ContinuedPretraining(ModuleOptions(bundle=str(bundle_dir)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            module._watch_collapse(0.05, 0.5)
        module._watch_collapse(0.5, 0.001)
    collapse = [str(w.message) for w in caught if issubclass(w.category, CollapseWarning)]
    assert len(collapse) == 2
    assert "target_var 0.05 is below the checkpoint's min_target_var 0.1" in collapse[0] and "--lr" in collapse[0]
    assert "pred_var 0.001 is below the checkpoint's min_pred_var 0.01" in collapse[1]


# ------------------------------------------------------------------------------------------------ scale options


@pytest.mark.slow
def test_activation_checkpointing_trains_to_the_same_weights(full_run, bundle_dir, audio_dir, tmp_path):
    """--activation-checkpointing recomputes each student block in the backward (the teacher's are not wrapped):
    the run's losses and exported weights (teacher included) equal the plain run's."""
    from bundles.data2vec2.model import Block
    from continue_pt.sharding import checkpoint_layers

    module = build_module(_options(bundle_dir, audio_dir, tmp_path / "unused"))
    blocks = sum(isinstance(m, Block) for m in module.student.student.modules())
    assert checkpoint_layers(module) == blocks > 0  # the student's blocks only, not the teacher's
    assert not [m for m in module.student.teacher.modules() if type(m).__name__ == "CheckpointWrapper"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PretrainOptionsWarning)
        run = run_pretraining(_options(bundle_dir, audio_dir, tmp_path / "ac", activation_checkpointing=True))
    assert [r["train/loss"] for r in logged_rows(run.metrics_csv)] == \
        [r["train/loss"] for r in logged_rows(full_run.metrics_csv)]
    a, b = load_bundle(full_run.bundle_dir).state_dict(), load_bundle(run.bundle_dir).state_dict()
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)


def test_fsdp_is_refused_for_data2vec2_with_what_to_use_instead(bundle_dir, audio_dir, tmp_path):
    with pytest.raises(PretrainOptionsError, match="--strategy fsdp is not available for data2vec 2.0") as error:
        run_pretraining(_options(bundle_dir, audio_dir, tmp_path / "run", strategy="fsdp", devices=2,
                                 accelerator="cpu"))
    assert "--activation-checkpointing" in str(error.value) and not (tmp_path / "run").exists()
