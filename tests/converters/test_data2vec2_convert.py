"""data2vec 2.0 (fairseq ``data2vec_multi``, audio): converted bundles reproduce fairseq's outputs.

Random-weight fairseq models (fairseq's own data2vec 2.0 code, see tests/data2vec2_reference.py) are built from the
published configs in tests/fairseq_configs: at full size on the meta device for key-map coverage, shrunk (2 blocks,
narrow; the LARGE one with 2 prenet blocks) for forward parity. They are saved as fairseq's trainer saves them,
converted, and compared block by block, teacher and decoder included.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from omegaconf import OmegaConf

from tests.reference import require

require("fairseq")

from bundles.config import BundleConfig  # noqa: E402
from bundles.factory import build_encoder, build_pretrain_model  # noqa: E402
from bundles.loading import load_bundle  # noqa: E402
from bundles.data2vec2.model import alibi_slopes  # noqa: E402
from continue_pt.cli import cli  # noqa: E402
from converters.convert import convert_checkpoint  # noqa: E402
from converters.describe import describe  # noqa: E402
from converters.errors import ConversionError  # noqa: E402
from converters.families import data2vec2  # noqa: E402
from tests.data2vec2_reference import (  # noqa: E402
    DATA2VEC2_CONFIGS,
    build_data2vec2_ctc_model,
    build_data2vec2_model,
    checkpoint_dict,
    data2vec2_modules,
    fairseq_block_outputs,
    fairseq_ctc_logits,
    fairseq_teacher_outputs,
    load_data2vec2_config,
    prepare,
    save_data2vec2_checkpoint,
    shrunk,
)

pytestmark = pytest.mark.fairseq

TOLERANCE = 3e-5
NUM_UPDATES = 54321
SHRUNK = {"data2vec2_base_libri": {}, "data2vec2_large_vox": {"prenet_depth": 2}}


def _audio(batch: int = 2, samples: int = 8000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, samples, generator=g) * torch.tensor([0.1, 3.0])[:batch, None]


@pytest.fixture(scope="module", params=DATA2VEC2_CONFIGS)
def converted(request, tmp_path_factory):
    """(fairseq reference, bundle, checkpoint path) for a shrunk published config."""
    name = request.param
    ref = build_data2vec2_model(name, seed=3, stored=shrunk(load_data2vec2_config(name), **SHRUNK[name]))
    work = tmp_path_factory.mktemp(name)
    src = work / f"{name}.pt"
    save_data2vec2_checkpoint(ref, src, "dict", num_updates=NUM_UPDATES)
    return ref, load_bundle(convert_checkpoint(src, work / "bundle")), src


@pytest.fixture(scope="module")
def ctc(tmp_path_factory):
    name = "data2vec2_base_libri"
    ref = build_data2vec2_ctc_model(name, seed=4, stored=shrunk(load_data2vec2_config(name)))
    work = tmp_path_factory.mktemp("d2v_ctc")
    save_data2vec2_checkpoint(ref, work / "ctc.pt", "dict", num_updates=NUM_UPDATES)
    return ref, load_bundle(convert_checkpoint(work / "ctc.pt", work / "bundle")), work / "ctc.pt"


def _flat_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------- key map


@pytest.mark.slow
@pytest.mark.parametrize("name", DATA2VEC2_CONFIGS)
def test_key_map_covers_the_published_models_exactly(name):
    """Every tensor of the full-size fairseq model (student, decoder, _ema teacher) is mapped, and the mapped set is
    exactly our pre-training model's state dict, shape for shape."""
    ref = build_data2vec2_model(name, device="meta")
    source = {k: tuple(v.shape) for k, v in _flat_state(ref.model).items()}
    result = data2vec2.PRETRAIN_KEY_MAP.classify(source)
    assert result.problems() == [] and not result.dropped
    model_cfg = OmegaConf.to_container(ref.cfg.model)
    problems: list[str] = []
    enc = data2vec2.encoder_args(model_cfg, problems)
    assert problems == []
    config = BundleConfig(family="data2vec2", kind="pretrain", encoder_args=enc,
                          pretrain_args={"decoder": data2vec2.decoder_args(model_cfg)}, sample_rate=16000,
                          normalize_waveform=True)
    ours = {k: tuple(v.shape) for k, v in build_pretrain_model(config).state_dict().items()}
    assert {target: source[key] for key, target in result.mapped.items()} == ours
    assert any(k.startswith("teacher.") for k in ours) and any(k.startswith("decoder.") for k in ours)
    if name == "data2vec2_large_vox":
        assert enc["prenet_depth"] == 8 and enc["encoder_num_layers"] == 16 and enc["encoder_num_heads"] == 16


