"""Tests of the fairseq reference helper (tests/fairseq_reference.py) against fairseq itself and torchaudio."""

from __future__ import annotations

import argparse
import zipfile
from functools import cache
from pathlib import Path

import pytest
import torch

from tests.reference import require

require("fairseq")

from tests import fairseq_reference as fr  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

pytestmark = pytest.mark.fairseq

PRETRAIN_HUBERT = ("hubert_base_ls960", "hubert_large_ll60k")
PRETRAIN_W2V2 = ("wav2vec_small", "libri960_big")
FINE_TUNED = ("hubert_large_ll60k_finetune_ls960", "wav2vec_small_960h")


@cache
def _ref(name: str) -> fr.FairseqReference:
    """One reference per config for the whole module (tests must not modify it)."""
    return fr.build_fairseq_model(name, num_layers=2, seed=0)


def _waveform(batch: int = 2, samples: int = 8000, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, samples, generator=torch.Generator().manual_seed(seed)) * 0.3


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _with_model(ref: fr.FairseqReference, model: torch.nn.Module) -> fr.FairseqReference:
    return fr.FairseqReference(ref.name, ref.family, ref.fine_tuned, model, ref.cfg, ref.task_state, ref.dictionary)


def _assert_same_configs(cfg: DictConfig, ref: fr.FairseqReference) -> None:
    """``cfg`` (what fairseq's convert_namespace_to_omegaconf made of the saved Namespace) has the reference's
    model / task / optimization values: the Namespace is one fairseq itself understands."""

    def same(converted: DictConfig, original: DictConfig, skip: tuple[str, ...] = ()) -> None:
        a = OmegaConf.to_container(converted, resolve=True)
        b = OmegaConf.to_container(original, resolve=True)
        for key in b:
            if key not in skip and not isinstance(b[key], dict):
                assert a[key] == b[key], (key, a[key], b[key])

    same(cfg.model, ref.cfg.model, skip=("w2v_args",))
    same(cfg.task, ref.cfg.task)
    same(cfg.optimization, ref.cfg.optimization)
    if ref.fine_tuned:
        same(cfg.model.w2v_args.model, ref.cfg.model.w2v_args.model)
        same(cfg.model.w2v_args.task, ref.cfg.model.w2v_args.task)


def test_config_names_are_the_stored_files() -> None:
    from tests.data2vec2_reference import DATA2VEC2_CONFIGS  # data2vec 2.0's builders are their own

    assert sorted(fr.CONFIG_NAMES + DATA2VEC2_CONFIGS) == sorted(p.stem for p in fr.CONFIG_DIR.glob("*.json"))
    assert fr.load_config("hubert_base_ls960")["num_classes"] == [504]


@pytest.mark.slow
@pytest.mark.parametrize("name", fr.CONFIG_NAMES)
def test_build(name: str) -> None:
    from fairseq.data import Dictionary
    from fairseq.models.hubert.hubert import HubertModel
    from fairseq.models.hubert.hubert_asr import HubertCtc, HubertEncoder
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Model
    from fairseq.models.wav2vec.wav2vec2_asr import Wav2VecCtc, Wav2VecEncoder

    ref = _ref(name)
    expected = {
        "hubert_base_ls960": HubertModel,
        "hubert_large_ll60k": HubertModel,
        "hubert_large_ll60k_finetune_ls960": HubertCtc,
        "wav2vec_small": Wav2Vec2Model,
        "libri960_big": Wav2Vec2Model,
        "wav2vec_small_960h": Wav2VecCtc,
    }[name]
    assert type(ref.model) is expected
    assert not ref.model.training
    assert ref.family == ("hubert" if name.startswith("hubert") else "wav2vec2")
    assert ref.fine_tuned == (name in FINE_TUNED)
    assert len(ref.backbone.encoder.layers) == 2
    assert isinstance(ref.cfg, DictConfig) and OmegaConf.is_struct(ref.cfg)
    stored = fr.load_config(name)
    if ref.fine_tuned:
        assert isinstance(ref.model.w2v_encoder, HubertEncoder if ref.family == "hubert" else Wav2VecEncoder)
        assert ref.cfg.model.w2v_args.model.encoder_layers == 2
        assert ref.model.w2v_encoder.proj.out_features == len(ref.dictionary) == 32
        assert ref.task_state == {"target_dictionary": ref.dictionary}
        ctc = stored if ref.family == "hubert" else stored["model"]
        assert ref.cfg.model.normalize == ctc["normalize"] == ref.cfg.model.w2v_args.task.normalize
        assert ref.cfg.model.w2v_args.model.encoder_embed_dim == ctc["w2v_args"]["model"]["encoder_embed_dim"]
    elif ref.family == "hubert":
        assert ref.cfg.model.encoder_layers == 2
        assert ref.cfg.model.encoder_embed_dim == stored["model"]["encoder_embed_dim"]
        assert ref.cfg.task.normalize == stored["task"]["normalize"]
        assert isinstance(ref.dictionary, Dictionary) and len(ref.dictionary) == 504
        assert ref.task_state["dictionaries"] == [ref.dictionary]
        assert ref.model.label_embs_concat.shape[0] == 504
    else:
        assert ref.cfg.model.encoder_embed_dim == stored["encoder_embed_dim"]
        assert ref.dictionary is None and ref.task_state == {}
    # every weight is random: no zero/default tensor survives
    for key, tensor in ref.model.state_dict().items():
        if tensor.numel() == 0 or not tensor.is_floating_point():
            continue
        assert (tensor != 0).all(), key
        assert tensor.numel() == 1 or tensor.std() > 0, key
        if key.endswith("weight_g"):
            assert (tensor > 0).all(), key


