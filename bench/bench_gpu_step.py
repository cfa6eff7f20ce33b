"""Benchmark: continued pre-training steps of HuBERT / wav2vec 2.0 BASE and LARGE on one GPU: audio-seconds per
second per GPU, step time, MFU and peak memory, eager and ``torch.compile``.

    .venv/bin/python bench/bench_gpu_step.py [--model base|large|both] [--family hubert|wav2vec2] [--steps 20]
        [--warmup 5] [--batch-seconds 125] [--crop-seconds 15.625] [--compile] [--precision bf16-mixed|32]
        [--peak-flops F] [--out result.json] [--keep]
    .venv/bin/python bench/bench_gpu_step.py --smoke [--family ...] [--out result.json] [--write]

Needs a CUDA GPU; without one (and without ``--smoke``) it says so, exits with status 2 and writes nothing.

**Models.** Random-weight fairseq models of the real configs in ``tests/fairseq_configs`` (HuBERT:
``hubert_base_ls960``, ``hubert_large_ll60k``; wav2vec 2.0: ``wav2vec_small``, ``libri960_big``; every layer),
built with fairseq (``tests/fairseq_reference.py``, seed 0), saved as fairseq checkpoints and converted with
``converters.convert.convert_checkpoint`` (cached in ``bench/_work/gpu_step``, removed unless ``--keep``). Where
fairseq is not installed (a GPU machine's bare image), the bundle is made from the config the converter wrote for
that model (``bench/gpu_step_configs``, kept in sync by ``tests/test_bench_gpu_step.py``) with every tensor drawn
from a seeded normal, as the fairseq models' are; the results section says which. HuBERT
keeps its label head (K = 500 clusters + fairseq's 4 special rows) and gets a random k-means of the right width
(500 x 768, layer 9), so targets are made online as in a real run: BASE is its own teacher (a frozen copy cut at
layer 9); LARGE's teacher is the BASE model cut at layer 9 (LARGE was trained on layer-9 km500 targets of the BASE
iteration-2 model, see the catalogue). wav2vec 2.0 has no teacher (its own quantizer).

**Step.** The real training step of the LightningModule (``HubertContinuedPretraining`` /
``Wav2Vec2ContinuedPretraining``) driven by a Lightning ``Trainer`` (1 device, ``bf16-mixed`` by default, the
gradient clipping of ``continue-pt pretrain``): mask drawing, online targets, forward, loss, backward, the
gradient division and one host read in ``on_before_optimizer_step``, clipping and the (fused on CUDA) AdamW step,
under Lightning's precision plugin. A Trainer is built once per measurement (model x compile) and runs
``warmup + steps`` steps; its start-up is outside the timing, so driving ``training_step`` by hand would measure
the same work with a copy of Lightning's loop that could drift from it. Batches are in memory (the data pipeline
is not measured): ``--batch-seconds / --crop-seconds`` crops (default 8 x 15.625 s, fairseq's
``max_sample_size`` 250,000), seeded noise, normalised per crop where the model expects it, pinned; what the data
loader hands over in a real run (waveforms, lengths). Step time = interval between the ends of consecutive steps
with ``torch.cuda.synchronize()`` at each end (so it includes everything the loop does), the first ``--warmup``
steps excluded; the median is reported. Attention: whatever ``F.scaled_dot_product_attention`` picks (flash on
H100 in bf16). ``--compile``: ``nn.Module.compile()`` (in place) of every transformer layer and of the conv
front ends, student and teacher. Peak memory: ``torch.cuda.max_memory_allocated()`` over the timed steps.

**FLOPs** (per step, from the modules' own shapes; matrix products, convolutions and attention only: the
elementwise ops, norms and softmax are not counted, as MFU conventionally does). B crops of S samples, T frames::

    conv layer (C_in -> C_out, kernel k):  2 C_in C_out k T_out        (per crop)
    feature projection (C -> d):           2 T C d
    positional conv (d, kernel k, groups g): 2 T_pos (d/g) d k          (T_pos = T + 2 (k // 2) - k + 1)
    transformer layer (d, ff):             8 T d^2 (q, k, v, out) + 4 T^2 d (QK^T, AV) + 4 T d ff (FFN)
                                           = 24 T d^2 + 4 T^2 d for ff = 4 d
    HuBERT head:  masked M frames:    2 M d f (final_proj) + 2 M (K + 4) f (cosine logits, f = final_dim)
                  unmasked U frames:  the same with U (LARGE: skipped; forward only when its weight is 0)
    wav2vec 2.0 head (M masked frames, G groups x V codewords, c = codevector dim):
                  2 M C G V (weight_proj) + 2 M V c (codevector pick) + 2 M c f (project_q) + 2 M d f (final_proj)
                  + 2 M^2 f (contrastive logits: ours compare every masked frame with every other, then gather)
    teacher (HuBERT online targets, frozen, forward only): conv front end + projection + positional conv +
                  the layers up to the k-means layer + 2 T D K (k-means distances)

    training FLOPs = 3 x student forward (forward + backward: 2x for the input and weight gradients)
                     - conv layer 0's input gradient (the waveform needs none)
                     - 2x the parts without gradient (HuBERT's unmasked logits when their weight is 0)
                     + teacher forward

Transformer layers count ``L (1 - layer_drop)`` (the expected layers run), M and U are the mean over 16 masks
drawn with the model's masking for this shape. FLOPs per audio-second = training FLOPs per step / audio seconds
per step (the ``T^2`` term makes it depend on the crop length). MFU = achieved FLOP/s / the device's peak dense
bf16 FLOP/s (:data:`PEAK_BF16`; ``--peak-flops`` overrides; an unknown device or ``--precision 32`` without
``--peak-flops``: "n/a"). The formula is checked against ``torch.utils.flop_counter.FlopCounterMode`` on one more
(eager) step with the layers and masks that step actually ran (``flop_check`` in the JSON output). These are
model FLOPs: the flash-attention backward's recomputation of ``QK^T`` (0.5x an attention forward) is real work
on the GPU but, as MFU conventionally does, not counted (:func:`flop_counter`).

``--smoke``: on the CPU, the tiny shipped demo checkpoints (``continue_pt/demo_assets``: 2 layers, 64-d; HuBERT
with its k-means), fp32, 2 steps after 1 warm-up, 2 crops of 2 s; nothing written to ``bench/RESULTS.md`` unless
``--write``. It keeps this script from rotting (``tests/test_bench_gpu_step.py``). On a GPU the script writes its
section ``bench_gpu_step`` of ``bench/RESULTS.md``. Target (issue 12): HuBERT BASE >= 3,000 audio-s/s on one H100
(about 15 % MFU).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

sys.path.insert(0, str(C.REPO))

SECTION = "bench_gpu_step"
NO_GPU_MESSAGE = ("bench_gpu_step: no CUDA device here: nothing measured, nothing written (run it on a machine with "
                  "a CUDA GPU, or pass --smoke for the CPU check of the script)")
SEED = 0
SAMPLE_RATE = 16000
K = 500
KMEANS_LAYER = 9  # of BASE: the published hubert_base_ls960_L9_km500 layer
CONFIGS = {("hubert", "base"): "hubert_base_ls960", ("hubert", "large"): "hubert_large_ll60k",
           ("wav2vec2", "base"): "wav2vec_small", ("wav2vec2", "large"): "libri960_big"}
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
"""Peak dense bf16 tensor-core FLOP/s by the words of the device name (first match wins: H100 PCIe and NVL before
H100 = SXM)."""
TARGET_AUDIO_S_PER_S = 3000.0
MASK_DRAWS = 16
SMOKE = {"steps": 2, "warmup": 1, "batch_seconds": 4.0, "crop_seconds": 2.0, "precision": "32"}
DEFAULTS = {"steps": 20, "warmup": 5, "batch_seconds": 125.0, "crop_seconds": 15.625, "precision": "bf16-mixed"}


# ----------------------------------------------------------------------------------------------- FLOPs


@dataclass
class Part:
    """One part of the step: forward FLOPs per step and what training costs of it."""

    name: str
    forward: float
    training: float


def _conv(conv: Any, t_in: int) -> tuple[float, int]:
    """(forward FLOPs per crop, output frames) of a ``nn.Conv1d`` on ``t_in`` frames."""
    (k,), (stride,), (pad,), (dil,) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    t_out = (t_in + 2 * pad - dil * (k - 1) - 1) // stride + 1
    return 2.0 * (conv.in_channels // conv.groups) * conv.out_channels * k * t_out, t_out


def _linear(linear: Any, rows: float) -> float:
    return 2.0 * rows * linear.in_features * linear.out_features


def _conv_layers(encoder_model: Any) -> list[Any]:
    return [block.conv for block in encoder_model.feature_extractor.conv_layers]


def _front_end(model: Any, batch: int, samples: int) -> tuple[list[float], float, float, int]:
    """(per conv layer, feature projection, positional conv) forward FLOPs of a torchaudio ``Wav2Vec2Model`` for
    ``batch`` crops of ``samples`` samples, and the frames it makes."""
    t, convs = samples, []
    for conv in _conv_layers(model):
        flops, t = _conv(conv, t)
        convs.append(batch * flops)
    projection = _linear(model.encoder.feature_projection.projection, batch * t)
    positional, _ = _conv(model.encoder.transformer.pos_conv_embed.conv, t)
    return convs, projection, batch * positional, t


def _layer_parts(layer: Any, batch: int, frames: int) -> tuple[float, float, float]:
    """(q/k/v/out projections, attention scores, feed-forward) forward FLOPs of one torchaudio ``EncoderLayer``."""
    att = layer.attention
    rows = batch * frames
    projections = sum(_linear(p, rows) for p in (att.q_proj, att.k_proj, att.v_proj, att.out_proj))
    scores = 4.0 * batch * frames * frames * att.num_heads * att.head_dim  # QK^T and AV
    ff = layer.feed_forward
    return projections, scores, _linear(ff.intermediate_dense, rows) + _linear(ff.output_dense, rows)


def _encoder_parts(model: Any, batch: int, samples: int, layers_run: float, prefix: str, passes: float,
                   conv_passes: tuple[float, float]) -> tuple[list[Part], int]:
    """The encoder's parts and its frames; ``conv_passes``: (conv layer 0, conv layers 1..) (:func:`_conv_passes`)."""
    convs, projection, positional, frames = _front_end(model, batch, samples)
    layers = model.encoder.transformer.layers
    per_layer = _layer_parts(layers[0], batch, frames) if len(layers) else (0.0, 0.0, 0.0)
    conv_training = conv_passes[0] * convs[0] + conv_passes[1] * sum(convs[1:])
    parts = [Part(f"{prefix}conv front end ({len(convs)} layers)", sum(convs), conv_training),
             Part(f"{prefix}feature projection", projection, passes * projection),
             Part(f"{prefix}positional conv", positional, passes * positional)]
    names = ("attention q/k/v/out projections", "attention scores (QK^T, AV)", "feed-forward")
    for name, flops in zip(names, per_layer):
        parts.append(Part(f"{prefix}{name} (x {layers_run:g} layers)", layers_run * flops, passes * layers_run * flops))
    return parts, frames


