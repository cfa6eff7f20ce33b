"""Issue 12, item 4: ``bench/bench_gpu_step.py`` (GPU throughput and MFU of continued pre-training steps) cannot rot:
its CPU smoke mode runs here (the real LightningModule step of the tiny demo models), its FLOP formula is checked
against a hand count and, in the smoke run, against ``torch.utils.flop_counter.FlopCounterMode``; without a GPU the
real benchmark refuses with exit status 2 and writes nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "bench_gpu_step.py"
RESULTS = ROOT / "bench" / "RESULTS.md"
FLOP_CHECK_TOLERANCE = 1e-4
"""Formula vs FlopCounterMode on the smoke step, relative. Both count the same matrix products, convolutions and
attention of the step that ran (its layers and masked frames), so they agree exactly; 0.01 % leaves room for
rounding only, while a missed or double-counted part of the tiny model (the smallest, the k-means distances, is
0.1 % of its step) fails."""


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_gpu_step

    return bench_gpu_step


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["hubert", "wav2vec2"])
def test_smoke_mode_trains_and_reports(tmp_path, family):
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    out = tmp_path / "result.json"
    proc = _run("--smoke", "--family", family, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["device"] == "cpu"
    (run,) = result["runs"]
    assert run["family"] == family and run["model"] == "tiny" and run["precision"] == "32" and not run["compile"]
    assert run["steps"] == 2 and len(run["step_seconds"]) == 2 and all(s > 0 for s in run["step_seconds"])
    assert run["audio_seconds_per_second"] > 0
    assert math.isclose(run["audio_seconds_per_second"],
                        run["audio_seconds_per_step"] / run["step_seconds_median"], rel_tol=1e-9)
    assert math.isfinite(run["loss"]) and run["loss"] > 0
    assert run["mfu"] is None and run["peak_memory_bytes"] is None  # CPU: no peak FLOP/s, no CUDA memory

    names = [p["name"] for p in run["parts"]]
    for expected in ("conv front end", "feature projection", "positional conv", "attention q/k/v/out",
                     "attention scores", "feed-forward"):
        assert any(n.startswith(expected) for n in names), (expected, names)
    if family == "hubert":  # online targets: the frozen teacher and the k-means, forward only
        assert any(n.startswith("teacher forward") for n in names) and "k-means distances" in names
        assert any("label logits, masked" in n for n in names)
    else:
        assert any(n.startswith("quantizer") for n in names) and any("contrastive" in n for n in names)
    assert all(p["training"] >= p["forward"] > 0 for p in run["parts"])
    assert math.isclose(run["training_flops_per_step"], sum(p["training"] for p in run["parts"]), rel_tol=1e-12)

    check = run["flop_check"]
    assert check["counted"] > 0
    assert abs(check["relative_difference"]) <= FLOP_CHECK_TOLERANCE, check
    assert (RESULTS.read_bytes() if RESULTS.exists() else None) == before  # smoke without --write: nothing


def test_flop_formula_matches_a_hand_count():
    """A tiny encoder, counted by hand: 2 crops of 1000 samples, conv (4, 10, 5) then (6, 3, 2), d 8, ff 16, one
    layer of 2 heads, positional conv kernel 4 in 2 groups."""
    from torchaudio.models.wav2vec2 import wav2vec2_model

    bench = _bench()
    model = wav2vec2_model(
        extractor_mode="group_norm", extractor_conv_layer_config=[(4, 10, 5), (6, 3, 2)], extractor_conv_bias=False,
        encoder_embed_dim=8, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=4, encoder_pos_conv_groups=2,
        encoder_num_layers=1, encoder_num_heads=2, encoder_attention_dropout=0.0, encoder_ff_interm_features=16,
        encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0,
        aux_num_out=None)
    parts, frames = bench._encoder_parts(model, 2, 1000, 1.0, "", 3.0, (2.0, 3.0))
    # conv 0: (1000 - 10) // 5 + 1 = 199 frames; conv 1: (199 - 3) // 2 + 1 = 99 frames
    assert frames == 99
    conv0, conv1 = 2 * (2 * 1 * 4 * 10 * 199), 2 * (2 * 4 * 6 * 3 * 99)
    projection = 2 * (2 * 99) * 6 * 8
    positional = 2 * (2 * (99 + 2 * 2 - 4 + 1) * (8 // 2) * 8 * 4)  # padding 2: 100 output frames
    qkvo = 2 * (8 * 99 * 8 * 8)  # 8 T d^2
    scores = 2 * (4 * 99 * 99 * 8)  # 4 T^2 d
    ffn = 2 * (4 * 99 * 8 * 16)  # 4 T d ff
    got = {p.name.split(" (")[0]: (p.forward, p.training) for p in parts}
    assert got == {
        "conv front end": (conv0 + conv1, 2 * conv0 + 3 * conv1),  # the waveform needs no input gradient
        "feature projection": (projection, 3 * projection),
        "positional conv": (positional, 3 * positional),
        "attention q/k/v/out projections": (qkvo, 3 * qkvo),
        "attention scores": (scores, 3 * scores),
        "feed-forward": (ffn, 3 * ffn),
    }
    # 24 T d^2 + 4 T^2 d per layer when ff = 4 d; here ff = 2 d: 16 T d^2 + 4 T^2 d
    assert qkvo + ffn + scores == 2 * (16 * 99 * 64 + 4 * 99 * 99 * 8)


def test_peak_flops_table():
    bench = _bench()
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed", None) == 989e12
    assert bench.peak_flops("NVIDIA H100 PCIe", "bf16-mixed", None) == 756e12
    assert bench.peak_flops("NVIDIA H100 NVL", "bf16-mixed", None) == 835e12
    assert bench.peak_flops("NVIDIA H200", "bf16-mixed", None) == 989e12
    assert bench.peak_flops("NVIDIA A100-SXM4-80GB", "bf16-mixed", None) == 312e12
    assert bench.peak_flops("Tesla T4", "bf16-mixed", None) is None  # unknown: MFU n/a
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "32", None) is None  # fp32 is not held to the bf16 peak
    assert bench.peak_flops("Tesla T4", "32", 65e12) == 65e12


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the real benchmark")
def test_without_a_gpu_it_refuses_and_writes_nothing(tmp_path):
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    work = ROOT / "bench" / "_work" / "gpu_step"
    work_before = work.exists()
    out = tmp_path / "result.json"
    proc = _run("--model", "base", "--out", str(out), timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no CUDA device here" in proc.stderr and "--smoke" in proc.stderr
    assert not out.exists()
    assert (RESULTS.read_bytes() if RESULTS.exists() else None) == before
    assert work.exists() == work_before  # no model was built


@pytest.mark.slow
@pytest.mark.parametrize("config", ["hubert_base_ls960", "hubert_large_ll60k", "wav2vec_small", "libri960_big"])
def test_committed_configs_are_what_the_converter_writes(tmp_path, config):
    """Where fairseq is missing (a GPU machine's bare image) the benchmark builds its models from
    ``bench/gpu_step_configs``: those must stay what the converter writes for the random fairseq model of the real
    config (compared with 2 layers; every other field must agree)."""
    from tests.reference import require

    require("fairseq")
    from converters.convert import convert_checkpoint
    from tests.fairseq_reference import build_fairseq_model, save_checkpoint

    bench = _bench()
    ref = build_fairseq_model(config, num_layers=2, seed=0, num_clusters=bench.K)
    save_checkpoint(ref, tmp_path / "model.pt", "dict")
    fresh = bench.save_config(convert_checkpoint(tmp_path / "model.pt", tmp_path / "bundle"), config, tmp_path)
    committed = json.loads((bench.CONFIG_DIR / f"{config}.json").read_text())
    fresh = json.loads(fresh.read_text())
    assert fresh["encoder_args"].pop("encoder_num_layers") == 2
    assert committed["encoder_args"].pop("encoder_num_layers") == (24 if config in ("hubert_large_ll60k",
                                                                                     "libri960_big") else 12)
    assert fresh == committed


@pytest.mark.parametrize("config", ["hubert_base_ls960", "wav2vec_small"])
def test_without_fairseq_the_models_come_from_the_committed_configs(tmp_path, monkeypatch, config):
    """The bundle made from a committed config (cut to 1 layer here, to stay small) loads, and the family's module
    trains from it (HuBERT: with the special label rows and a k-means of the right width)."""
    bench = _bench()
    data = json.loads((bench.CONFIG_DIR / f"{config}.json").read_text())
    data["encoder_args"]["encoder_num_layers"] = 1
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / f"{config}.json").write_text(json.dumps(data))
    monkeypatch.setattr(bench, "CONFIG_DIR", tmp_path / "configs")
    monkeypatch.setitem(sys.modules, "tests.fairseq_reference", None)  # as on a machine without fairseq
    bundle, how = bench._random_bundle(config, tmp_path / "work")
    assert how == bench._FROM_CONFIG
    family = "hubert" if config.startswith("hubert") else "wav2vec2"
    kmeans = bench._random_kmeans(768, 1) if family == "hubert" else None
    module = bench.build_module(bench.ModelSetup("BASE", family, bundle, None, kmeans))
    assert len(module.student.wav2vec2.encoder.transformer.layers) == 1
    weights = torch.cat([p.detach().flatten() for p in module.student.parameters()])
    assert 0.09 < float(weights.std()) < 0.11  # drawn, not left empty or zero
    assert bench._random_bundle(config, tmp_path / "work") == (bundle, "cached")


def test_the_gpu_section_reports_each_run_and_the_target():
    """What a GPU run writes to bench/RESULTS.md, from measurements as a GPU gives them (no GPU here)."""
    bench = _bench()
    args = bench.parse_args(["--model", "both", "--compile"])
    parts = [{"name": "feed-forward (x 12 layers)", "forward": 2e12, "training": 6e12}]

    def run(model: str, compiled: bool, step_s: float) -> object:
        flops = 6e12
        return bench.Measurement(
            model=model, family="hubert", compile=compiled, precision="bf16-mixed", device="NVIDIA H100 80GB HBM3",
            crops=8, crop_seconds=15.625, audio_seconds_per_step=125.0, warmup=5, steps=20,
            step_seconds=[step_s] * 20, step_seconds_median=step_s, audio_seconds_per_second=125.0 / step_s,
            training_flops_per_step=flops, training_flops_per_audio_second=flops / 125.0,
            achieved_flops_per_second=flops / step_s, peak_flops_per_second=989e12,
            mfu=flops / step_s / 989e12, peak_memory_bytes=20 * 2 ** 30, loss=6.5, parts=parts)

    runs = [run("BASE", False, 0.05), run("BASE", True, 0.04), run("LARGE", False, 0.125)]
    info = {"date": "d", "cpu": "c", "cores": "16", "ram": "1 GiB", "python": "3", "torch": "t", "torchaudio": "a",
            "safetensors": "s", "torch_threads": "1", "rss": "r", "load_start": "0"}
    setup = bench.ModelSetup("BASE", "hubert", Path("b"), description="`hubert_base_ls960`")
    text = "\n".join(bench.section_body(runs, args, "cmd", info, "NVIDIA H100 80GB HBM3 (...)", [setup]))
    assert "GPU: NVIDIA H100 80GB HBM3" in text and "no GPU used" not in text
    assert "| hubert BASE  | on      | 3,125 " in text  # 125 s / 0.04 s
    assert "MFU" in text and "15.2 %" in text  # 6e12 / 0.04 / 989e12
    assert "20.0 GiB" in text and "989 TFLOP/s here" in text
    assert "best 3,125 (compiled)" in text and "**meets**" in text  # BASE >= 3,000 audio-s/s
    slow = "\n".join(bench.section_body([run("BASE", False, 0.05)], args, "cmd", info, "g", [setup]))
    assert "best 2,500 (eager)" in slow and "**misses**" in slow