def test_dictionary_order() -> None:
    plain = fr.cluster_dictionary(500)
    assert plain.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert all(plain.index(str(c)) == c + 4 for c in range(500))
    shuffled = fr.build_fairseq_model("hubert_base_ls960", shuffle_dictionary=True, num_clusters=20).dictionary
    assert shuffled.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert sorted(shuffled.symbols[4:], key=int) == [str(c) for c in range(20)]
    assert any(shuffled.index(str(c)) != c + 4 for c in range(20))
    assert len(fr.letter_dictionary()) == 32


@pytest.mark.slow
@pytest.mark.parametrize("era", fr.ERAS)
@pytest.mark.parametrize("name", fr.CONFIG_NAMES)
def test_checkpoint_roundtrip(name: str, era: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fairseq import checkpoint_utils
    from fairseq.data import Dictionary

    ref = _ref(name)
    path = tmp_path / "checkpoint.pt"
    fr.save_checkpoint(ref, path, era, num_updates=777)
    assert zipfile.is_zipfile(path) == (era != "legacy")
    state = torch.load(path, weights_only=False)  # a file this test just wrote

    assert state["optimizer_history"][-1]["num_updates"] == 777
    assert {"model", "optimizer_history", "extra_state"} <= state.keys()
    if era == "namespace":
        assert "cfg" not in state
        args = state["args"]
        assert isinstance(args, argparse.Namespace)
        assert args.arch == ref.cfg.model._name and args.task == ref.cfg.task._name
        if ref.fine_tuned:
            assert isinstance(args.w2v_args, argparse.Namespace) and args.w2v_args.encoder_layers == 2
        else:
            assert args.encoder_layers == 2
        assert args.normalize == ref.normalize
    else:
        assert state["args"] is None
        cfg = state["cfg"]
        if era == "dictconfig":
            assert isinstance(cfg, DictConfig)
        else:
            assert type(cfg) is dict and type(cfg["model"]) is dict
            assert cfg == OmegaConf.to_container(ref.cfg)
        assert cfg["model"]["_name"] == ref.cfg.model._name
    if ref.family == "hubert" or era != "namespace":
        assert state["task_state"].keys() == ref.task_state.keys()
        for value in state["task_state"].values():
            for d in value if isinstance(value, list) else [value]:
                assert type(d) is Dictionary and d.symbols == ref.dictionary.symbols
    assert state["model"].keys() == ref.model.state_dict().keys()
    assert "encoder.pos_conv.0.weight_g" in {k.removeprefix("w2v_encoder.w2v_model.") for k in state["model"]}
    for key, value in ref.model.state_dict().items():
        assert torch.equal(state["model"][key], value), key

    # fairseq rebuilds the same model from the file. load_model_ensemble_and_task cannot build hubert_ctc
    # (HubertEncoder reads cfg.autoregressive, absent from HubertCtcConfig) nor convert a nested w2v_args
    # Namespace with hydra >= 1.1; model_from_state handles those with fairseq's pieces.
    if ref.name == "hubert_large_ll60k_finetune_ls960" or (era == "namespace" and ref.fine_tuned):
        cfg = fr.namespace_to_config(state["args"]) if era == "namespace" else state["cfg"]
        model = fr.model_from_state({**state, "args": None, "cfg": cfg}, task_state=ref.task_state)
    else:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # fairseq calls torch.load without weights_only
        with fr.skip_weight_init():  # every weight is loaded from the file right after construction
            models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)], strict=True)
        model = models[0].eval()
    if era == "namespace":
        _assert_same_configs(cfg, ref)
    wav = _waveform(1, 1600)
    assert _max_diff(fr.fairseq_layer_outputs(_with_model(ref, model), wav), fr.fairseq_layer_outputs(ref, wav)) == 0