def _conv_passes(feature_grad_mult: float) -> tuple[float, float]:
    """(passes of conv layer 0, of conv layers 1..) of the student: forward + weight gradient for layer 0 (the
    waveform needs no input gradient), forward + input and weight gradients for the others; a frozen front end
    (feature_grad_mult 0) runs forward only."""
    return (1.0, 1.0) if feature_grad_mult == 0 else (2.0, 3.0)


def hubert_parts(module: Any, batch: int, samples: int, masked: float, unmasked: float,
                 layers_run: float) -> list[Part]:
    """Training FLOPs of one ``HubertContinuedPretraining`` step, by part (see the module docstring)."""
    student = module.student
    parts, _ = _encoder_parts(student.wav2vec2, batch, samples, layers_run, "", 3.0,
                              _conv_passes(float(module.feature_grad_mult)))
    head = student.logit_generator
    classes = head.label_embeddings.shape[0] + (module.extra_label_embeddings.shape[0]
                                                if module.extra_label_embeddings is not None else 0)
    final_dim = head.label_embeddings.shape[1]

    def predict(rows: float) -> float:
        return _linear(head.final_proj, rows) + 2.0 * rows * classes * final_dim

    if not head.skip_masked:
        parts.append(Part("final_proj + label logits, masked frames", predict(masked), 3.0 * predict(masked)))
    if not head.skip_nomask:
        grad = module.weights.unmasked != 0
        parts.append(Part(f"final_proj + label logits, unmasked frames ({'with' if grad else 'no'} gradient)",
                          predict(unmasked), (3.0 if grad else 1.0) * predict(unmasked)))
    if module.targets is not None:
        teacher = module.targets.teacher
        t_parts, frames = _encoder_parts(teacher, batch, samples, len(teacher.encoder.transformer.layers),
                                         "teacher ", 1.0, (1.0, 1.0))
        forward = sum(p.forward for p in t_parts)
        parts.append(Part(f"teacher forward (frozen, {len(teacher.encoder.transformer.layers)} layers)", forward,
                          forward))
        km = module.targets.kmeans
        distances = 2.0 * batch * frames * km.dim * km.num_clusters
        parts.append(Part("k-means distances", distances, distances))
    return parts


