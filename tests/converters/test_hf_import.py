"""`continue-pt convert HF_DIR`: any transformers HuBERT / wav2vec 2.0 directory (as published on the Hub) -> bundle.

transformers (test-only, pinned 5.24.0) builds small random-weight models of every class the converter reads, saves
them (safetensors, sharded safetensors, a torch zip ``pytorch_model.bin``, a legacy-format one with older key
names), and is the reference: every layer of the bundle's torchaudio model must give transformers' hidden states.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bundles import load_bundle
from bundles.errors import BundleError
from bundles.waveform import normalize_waveforms
from converters.convert import convert_checkpoint
from converters.errors import ConversionError
from converters.hf_export import export_hf
from tests.reference import require

transformers = require("transformers")  # the test-only reference; missing it fails the suite

HUBERT_TOL, WAV2VEC2_TOL = 3e-5, 1.5e-5
CLASSES = ("HubertModel", "HubertForCTC", "Wav2Vec2Model", "Wav2Vec2ForCTC", "Wav2Vec2ForPreTraining")
LETTERS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "E": 5, "T": 6, "A": 7, "O": 8, "N": 9, "I": 10,
           "H": 11}
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=[32, 32],
              conv_kernel=[10, 3], conv_stride=[5, 2], num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
              vocab_size=12, hidden_dropout=0.05, activation_dropout=0.02, attention_dropout=0.03,
              feat_proj_dropout=0.04, layerdrop=0.06)
_QUANTIZER = dict(num_codevector_groups=2, num_codevectors_per_group=8, codevector_dim=16, proj_codevector_dim=12,
                  contrastive_logits_temperature=0.2, num_negatives=7, diversity_loss_weight=0.3,
                  feat_quantizer_dropout=0.1)


def tiny_model(cls: str, norm: str = "group", stable: bool = False, seed: int = 0, **overrides):
    """A transformers model of class ``cls`` with every parameter random (layer norms around 1)."""
    config_class = transformers.HubertConfig if cls.startswith("Hubert") else transformers.Wav2Vec2Config
    extra = _QUANTIZER if cls == "Wav2Vec2ForPreTraining" else {}
    config = config_class(feat_extract_norm=norm, do_stable_layer_norm=stable, conv_bias=stable,
                          **{**_SMALL, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def save(model, path: Path, form: str = "safetensors") -> Path:
    """The directory ``save_pretrained`` writes, with the weights as ``form``: safetensors, sharded (several
    safetensors files and their index), bin (torch.save's zip, what transformers 4 wrote with
    safe_serialization=False) or legacy_bin (torch.save's pre-1.6 format)."""
    if form == "sharded":
        model.save_pretrained(path, max_shard_size="20KB")
        assert (path / "model.safetensors.index.json").is_file()
        return path
    model.save_pretrained(path)
    if form in ("bin", "legacy_bin"):
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin",
                   _use_new_zipfile_serialization=form == "bin")
    return path


def base_of(model):
    return getattr(model, "hubert", None) or getattr(model, "wav2vec2", None) or model


def waveforms() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(2, 4000) * 0.3 + 0.02


def assert_same_layers(bundle_dir: Path, model) -> None:
    """Every encoder layer of the bundle's torchaudio model equals transformers' hidden state of that layer (on the
    waveform the bundle's model normalises itself where transformers expects it normalised)."""
    b = load_bundle(bundle_dir)
    wav = waveforms()
    with torch.no_grad():
        ours, _ = b.get_model().extract_features(wav)
        theirs = base_of(model)(normalize_waveforms(wav) if b.normalize_waveform else wav,
                                output_hidden_states=True).hidden_states[1:]
    tol = HUBERT_TOL if b.family == "hubert" else WAV2VEC2_TOL
    assert len(ours) == len(theirs) == model.config.num_hidden_layers
    for layer, (a, t) in enumerate(zip(ours, theirs), start=1):
        assert float((a - t).abs().max()) <= tol, f"layer {layer}"