@pytest.mark.parametrize("name", fr.CONFIG_NAMES)
def test_layer_outputs_match_torchaudio_import(name: str) -> None:
    """torchaudio's import_fairseq_model (an independent reimplementation) agrees, with and without padding."""
    from torchaudio.models.wav2vec2.utils import import_fairseq_model

    ref = _ref(name)
    imported = import_fairseq_model(ref.model.w2v_encoder if ref.fine_tuned else ref.model).eval()
    wav = _waveform(2, 8000)
    # 6950 samples: 21 frames both by the conv formula (torchaudio, fairseq wav2vec 2.0) and by fairseq HuBERT's
    # chunked padding mask (see test_hubert_padding_counts_frames_like_fairseq for lengths where they differ).
    for batch, lens in ((wav[:1, :3680], None), (wav, torch.tensor([8000, 6950]))):
        outs = fr.fairseq_layer_outputs(ref, batch, lens)
        frames_total = 11 if lens is None else 24  # 11: odd, so fairseq pads internally
        assert len(outs) == 2 and outs[0].shape == (len(batch), frames_total, ref.backbone.encoder.embedding_dim)
        # torchaudio gets the waveform the way fairseq's dataset prepares it (normalised per utterance)
        prepared, _ = fr.prepare_waveform(ref, batch, lens)
        with torch.no_grad():
            expected, frames = imported.extract_features(prepared, lens)
        if lens is not None:
            assert frames.tolist() == [24, 21]
        for got, want in zip(outs, expected):
            for b in range(len(batch)):
                n = int(frames[b]) if frames is not None else got.shape[1]
                torch.testing.assert_close(got[b, :n], want[b, :n], atol=1e-4, rtol=1e-4)
    if ref.fine_tuned:
        logits = fr.fairseq_ctc_logits(ref, wav[:1])
        assert logits.shape == (1, 24, 32)
        with torch.no_grad():
            expected_logits, _ = imported(fr.prepare_waveform(ref, wav[:1])[0])
        torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_hubert_padding_counts_frames_like_fairseq() -> None:
    """fairseq's HuBERT pads a frame only if its whole T // frames chunk is padding: one frame more than the
    conv formula for many lengths (wav2vec 2.0 and torchaudio use the formula)."""
    ref = _ref("hubert_base_ls960")
    lengths = torch.tensor([8000, 5123, 6950, 6000])
    conv_formula = (lengths - 400) // 320 + 1
    assert conv_formula.tolist() == [24, 15, 21, 18]
    assert fr.hubert_valid_frames(ref, 8000, lengths).tolist() == [24, 16, 21, 19]


