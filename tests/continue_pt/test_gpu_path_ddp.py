"""Issue 15, item 1: 2-process DDP (on CPU) of a model whose layer drop or frozen feature extractor leaves
parameters without gradient finishes, and every rank ends with the same weights; the strategy choice itself."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from continue_pt.demo import CHECKPOINT, KMEANS, KMEANS_LAYER, WAV2VEC2_CHECKPOINT, demo_audio
from continue_pt.options import PretrainOptionsError
from continue_pt.pretrain import PretrainOptions
from continue_pt.trainer_choice import FIND_UNUSED, choose_strategy, device_count, unused_parameter_reasons

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = '''
import json, sys
import lightning.pytorch as pl
import torch

sys.path.insert(0, sys.argv[1])
from continue_pt.pretrain import PretrainOptions, run_pretraining


class SaveWeights(pl.Callback):
    def on_train_end(self, trainer, module):
        state = {k: v.detach().clone() for k, v in module.student.state_dict().items()}
        torch.save({"state": state, "strategy": type(trainer.strategy).__name__,
                    "find_unused": getattr(trainer.strategy, "_ddp_kwargs", {}).get("find_unused_parameters"),
                    "world": trainer.world_size, "step": trainer.global_step},
                   f"{sys.argv[3]}/rank{trainer.global_rank}.pt")


options = PretrainOptions(**json.loads(sys.argv[2]))
run_pretraining(options, callbacks=[SaveWeights()])
'''


def _audio(tmp_path: Path) -> Path:
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(8):
        sf.write(audio / f"utt{i}.wav", demo_audio(1.5, seed=i)[0].numpy(), 16000)
    return audio


def _bundle(tmp_path: Path, family: str, layer_drop: float) -> Path:
    from converters.convert import convert_checkpoint

    out = tmp_path / f"{family}_bundle"
    if family == "hubert":
        convert_checkpoint(CHECKPOINT, out, kmeans=KMEANS, kmeans_layer=KMEANS_LAYER)
    else:
        convert_checkpoint(WAV2VEC2_CHECKPOINT, out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["encoder_args"]["encoder_layer_drop"] = layer_drop
    config_path.write_text(json.dumps(config))
    return out


def _run_two_ranks(tmp_path: Path, bundle: Path, **overrides) -> list[dict]:
    script = tmp_path / "ddp_run.py"
    script.write_text(_SCRIPT)
    weights = tmp_path / "weights"
    weights.mkdir()
    options = dict(train_data=str(_audio(tmp_path)), output_dir=str(tmp_path / "run"), init_from=str(bundle),
                   max_steps=3, warmup_steps=1, max_batch_seconds=3.0, min_seconds=1.0, num_workers=0,
                   accelerator="cpu", devices=2, checkpoint_every=100, log_every=1, progress_bar=False, lr=1e-3,
                   **overrides)
    # Without find_unused_parameters the ranks wait for each other forever: the timeout turns that into a failure.
    proc = subprocess.run([sys.executable, str(script), str(ROOT), json.dumps(options), str(weights)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(weights / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _assert_trained_and_equal(ranks: list[dict], start: dict[str, torch.Tensor]) -> None:
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [3, 3]
    assert all(r["find_unused"] is True for r in ranks)
    zero, one = ranks[0]["state"], ranks[1]["state"]
    assert set(zero) == set(one)
    for name in zero:
        assert torch.equal(zero[name], one[name]), name
    moved = [name for name in zero if name in start and not torch.equal(zero[name], start[name])]
    assert moved, "no weight changed: nothing was trained"


@pytest.mark.slow
def test_hubert_ddp_with_layer_drop_finishes_with_equal_weights(tmp_path):
    from bundles import load_bundle

    bundle = _bundle(tmp_path, "hubert", layer_drop=0.5)
    start = load_bundle(bundle).get_pretrain_model().state_dict()
    _assert_trained_and_equal(_run_two_ranks(tmp_path, bundle), start)


@pytest.mark.slow
def test_wav2vec2_ddp_with_frozen_extractor_finishes_with_equal_weights(tmp_path):
    from bundles import load_bundle

    bundle = _bundle(tmp_path, "wav2vec2", layer_drop=0.0)
    start = load_bundle(bundle).get_pretrain_model().state_dict()
    ranks = _run_two_ranks(tmp_path, bundle, freeze_feature_extractor_steps=2)
    _assert_trained_and_equal(ranks, start)
    # frozen for steps 0 and 1 only: the extractor moved in step 2, identically on both ranks
    assert any(not torch.equal(ranks[0]["state"][k], start[k]) for k in start if "feature_extractor" in k)


# ------------------------------------------------------------------------------------------------ the choice


class _Fake(torch.nn.Module):
    """Just what unused_parameter_reasons reads of a continued pre-training module."""

    def __init__(self, layer_drop: float, feature_grad_mult: float):
        super().__init__()
        self.student = torch.nn.Module()
        self.student.wav2vec2 = torch.nn.Module()
        self.student.wav2vec2.encoder = torch.nn.Module()
        self.student.wav2vec2.encoder.transformer = torch.nn.Module()
        self.student.wav2vec2.encoder.transformer.layer_drop = layer_drop
        self.feature_grad_mult = feature_grad_mult


def test_find_unused_is_chosen_exactly_when_parameters_can_go_unused():
    plain = _Fake(0.0, 0.1)
    assert choose_strategy("auto", "cpu", 2, plain) == "auto"
    assert choose_strategy("auto", "cpu", 2, _Fake(0.05, 0.1)) == FIND_UNUSED
    assert choose_strategy("auto", "cpu", "2", _Fake(0.0, 0.0)) == FIND_UNUSED
    assert choose_strategy("auto", "cpu", [0, 1], plain, freeze_feature_extractor_steps=10) == FIND_UNUSED
    assert choose_strategy("auto", "cpu", 1, _Fake(0.5, 0.0)) == "auto"  # one process: no DDP at all
    assert choose_strategy("ddp", "cpu", 2, plain) == "ddp"  # the user's explicit choice stands where it can run
    assert choose_strategy("ddp", "cpu", 2, _Fake(0.5, 0.0)) == FIND_UNUSED  # plain DDP would hang every rank
    assert choose_strategy("ddp_spawn", "cpu", 2, _Fake(0.5, 0.0)) == "ddp_spawn"
    assert unused_parameter_reasons(plain) == []
    assert device_count("cpu", "0,1,2") == 3 and device_count("cpu", "auto") == 1


def test_unknown_strategy_is_reported_with_the_choices(tmp_path):
    options = PretrainOptions(train_data=str(tmp_path), output_dir=str(tmp_path / "o"), init_from=None,
                              resume=None, strategy="dpp")
    with pytest.raises(PretrainOptionsError) as err:
        options.validate()
    assert any("strategy is 'dpp'" in p and FIND_UNUSED in p for p in err.value.problems)


def test_cli_strategy_flag_reaches_the_options(tmp_path):
    from click.testing import CliRunner

    from continue_pt.cli import cli

    result = CliRunner().invoke(cli, ["pretrain", "--train-data", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                                       "--init-from", str(tmp_path / "missing"), "--strategy", "dpp"])
    assert result.exit_code == 1
    assert "strategy is 'dpp'" in result.output and "Traceback" not in result.output
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