_CASES = [(cls, "group", False, "safetensors") for cls in CLASSES] + \
         [(cls, "layer", True, "bin") for cls in CLASSES] + \
         [("HubertModel", "layer", False, "sharded"), ("Wav2Vec2ForCTC", "group", True, "legacy_bin"),
          ("Wav2Vec2ForPreTraining", "layer", False, "sharded"), ("HubertForCTC", "group", True, "safetensors")]


@pytest.mark.parametrize("cls, norm, stable, form", _CASES)
def test_every_class_converts_and_matches_transformers_layer_by_layer(cls, norm, stable, form, tmp_path):
    model = tiny_model(cls, norm, stable)
    out = convert_checkpoint(save(model, tmp_path / "hf", form), tmp_path / "bundle")
    assert_same_layers(out, model)
    b = load_bundle(out)
    kind = {"HubertModel": "encoder", "Wav2Vec2Model": "encoder", "Wav2Vec2ForPreTraining": "pretrain"}.get(cls, "ctc")
    assert (b.family, b.kind) == ("hubert" if cls.startswith("Hubert") else "wav2vec2", kind)
    enc = b.config.encoder_args
    assert enc["extractor_mode"] == f"{norm}_norm" and enc["encoder_layer_norm_first"] is stable
    assert enc["extractor_conv_bias"] is stable and enc["extractor_conv_layer_config"] == [[32, 10, 5], [32, 3, 2]]
    assert (enc["encoder_dropout"], enc["encoder_ff_interm_dropout"], enc["encoder_attention_dropout"],
            enc["encoder_projection_dropout"], enc["encoder_layer_drop"]) == (0.05, 0.02, 0.03, 0.04, 0.06)
    # no preprocessor_config.json: normalised input exactly for the layer-norm extractor (fairseq's convention)
    assert b.normalize_waveform is (norm == "layer")
    imported = b.config.provenance["transformers_import"]
    assert imported["architecture"] == cls and imported["source_dir"] == "hf"
    mask = base_of(model).masked_spec_embed.detach()
    if kind == "pretrain":
        assert torch.equal(b.state_dict()["mask_embedding"], mask)
    else:  # no slot in the encoder: kept under fairseq's name, as fairseq bundles of the same kind keep it
        name = "mask_emb" if kind == "encoder" else "w2v_encoder.w2v_model.mask_emb"
        assert list(b.fairseq_extras()) == [name] and torch.equal(b.fairseq_extras()[name], mask)
    if kind == "ctc":
        wav = waveforms()
        with torch.no_grad():
            ours, _ = b.get_model()(wav)
            theirs = model(normalize_waveforms(wav) if b.normalize_waveform else wav).logits
        assert float((ours - theirs).abs().max()) <= (HUBERT_TOL if cls.startswith("Hubert") else WAV2VEC2_TOL)


@pytest.mark.parametrize("norm, stable", [("group", False), ("layer", True)])
def test_wav2vec2_for_pretraining_becomes_a_complete_pretraining_bundle(norm, stable, tmp_path):
    model = tiny_model("Wav2Vec2ForPreTraining", norm, stable)
    b = load_bundle(convert_checkpoint(save(model, tmp_path / "hf"), tmp_path / "bundle"))
    pre = b.get_pretrain_model().eval()
    assert b.config.pretrain_args == {"extractor_dim": 32, "encoder_embed_dim": 32, "final_dim": 12,
                                      "latent_vars": 8, "latent_groups": 2, "codevector_dim": 16,
                                      "latent_temp": [2.0, 0.5, 0.999995]}
    objective = b.config.objective
    assert (objective["logit_temp"], objective["num_negatives"], objective["dropout_features"]) == (0.2, 7, 0.1)
    assert objective["criterion"]["loss_weights"] == [0.3]
    wav = waveforms()
    with torch.no_grad():
        out = model.wav2vec2(normalize_waveforms(wav) if b.normalize_waveform else wav)
        ours_q = pre.quantizer(out.extract_features)  # the same (layer-normed) features into both quantizers
        theirs_q, _ = model.quantizer(out.extract_features)
        assert torch.equal(ours_q.x, theirs_q)
        assert torch.allclose(pre.project_q(ours_q.x), model.project_q(theirs_q), rtol=0, atol=1e-6)
        hidden = out.last_hidden_state
        assert torch.allclose(pre.final_proj(hidden), model.project_hid(hidden), rtol=0, atol=1e-6)
        ours_out, _ = pre.wav2vec2(normalize_waveforms(wav) if b.normalize_waveform else wav)  # final layer norm too
        assert float((ours_out - hidden).abs().max()) <= WAV2VEC2_TOL
    assert torch.equal(pre.mask_embedding.detach(), model.wav2vec2.masked_spec_embed.detach())


