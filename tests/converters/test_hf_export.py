"""`export --to hf` (converters.hf_export) and its reverse in `convert` (converters.hf_import).

transformers is a test-only dependency (pinned in pyproject's `test` extra): each exported directory is loaded with
transformers' own ``from_pretrained`` while its loading log is captured (no missing / unexpected / newly initialised
weight may be reported) and compared layer by layer with the bundle's torchaudio model.
"""

from __future__ import annotations

import io
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bundles import load_bundle
from bundles.config import BundleConfig
from bundles.factory import build_encoder, build_pretrain_model
from bundles.safetensors_stream import PendingTensor
from bundles.waveform import normalize_waveforms
from bundles.writing import write_bundle
from converters.convert import convert_checkpoint
from converters.errors import ConversionError
from converters.hf_export import export_bytes, export_hf, hf_config, plan_hf_tensors
from converters.hf_layout import EXTRAS_FILE, LAYOUTS, bundle_key_to_hf
from continue_pt.demo import ASSETS, CHECKPOINT, KMEANS, KMEANS_LAYER
from tests.reference import require

transformers = require("transformers")  # the test-only reference; missing it fails the suite

HUBERT_TOL, WAV2VEC2_TOL = 3e-5, 1.5e-5
LETTERS = ["<s>", "<pad>", "</s>", "<unk>", "|", "E", "T", "A", "O", "N", "I", "H"]
_LOAD_PROBLEMS = ("missing", "unexpected", "newly initialized", "not initialized", "mismatch", "not used")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """The demo's tiny HuBERT (with its k-means) and wav2vec 2.0, and two synthetic CTC bundles with the other
    options (layer-norm extractor, conv bias, layer norm first, normalised waveforms)."""
    root = tmp_path_factory.mktemp("hf")
    out = {"hubert": convert_checkpoint(CHECKPOINT, root / "hubert", kmeans=KMEANS, kmeans_layer=KMEANS_LAYER),
           "wav2vec2": convert_checkpoint(ASSETS / "tiny_wav2vec2.pt", root / "wav2vec2")}
    for family in ("wav2vec2", "hubert"):
        out[f"{family}_ctc"] = _ctc_bundle(load_bundle(out[family]).config, family, root / f"{family}_ctc")
    return out