def wav2vec2_parts(module: Any, batch: int, samples: int, masked: float, layers_run: float,
                   masked_squared: float | None = None) -> list[Part]:
    """Training FLOPs of one ``Wav2Vec2ContinuedPretraining`` step, by part (see the module docstring)."""
    student = module.student
    parts, _ = _encoder_parts(student.wav2vec2, batch, samples, layers_run, "", 3.0,
                              _conv_passes(float(module.objective.feature_grad_mult)))
    q = student.quantizer
    codevector_dim = q.codevectors.shape[-1] * q.groups
    quantizer = (_linear(q.weight_proj, masked) + 2.0 * masked * q.num_vars * codevector_dim
                 + _linear(student.project_q, masked))
    final_dim = student.final_proj.out_features
    m2 = masked * masked if masked_squared is None else masked_squared
    head = _linear(student.final_proj, masked) + 2.0 * m2 * final_dim
    parts += [Part("quantizer (weight_proj, codevector pick, project_q), masked frames", quantizer, 3.0 * quantizer),
              Part("final_proj + contrastive logits, masked frames", head, 3.0 * head)]
    return parts


def step_parts(module: Any, batch: int, samples: int, masks: list[tuple[int, int]], layers_run: float
               ) -> list[Part]:
    """The step's parts averaged over ``masks`` (``(masked, unmasked)`` frame counts of the step's masks)."""
    n = len(masks)
    masked = sum(m for m, _ in masks) / n
    unmasked = sum(u for _, u in masks) / n
    if hasattr(module, "targets"):  # HuBERT
        return hubert_parts(module, batch, samples, masked, unmasked, layers_run)
    return wav2vec2_parts(module, batch, samples, masked, layers_run, sum(m * m for m, _ in masks) / n)


def expected_masks(module: Any, batch: int, frames: int, draws: int = MASK_DRAWS) -> list[tuple[int, int]]:
    """``(masked, unmasked)`` frame counts of ``draws`` masks drawn with the module's own masking for this shape."""
    import numpy as np

    out = []
    for i in range(draws):
        rng = np.random.default_rng([SEED, 99, i])
        if hasattr(module, "draw_masks"):
            mask, _ = module.draw_masks({}, (batch, frames), None, rng)
        else:
            mask = module.draw_mask((batch, frames), None, rng)
        m = int(mask.sum())
        out.append((m, batch * frames - m))
    return out