def test_ctc_vocabulary_is_kept_with_fairseq_names_and_exports_back_unchanged(tmp_path):
    hf = save(tiny_model("Wav2Vec2ForCTC"), tmp_path / "hf")
    (hf / "vocab.json").write_text(json.dumps(LETTERS))
    b = load_bundle(convert_checkpoint(hf, tmp_path / "bundle"))
    symbols = b.config.label_dictionary["ctc_symbols"]
    assert symbols[:2] == ["<s>", "<pad>"] and symbols[2:] == list(LETTERS)[2:]  # fairseq's blank <s> is row 0
    back = export_hf(tmp_path / "bundle", tmp_path / "again")
    assert json.loads((back / "vocab.json").read_text()) == LETTERS
    (hf / "vocab.json").write_text(json.dumps({"a": 0, "b": 5}))  # not the lm_head's rows: not kept, said why
    b = load_bundle(convert_checkpoint(hf, tmp_path / "b2"))
    assert b.config.label_dictionary is None
    assert any("vocab.json" in note for note in b.config.provenance["transformers_import"]["assumed"])


def test_older_key_names_and_prefixes_are_read_as_transformers_reads_them(tmp_path):
    """weight_g/weight_v (transformers on torch < 2.1), a base model saved with its `hubert.` prefix, a CTC model
    without `wav2vec2.`; transformers loads each directory to the same model, and so does convert."""
    for cls, rename in (("HubertModel", lambda k: "hubert." + k),
                        ("Wav2Vec2ForCTC", lambda k: k[len("wav2vec2."):] if k.startswith("wav2vec2.") else k)):
        model = tiny_model(cls, seed=5)
        hf = save(model, tmp_path / cls)
        (hf / "model.safetensors").unlink()
        state = {rename(k).replace("parametrizations.weight.original0", "weight_g")
                 .replace("parametrizations.weight.original1", "weight_v"): v for k, v in model.state_dict().items()}
        assert any(k.endswith("weight_g") for k in state)
        torch.save(state, hf / "pytorch_model.bin", _use_new_zipfile_serialization=False)
        reloaded = getattr(transformers, cls).from_pretrained(hf).eval()
        assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
        assert_same_layers(convert_checkpoint(hf, tmp_path / f"{cls}_bundle"), model)


def test_the_class_is_told_by_the_tensors_when_config_json_names_none(tmp_path):
    hf = save(tiny_model("Wav2Vec2ForPreTraining"), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    del config["architectures"]
    (hf / "config.json").write_text(json.dumps(config))
    shutil.copytree(hf, tmp_path / "renamed_hubert_ctc")  # the directory's name decides nothing
    b = load_bundle(convert_checkpoint(tmp_path / "renamed_hubert_ctc", tmp_path / "bundle"))
    assert (b.family, b.kind) == ("wav2vec2", "pretrain")


def test_preprocessor_config_decides_rate_and_normalisation(tmp_path):
    hf = save(tiny_model("HubertModel", "group"), tmp_path / "hf")
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True, sampling_rate=16000).save_pretrained(hf)
    b = load_bundle(convert_checkpoint(hf, tmp_path / "bundle"))
    assert b.normalize_waveform is True and b.sample_rate == 16000
    assert b.config.provenance["normalize_from"] == "preprocessor_config.json do_normalize"
    with pytest.raises(BundleError, match="no pre-training head"):  # an encoder-only bundle
        b.get_pretrain_model()


