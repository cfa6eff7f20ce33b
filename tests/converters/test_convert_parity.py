"""Converted bundles reproduce fairseq's own outputs: every encoder layer, HuBERT logits, the quantizer, CTC logits.

Random-weight fairseq models are built from the real configurations in tests/fairseq_configs (encoders cut to
two layers, full widths), saved as fairseq's trainer saves them in each pickle era, converted, and compared
with fairseq at torchaudio's tolerances.
"""

from __future__ import annotations

import pytest
import torch

from tests.reference import require

require("fairseq")

from bundles.factory import build_encoder, build_pretrain_model  # noqa: E402
from bundles.loading import load_bundle  # noqa: E402
from bundles.waveform import normalize_waveforms  # noqa: E402
from converters.convert import convert_checkpoint  # noqa: E402
from converters.families import hubert, wav2vec2  # noqa: E402
from tests.fairseq_reference import (  # noqa: E402
    CONFIG_NAMES,
    ERAS,
    build_fairseq_model,
    fairseq_ctc_logits,
    fairseq_hubert_logits,
    fairseq_layer_outputs,
    fairseq_quantizer_outputs,
    save_checkpoint,
)

pytestmark = pytest.mark.fairseq

# torchaudio's own import tests use these per-layer tolerances.
TOLERANCE = {"hubert": 3e-5, "wav2vec2": 1.5e-5}
NUM_UPDATES = 12345

_cache: dict[tuple[str, str], tuple[object, object]] = {}


def _converted(name: str, era: str, tmp_path_factory: pytest.TempPathFactory):
    """(fairseq reference, bundle) for a config and era; built once per session."""
    key = (name, era)
    if key not in _cache:
        ref = build_fairseq_model(name, num_layers=2, seed=1, shuffle_dictionary=True)
        work = tmp_path_factory.mktemp(f"{name}-{era}")
        src = work / f"{name}.pt"
        save_checkpoint(ref, src, era, num_updates=NUM_UPDATES)
        bundle = load_bundle(convert_checkpoint(src, work / "bundle"))
        _cache[key] = (ref, bundle)
    return _cache[key]