def student_frames(module: Any, samples: int) -> int:
    from continue_pt.frames import conv_output_frames

    return conv_output_frames(module.bundle_config.encoder_args["extractor_conv_layer_config"], samples)


def expected_layers(module: Any) -> float:
    transformer = module.student.wav2vec2.encoder.transformer
    return len(transformer.layers) * (1.0 - float(transformer.layer_drop or 0.0))


# ----------------------------------------------------------------------------------------------- models


@dataclass
class ModelSetup:
    """What one measurement trains: the module's options, its k-means (HuBERT) and what the tables say of it."""

    label: str
    family: str
    bundle: Path
    teacher: Path | None = None
    kmeans: Any = None
    description: str = ""


CONFIG_DIR = C.BENCH / "gpu_step_configs"
"""The bundle config the converter writes for each random-weight model (``save_config``; its provenance left out):
what builds the bundles where fairseq is not installed (a GPU machine's bare image)."""
_FROM_CONFIG = "random weights drawn from the committed converter config (no fairseq here)"


def _random_bundle(config: str, work: Path) -> tuple[Path, str]:
    """The random-weight model of ``config`` (all its layers) as a bundle, built once (cached in ``work``), and how:
    built by fairseq and converted (the converter path of the other benchmarks), or, where fairseq is not
    installed, from the bundle config the converter wrote for it (:data:`CONFIG_DIR`) with weights drawn here."""
    out = work / config
    if (out / "config.json").is_file():
        return out, "cached"
    try:
        from tests.fairseq_reference import build_fairseq_model, load_config, save_checkpoint
    except ImportError:  # fairseq (or its omegaconf) is not installed
        return _bundle_from_config(config, out), _FROM_CONFIG
    from converters.convert import convert_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stored = load_config(config)
    layers = int(stored.get("model", stored)["encoder_layers"])  # HuBERT's are trainer configs, wav2vec 2.0's models
    ref = build_fairseq_model(config, num_layers=layers, seed=SEED, num_clusters=K)
    checkpoint = work / f"{config}_random_seed{SEED}.pt"
    save_checkpoint(ref, checkpoint, "dict")
    del ref
    convert_checkpoint(checkpoint, out, overwrite=True)
    checkpoint.unlink()
    C.log(f"built {config} ({layers} layers, random weights) and converted it in {time.perf_counter() - t0:.0f} s")
    return out, "built by fairseq, converted"


def save_config(bundle: Path, config: str, directory: Path = CONFIG_DIR) -> Path:
    """Keep ``bundle``'s config (the converter's, for the random model of ``config``) without its provenance (the
    whole fairseq configuration, a file hash) in ``directory``: what :func:`_bundle_from_config` builds from."""
    data = json.loads((bundle / "config.json").read_text())
    data["provenance"] = {"source": f"random-weight fairseq {config} (tests/fairseq_configs), converted; "
                                    "provenance left out (bench/bench_gpu_step.py save_config)"}
    data["files"] = {"model": "model.safetensors"}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{config}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def _bundle_from_config(config: str, out: Path) -> Path:
    """A bundle of the committed converter config of ``config`` with random weights: every tensor drawn from a
    seeded normal (std 0.1), as ``tests/fairseq_reference.py`` draws the fairseq models' (the cost of a step does
    not depend on the values)."""
    import torch

    from bundles.config import BundleConfig
    from bundles.factory import build_pretrain_model
    from bundles.safetensors_stream import PendingTensor
    from bundles.writing import write_bundle

    path = CONFIG_DIR / f"{config}.json"
    bundle_config = BundleConfig.from_dict(path, json.loads(path.read_text()))
    state = build_pretrain_model(bundle_config).state_dict()  # on the meta device: names and shapes only
    g = torch.Generator().manual_seed(SEED)

    def drawn(name: str, shape: tuple[int, ...]) -> PendingTensor:
        return PendingTensor(name, shape, torch.float32, lambda: 0.1 * torch.randn(shape, generator=g))

    tensors = [drawn(name, tuple(t.shape)) for name, t in state.items()]
    extras = []
    if bundle_config.family == "hubert":  # fairseq's 4 special-symbol rows of the label embeddings
        special = len(bundle_config.label_dictionary["non_cluster_symbols"])
        extras.append(drawn("label_embeddings_non_cluster", (special, int(bundle_config.pretrain_args["final_dim"]))))
    write_bundle(out, bundle_config, tensors, extras, overwrite=True)
    C.log(f"{config}: {_FROM_CONFIG} -> {out}")
    return out


def _random_kmeans(dim: int, layer: int) -> Any:
    import torch

    from bundles.kmeans import KMeansModel

    g = torch.Generator().manual_seed(SEED + 1)
    return KMeansModel(torch.randn(K, dim, generator=g), layer=layer)


def model_setups(family: str, sizes: list[str], work: Path) -> list[ModelSetup]:
    """The BASE / LARGE models of ``family`` (see the module docstring)."""
    setups = []
    for size in sizes:
        config = CONFIGS[(family, size)]
        bundle, how = _random_bundle(config, work)
        if family == "wav2vec2":
            setups.append(ModelSetup(size.upper(), family, bundle, description=f"`{config}` ({how}; contrastive)"))
            continue
        base, _ = _random_bundle(CONFIGS[("hubert", "base")], work)
        teacher = None if size == "base" else base
        setups.append(ModelSetup(size.upper(), family, bundle, teacher, _random_kmeans(768, KMEANS_LAYER),
                                 f"`{config}` ({how}), online targets: teacher BASE cut at layer {KMEANS_LAYER}, "
                                 f"random k-means {K} x 768"))
    return setups