def _ctc_bundle(template: BundleConfig, family: str, out: Path) -> Path:
    """A fine-tuned bundle with random weights and the options the demo checkpoints do not use."""
    enc = {**template.encoder_args, "extractor_mode": "layer_norm", "extractor_conv_bias": True,
           "encoder_layer_norm_first": True, "aux_num_out": 12}
    symbols = LETTERS if family == "wav2vec2" else None  # the HuBERT one has no vocabulary: vocab_size only
    config = BundleConfig(family=family, kind="ctc", encoder_args=enc, pretrain_args=None, sample_rate=16000,
                          normalize_waveform=True, provenance={"source_file": "synthetic"},
                          label_dictionary={"ctc_symbols": symbols} if symbols else None)
    torch.manual_seed(1)
    model = build_encoder(config).to_empty(device="cpu")
    for name, p in model.state_dict().items():
        p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("layer_norm.weight") else 0.0))
    tensors = [PendingTensor(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in model.state_dict().items()]
    return write_bundle(out, config, tensors)


@contextmanager
def transformers_log():
    """Everything transformers logs while loading (its loading report goes to the `transformers` loggers)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("transformers")
    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_info()
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        transformers.logging.set_verbosity(old)


def _load_cleanly(cls_name: str, path: Path):
    with transformers_log() as log:
        model = getattr(transformers, cls_name).from_pretrained(path).eval()
    text = log.getvalue().lower()
    assert "load report" not in text and not any(p in text for p in _LOAD_PROBLEMS), log.getvalue()[-2000:]
    return model


def _waveforms(normalize: bool, path: Path, wav: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw waveforms for the bundle, the same normalised as the bundle does when it does: the input its
    torchaudio model sees). transformers' feature extractor of the directory is checked to normalise alike."""
    if wav is None:
        torch.manual_seed(0)
        wav = torch.randn(2, 8000) * 0.3 + 0.05
    extractor = transformers.AutoFeatureExtractor.from_pretrained(path)
    assert extractor.do_normalize == normalize
    hf = extractor([w.numpy() for w in wav], sampling_rate=16000, return_tensors="pt").input_values
    ours = normalize_waveforms(wav) if normalize else wav
    # transformers divides by sqrt(var + 1e-7), fairseq (and the bundle) by sqrt(var + 1e-5): a relative difference
    # of about (1e-5 - 1e-7) / (2 var), inherent to transformers' feature extractor; the models get the same input.
    rtol = 1e-5 / float(wav.var(dim=-1).min()) if normalize else 0.0
    assert torch.allclose(hf, ours, rtol=rtol, atol=1e-6)
    return wav, ours


def _compare_layers(bundle_dir: Path, hf_model, hf_dir: Path, tol: float) -> None:
    b = load_bundle(bundle_dir)
    wav, hf_wav = _waveforms(b.normalize_waveform, hf_dir)
    with torch.no_grad():
        ours, _ = b.get_model().extract_features(wav)
        theirs = hf_model(hf_wav, output_hidden_states=True).hidden_states
    assert len(theirs) == len(ours) + 1
    for i, layer in enumerate(ours):  # hidden_states[0] is the transformer's input
        err = float((layer - theirs[i + 1]).abs().max())
        assert err <= tol, f"layer {i + 1}: max |diff| {err}"


@pytest.mark.parametrize("family, layout", [(f, l) for f in ("hubert", "wav2vec2")
                                            for l in LAYOUTS if l[0] == f])
def test_key_table_places_every_bundle_key_exactly_where_transformers_expects_it(family, layout, bundles):
    config = load_bundle(bundles[family if layout[1] == "pretrain" else f"{family}_ctc"]).config
    encoder_only = len(layout) == 3
    model = build_pretrain_model(config) if config.kind == "pretrain" else build_encoder(config)
    placed = {k: bundle_key_to_hf(LAYOUTS[layout], k) for k, v in model.state_dict().items()}
    assert all(placed.values()), [k for k, v in placed.items() if v is None]
    hf_cfg = hf_config(config, encoder_only=encoder_only)
    with torch.device("meta"):
        hf_model = getattr(transformers, hf_cfg["architectures"][0])(
            transformers.AutoConfig.for_model(**hf_cfg))
    hf_shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    ours = {name: tuple(model.state_dict()[k].shape) for k, (where, name) in placed.items() if where == "model"}
    assert ours == hf_shapes
    kept = sorted(k for k, (where, _) in placed.items() if where == "extras")
    expected_kept = {("hubert", "pretrain"): ["logit_generator.final_proj.bias", "logit_generator.final_proj.weight",
                                              "logit_generator.label_embeddings"],
                     ("wav2vec2", "pretrain", "encoder"): ["final_proj.bias", "final_proj.weight", "project_q.bias",
                                                           "project_q.weight", "quantizer.codevectors",
                                                           "quantizer.weight_proj.bias",
                                                           "quantizer.weight_proj.weight"]}
    assert kept == expected_kept.get(layout, [])


def test_hubert_exports_as_a_hubert_model_that_loads_cleanly_and_matches(bundles, tmp_path):
    written = []
    out = export_hf(bundles["hubert"], tmp_path / "hf", on_tensor=lambda t: written.append(t.nbytes))
    # the progress callback sees every tensor; export_bytes is the bar's total
    assert sum(written) == export_bytes(bundles["hubert"])
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", EXTRAS_FILE, "model.safetensors", "preprocessor_config.json"]
    model = _load_cleanly("HubertModel", out)
    _compare_layers(bundles["hubert"], model, out, HUBERT_TOL)
    mask = load_bundle(bundles["hubert"]).state_dict()["mask_generator.mask_embedding"]
    assert torch.equal(model.masked_spec_embed.detach(), mask)


def test_wav2vec2_exports_for_pretraining_with_its_quantizer_and_as_a_bare_encoder(bundles, tmp_path):
    bundle = load_bundle(bundles["wav2vec2"])
    state = bundle.state_dict()
    out = export_hf(bundles["wav2vec2"], tmp_path / "pt")
    model = _load_cleanly("Wav2Vec2ForPreTraining", out)
    with pytest.raises(AssertionError, match="UNEXPECTED"):  # the check bites: the bare encoder leaves heads unused
        _load_cleanly("Wav2Vec2Model", out)
    _compare_layers(bundles["wav2vec2"], model.wav2vec2, out, WAV2VEC2_TOL)
    for ours, theirs in [("quantizer.codevectors", model.quantizer.codevectors),
                         ("quantizer.weight_proj.weight", model.quantizer.weight_proj.weight),
                         ("project_q.weight", model.project_q.weight), ("final_proj.weight", model.project_hid.weight),
                         ("mask_embedding", model.wav2vec2.masked_spec_embed)]:
        assert torch.equal(theirs.detach(), state[ours]), ours
    # the quantizer picks the same codes from the same (layer-normed) features
    wav, _ = _waveforms(False, out)
    with torch.no_grad():
        feats = model.wav2vec2(wav).extract_features
        ours_q = bundle.get_pretrain_model().eval().quantizer(feats)
        theirs_q = model.quantizer.weight_proj(feats).view(-1, 16).argmax(-1)
    assert torch.equal(ours_q.targets.reshape(-1), theirs_q)

    encoder = export_hf(bundles["wav2vec2"], tmp_path / "enc", encoder_only=True)
    _compare_layers(bundles["wav2vec2"], _load_cleanly("Wav2Vec2Model", encoder), encoder, WAV2VEC2_TOL)


@pytest.mark.parametrize("family", ["wav2vec2", "hubert"])
def test_ctc_bundles_with_layer_norm_options_export_for_ctc_and_match(family, bundles, tmp_path):
    out = export_hf(bundles[f"{family}_ctc"], tmp_path / "hf")
    assert json.loads((out / "preprocessor_config.json").read_text())["do_normalize"] is True
    model = _load_cleanly("Wav2Vec2ForCTC" if family == "wav2vec2" else "HubertForCTC", out)
    tol = WAV2VEC2_TOL if family == "wav2vec2" else HUBERT_TOL
    base = model.wav2vec2 if family == "wav2vec2" else model.hubert
    _compare_layers(bundles[f"{family}_ctc"], base, out, tol)
    b = load_bundle(bundles[f"{family}_ctc"])
    wav, hf_wav = _waveforms(True, out)
    with torch.no_grad():
        ours, _ = b.get_model()(wav)
        theirs = model(hf_wav).logits
    assert float((ours - theirs).abs().max()) <= tol
    if family == "hubert":
        assert not (out / "vocab.json").exists()
        return
    # the vocabulary: row 0 (fairseq's blank) is transformers' pad token, the rows themselves are unchanged
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_ids_to_tokens(list(range(12))) == ["<pad>", "<s>"] + LETTERS[2:]
    assert tokenizer.pad_token_id == model.config.pad_token_id == 0
    assert tokenizer.decode([0, 5, 5, 0, 6, 4, 7, 7]) == "ET A"  # blank-separated repeats, "|" between words


@pytest.mark.parametrize("name, encoder_only", [("hubert", False), ("wav2vec2", False), ("wav2vec2", True),
                                                ("wav2vec2_ctc", False), ("hubert_ctc", False)])
def test_bundle_to_transformers_to_bundle_is_lossless(name, encoder_only, bundles, tmp_path):
    hf = export_hf(bundles[name], tmp_path / "hf", encoder_only=encoder_only)
    back = convert_checkpoint(hf, tmp_path / "back")
    a, b = load_bundle(bundles[name]), load_bundle(back)
    for read in ("state_dict", "fairseq_extras"):
        x, y = getattr(a, read)(), getattr(b, read)()
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype for k in x), read
    assert a.has_kmeans == b.has_kmeans
    if a.has_kmeans:
        ka, kb = a.get_kmeans(), b.get_kmeans()
        assert torch.equal(ka.centroids, kb.centroids) and ka.layer == kb.layer and ka.metadata == kb.metadata
    ca, cb = json.loads(a.config.to_json()), json.loads(b.config.to_json())
    assert cb["provenance"].pop("transformers_import")["source_dir"] == "hf"
    assert ca == cb
    if name == "hubert":  # and the continued pre-training model is whole again: head, label order, mask
        assert b.get_pretrain_model().logit_generator.label_embeddings.shape == (20, 32)