@pytest.mark.parametrize("name", fr.CONFIG_NAMES)
def test_waveform_normalisation(name: str) -> None:
    """Raw audio goes in; the helper applies fairseq's per-utterance layer norm (valid samples only) iff
    task.normalize, and zeros the padding."""
    ref = _ref(name)
    wav = _waveform(2, 4000) * 3 + 0.5
    lengths = torch.tensor([4000, 3000])
    prepared, padding = fr.prepare_waveform(ref, wav, lengths)
    assert torch.equal(padding, torch.arange(4000)[None, :] >= lengths[:, None])
    assert (prepared[1, 3000:] == 0).all()
    for b, n in enumerate(lengths.tolist()):
        if ref.normalize:
            assert abs(float(prepared[b, :n].mean())) < 1e-5
            assert float(prepared[b, :n].std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
        else:
            assert torch.equal(prepared[b, :n], wav[b, :n])
    if ref.normalize:  # the layer-norm feature extractor is not scale invariant: the helper must normalise
        a = fr.fairseq_layer_outputs(ref, wav[:1, :1600])
        b = fr.fairseq_layer_outputs(ref, wav[:1, :1600] * 5)
        assert _max_diff(a, b) < 1e-3


@pytest.mark.parametrize("name", PRETRAIN_HUBERT)
def test_hubert_logits_match_fairseq_loss(name: str) -> None:
    """cross_entropy(L, dictionary row of the target) equals fairseq's compute_nce-based masked loss."""
    from unittest import mock

    import torch.nn.functional as F

    ref = _ref(name)
    wav = _waveform(2, 8000)
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 24, generator=gen) < 0.5
    lengths = torch.tensor([8000, 6000])
    logits = fr.fairseq_hubert_logits(ref, wav, mask, lengths=lengths)
    valid = torch.arange(24)[None, :] < fr.hubert_valid_frames(ref, 8000, lengths)[:, None]  # 19 frames, not 18
    assert logits.shape == (int((mask & valid).sum()), len(ref.dictionary))

    clusters = torch.randint(0, 500, (2, 24), generator=gen)
    rows = torch.tensor([[ref.dictionary.index(str(int(c))) for c in row] for row in clusters])
    prepared, padding = fr.prepare_waveform(ref, wav, lengths)
    with torch.no_grad(), mock.patch("fairseq.models.hubert.hubert.compute_mask_indices", lambda *a, **k: mask.numpy()):
        out = ref.model(prepared, target_list=[rows], padding_mask=padding, mask=True)
    fairseq_logits = out["logit_m_list"][0]
    targets = rows[mask & valid]
    torch.testing.assert_close(fairseq_logits[:, 0], logits[torch.arange(len(targets)), targets])
    fairseq_loss = F.cross_entropy(fairseq_logits.float(), torch.zeros(len(targets), dtype=torch.long), reduction="sum")
    torch.testing.assert_close(F.cross_entropy(logits, targets, reduction="sum"), fairseq_loss)


@pytest.mark.parametrize("name", PRETRAIN_W2V2)
def test_quantizer_outputs(name: str) -> None:
    ref = _ref(name)
    quantizer = ref.model.quantizer
    feats = torch.randn(2, 7, 512, generator=torch.Generator().manual_seed(4))
    groups, num_vars = quantizer.groups, quantizer.num_vars
    with torch.no_grad():
        logits = quantizer.weight_proj(feats).view(2, 7, groups, num_vars)

    hard = fr.fairseq_quantizer_outputs(ref, feats)
    assert set(hard) >= {"x", "code_perplexity", "prob_perplexity", "temp", "targets"}
    assert torch.equal(hard["targets"], logits.argmax(-1))
    codebook = quantizer.vars.view(groups, num_vars, -1)
    expected_x = torch.cat([codebook[g][hard["targets"][..., g]] for g in range(groups)], dim=-1)
    torch.testing.assert_close(hard["x"], expected_x)
    assert hard["temp"] == quantizer.max_temp

    zero = fr.fairseq_quantizer_outputs(ref, feats, torch.zeros(2 * 7 * groups, num_vars))
    torch.testing.assert_close(zero["x"], hard["x"])

    noise = -torch.empty(2, 7, groups, num_vars).exponential_(generator=torch.Generator().manual_seed(5)).log()
    noisy = fr.fairseq_quantizer_outputs(ref, feats, noise, num_updates=20000)
    assert torch.equal(noisy["targets"], (logits + noise).argmax(-1))
    assert not torch.equal(noisy["targets"], hard["targets"])
    assert noisy["temp"] == pytest.approx(max(2.0 * 0.999995**20000, 0.5))
    assert quantizer.curr_temp == quantizer.max_temp and not quantizer.training  # nothing leaks out
    torch.testing.assert_close(noisy["prob_perplexity"], hard["prob_perplexity"])  # noise-free statistic
