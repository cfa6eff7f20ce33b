"""s3prl's converted checkpoints -> complete pre-training bundles, heads included, equal to fairseq's model.

A random-weight fairseq model is built from the real configurations in tests/fairseq_configs, saved as fairseq's
trainer saves it, and turned into an s3prl file exactly as s3prl's ``upstream/{hubert,wav2vec2}/convert.py`` does
(fairseq's ``load_checkpoint_to_cpu``, ``OmegaConf.to_container(state["cfg"])``, ``torch.save`` of the dict). The
bundle must reproduce fairseq layer by layer and hold fairseq's heads unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.reference import require

require("fairseq")

from bundles.loading import load_bundle  # noqa: E402
from continue_pt.cli import cli  # noqa: E402
from converters.convert import convert_checkpoint  # noqa: E402
from converters.errors import ConversionError  # noqa: E402
from converters.source_format import source_format  # noqa: E402
from tests.fairseq_reference import (  # noqa: E402
    build_fairseq_model,
    fairseq_layer_outputs,
    fairseq_quantizer_outputs,
    save_checkpoint,
)

pytestmark = pytest.mark.fairseq

TOLERANCE = {"hubert": 3e-5, "wav2vec2": 1.5e-5}


def write_s3prl_file(fairseq_pt: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """s3prl's ``load_and_convert_fairseq_ckpt`` (hubert and wav2vec2 variants), without importing s3prl."""
    from fairseq.checkpoint_utils import load_checkpoint_to_cpu
    from omegaconf import OmegaConf

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # fairseq's torch.load predates weights_only
    state = load_checkpoint_to_cpu(str(fairseq_pt), arg_overrides={})
    cfg = OmegaConf.to_container(state["cfg"])
    assert type(cfg) is dict
    output = {"task_cfg": cfg["task"], "model_cfg": cfg["model"], "model_weight": state["model"]}
    if cfg["model"]["_name"] == "hubert":
        output["dictionaries_symbols"] = [d.symbols for d in state["task_state"]["dictionaries"]]
    torch.save(output, out)
    return out


_cache: dict[tuple[str, str], tuple[object, object]] = {}


def _converted(name: str, era: str, tmp_path_factory, monkeypatch):
    if (name, era) not in _cache:
        ref = build_fairseq_model(name, num_layers=2, seed=3, shuffle_dictionary=True)
        work = tmp_path_factory.mktemp(f"s3prl-{name}-{era}")
        save_checkpoint(ref, work / "fairseq.pt", era)
        src = write_s3prl_file(work / "fairseq.pt", work / "converted.pt", monkeypatch)
        assert source_format(src) == "s3prl"
        _cache[(name, era)] = (ref, load_bundle(convert_checkpoint(src, work / "bundle")))
    return _cache[(name, era)]


CASES = [("hubert_base_ls960", "dict"), ("hubert_base_ls960", "namespace"), ("hubert_large_ll60k", "dict"),
         ("wav2vec_small", "dict"), ("libri960_big", "dict")]


@pytest.mark.slow
@pytest.mark.parametrize("name,era", CASES)
def test_every_layer_matches_fairseq(name, era, tmp_path_factory, monkeypatch):
    ref, bundle = _converted(name, era, tmp_path_factory, monkeypatch)
    assert (bundle.family, bundle.kind) == (ref.family, "pretrain")
    assert bundle.normalize_waveform == ref.normalize
    wav = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    expected = fairseq_layer_outputs(ref, wav)
    with torch.no_grad():
        actual, _ = bundle.get_model().extract_features(wav)
    assert len(actual) == len(expected) == 2
    for layer, (a, e) in enumerate(zip(actual, expected), start=1):
        assert (a - e).abs().max().item() <= TOLERANCE[bundle.family], f"layer {layer}"
    assert bundle.config.provenance["source_format"].startswith("s3prl")


@pytest.mark.slow
@pytest.mark.parametrize("name,era", [c for c in CASES if c[0].startswith("hubert")])
def test_hubert_heads_equal_fairseqs_in_cluster_order(name, era, tmp_path_factory, monkeypatch):
    ref, bundle = _converted(name, era, tmp_path_factory, monkeypatch)
    model = bundle.get_pretrain_model()
    fairseq = ref.model
    rows = [ref.dictionary.index(str(c)) for c in range(500)]
    assert rows != sorted(rows), "the test dictionary should be shuffled"
    assert torch.equal(model.logit_generator.label_embeddings.detach(), fairseq.label_embs_concat.detach()[rows])
    assert torch.equal(model.logit_generator.final_proj.weight.detach(), fairseq.final_proj.weight.detach())
    assert torch.equal(model.logit_generator.final_proj.bias.detach(), fairseq.final_proj.bias.detach())
    assert torch.equal(model.mask_generator.mask_embedding.detach(), fairseq.mask_emb.detach())
    specials = [r for r in range(len(ref.dictionary)) if r not in set(rows)]
    assert torch.equal(bundle.fairseq_extras()["label_embeddings_non_cluster"],
                       fairseq.label_embs_concat.detach()[specials])
    assert bundle.config.label_dictionary["source_symbols"] == ref.dictionary.symbols
    assert bundle.config.pretrain_args["num_classes"] == 500


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wav2vec_small", "libri960_big"])
def test_wav2vec2_quantizer_and_heads_equal_fairseqs(name, tmp_path_factory, monkeypatch):
    ref, bundle = _converted(name, "dict", tmp_path_factory, monkeypatch)
    model = bundle.get_pretrain_model()
    fairseq = ref.model
    assert torch.equal(model.quantizer.codevectors.detach(), fairseq.quantizer.vars.detach())
    assert torch.equal(model.quantizer.weight_proj.weight.detach(), fairseq.quantizer.weight_proj.weight.detach())
    for head in ("project_q", "final_proj"):
        assert torch.equal(getattr(model, head).weight.detach(), getattr(fairseq, head).weight.detach())
    assert torch.equal(model.mask_embedding.detach(), fairseq.mask_emb.detach())
    features = torch.randn(2, 7, 512, generator=torch.Generator().manual_seed(4))
    model.quantizer.eval()
    with torch.no_grad():
        ours = model.quantizer(features)
    expected = fairseq_quantizer_outputs(ref, features, None, num_updates=0)
    torch.testing.assert_close(ours.x, expected["x"], atol=1e-5, rtol=0)
    assert torch.equal(ours.targets, expected["targets"])
    assert bundle.num_updates is None and "num_updates_note" in bundle.config.provenance


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _assert_cli_refuses(src: Path, out: Path, *pieces: str) -> None:
    result = CliRunner().invoke(cli, ["convert", str(src), "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error:")].__len__() == 1, result.output
    for piece in pieces:
        assert piece in result.output, result.output
    assert not out.exists()