def test_a_directory_re_saved_by_transformers_reads_back_with_its_new_weights(bundles, tmp_path):
    """Fine-tuned with transformers and saved again (here: one weight changed, the weight-norm factors under
    transformers' legacy names): convert takes the new weights and the head from the extras file."""
    from safetensors.torch import load_file, save_file

    hf = export_hf(bundles["hubert"], tmp_path / "hf")
    model = _load_cleanly("HubertModel", hf)
    with torch.no_grad():
        model.encoder.layers[0].feed_forward.output_dense.bias.add_(1.0)
    model.save_pretrained(tmp_path / "tuned")
    (tmp_path / "tuned" / EXTRAS_FILE).write_bytes((hf / EXTRAS_FILE).read_bytes())
    weights = load_file(tmp_path / "tuned" / "model.safetensors")
    for new, old in (("weight_g", "parametrizations.weight.original0"), ("weight_v", "parametrizations.weight.original1")):
        weights[f"encoder.pos_conv_embed.conv.{new}"] = weights.pop(f"encoder.pos_conv_embed.conv.{old}")
    save_file(weights, tmp_path / "tuned" / "model.safetensors", metadata={"format": "pt"})
    back = load_bundle(convert_checkpoint(tmp_path / "tuned", tmp_path / "back")).state_dict()
    original = load_bundle(bundles["hubert"]).state_dict()
    changed = "wav2vec2.encoder.transformer.layers.0.feed_forward.output_dense.bias"
    assert torch.equal(back[changed], original[changed] + 1.0)
    assert all(torch.equal(back[k], original[k]) for k in original if k != changed)