def test_alibi_slopes_are_fairseqs():
    base = data2vec2_modules().base
    for heads in (4, 12, 16, 6):
        expected = base.get_alibi(3, heads)[:, 0, 1] * -1  # slope_h * |0 - 1|
        assert torch.allclose(torch.tensor(alibi_slopes(heads)), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- forward parity


@pytest.mark.slow
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_every_block_output_equals_fairseqs(converted, padded):
    ref, bundle, _ = converted
    wav = _audio()
    lengths = torch.tensor([8000, 5123]) if padded else None
    outputs, results, final = fairseq_block_outputs(ref, wav, lengths)
    model = bundle.get_model()  # normalises each waveform over its valid samples, as fairseq's dataset does
    with torch.no_grad():
        ours, frames = model.extract_features(wav, lengths)
        our_final, _ = model(wav, lengths)
        our_results, _ = model.model.layer_results(*prepare(wav, lengths)[:1], lengths)
        two, _ = model.extract_features(wav, lengths, num_layers=1)
    assert len(ours) == len(outputs) == bundle.config.encoder_args["encoder_num_layers"] and len(two) == 1
    valid = frames.tolist() if padded else [ours[0].shape[1]] * 2
    assert padded is False or valid[1] < ours[0].shape[1]
    for b, n in enumerate(valid):
        for i, (theirs, mine) in enumerate(zip(outputs, ours)):
            assert (theirs[b, :n] - mine[b, :n]).abs().max() <= TOLERANCE, f"block {i}, utterance {b}"
        for i, (theirs, mine) in enumerate(zip(results, our_results)):
            assert (theirs[b, :n] - mine[b, :n]).abs().max() <= TOLERANCE, f"layer result {i}, utterance {b}"
        assert (final[b, :n] - our_final[b, :n]).abs().max() <= TOLERANCE


def test_samples_past_the_lengths_do_not_matter(converted):
    _, bundle, _ = converted
    model = bundle.get_model()
    wav, lengths = _audio(), torch.tensor([8000, 5123])
    noisy = wav.clone()
    noisy[1, 5123:] = 100.0
    with torch.no_grad():
        a, frames = model(wav, lengths)
        b, _ = model(noisy, lengths)
    assert torch.equal(a[1, :frames[1]], b[1, :frames[1]])


@pytest.mark.slow
def test_teacher_and_decoder_are_kept_bit_for_bit_and_compute_what_fairseq_does(converted):
    ref, bundle, _ = converted
    fairseq_state = _flat_state(ref.model)
    ours = bundle.state_dict()
    teacher_keys = [k for k in fairseq_state if k.startswith("_ema.")]
    assert teacher_keys and len([k for k in ours if k.startswith("teacher.")]) == len(teacher_keys)
    mapped = data2vec2.PRETRAIN_KEY_MAP.classify(fairseq_state).mapped
    for key, target in mapped.items():
        assert torch.equal(ours[target], fairseq_state[key]), key
    # The teacher is not the student (published schedules end with it nearly frozen, but it is its own weights).
    assert not torch.equal(ours["teacher.layers.0.attn.qkv.weight"], ours["student.encoder.layers.0.attn.qkv.weight"])

    model = bundle.get_pretrain_model().eval()
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    wav, lengths = _audio(), torch.tensor([8000, 5123])
    wav_n, sample_mask = prepare(wav, lengths)
    with torch.no_grad():
        features, frames = model.student.local_features(wav_n, lengths)
        their_features = ref.audio_encoder.local_features(wav_n)
        assert (features - their_features).abs().max() <= TOLERANCE
        frame_mask = torch.arange(features.shape[1])[None, :] >= frames[:, None]
        their_outputs, their_results = fairseq_teacher_outputs(
            ref, their_features, sample_mask)
        our_outputs, our_results = model.teacher(features, frame_mask)
        for b, n in enumerate(frames.tolist()):
            for theirs, mine in zip(their_outputs + their_results, our_outputs + our_results):
                assert (theirs[b, :n] - mine[b, :n]).abs().max() <= TOLERANCE
        x = torch.randn(2, 30, bundle.config.encoder_args["encoder_embed_dim"], generator=torch.Generator().manual_seed(1))
        assert (model.decoder(x) - ref.audio_encoder.decoder(x, None)).abs().max() <= TOLERANCE


def test_bundle_keeps_the_schedule_and_num_updates(converted):
    ref, bundle, _ = converted
    cfg = ref.cfg.model
    objective = bundle.config.objective
    assert bundle.num_updates == NUM_UPDATES and bundle.normalize_waveform is True
    for option in ("ema_decay", "ema_end_decay", "ema_anneal_end_step", "average_top_k_layers", "clone_batch",
                   "instance_norm_target_layer", "loss_beta", "loss_scale"):
        assert objective[option] == cfg[option], option
    assert objective["mask_prob"] == cfg.modalities.audio.mask_prob
    assert objective["mask_length"] == cfg.modalities.audio.mask_length
    assert bundle.config.pretrain_args["decoder"]["decoder_kernel"] == 7


@pytest.mark.slow
@pytest.mark.parametrize("converted", ["data2vec2_base_libri"], indirect=True)  # one config is enough for the eras
@pytest.mark.parametrize("era", ["dictconfig", "legacy"])
def test_other_pickle_eras_give_the_same_bundle(converted, era, tmp_path):
    ref, bundle, _ = converted
    src = tmp_path / "ck.pt"
    save_data2vec2_checkpoint(ref, src, era, num_updates=NUM_UPDATES)
    other = load_bundle(convert_checkpoint(src, tmp_path / "b"))
    assert other.config.encoder_args == bundle.config.encoder_args and other.num_updates == NUM_UPDATES
    a, b = bundle.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------- fine-tuned


@pytest.mark.slow
def test_ctc_logits_equal_fairseqs(ctc):
    ref, bundle, _ = ctc
    assert bundle.kind == "ctc" and bundle.family == "data2vec2" and bundle.num_updates == NUM_UPDATES
    wav, lengths = _audio(), torch.tensor([8000, 5123])
    theirs = fairseq_ctc_logits(ref, wav, lengths)
    with torch.no_grad():
        ours, frames = bundle.get_model()(wav, lengths)
    assert ours.shape == theirs.shape and ours.shape[-1] == 32
    for b, n in enumerate(frames.tolist()):
        assert (ours[b, :n] - theirs[b, :n]).abs().max() <= TOLERANCE
    assert build_encoder(bundle.config).aux is not None


# --------------------------------------------------------------------------------------------- refusals, CLI


def _rewritten(ref, path: Path, rename: tuple[str, str] | None = None, **cfg_model) -> Path:
    state = checkpoint_dict(ref)
    if rename:
        state["model"] = {k.replace(*rename): v for k, v in state["model"].items()}
    state["cfg"]["model"].update(cfg_model)
    torch.save(state, path)
    return path


@pytest.mark.slow
def test_other_modalities_are_refused_in_one_message(converted, tmp_path):
    ref, _, _ = converted
    src = _rewritten(ref, tmp_path / "image.pt", ("modality_encoders.AUDIO.", "modality_encoders.IMAGE."),
                     supported_modality="IMAGE")
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(src, tmp_path / "out")
    assert len(err.value.problems) == 1 and "modality IMAGE" in err.value.problems[0]
    assert "audio" in err.value.problems[0] and not (tmp_path / "out").exists()
    result = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error:")]


def test_unsupported_options_and_a_missing_teacher_are_named(converted, tmp_path):
    ref, _, _ = converted
    state = checkpoint_dict(ref)
    state["model"] = {k: v for k, v in state["model"].items() if k != "_ema"}
    state["cfg"]["model"]["ema_encoder_only"] = True
    torch.save(state, tmp_path / "x.pt")
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(tmp_path / "x.pt", tmp_path / "out")
    text = str(err.value)
    assert "ema_encoder_only=True" in text and "no EMA teacher ('_ema')" in text


def test_a_teacher_entry_that_is_not_tensors_is_refused(converted, tmp_path):
    ref, _, _ = converted
    state = checkpoint_dict(ref)
    state["model"]["_ema"] = {"blocks.0.norm1.weight": "not a tensor"}
    torch.save(state, tmp_path / "x.pt")
    with pytest.raises(ConversionError, match=re.escape("non-tensor entries ['_ema']")):
        convert_checkpoint(tmp_path / "x.pt", tmp_path / "out")


def test_inspect_says_what_it_is(converted):
    _, bundle, src = converted
    for path in (src, bundle.path):
        facts = describe(path)
        assert facts["family"] == "data2vec2" and facts["kind"] == "pretrain"
        assert facts["heads"] == ["decoder", "EMA teacher"] and facts["num_updates"] == NUM_UPDATES


def test_pretrain_refuses_a_fine_tuned_data2vec2_bundle_with_one_error_line(ctc, tmp_path):
    """(A pre-trained data2vec 2.0 bundle continues: tests/continue_pt/test_data2vec2_pretrain.py.)"""
    for (_, bundle, _), expected in ((ctc, "EMA teacher"),):
        result = CliRunner().invoke(cli, ["pretrain", "--init-from", str(bundle.path), "--train-data", str(tmp_path),
                                          "--output-dir", str(tmp_path / "run"), "--max-steps", "1"])
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code != 0 and "Traceback" not in result.output and len(errors) == 1, result.output
        assert "data2vec2" in result.output or "data2vec 2.0" in result.output
        assert expected in result.output and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bundles_data2vec2_imports_neither_torchaudio_nor_fairseq():
    code = ("import sys, bundles.data2vec2.factory, bundles.data2vec2.model; bad = [m for m in sys.modules if "
            "m.split('.')[0] in ('torchaudio', 'fairseq', 'examples', 'timm', 'converters', 'continue_pt', 'omegaconf')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_verify_passes_and_export_to_hf_is_refused_with_one_error_line(converted, tmp_path):
    _, bundle, src = converted
    result = CliRunner().invoke(cli, ["verify", str(bundle.path), "--against", str(src)])
    assert result.exit_code == 0 and "tensors equal" in result.output, result.output
    out = tmp_path / "hf"
    result = CliRunner().invoke(cli, ["export", str(bundle.path), "-o", str(out), "--to", "hf"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code != 0 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "data2vec2" in errors[0] and not out.exists()


def _fairseq_model_of(checkpoint: dict) -> torch.nn.Module:
    """fairseq's model for an exported checkpoint, built from its cfg and loaded strictly (the EMA teacher through
    Data2VecMultiModel's own _load_from_state_dict)."""
    from fairseq import tasks
    from fairseq.models.wav2vec.wav2vec2_asr import Wav2VecCtc, Wav2VecEncoder

    cfg = OmegaConf.create(checkpoint["cfg"])
    if cfg.model._name == "wav2vec_ctc":
        model = Wav2VecCtc(cfg.model, Wav2VecEncoder(cfg.model, output_size=checkpoint["model"][
            "w2v_encoder.proj.weight"].shape[0]))
    else:
        model = tasks.setup_task(cfg.task).build_model(cfg.model)
    model.load_state_dict(checkpoint["model"], strict=True)
    return model


@pytest.mark.slow
def test_export_to_fairseq_loads_back_into_fairseq_tensor_for_tensor(converted, ctc, tmp_path):
    """`export --to fairseq` writes the teacher back under model["_ema"]; fairseq's own classes load the file
    strictly and hold every tensor of the model the bundle was converted from (pre-trained and fine-tuned)."""
    for (ref, bundle, _), name in ((converted, "pretrained.pt"), (ctc, "ctc.pt")):
        out = tmp_path / name
        result = CliRunner().invoke(cli, ["export", str(bundle.path), "-o", str(out), "--to", "fairseq"])
        assert result.exit_code == 0, result.output
        checkpoint = torch.load(out, weights_only=True)
        assert checkpoint["optimizer_history"][-1]["num_updates"] == NUM_UPDATES
        assert ("_ema" in checkpoint["model"]) == (not ref.fine_tuned)
        reloaded = _flat_state(_fairseq_model_of(checkpoint))
        original = _flat_state(ref.model)
        assert reloaded.keys() == original.keys()
        assert all(torch.equal(reloaded[k], original[k]) for k in original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_alibi_equals_fairseqs_altattention(dtype):
    """In bf16 the ALiBi bias (hundreds, for long inputs) is added in float32, as fairseq does: our attention and
    fairseq's AltAttention agree to the working dtype's precision."""
    from bundles.data2vec2.model import Attention, alibi_bias

    modules = data2vec2_modules().modules
    torch.manual_seed(0)
    theirs = modules.AltAttention(32, num_heads=4, qkv_bias=True).eval().to(dtype)
    ours = Attention(32, 4, 0.0, 0.0).eval().to(dtype)
    ours.load_state_dict(theirs.state_dict())
    frames = 600
    x = torch.randn(2, frames, 32).to(dtype)
    bias = alibi_bias(4, torch.arange(frames)[None]) * 1.3
    padding = torch.zeros(2, frames, dtype=torch.bool)
    padding[1, 500:] = True
    full = bias.expand(2, -1, -1, -1).masked_fill(padding[:, None, None, :], float("-inf"))
    with torch.no_grad():
        expected = theirs(x, padding, bias.expand(2, -1, -1, -1).clone()).float()
        got = ours(x, full).float()
    tolerance = 3e-5 if dtype == torch.float32 else 0.0  # bf16: the same operations in the same dtypes
    assert (got[0] - expected[0]).abs().max() <= tolerance and (got[1, :500] - expected[1, :500]).abs().max() <= tolerance


def test_attention_with_a_learned_bias_equals_fairseqs_output_and_gradients():
    """In training the ALiBi bias carries the learned scales' gradient; on CPU our attention then writes the products
    out (bias and scale inside one ``baddbmm``) instead of torch's fallback: output and every gradient (input,
    weights, scale) equal fairseq's AltAttention's."""
    from bundles.data2vec2.model import Attention, alibi_bias

    modules = data2vec2_modules().modules
    torch.manual_seed(0)
    theirs = modules.AltAttention(32, num_heads=4, qkv_bias=True)
    ours = Attention(32, 4, 0.0, 0.0)
    ours.load_state_dict(theirs.state_dict())
    frames = 50
    x = torch.randn(3, frames, 32)
    padding = torch.zeros(3, frames, dtype=torch.bool)
    padding[1, 40:] = True
    base = alibi_bias(4, torch.arange(frames)[None])
    results = []
    for module, call in ((theirs, lambda inp, b: theirs(inp, padding, b.expand(3, -1, -1, -1))),
                         (ours, lambda inp, b: ours(inp, b.expand(3, -1, -1, -1).masked_fill(
                             padding[:, None, None, :], float("-inf"))))):
        scale = torch.full((1, 4, 1, 1), 1.3, requires_grad=True)
        inp = x.clone().requires_grad_()
        out = call(inp, base * scale)
        (out[:, :40] * torch.linspace(-1, 1, 32)).sum().backward()
        results.append((out.detach()[:, :40], inp.grad, scale.grad, {n: p.grad for n, p in module.named_parameters()}))
    (out_a, x_a, s_a, w_a), (out_b, x_b, s_b, w_b) = results
    assert (out_a - out_b).abs().max() <= 3e-5
    assert (x_a - x_b).abs().max() <= 3e-5 and (s_a - s_b).abs().max() <= 1e-4 * s_a.abs().max()
    assert w_a.keys() == w_b.keys() and all((w_a[n] - w_b[n]).abs().max() <= 3e-5 for n in w_a)


@pytest.mark.parametrize("mode", ["layer_norm", "default"])
def test_conv_front_end_equals_fairseqs_in_both_norm_modes(mode):
    """Our front end is time-major (each conv a matrix product over unfolded windows): output and every gradient
    equal fairseq's ConvFeatureExtractionModel's, with layer norms or with the group norm of "default" mode."""
    from fairseq.models.wav2vec.wav2vec2 import ConvFeatureExtractionModel

    from bundles.data2vec2.config import Data2Vec2EncoderArgs
    from bundles.data2vec2.model import FeatureExtractor

    layers = [(16, 10, 5), (16, 3, 2), (16, 3, 2), (16, 2, 2)]
    torch.manual_seed(0)
    theirs = ConvFeatureExtractionModel(layers, dropout=0.0, mode=mode, conv_bias=False)
    ours = FeatureExtractor(Data2Vec2EncoderArgs(extractor_conv_layer_config=tuple(layers),
                                                 extractor_mode="layer_norm" if mode == "layer_norm" else "group_norm"))
    for p in theirs.parameters():  # norms away from their identity initialisation
        p.data.add_(torch.randn_like(p) * 0.1)
    renamed = {re.sub(r"\.2\.(1\.)?(weight|bias)$", r".layer_norm.\2", re.sub(r"\.0\.weight$", ".conv.weight", k)): v
               for k, v in theirs.state_dict().items()}
    ours.load_state_dict(renamed)
    wav = _audio(2, 4000)
    a, b = wav.clone().requires_grad_(), wav.clone().requires_grad_()
    expected = theirs(a).transpose(1, 2)
    got, _ = ours(b, None)
    assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-5
    weights = torch.linspace(-1, 1, got.shape[-1])
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    assert (a.grad - b.grad).abs().max() <= 1e-5 * a.grad.abs().max()
    grads = {k: v.grad for k, v in zip(renamed, theirs.parameters())}
    assert all((grads[k] - p.grad).abs().max() <= 1e-4 * grads[k].abs().max() for k, p in ours.named_parameters())


def test_four_dimensional_alibi_scales_of_older_files_are_upgraded(converted, tmp_path):
    """Files written before per-layer scales hold alibi_scale as [1, H, 1, 1] (fairseq upgrades them on load)."""
    ref, bundle, _ = converted
    state = checkpoint_dict(ref)
    key = "modality_encoders.AUDIO.alibi_scale"
    state["model"][key] = state["model"][key].squeeze(0)
    state["model"]["_ema"] = dict(state["model"]["_ema"])  # fairseq's state_dict hands out its live EMA dict
    state["model"]["_ema"][key] = state["model"]["_ema"][key].squeeze(0)
    torch.save(state, tmp_path / "old.pt")
    old = load_bundle(convert_checkpoint(tmp_path / "old.pt", tmp_path / "b"))
    a, b = bundle.state_dict(), old.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "upgraded_alibi_scale" in old.config.provenance and "upgraded_alibi_scale" not in bundle.config.provenance


@pytest.mark.parametrize("converted", ["data2vec2_base_libri"], indirect=True)  # the card of the file it serves
def test_convert_by_catalogue_name_from_a_mirror(converted, tmp_path):
    """`continue-pt convert data2vec2_base_libri --mirror URL` fetches base_libri.pt (here: a random-weight stand-in
    served on 127.0.0.1) and converts it."""
    import functools
    import shutil
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    ref, _, src = converted
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(src, served / "base_libri.pt")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        result = CliRunner().invoke(cli, ["convert", "data2vec2_base_libri", "-o", str(tmp_path / "b"), "--mirror",
                                          f"http://127.0.0.1:{httpd.server_address[1]}", "--cache-dir",
                                          str(tmp_path / "cache")])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert result.exit_code == 0, result.output
    bundle = load_bundle(tmp_path / "b")
    assert bundle.family == "data2vec2" and bundle.kind == "pretrain" and bundle.num_updates == NUM_UPDATES
    assert (tmp_path / "cache" / "catalogue" / "base_libri.pt").is_file()


class _Hostile:
    """Unpickling it would run a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_code_hidden_in_the_teacher_entry_is_refused_without_running(converted, tmp_path):
    ref, _, _ = converted
    state = checkpoint_dict(ref)
    state["model"]["_ema"] = {**state["model"]["_ema"], "blocks.0.norm1.weight": _Hostile(tmp_path / "ran")}
    torch.save(state, tmp_path / "hostile.pt")
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(tmp_path / "hostile.pt", tmp_path / "out")
    assert "system" in str(err.value) and "allow-list" in str(err.value)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("key_map", [data2vec2.PRETRAIN_KEY_MAP, data2vec2.CTC_KEY_MAP], ids=["pretrain", "ctc"])
def test_the_key_maps_reverse_exactly(converted, key_map):
    """Every bundle key maps back to the fairseq key it came from (as the export to fairseq chooses among the
    reverse rules: the conv front end's norm by extractor_mode)."""
    from converters.fairseq_export import _candidates, _pick
    from converters.families.reverse_map import reverse_key_map

    ref, _, _ = converted
    source = _flat_state(ref.model)
    if key_map is data2vec2.CTC_KEY_MAP:
        source = {f"w2v_encoder.w2v_model.{k}": v for k, v in source.items()
                  if not k.startswith(("_ema.", "modality_encoders.AUDIO.decoder."))}
        source["w2v_encoder.proj.weight"] = torch.zeros(1)
    result = key_map.classify(source)
    assert result.problems() == [] and len(result.mapped) == len(source)
    reverse = reverse_key_map(key_map)
    mode = {"extractor_mode": "layer_norm"}
    assert all(_pick(_candidates(reverse, target), mode) == key for key, target in result.mapped.items())