def _audio(batch: int = 1, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Speech-like scale differences between utterances, so waveform normalisation matters.
    return torch.randn(batch, int(16000 * seconds), generator=g) * torch.tensor([0.1, 3.0])[:batch, None]


CASES = [(name, "dict") for name in CONFIG_NAMES] + [
    (name, era) for name in ("hubert_base_ls960", "wav2vec_small", "wav2vec_small_960h") for era in ERAS if era != "dict"
]


@pytest.mark.slow
@pytest.mark.parametrize("name,era", CASES)
def test_every_encoder_layer_matches_fairseq(name, era, tmp_path_factory):
    ref, bundle = _converted(name, era, tmp_path_factory)
    model = bundle.get_model()
    wav = _audio(batch=1)
    expected = fairseq_layer_outputs(ref, wav)
    with torch.no_grad():
        actual, _ = model.extract_features(wav)
    assert len(actual) == len(expected) == 2
    for layer, (a, e) in enumerate(zip(actual, expected), start=1):
        assert a.shape == e.shape, f"layer {layer}"
        diff = (a - e).abs().max().item()
        assert diff <= TOLERANCE[bundle.family], f"layer {layer}: max abs difference {diff}"


@pytest.mark.parametrize("name,era", CASES)
def test_configuration_taken_from_the_checkpoint(name, era, tmp_path_factory):
    ref, bundle = _converted(name, era, tmp_path_factory)
    assert bundle.normalize_waveform == ref.normalize
    assert bundle.num_updates == NUM_UPDATES
    assert bundle.kind == ("ctc" if ref.fine_tuned else "pretrain")
    backbone_cfg = ref.backbone.cfg if hasattr(ref.backbone, "cfg") else None
    enc = bundle.config.encoder_args
    conv_bias = ref.backbone.feature_extractor.conv_layers[0][0].bias is not None
    assert enc["extractor_conv_bias"] == conv_bias
    assert enc["encoder_layer_norm_first"] == ref.backbone.encoder.layer_norm_first
    assert enc["encoder_num_layers"] == 2
    del backbone_cfg
    if not ref.fine_tuned:  # the criterion's loss weights, which continued pre-training uses, in every era
        criterion = bundle.config.objective["criterion"]
        assert [float(w) for w in criterion["loss_weights"]] == [float(w) for w in ref.cfg.criterion.loss_weights]


@pytest.mark.slow
def test_pre_hydra_string_loss_weights_are_read_as_data(tmp_path):
    """fairseq before Hydra kept ``--loss-weights '[0.1, 10]'`` as a string in ``args`` (and eval-ed it): the
    converter reads it with ast.literal_eval, so the bundle's criterion holds the numbers."""
    import argparse

    ref = build_fairseq_model("wav2vec_small", num_layers=1, seed=2)
    src = tmp_path / "old.pt"
    save_checkpoint(ref, src, "namespace")
    checkpoint = torch.load(src, weights_only=False)  # our own test file, written just above
    args = vars(checkpoint["args"])
    args["loss_weights"], args["log_keys"] = "[0.1, 10]", '["prob_perplexity","code_perplexity","temp"]'
    checkpoint["args"] = argparse.Namespace(**args)
    torch.save(checkpoint, src)
    criterion = load_bundle(convert_checkpoint(src, tmp_path / "bundle")).config.objective["criterion"]
    assert criterion["loss_weights"] == [0.1, 10] and criterion["log_keys"][0] == "prob_perplexity"


@pytest.mark.slow
def test_padded_batch_matches_fairseq_per_utterance(tmp_path_factory):
    """Waveform normalisation and padding masks behave like fairseq's on a padded batch (LARGE normalises)."""
    ref, bundle = _converted("hubert_large_ll60k", "dict", tmp_path_factory)
    wav = _audio(batch=2)
    lengths = torch.tensor([16000, 11000])
    wav[1, 11000:] = 0
    expected = fairseq_layer_outputs(ref, wav, lengths)
    with torch.no_grad():
        actual, out_lengths = bundle.get_model().extract_features(wav, lengths)
    for a, e in zip(actual, expected):
        for b in range(2):
            n = int(out_lengths[b])
            diff = (a[b, :n] - e[b, :n]).abs().max().item()
            assert diff <= TOLERANCE["hubert"], f"utterance {b}: {diff}"


@pytest.mark.parametrize("name", ["hubert_base_ls960", "hubert_large_ll60k"])
def test_hubert_cluster_logits_match_fairseq_with_shuffled_dictionary(name, tmp_path_factory):
    ref, bundle = _converted(name, "dict", tmp_path_factory)
    symbols = ref.dictionary.symbols
    assert any(symbols[c + 4] != str(c) for c in range(10)), "the test dictionary should be shuffled"
    model = bundle.get_pretrain_model().eval()
    wav = _audio(batch=1)
    # get_pretrain_model leaves waveform normalisation to the data pipeline, as fairseq's dataset does it.
    normalized = normalize_waveforms(wav) if bundle.normalize_waveform else wav
    with torch.no_grad():
        feats, lengths = model.wav2vec2.feature_extractor(normalized, None)
        mask = torch.zeros(feats.shape[:2], dtype=torch.bool)
        mask[0, 5:15] = True
        mask[0, 30:38] = True
        expected = fairseq_hubert_logits(ref, wav, mask)
        x, _ = model.wav2vec2.encoder._preprocess(feats, lengths)
        x = torch.where(mask[..., None], model.mask_generator.mask_embedding.to(x.dtype), x)
        x = model.wav2vec2.encoder.transformer(x, attention_mask=None)
        proj = model.logit_generator.final_proj(x[mask])
        logit_temp = bundle.config.objective["logit_temp"]
        ours = torch.cosine_similarity(proj[:, None], model.logit_generator.label_embeddings[None], dim=-1) / logit_temp
        extras = bundle.fairseq_extras()["label_embeddings_non_cluster"]
        ours_special = torch.cosine_similarity(proj[:, None], extras[None], dim=-1) / logit_temp
    rows = [ref.dictionary.index(str(c)) for c in range(ours.shape[1])]
    assert ours.shape == (int(mask.sum()), 500)
    torch.testing.assert_close(ours, expected[:, rows], atol=3e-5, rtol=0)
    special_rows = [r for r in range(len(symbols)) if r not in set(rows)]
    torch.testing.assert_close(ours_special, expected[:, special_rows], atol=3e-5, rtol=0)
    assert bundle.config.label_dictionary["non_cluster_symbols"] == [symbols[r] for r in special_rows]


@pytest.mark.parametrize("name", ["wav2vec_small", "libri960_big"])
def test_quantizer_matches_fairseq_in_eval_and_with_given_gumbel_noise(name, tmp_path_factory):
    ref, bundle = _converted(name, "dict", tmp_path_factory)
    model = bundle.get_pretrain_model()
    quantizer = model.quantizer
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 7, 512, generator=g)
    groups, num_vars = quantizer.groups, quantizer.num_vars
    noise = -torch.empty(2 * 7 * groups, num_vars).exponential_(generator=g).log()
    for gumbel in (None, noise):
        expected = fairseq_quantizer_outputs(ref, features, gumbel, num_updates=NUM_UPDATES)
        quantizer.train(gumbel is not None)
        with torch.no_grad():
            ours = quantizer(features, gumbel_noise=gumbel)
        torch.testing.assert_close(ours.x, expected["x"], atol=1e-5, rtol=0)
        assert torch.equal(ours.targets, expected["targets"])
        torch.testing.assert_close(ours.code_perplexity, expected["code_perplexity"])
        torch.testing.assert_close(ours.prob_perplexity, expected["prob_perplexity"])
        assert ours.temperature == pytest.approx(expected["temp"])  # the schedule continued from num_updates
    assert quantizer.temperature < 2.0