def smoke_setup(family: str, work: Path) -> ModelSetup:
    """The tiny shipped demo checkpoint of ``family`` (HuBERT with its own k-means), converted."""
    from continue_pt.demo import CHECKPOINT, KMEANS, KMEANS_LAYER as DEMO_LAYER, WAV2VEC2_CHECKPOINT
    from converters.convert import convert_checkpoint

    out = work / f"tiny_{family}"
    if family == "hubert":
        convert_checkpoint(CHECKPOINT, out, kmeans=KMEANS, kmeans_layer=DEMO_LAYER, overwrite=True)
        return ModelSetup("tiny", family, out, description=f"`{CHECKPOINT.name}` + `{KMEANS.name}`")
    convert_checkpoint(WAV2VEC2_CHECKPOINT, out, overwrite=True)
    return ModelSetup("tiny", family, out, description=f"`{WAV2VEC2_CHECKPOINT.name}`")


def build_module(setup: ModelSetup) -> Any:
    from continue_pt.hubert.options import HubertOptions
    from continue_pt.module_options import ModuleOptions

    if setup.family == "hubert":
        from continue_pt.hubert.module import HubertContinuedPretraining

        options = ModuleOptions(bundle=str(setup.bundle),
                                hubert=HubertOptions(teacher=str(setup.teacher) if setup.teacher else None))
        return HubertContinuedPretraining(options, kmeans=setup.kmeans)
    from continue_pt.wav2vec2.module import Wav2Vec2ContinuedPretraining

    return Wav2Vec2ContinuedPretraining(ModuleOptions(bundle=str(setup.bundle)))


def compile_in_place(module: Any) -> int:
    """``nn.Module.compile()`` of every transformer layer and conv front end (student and teacher); how many."""
    from torchaudio.models.wav2vec2.components import EncoderLayer, FeatureExtractor

    compiled = 0
    for sub in module.modules():
        if isinstance(sub, (EncoderLayer, FeatureExtractor)):
            sub.compile()
            compiled += 1
    return compiled


# ----------------------------------------------------------------------------------------------- batches


def make_batches(module: Any, crops: int, samples: int, count: int = 4) -> list[dict[str, Any]]:
    """``count`` distinct in-memory batches of ``crops`` x ``samples`` seeded noise, as the data loader hands them
    over (waveforms normalised per crop when the model's data are, lengths on the CPU)."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    out = []
    for _ in range(count):
        wav = 0.1 * torch.randn(crops, samples, generator=g)
        if module.data_normalizes:
            wav = (wav - wav.mean(dim=1, keepdim=True)) / (wav.std(dim=1, keepdim=True) + 1e-5)
        out.append({"waveforms": wav, "lengths": torch.full((crops,), samples, dtype=torch.long)})
    return out


class _Cycle:
    """A map-style dataset of ``length`` batches cycling through ``batches`` (``DataLoader(batch_size=None)``)."""

    def __init__(self, batches: list[dict[str, Any]], length: int):
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.batches[i % len(self.batches)]


# ----------------------------------------------------------------------------------------------- measuring


def _callbacks(warmup: int, steps: int, cuda: bool, check_step: int | None) -> tuple[Any, Any]:
    """(step timer, FLOP counter of step ``check_step`` or None) as Lightning callbacks."""
    import lightning.pytorch as pl
    import torch

    class StepTimer(pl.Callback):
        """Wall time between the ends of consecutive steps (synchronised), after ``warmup`` steps; peak memory."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.loss = float("nan")
            self.peak_memory: int | None = None

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if batch_idx >= warmup + steps:
                return
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            if batch_idx == warmup - 1 and cuda:
                torch.cuda.reset_peak_memory_stats()
            if batch_idx == warmup + steps - 1:
                if cuda:
                    self.peak_memory = int(torch.cuda.max_memory_allocated())
                loss = trainer.callback_metrics.get("train/loss")
                self.loss = float(loss) if loss is not None else float("nan")

        def step_times(self) -> list[float]:
            ends = self.ends[warmup - 1:]
            return [b - a for a, b in zip(ends, ends[1:])]

    class FlopCheck(pl.Callback):
        """``FlopCounterMode`` over the forward and backward of step ``check_step``, with the layers and masked
        frames that step ran (forward hooks)."""

        def __init__(self) -> None:
            self.counter: Any = None
            self.layers = 0
            self.head_rows: list[tuple[int, bool]] = []
            self.total: int | None = None
            self.counts: dict[str, int] = {}
            self._hooks: list[Any] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx != check_step:
                return
            student = module.student
            head = student.logit_generator.final_proj if hasattr(student, "logit_generator") else student.final_proj
            self._hooks = [layer.register_forward_hook(self._layer_ran)
                           for layer in student.wav2vec2.encoder.transformer.layers]
            self._hooks.append(head.register_forward_hook(self._head_ran))
            self.counter = flop_counter()
            self.counter.__enter__()

        def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
            if self.counter is None or self.total is not None:
                return
            self.counter.__exit__(None, None, None)
            for hook in self._hooks:
                hook.remove()
            self.total = int(self.counter.get_total_flops())
            self.counts = {str(op): int(n) for op, n in self.counter.get_flop_counts().get("Global", {}).items()}

        def _layer_ran(self, *_: Any) -> None:
            self.layers += 1

        def _head_ran(self, _module: Any, inputs: Any, _output: Any) -> None:
            self.head_rows.append((int(inputs[0].shape[0]), torch.is_grad_enabled()))

    return StepTimer(), (FlopCheck() if check_step is not None else None)