def test_what_torchaudio_cannot_compute_is_refused_naming_each_option(tmp_path):
    hf = save(tiny_model("HubertModel"), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config.update(hidden_act="relu", layer_norm_eps=1e-6, feat_proj_layer_norm=False, conv_pos_batch_norm=True,
                  adapter_attn_dim=16, add_adapter=True)
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(hf, tmp_path / "out")
    text = str(err.value)
    for said in ("hidden_act='relu'", "layer_norm_eps=1e-06", "feat_proj_layer_norm=False",
                 "conv_pos_batch_norm=True", "adapter_attn_dim=16", "add_adapter=True"):
        assert said in text, said
    assert str(hf / "config.json") in text and not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type, architecture, said", [
    ("wav2vec2-conformer", "Wav2Vec2ConformerModel", "model_type 'wav2vec2-conformer'"),
    ("data2vec-audio", "Data2VecAudioModel", "model_type 'data2vec-audio'"),
    ("wavlm", "WavLMModel", "model_type 'wavlm'"),
    ("wav2vec2", "Wav2Vec2ForSequenceClassification", "use_weighted_layer_sum=True"),
    ("hubert", "Wav2Vec2ForCTC", "not a model_type 'hubert' class"),
])
def test_other_models_and_heads_are_refused_by_name(model_type, architecture, said, tmp_path):
    hf = save(tiny_model("Wav2Vec2Model"), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config.update(model_type=model_type, architectures=[architecture], use_weighted_layer_sum=True)
    (hf / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(_cli(), ["convert", str(hf), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert said in result.output and architecture in result.output
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_the_config_are_refused_listing_each(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = save(tiny_model("Wav2Vec2ForCTC"), tmp_path / "hf")
    state = load_file(hf / "model.safetensors")
    del state["wav2vec2.encoder.layers.1.final_layer_norm.bias"]
    state["wav2vec2.encoder.layers.0.attention.q_proj.weight"] = torch.zeros(3, 3)
    state["classifier.weight"] = torch.zeros(2, 32)
    save_file(state, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(hf, tmp_path / "out")
    text = str(err.value)
    assert "wav2vec2.encoder.layers.1.final_layer_norm.bias is missing" in text
    assert "wav2vec2.encoder.layers.0.attention.q_proj.weight has shape [3, 3], config.json implies [32, 32]" in text
    assert "classifier.weight" in text and not (tmp_path / "out").exists()


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("damage", ["os.system", "import", "truncated", "random", "empty", "truncated_safetensors",
                                    "not_a_state_dict"])
def test_a_hostile_or_broken_weight_file_is_refused_naming_it_and_nothing_runs_or_is_written(damage, tmp_path):
    canary = tmp_path / "CANARY"
    hf = save(tiny_model("HubertModel"), tmp_path / "hf", "bin")
    weights = hf / "pytorch_model.bin"
    good = weights.read_bytes()
    if damage == "os.system":
        torch.save({"encoder.layer_norm.weight": _Payload(os.system, f"touch {canary}")}, weights)
    elif damage == "import":  # a pickle that imports a module and calls into it
        weights.write_bytes(b"\x80\x02cimportlib\nimport_module\nq\x00X\x02\x00\x00\x00osq\x01\x85q\x02Rq\x03.")
    elif damage == "truncated":
        weights.write_bytes(good[: len(good) // 2])
    elif damage == "random":
        weights.write_bytes(os.urandom(4096))
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "not_a_state_dict":
        torch.save([torch.zeros(2)], weights)
    else:
        weights.unlink()
        save(tiny_model("HubertModel"), hf)
        data = (hf / "model.safetensors").read_bytes()
        (hf / "model.safetensors").write_bytes(data[: len(data) - 100])
        weights = hf / "model.safetensors"
    result = CliRunner().invoke(_cli(), ["convert", str(hf), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(weights) in errors[0] and "Traceback" not in result.output
    if damage in ("os.system", "import"):
        assert "refused" in result.output and ("system" in result.output or "import_module" in result.output)
    assert not canary.exists(), "pickled code ran"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no bundle, no temporary directory


def test_num_updates_is_stored_or_recorded_as_unknown_and_said(tmp_path):
    hf = save(tiny_model("Wav2Vec2ForPreTraining"), tmp_path / "hf")
    result = CliRunner().invoke(_cli(), ["convert", str(hf), "-o", str(tmp_path / "known"), "--num-updates", "40000"])
    assert result.exit_code == 0, result.output
    known = load_bundle(tmp_path / "known")
    assert known.num_updates == 40000 and "num_updates_unknown" not in known.config.provenance
    temperature = known.get_pretrain_model().quantizer.temperature
    assert temperature == pytest.approx(max(2.0 * 0.999995 ** 40000, 0.5))

    result = CliRunner().invoke(_cli(), ["convert", str(hf), "-o", str(tmp_path / "unknown")])
    assert result.exit_code == 0, result.output
    assert load_bundle(tmp_path / "unknown").num_updates is None
    shown = CliRunner().invoke(_cli(), ["inspect", str(tmp_path / "unknown"), "--json"])
    assert json.loads(shown.output)["num_updates"].startswith("unknown")

    from continue_pt.module_base import ModuleOptions
    from continue_pt.options import PretrainOptionsWarning
    from continue_pt.wav2vec2.module import Wav2Vec2ContinuedPretraining

    with pytest.warns(PretrainOptionsWarning, match=r"unknown, so the Gumbel temperature starts from 2 .*--num-updates"):
        Wav2Vec2ContinuedPretraining(ModuleOptions(bundle=str(tmp_path / "unknown")))

    result = CliRunner().invoke(_cli(), ["convert", str(Path(__file__).parents[2] / "continue_pt" / "demo_assets" /
                                                        "tiny_wav2vec2.pt"), "-o", str(tmp_path / "fs"),
                                         "--num-updates", "5"])
    assert result.exit_code == 1 and "--num-updates is for transformers directories" in result.output


def test_an_exported_directory_without_its_extras_file_reads_as_the_model_transformers_has(tmp_path):
    """The inverse of `export --to hf`'s config: a wav2vec 2.0 pre-training bundle exported and read back without
    the extras file is the same model (every tensor bit for bit, the same architecture)."""
    from continue_pt.demo import ASSETS

    original = load_bundle(convert_checkpoint(ASSETS / "tiny_wav2vec2.pt", tmp_path / "bundle"))
    hf = export_hf(original.path, tmp_path / "hf")
    (hf / "continue_pt_extras.safetensors").unlink()
    back = load_bundle(convert_checkpoint(hf, tmp_path / "back", num_updates=original.num_updates))
    a, b = original.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.config.encoder_args == original.config.encoder_args
    assert back.config.pretrain_args == original.config.pretrain_args
    assert back.num_updates == original.num_updates and back.normalize_waveform == original.normalize_waveform


def _cli():
    from continue_pt.cli import cli

    return cli


def test_inspect_describes_a_published_directory_and_its_ctc_bundle(tmp_path):
    hf = save(tiny_model("HubertForCTC"), tmp_path / "hf", "bin")
    (hf / "vocab.json").write_text(json.dumps(LETTERS))
    facts = json.loads(CliRunner().invoke(_cli(), ["inspect", str(hf), "--json"]).output)
    assert facts["architecture"] == "HubertForCTC" and facts["weights"] == ["pytorch_model.bin"]
    assert facts["extras"] is None and "hubert ctc bundle" in facts["use"]
    convert_checkpoint(hf, tmp_path / "bundle")
    shown = CliRunner().invoke(_cli(), ["inspect", str(tmp_path / "bundle"), "--json"])
    assert shown.exit_code == 0, shown.output
    facts = json.loads(shown.output)
    assert (facts["kind"], facts["vocabulary"], facts["heads"]) == ("ctc", 12, ["ctc output layer"])


def test_sharded_pytorch_model_bin_and_what_a_bad_index_names(tmp_path):
    model = tiny_model("Wav2Vec2Model", "layer", True)
    hf = save(model, tmp_path / "hf", "bin")
    state = model.state_dict()
    names = list(state)
    (hf / "pytorch_model.bin").unlink()
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for shard, keys in halves.items():
        torch.save({k: state[k] for k in keys}, hf / shard)
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (hf / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert_same_layers(convert_checkpoint(hf, tmp_path / "bundle"), model)

    for bad, said in ((dict(index["weight_map"], **{names[0]: "../evil.bin"}), "'../evil.bin'"),
                      (dict(index["weight_map"], **{names[0]: "absent.bin"}), "not in the directory: ['absent.bin']"),
                      (dict(index["weight_map"], extra_tensor="pytorch_model-00001-of-00002.bin"),
                       "lacks tensors its index names: ['extra_tensor']")):
        (hf / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": bad}))
        with pytest.raises(ConversionError, match=re.escape(said)):
            convert_checkpoint(hf, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_an_exported_directory_keeps_its_num_updates(tmp_path):
    from continue_pt.demo import ASSETS

    bundle = convert_checkpoint(ASSETS / "tiny_wav2vec2.pt", tmp_path / "bundle")
    hf = export_hf(bundle, tmp_path / "hf")
    stored = load_bundle(bundle).num_updates
    assert load_bundle(convert_checkpoint(hf, tmp_path / "same", num_updates=stored)).num_updates == stored
    with pytest.raises(ConversionError, match=f"records num_updates {stored}, --num-updates gives 7"):
        convert_checkpoint(hf, tmp_path / "other", num_updates=7)


def test_malformed_options_are_named_all_at_once(tmp_path):
    hf = save(tiny_model("Wav2Vec2ForCTC"), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config.update(conv_bias="yes", hidden_size="32", conv_kernel=[10], vocab_size=-1, feat_extract_norm="batch")
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(hf, tmp_path / "out")
    text = str(err.value)
    for said in ("conv_bias='yes' is not true or false", "hidden_size='32' is not a positive integer",
                 "conv_dim, conv_kernel and conv_stride have 2, 1 and 2 entries", "vocab_size=-1",
                 "feat_extract_norm='batch'", "preprocessor_config.json is not valid JSON"):
        assert said in text, said
    assert not (tmp_path / "out").exists()
    (hf / "config.json").write_text("{broken")
    result = CliRunner().invoke(_cli(), ["convert", str(hf), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and f"Error: {hf / 'config.json'}: is not valid JSON" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("cls, published", [
    ("HubertForCTC", dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, feat_extract_norm="layer",
                          do_stable_layer_norm=True, conv_bias=True, vocab_size=32)),  # hubert-large-ls960-ft
    ("Wav2Vec2ForPreTraining", dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                                    feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False)),
])
def test_published_widths_match_within_the_tolerances(cls, published, tmp_path):
    """The published shapes (transformers' default front end and positional convolution; 1 layer, transformers' own
    initialisation): the per-layer tolerances hold at full width too."""
    config_class = transformers.HubertConfig if cls.startswith("Hubert") else transformers.Wav2Vec2Config
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config_class(num_hidden_layers=1, **published)).eval()
    out = convert_checkpoint(save(model, tmp_path / "hf"), tmp_path / "bundle")
    assert_same_layers(out, model)


@pytest.mark.slow
@pytest.mark.fairseq
@pytest.mark.parametrize("name", ["hubert_large_ll60k_finetune_ls960", "wav2vec_small", "libri960_big",
                                  "wav2vec_small_960h"])
def test_published_configurations_read_back_from_transformers_alone(name, tmp_path):
    """fairseq (published configuration, 2 layers) -> bundle -> transformers, the extras file deleted (what a Hub
    user has): the transformers directory alone gives the same model, every tensor bit for bit and the same
    torchaudio arguments; only what transformers does not record (num_updates, the fairseq configuration) is lost."""
    from tests.fairseq_reference import build_fairseq_model, save_checkpoint

    ref = build_fairseq_model(name, num_layers=2, seed=1)
    save_checkpoint(ref, tmp_path / "src.pt", "dict")
    original = load_bundle(convert_checkpoint(tmp_path / "src.pt", tmp_path / "bundle"))
    hf = export_hf(original.path, tmp_path / "hf")
    (hf / "continue_pt_extras.safetensors").unlink()
    back = load_bundle(convert_checkpoint(hf, tmp_path / "back"))
    assert (back.family, back.kind) == (original.family, original.kind)
    a, b = original.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.config.encoder_args == original.config.encoder_args
    assert back.config.pretrain_args == original.config.pretrain_args
    assert back.normalize_waveform == original.normalize_waveform
    if original.kind == "ctc":
        assert back.config.label_dictionary == original.config.label_dictionary