@pytest.mark.parametrize("name", ["wav2vec_small", "libri960_big"])
def test_wav2vec2_projection_heads_match_fairseq(name, tmp_path_factory):
    ref, bundle = _converted(name, "dict", tmp_path_factory)
    model = bundle.get_pretrain_model()
    x = torch.randn(3, model.final_proj.in_features)
    q = torch.randn(3, model.project_q.in_features)
    with torch.no_grad():
        torch.testing.assert_close(model.final_proj(x), ref.model.final_proj(x))
        torch.testing.assert_close(model.project_q(q), ref.model.project_q(q))
    assert torch.equal(model.mask_embedding.detach(), ref.model.mask_emb.detach())


@pytest.mark.parametrize("name", ["hubert_large_ll60k_finetune_ls960", "wav2vec_small_960h"])
def test_ctc_logits_match_fairseq(name, tmp_path_factory):
    ref, bundle = _converted(name, "dict", tmp_path_factory)
    wav = _audio(batch=1)
    expected = fairseq_ctc_logits(ref, wav)
    with torch.no_grad():
        actual, _ = bundle.get_model()(wav)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= TOLERANCE[bundle.family] * 4  # one more layer than the encoder


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_fairseq_key_is_mapped_or_dropped_on_purpose(name):
    ref = build_fairseq_model(name, num_layers=2, seed=0)
    family = hubert if ref.family == "hubert" else wav2vec2
    key_map = family.CTC_KEY_MAP if ref.fine_tuned else family.PRETRAIN_KEY_MAP
    result = key_map.classify(ref.model.state_dict())
    assert result.unmapped == [] and result.conflicting == []
    assert result.problems() == []
    assert not set(result.mapped) & set(result.dropped)
    assert set(result.mapped) | set(result.dropped) == set(ref.model.state_dict())


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_mapped_keys_equal_the_target_models_keys(name, tmp_path_factory):
    _ref, bundle = _converted(name, "dict", tmp_path_factory)
    target = build_pretrain_model(bundle.config) if bundle.kind == "pretrain" else build_encoder(bundle.config)
    assert set(bundle.state_dict()) == set(target.state_dict())
    family = hubert if bundle.family == "hubert" else wav2vec2
    key_map = family.CTC_KEY_MAP if bundle.kind == "ctc" else family.PRETRAIN_KEY_MAP
    mapped = set(key_map.classify(_ref.model.state_dict()).mapped.values())
    assert mapped == set(target.state_dict())