def test_what_transformers_cannot_hold_is_refused_naming_the_option(bundles, tmp_path):
    config = json.loads((bundles["wav2vec2"] / "config.json").read_text())
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in bundles["wav2vec2"].iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    config["encoder_args"]["extractor_mode"] = "batch_norm"
    config["pretrain_args"]["latent_combine_groups"] = True
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError) as err:
        export_hf(odd, tmp_path / "hf")
    text = str(err.value)
    assert "extractor_mode='batch_norm'" in text and "latent_combine_groups" in text
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["odd"]


def test_existing_output_is_kept_unless_overwrite(bundles, tmp_path):
    with pytest.raises(ConversionError, match="no such bundle directory"):
        export_hf(tmp_path / "nothing", tmp_path / "x")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ConversionError, match="already exists"):
        export_hf(bundles["hubert"], out)
    assert (out / "keep").exists()
    export_hf(bundles["hubert"], out, overwrite=True)
    assert not (out / "keep").exists() and (out / "model.safetensors").is_file()


def test_a_full_disk_leaves_nothing_and_names_the_file(bundles, tmp_path, monkeypatch):
    import errno
    import os

    from bundles.errors import DiskFull
    from converters import hf_export

    def no_space(path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(hf_export, "write_safetensors_streaming", no_space)
    with pytest.raises(DiskFull, match=r"hf/model.safetensors: could not be written .* it needs"):
        export_hf(bundles["hubert"], tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_convert_refuses_a_changed_or_foreign_transformers_directory(bundles, tmp_path):
    hf = export_hf(bundles["hubert"], tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="num_hidden_layers is 3, the stored bundle configuration gives 2"):
        convert_checkpoint(hf, tmp_path / "back")
    (hf / EXTRAS_FILE).unlink()  # now read as any transformers directory: its weights lack the third layer
    result = CliRunner().invoke(_cli(), ["convert", str(hf), "-o", str(tmp_path / "back")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "encoder.layers.2.attention.k_proj.weight is missing" in result.output
    assert not (tmp_path / "back").exists()
    config["num_hidden_layers"] = 2  # as exported: the encoder alone (the head was in the extras file)
    (hf / "config.json").write_text(json.dumps(config))
    assert load_bundle(convert_checkpoint(hf, tmp_path / "back")).kind == "encoder"


def test_the_convert_command_reads_an_exported_directory(bundles, tmp_path):
    hf = export_hf(bundles["wav2vec2"], tmp_path / "hf")
    result = CliRunner().invoke(_cli(), ["convert", str(hf), "-o", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    assert load_bundle(tmp_path / "back").get_pretrain_model().quantizer.codevectors.shape == (1, 32, 16)


def test_inspect_describes_an_exported_directory(bundles, tmp_path):
    hf = export_hf(bundles["hubert"], tmp_path / "hf")
    result = CliRunner().invoke(_cli(), ["inspect", str(hf), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["what"] == "transformers directory" and facts["architecture"] == "HubertModel"
    assert facts["bundle"]["family"] == "hubert" and "kmeans.centroids" in facts["extras"]
    assert facts["parameters"] == sum(t.numel() for k, t in load_bundle(bundles["hubert"]).state_dict().items()
                                      if not k.startswith("logit_generator."))


def test_a_training_checkpoint_exports_through_a_temporary_bundle(bundles, tmp_path):
    import soundfile as sf

    from continue_pt.demo import demo_audio
    from continue_pt.export import export_checkpoint
    from continue_pt.pretrain import PretrainOptions, run_pretraining

    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(2):
        sf.write(audio / f"u{i}.wav", demo_audio(2.0, seed=i)[0].numpy(), 16000)
    run_pretraining(PretrainOptions(train_data=str(audio), output_dir=str(tmp_path / "run"),
                                    init_from=str(bundles["hubert"]), max_steps=1, max_batch_seconds=4.0,
                                    min_seconds=1.0, num_workers=0, warmup_steps=1, checkpoint_every=1,
                                    progress_bar=False))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    hf = tmp_path / "hf"
    result = CliRunner().invoke(_cli(), ["export", str(ckpt), "--to", "hf", "-o", str(hf)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio", "hf", "run"]  # the temporary bundle is gone
    with pytest.raises(ConversionError, match="is a file, not a bundle directory.*continue-pt export CKPT --to hf"):
        export_hf(ckpt, tmp_path / "hf2")  # the converters read bundles only
    via_bundle = export_checkpoint(ckpt, tmp_path / "bundle")
    _compare_layers(via_bundle, _load_cleanly("HubertModel", hf), hf, HUBERT_TOL)


def _cli():
    from continue_pt.cli import cli

    return cli


@pytest.mark.slow
@pytest.mark.fairseq
@pytest.mark.parametrize("name", ["hubert_base_ls960", "hubert_large_ll60k", "hubert_large_ll60k_finetune_ls960",
                                  "wav2vec_small", "libri960_big", "wav2vec_small_960h"])
def test_published_configurations_match_fairseq_through_transformers(name, tmp_path):
    """Every published configuration (published widths, 2 layers, random weights): fairseq -> bundle -> transformers
    gives fairseq's own layer outputs, from the audio transformers' feature extractor prepares."""
    from tests.fairseq_reference import build_fairseq_model, fairseq_layer_outputs, save_checkpoint

    ref = build_fairseq_model(name, num_layers=2, seed=1)
    save_checkpoint(ref, tmp_path / "src.pt", "dict")
    bundle = convert_checkpoint(tmp_path / "src.pt", tmp_path / "bundle")
    hf = export_hf(bundle, tmp_path / "hf")
    architecture = json.loads((hf / "config.json").read_text())["architectures"][0]
    model = _load_cleanly(architecture, hf)
    base = getattr(model, "hubert", None) or getattr(model, "wav2vec2", None) or model
    torch.manual_seed(0)
    wav = torch.randn(1, 16000) * 0.1
    expected = fairseq_layer_outputs(ref, wav)
    _, hf_wav = _waveforms(ref.normalize, hf, wav)
    with torch.no_grad():
        actual = base(hf_wav, output_hidden_states=True).hidden_states[1:]
    tol = HUBERT_TOL if ref.family == "hubert" else WAV2VEC2_TOL
    if ref.fine_tuned:  # the checkpoint's letter dictionary became vocab.json (rows 0 and <pad> swap names)
        vocab = json.loads((hf / "vocab.json").read_text())
        symbols = list(ref.dictionary.symbols)
        symbols[0], symbols[1] = symbols[1], symbols[0]
        assert sorted(vocab, key=vocab.get) == symbols and sorted(vocab.values()) == list(range(len(symbols)))
    assert len(actual) == len(expected) == 2
    for layer, (a, e) in enumerate(zip(actual, expected), start=1):
        assert float((a - e).abs().max()) <= tol, f"layer {layer}"


def test_the_weights_are_copied_from_the_bundle_not_held_in_memory(bundles, tmp_path, monkeypatch):
    """Every tensor of the bundle's files reaches model.safetensors / the extras file as a span copy (what keeps a
    1.3 GB export near `cp` in time and memory); none is materialised by reading the bundle."""
    import bundles.safetensors_stream as stream

    materialised = []
    monkeypatch.setattr(stream, "_read_tensor", lambda path, name: materialised.append(name))
    plan_model, plan_extras, _ = plan_hf_tensors(load_bundle(bundles["hubert"]))
    spans = [t for t in plan_model + plan_extras if t.source_span is not None]
    assert len(spans) == len([t for t in plan_model + plan_extras if t.name != "kmeans.centroids"])
    export_hf(bundles["hubert"], tmp_path / "hf")
    assert not materialised
    _compare_layers(bundles["hubert"], _load_cleanly("HubertModel", tmp_path / "hf"), tmp_path / "hf", HUBERT_TOL)