def test_hostile_model_cfg_is_refused_and_nothing_runs(tmp_path):
    canary = tmp_path / "CANARY"
    weights = {"feature_extractor.conv_layers.0.0.weight": torch.zeros(2)}
    torch.save({"task_cfg": {"_name": "hubert_pretraining"},
                "model_cfg": {"_name": "hubert", "extractor_mode": _Payload(os.system, f"touch {canary}")},
                "model_weight": weights, "dictionaries_symbols": [["<s>", "<pad>", "</s>", "<unk>", "0"]]},
               tmp_path / "hostile.pt")
    _assert_cli_refuses(tmp_path / "hostile.pt", tmp_path / "out", "refused", "system")
    assert not canary.exists()


def test_truncated_file_is_refused(tmp_path_factory, tmp_path, monkeypatch):
    ref = build_fairseq_model("wav2vec_small", num_layers=1, seed=1)
    save_checkpoint(ref, tmp_path / "fairseq.pt", "dict")
    src = write_s3prl_file(tmp_path / "fairseq.pt", tmp_path / "s3prl.pt", monkeypatch)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    _assert_cli_refuses(src, tmp_path / "out", "s3prl.pt")


def test_omegaconf_objects_are_not_on_its_allow_list(tmp_path):
    """s3prl saves plain containers: an omegaconf DictConfig in model_cfg is not what its converter writes."""
    from omegaconf import OmegaConf

    from converters.s3prl_import import read_s3prl_checkpoint

    torch.save({"task_cfg": {}, "model_cfg": OmegaConf.create({"_name": "wav2vec2"}), "model_weight": {}},
               tmp_path / "odd.pt")
    with pytest.raises(ConversionError, match="omegaconf"):
        read_s3prl_checkpoint(tmp_path / "odd.pt")


def test_fairseq_enum_members_left_by_to_container_read_as_their_option(tmp_path, monkeypatch):
    """OmegaConf.to_container keeps enum members (enum_to_str=False). fairseq versions whose ``Choices`` enum pickles
    (published checkpoints hold ``fairseq.dataclass.constants.Choices`` members) would leave them in s3prl's file:
    they read as their option strings. (fairseq-fixed's own ``Choices`` cannot be pickled, so one is made here.)"""
    import enum

    import fairseq.dataclass.constants as constants

    choices = enum.Enum("Choices", {"default": "default", "static": "static"}, module="fairseq.dataclass.constants")
    monkeypatch.setattr(constants, "Choices", choices, raising=False)
    ref = build_fairseq_model("wav2vec_small", num_layers=1, seed=2)
    save_checkpoint(ref, tmp_path / "fairseq.pt", "dict")
    src = write_s3prl_file(tmp_path / "fairseq.pt", tmp_path / "s3prl.pt", monkeypatch)
    data = torch.load(src, weights_only=False)  # our own file, written just above
    data["model_cfg"]["extractor_mode"] = choices("default")
    data["model_cfg"]["mask_selection"] = choices("static")
    torch.save(data, src)
    bundle = load_bundle(convert_checkpoint(src, tmp_path / "bundle"))
    assert bundle.config.encoder_args["extractor_mode"] == "group_norm"
    assert bundle.config.objective["mask_selection"] == "static"


@pytest.mark.slow
def test_verify_rereads_the_s3prl_file(tmp_path, monkeypatch):
    ref = build_fairseq_model("hubert_base_ls960", num_layers=1, seed=5, shuffle_dictionary=True)
    save_checkpoint(ref, tmp_path / "fairseq.pt", "dict")
    src = write_s3prl_file(tmp_path / "fairseq.pt", tmp_path / "s3prl.pt", monkeypatch)
    bundle = convert_checkpoint(src, tmp_path / "bundle")
    result = CliRunner().invoke(cli, ["verify", str(bundle), "--against", str(src)])
    assert result.exit_code == 0 and "ok:" in result.output, result.output
    facts = CliRunner().invoke(cli, ["inspect", str(src)]).output
    assert "s3prl converted fairseq checkpoint" in facts and "final_proj" in facts