def flop_counter() -> Any:
    """``FlopCounterMode`` counting model FLOPs, as the formula does, with three corrections of torch's formulas:
    the CPU flash-attention kernels are counted (torch registers only the CUDA ones); an attention backward is
    counted as its 4 matrix products (2x the forward), without the flash kernels' recomputation of ``QK^T`` (torch
    counts it: 2.5x; MFU conventionally leaves recomputation out); a grouped convolution's weight gradient is
    counted once (torch's ``conv_backward_flop`` ignores ``groups`` there: the positional conv's weight gradient
    16x for BASE)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def attention(query, key, value, *args, out_shape=None, **kwargs):  # noqa: ANN001, ARG001
        return sdpa_flop_count(query, key, value)

    def attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):  # noqa: ANN001, ARG001
        return 2 * sdpa_flop_count(query, key, value)  # grad of scores, V, Q, K: no recomputed scores

    def conv_backward(grad_out, x, w, _bias, _stride, _padding, _dilation, transposed, _output_padding, _groups,
                      output_mask, out_shape=None, **kwargs):  # noqa: ANN001, ARG001
        # each gradient costs what the forward costs: batch x |weight| (C_out x C_in / groups x k) x output frames
        forward = conv_flop_count(x, w, grad_out, transposed)
        return forward * (int(output_mask[0]) + int(output_mask[1]))

    backwards = (aten._scaled_dot_product_flash_attention_for_cpu_backward,
                 aten._scaled_dot_product_flash_attention_backward,
                 aten._scaled_dot_product_efficient_attention_backward,
                 aten._scaled_dot_product_cudnn_attention_backward)
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: attention,
        **{op: attention_backward for op in backwards},
        aten.convolution_backward: conv_backward})


def _trainer(precision: str, cuda: bool, max_steps: int, callbacks: list[Any]) -> Any:
    import lightning.pytorch as pl

    from continue_pt.options import option_default
    from continue_pt.trainer_choice import default_deterministic

    accelerator = "gpu" if cuda else "cpu"
    return pl.Trainer(accelerator=accelerator, devices=1, precision="32-true" if precision == "32" else precision,
                      max_steps=max_steps, gradient_clip_val=option_default("gradient_clip_val"),
                      use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, log_every_n_steps=50, callbacks=callbacks,
                      deterministic=default_deterministic(accelerator))


@dataclass
class Measurement:
    model: str
    family: str
    compile: bool
    precision: str
    device: str
    crops: int
    crop_seconds: float
    audio_seconds_per_step: float
    warmup: int
    steps: int
    step_seconds: list[float]
    step_seconds_median: float
    audio_seconds_per_second: float
    training_flops_per_step: float
    training_flops_per_audio_second: float
    achieved_flops_per_second: float
    peak_flops_per_second: float | None
    mfu: float | None
    peak_memory_bytes: int | None
    loss: float
    parts: list[dict[str, Any]] = field(default_factory=list)
    flop_check: dict[str, Any] | None = None
    compiled_modules: int = 0


def measure(setup: ModelSetup, *, compile: bool, precision: str, crops: int, samples: int, warmup: int, steps: int,
            cuda: bool, peak: float | None, check_flops: bool) -> Measurement:
    """Train ``warmup + steps`` steps of ``setup`` (one more under the FLOP counter with ``check_flops``)."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    pl.seed_everything(SEED, verbose=False)
    module = build_module(setup)
    compiled = compile_in_place(module) if compile else 0
    frames = student_frames(module, samples)
    masks = expected_masks(module, crops, frames)
    parts = step_parts(module, crops, samples, masks, expected_layers(module))
    total = sum(p.training for p in parts)
    check_step = warmup + steps if check_flops else None
    timer, checker = _callbacks(warmup, steps, cuda, check_step)
    max_steps = warmup + steps + (1 if check_flops else 0)
    loader = DataLoader(_Cycle(make_batches(module, crops, samples), max_steps), batch_size=None, shuffle=False,
                        num_workers=0, pin_memory=cuda)
    trainer = _trainer(precision, cuda, max_steps, [timer] + ([checker] if checker else []))
    C.log(f"{setup.family} {setup.label}: {'compiled' if compile else 'eager'}, {precision}, {crops} x "
          f"{samples / SAMPLE_RATE:g} s, {warmup} warm-up + {steps} timed steps ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)
    times = timer.step_times()
    if len(times) != steps:
        raise RuntimeError(f"timed {len(times)} steps, expected {steps} (did training stop early? "
                           f"{module.stop_reason or ''})")
    median = statistics.median(times)
    audio = crops * samples / SAMPLE_RATE
    achieved = total / median
    flop_check = _flop_check_result(checker, module, crops, samples) if checker else None
    device = torch.cuda.get_device_name() if cuda else "cpu"
    return Measurement(
        model=setup.label, family=setup.family, compile=compile, precision=precision, device=device, crops=crops,
        crop_seconds=samples / SAMPLE_RATE, audio_seconds_per_step=audio, warmup=warmup, steps=steps,
        step_seconds=times, step_seconds_median=median, audio_seconds_per_second=audio / median,
        training_flops_per_step=total, training_flops_per_audio_second=total / audio,
        achieved_flops_per_second=achieved, peak_flops_per_second=peak,
        mfu=achieved / peak if peak else None, peak_memory_bytes=timer.peak_memory, loss=timer.loss,
        parts=[asdict(p) for p in parts], flop_check=flop_check, compiled_modules=compiled)


def _flop_check_result(checker: Any, module: Any, crops: int, samples: int) -> dict[str, Any]:
    """The formula with the checked step's own layers and masked frames, against what FlopCounterMode counted."""
    if checker.total is None:
        raise RuntimeError("the FLOP check step did not run")
    rows = checker.head_rows
    masked = rows[0][0]
    unmasked = rows[1][0] if len(rows) > 1 else crops * student_frames(module, samples) - masked
    parts = step_parts(module, crops, samples, [(masked, unmasked)], checker.layers)
    formula = sum(p.training for p in parts)
    return {"counted": checker.total, "formula": formula, "relative_difference": formula / checker.total - 1.0,
            "layers_run": checker.layers, "masked_frames": masked, "counted_by_op": checker.counts}


# ----------------------------------------------------------------------------------------------- reporting


def peak_flops(device_name: str, precision: str, override: float | None) -> float | None:
    """The device's peak dense bf16 FLOP/s (:data:`PEAK_BF16`), ``override`` if given; None when unknown or
    when training in fp32 (the bf16 peak is not its ceiling)."""
    if override:
        return override
    if precision != "bf16-mixed":
        return None
    for fragment, flops in PEAK_BF16.items():
        if all(word in device_name for word in fragment.split()):
            return flops
    return None


def _gib(n: int | None) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n is not None else "n/a"


def _mfu(m: Measurement) -> str:
    return f"{100 * m.mfu:.1f} %" if m.mfu is not None else "n/a"


def _number(x: float) -> str:
    """Thousands separated from 100 up, 3 significant digits below (a CPU smoke run's small numbers)."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def results_table(runs: list[Measurement]) -> str:
    rows = [[f"{m.family} {m.model}", "on" if m.compile else "off", _number(m.audio_seconds_per_second),
             f"{m.step_seconds_median * 1000:.1f}", _number(m.training_flops_per_audio_second / 1e9),
             _number(m.achieved_flops_per_second / 1e12), _mfu(m), _gib(m.peak_memory_bytes), f"{m.loss:.3f}"]
            for m in runs]
    return C.table(["model", "compile", "audio-s/s per GPU", "step ms (median)", "GFLOP per audio-s",
                    "achieved TFLOP/s", "MFU", "peak memory", "loss (last timed step)"], rows)


def parts_table(m: Measurement) -> str:
    total = m.training_flops_per_step
    rows = [[p["name"], _number(p["forward"] / 1e9), _number(p["training"] / 1e9),
             f"{100 * p['training'] / total:.1f} %"] for p in m.parts]
    rows.append(["total", _number(sum(p["forward"] for p in m.parts) / 1e9), _number(total / 1e9), "100 %"])
    return C.table([f"{m.family} {m.model}: part", "forward GFLOP / step", "training GFLOP / step", "share"], rows)


def check_line(m: Measurement) -> str:
    c = m.flop_check
    if c is None:
        return ""
    return (f"- FLOP formula vs `FlopCounterMode` ({m.family} {m.model}, one more eager step, {c['layers_run']} "
            f"layers run, {c['masked_frames']} masked frames): formula {c['formula'] / 1e9:.3f} GFLOP, counted "
            f"{c['counted'] / 1e9:.3f} GFLOP ({100 * c['relative_difference']:+.2f} %).")


def gpu_description() -> str:
    import torch

    p = torch.cuda.get_device_properties(0)
    return (f"{p.name} (compute capability {p.major}.{p.minor}, {p.total_memory / 2 ** 30:.0f} GiB), CUDA "
            f"{torch.version.cuda}, {torch.cuda.device_count()} visible, 1 used")


def section_body(runs: list[Measurement], args: argparse.Namespace, command: str, info: dict[str, str],
                 gpu: str, setups: list[ModelSetup]) -> list[str]:
    base = [m for m in runs if m.family == "hubert" and m.model == "BASE"]
    verdict = ""
    if base:
        best = max(base, key=lambda m: m.audio_seconds_per_second)
        meets = best.audio_seconds_per_second >= TARGET_AUDIO_S_PER_S
        how = "compiled" if best.compile else "eager"
        verdict = (f"- Target (issue 12): HuBERT BASE >= {TARGET_AUDIO_S_PER_S:,.0f} audio-s/s on one H100: best "
                   f"{best.audio_seconds_per_second:,.0f} ({how}) on {best.device}: "
                   f"**{'meets' if meets else 'misses'}**.")
    first = runs[0]
    body = [
        "## bench_gpu_step: continued pre-training steps on one GPU (audio-s/s, MFU, peak memory)",
        "",
        *C.machine_lines(info, command, gpu=gpu),
        "- Models: " + "; ".join(f"{s.family} {s.label}: {s.description}" for s in setups)
        + (" (the shipped demo checkpoints, converted)." if args.smoke else " (random weights of the real configs; "
           "`cached`: a bundle kept in bench/_work/gpu_step by an earlier run)."),
        f"- Step: the LightningModule's real training step under a Lightning Trainer (1 device, `{first.precision}`, "
        "gradient clipping 10, AdamW fused on CUDA): masks, online targets (HuBERT), forward, loss, backward, "
        f"gradient division, AdamW. Batch: {first.crops} crops x {first.crop_seconds:g} s = "
        f"{first.audio_seconds_per_step:g} s of audio "
        f"per step, in memory (no data pipeline). {first.warmup} warm-up steps excluded, then {first.steps} timed "
        "steps (end-to-end interval between synchronised step ends); medians. Peak memory: "
        "`torch.cuda.max_memory_allocated()` over the timed steps.",
        "- MFU: training FLOPs per step (formula in the script's docstring: matrix products, convolutions and "
        "attention, 3x the student's forward, the teacher's forward once) / median step time / the device's peak "
        "dense bf16 FLOP/s ("
        + (f"{first.peak_flops_per_second / 1e12:.0f} TFLOP/s here{', from --peak-flops' if args.peak_flops else ''}"
           if first.peak_flops_per_second else "unknown here, or fp32: n/a") + ").",
        "",
        results_table(runs),
        "",
        *([verdict] if verdict else []),
        *[line for m in runs if (line := check_line(m))],
        "",
        "FLOPs per step by part (eager run of each model):",
        "",
    ]
    seen = set()
    for m in runs:
        if (m.family, m.model) not in seen:
            seen.add((m.family, m.model))
            body += [parts_table(m), ""]
    return body


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["base", "large", "both"], default="both",
                    help="which models (default both; --smoke: the tiny demo model of --family instead)")
    ap.add_argument("--family", choices=["hubert", "wav2vec2"], default="hubert")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps, not timed, >= 1 (default 5; --smoke 1)")
    ap.add_argument("--batch-seconds", type=float, default=None,
                    help="audio per batch; crops = batch-seconds // crop-seconds (default 125 = 8 x 15.625 s)")
    ap.add_argument("--crop-seconds", type=float, default=None,
                    help="crop length (default 15.625 s = fairseq's max_sample_size 250000; --smoke 2)")
    ap.add_argument("--compile", action="store_true", help="measure with torch.compile too (eager and compiled)")
    ap.add_argument("--precision", choices=["bf16-mixed", "32"], default=None,
                    help="default bf16-mixed (--smoke: 32)")
    ap.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of the device for MFU")
    ap.add_argument("--no-flop-check", dest="flop_check", action="store_false",
                    help="skip the extra FlopCounterMode step")
    ap.add_argument("--smoke", action="store_true", help="CPU check of the script: tiny model, 2 steps, fp32")
    ap.add_argument("--write", action="store_true", help="--smoke: write the section of bench/RESULTS.md anyway")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep bench/_work/gpu_step (the converted bundles)")
    args = ap.parse_args(argv)
    for name, value in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first timed step's start is the last warm-up step's end)")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.crop_seconds <= 0 or args.batch_seconds < args.crop_seconds:
        ap.error("--batch-seconds must hold at least one crop of --crop-seconds (> 0)")
    return args


def run(args: argparse.Namespace, command: str, work: Path) -> list[Measurement]:
    import torch

    cuda = not args.smoke
    info = C.machine_info() if cuda or args.write else None  # the load average at the start
    if args.smoke:
        setups = [smoke_setup(args.family, work)]
    else:
        setups = model_setups(args.family, ["base", "large"] if args.model == "both" else [args.model], work)
    crops = max(1, int(args.batch_seconds // args.crop_seconds))
    samples = int(round(args.crop_seconds * SAMPLE_RATE))
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_flops(device, args.precision, args.peak_flops)
    runs = []
    for setup in setups:
        for compiled in ([False, True] if args.compile else [False]):
            runs.append(measure(setup, compile=compiled, precision=args.precision, crops=crops, samples=samples,
                                warmup=args.warmup, steps=args.steps, cuda=cuda, peak=peak,
                                check_flops=args.flop_check and not compiled))
            if cuda:
                torch.cuda.empty_cache()
    print(results_table(runs))
    for m in runs:
        if m.flop_check:
            print(check_line(m))
    print()
    print(parts_table(runs[0]))
    if args.out is not None:
        result = {"command": command, "smoke": args.smoke, "device": device, "runs": [asdict(m) for m in runs]}
        args.out.write_text(json.dumps(result, indent=1))
    if info is not None:
        gpu = gpu_description() if cuda else "none (--smoke: CPU, tiny model)"
        C.publish(SECTION, section_body(runs, args, command, info, gpu, setups))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return 2
    command = shlex.join([".venv/bin/python", "bench/bench_gpu_step.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="bench_gpu_step_") as tmp:
            run(args, command, Path(tmp))
    else:
        work = C.WORK / "gpu_step"
        try:
            run(args, command, work)
        finally:
            C.remove_work(work, args.keep)
    C.log(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
