"""Benchmark: GPU memory of continued pre-training per model size, and the largest batch (audio-seconds per GPU)
that fits an 80 GB GPU under DDP, FSDP over 8 GPUs, and each with activation checkpointing.

    .venv/bin/python bench/bench_memory.py [--no-publish] [--out result.json]
    .venv/bin/python bench/bench_memory.py --smoke [--out result.json]

**Sizes.** HuBERT BASE / LARGE and wav2vec 2.0 BASE / LARGE are the committed converter configs of the random
models of ``bench/bench_gpu_step.py`` (``bench/gpu_step_configs``: the real fairseq configs of
``tests/fairseq_configs``). HuBERT X-Large and XLS-R 1B / 2B are those LARGE configs with the published shapes
(fairseq ``examples/hubert``, ``examples/wav2vec/xlsr``): 48 layers of width 1280 / FFN 5120 (X-Large, XLS-R 1B),
1920 / 7680 (XLS-R 2B), 16 heads, ``final_dim`` 1024. Parameters are counted on the meta device
(``bundles.factory.build_pretrain_model``: every head included).

**States** (bytes per GPU; P parameters, of which P_layer in one transformer layer and P_root outside them):

* DDP: fp32 weights 4P + fp32 gradients 4P + AdamW's two fp32 moments 8P = 16P. Under ``bf16-mixed`` (autocast,
  the default on A100/H100) the fp32 weights *are* the master copy: there is no separate one.
* FSDP over N GPUs (``--strategy fsdp``: one unit per layer, the rest one root unit): 16P / N for the shards, plus
  what is gathered whole: the root unit's weights and gradients for the whole step (8 P_root) and, while a layer
  runs, that layer's weights and gradient and the next one's prefetched weights (12 P_layer). continue-pt's FSDP
  gathers fp32 (autocast computes in bf16, as under DDP; ``continue_pt/sharding.py``).
* HuBERT's frozen teacher is the same in every process (FSDP leaves it whole): fp32, BASE cut at layer 9 (the
  target model of the published LARGE and X-Large) = 4 x its parameters; no gradient, no optimizer state, and its
  activations are freed layer by layer (inference mode).

**Activations** are measured on this CPU: the student's real training forward (``hubert_forward`` /
``wav2vec2_forward`` and the loss, masks drawn with the model's own masking, dropout on, attention dropout 0 as a
GPU's flash attention keeps no attention matrix, no layer drop: the batch must fit when every layer runs) of
random-weight BASE and LARGE models, counting the bytes of every tensor autograd saves for the backward
(``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters themselves excluded), split into those
saved inside transformer layers and the rest, under bf16 autocast on the CPU (what ``bf16-mixed`` keeps) and in
fp32. Two crop lengths (2 and 4 s) separate what grows with the audio from what does not (autocast's bf16 copies of
the weights that matrix products save): ``bytes = fixed + rate x audio seconds``, per part; a third (1 s) checks
that it is a line. wav2vec 2.0 adds a transient the hooks do not see: its contrastive logits compare every masked
frame of the micro-batch with every other (an fp32 ``[S, S]`` matrix, ``S`` masked frames, counted from the masks
drawn). Other sizes: a layer's rate scales with the width (FFN = 4 x width in every size), the rest's rate is the
line through BASE and LARGE of the same family in the width, the fixed part with the layers' parameters. With
activation checkpointing each layer keeps only its input (the fp32 residual stream, 4 bytes x width x 50 frames per
second) and one layer's activations exist at a time, recomputed in the backward.

**The largest batch**: ``(usable - states - fixed) / rate`` audio-seconds per GPU and micro-batch (for wav2vec 2.0
the root of the quadratic with the ``[S, S]`` term), with 77 GiB usable of an 80 GB GPU (3 GiB left for the CUDA
context, NCCL buffers and the allocator's fragmentation). Not counted: the optimizer step's temporaries (the fused
AdamW works in place), the backward's transient gradients of one layer's activations and the data loader's pinned
buffers.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

GIB = 1024 ** 3
USABLE_BYTES = 77 * GIB
"""Of an 80 GB GPU (see the module docstring)."""
FSDP_GPUS = 8
FRAMES_PER_SECOND = 50  # 16 kHz audio through the conv front end (stride 320)
CROPS = 2
CROP_SECONDS = (1.0, 2.0, 4.0)
SMOKE_CROP_SECONDS = (0.5, 1.0, 2.0)
"""The line is drawn through the two longer crops; the shortest checks that it is one (no attention matrix kept)."""
TEACHER_CONFIG, TEACHER_LAYER = "hubert_base_ls960", 9
CONFIG_DIR = C.BENCH / "gpu_step_configs"


@dataclass
class Size:
    label: str
    family: str
    config: str
    """A committed converter config in ``bench/gpu_step_configs``."""
    shape: dict[str, int] = field(default_factory=dict)
    """encoder_args overrides (width, layers, FFN, heads); empty: the config as it is."""
    final_dim: int | None = None
    measured: bool = False
    """Its activations are measured here (BASE, LARGE); the others are extrapolated."""


def _xl(width: int, ffn: int) -> dict[str, int]:
    return {"encoder_embed_dim": width, "encoder_num_layers": 48, "encoder_ff_interm_features": ffn,
            "encoder_num_heads": 16}


SIZES = [
    Size("HuBERT BASE", "hubert", "hubert_base_ls960", measured=True),
    Size("HuBERT LARGE", "hubert", "hubert_large_ll60k", measured=True),
    Size("HuBERT X-Large", "hubert", "hubert_large_ll60k", _xl(1280, 5120), 1024),
    Size("wav2vec 2.0 BASE", "wav2vec2", "wav2vec_small", measured=True),
    Size("wav2vec 2.0 LARGE / XLS-R 300M", "wav2vec2", "libri960_big", measured=True),
    Size("XLS-R 1B", "wav2vec2", "libri960_big", _xl(1280, 5120), 1024),
    Size("XLS-R 2B", "wav2vec2", "libri960_big", _xl(1920, 7680), 1024),
]


def bundle_config(size: Size, source: dict[str, Any] | None = None) -> Any:
    """The size's bundle config: the committed one (or ``source``) with its shape and ``final_dim`` set."""
    from bundles.config import BundleConfig

    path = CONFIG_DIR / f"{size.config}.json"
    data = copy.deepcopy(source if source is not None else json.loads(path.read_text()))
    data["encoder_args"].update(size.shape)
    if size.final_dim is not None:
        data["pretrain_args"]["final_dim"] = size.final_dim
        if size.family == "wav2vec2":
            data["pretrain_args"]["codevector_dim"] = size.final_dim
            data["pretrain_args"]["encoder_embed_dim"] = data["encoder_args"]["encoder_embed_dim"]
    return BundleConfig.from_dict(path, data)


@dataclass
class Counts:
    params: int
    layer_params: int
    """Of one transformer layer."""
    layers: int
    width: int

    @property
    def root_params(self) -> int:
        return self.params - self.layers * self.layer_params


def count(config: Any) -> Counts:
    """Parameters of the pre-training model of ``config``, on the meta device."""
    from bundles.factory import build_pretrain_model

    model = build_pretrain_model(config)
    layers = model.wav2vec2.encoder.transformer.layers
    return Counts(sum(p.numel() for p in model.parameters()), sum(p.numel() for p in layers[0].parameters()),
                  len(layers), int(config.encoder_args["encoder_embed_dim"]))


# ------------------------------------------------------------------------------------------------ activations


@dataclass
class Activations:
    """Saved-for-backward bytes: ``fixed + rate x seconds``, inside the transformer layers (all of them) and
    outside them."""

    layer_fixed: float
    layer_rate: float
    other_fixed: float
    other_rate: float
    masked_per_second: float = 0.0
    """Masked frames per audio-second (wav2vec 2.0: the contrastive logits' transient ``[S, S]`` matrix)."""
    line_error: float = 0.0
    """Relative error of the line at the shortest crop."""


def _materialized(config: Any) -> Any:
    import torch

    from bundles.factory import build_pretrain_model

    model = build_pretrain_model(config).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    for m in model.modules():  # a GPU's flash attention keeps no attention matrix; the CPU's math path would
        if hasattr(m, "dropout") and type(m).__name__ == "SelfAttention":
            m.dropout = 0.0
    # the batch must fit when no layer is dropped (layer drop would make the count a random draw)
    model.wav2vec2.encoder.transformer.layer_drop = 0.0
    return model.train()


def saved_bytes(config: Any, model: Any, seconds: float, bf16: bool) -> tuple[int, int, int]:
    """Bytes autograd saves in one training forward of ``CROPS`` crops of ``seconds``: (in layers, outside), and
    the masked frames."""
    import numpy as np
    import torch
    from torchaudio.models.wav2vec2.components import EncoderLayer

    from continue_pt.frames import conv_output_frames
    from continue_pt.masking import MaskingOptions, time_mask

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    totals = {"layer": 0, "other": 0}
    depth = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            totals["layer" if depth[0] else "other"] += t.untyped_storage().nbytes()
        return t

    handles = []
    for m in model.modules():
        if isinstance(m, EncoderLayer):
            handles.append(m.register_forward_pre_hook(lambda *a: depth.__setitem__(0, depth[0] + 1)))
            handles.append(m.register_forward_hook(lambda *a: depth.__setitem__(0, depth[0] - 1)))
    samples = int(16000 * seconds)
    g = torch.Generator().manual_seed(1)
    waveforms = torch.randn(CROPS, samples, generator=g)
    frames = conv_output_frames(config.encoder_args["extractor_conv_layer_config"], samples)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if config.family == "hubert":
                from continue_pt.hubert.loss import hubert_loss_terms, unnormalized_loss
                from continue_pt.hubert.objective import hubert_forward

                masking = MaskingOptions.from_options(config.pretrain_args)
                mask = torch.from_numpy(time_mask((CROPS, frames), None, masking, rng=rng))
                labels = torch.randint(0, int(config.pretrain_args["num_classes"]), (CROPS, frames), generator=g)
                out = hubert_forward(model, waveforms, None, labels, mask, unmasked_grad=False, check_labels=False)
                loss = unnormalized_loss(hubert_loss_terms(out))
            else:
                from continue_pt.wav2vec2.objective import unnormalized_loss, wav2vec2_forward, wav2vec2_loss_terms

                masking = MaskingOptions.from_options(config.objective or {})
                mask = torch.from_numpy(time_mask((CROPS, frames), None, masking, rng=rng))
                out = wav2vec2_forward(model, waveforms, None, mask, num_negatives=100,
                                       rng=torch.Generator().manual_seed(2))
                loss = unnormalized_loss(wav2vec2_loss_terms(out), (0.1, 10.0))
    finally:
        for h in handles:
            h.remove()
    del loss
    return totals["layer"], totals["other"], int(mask.sum())


def measure_activations(config: Any, crop_seconds: tuple[float, float, float], bf16: bool) -> Activations:
    """The line through two crop lengths, for the layers and the rest (see the module docstring)."""
    model = _materialized(config)
    (l0, o0, _), (l1, o1, _), (l2, o2, masked) = (saved_bytes(config, model, s, bf16) for s in crop_seconds)
    a0, a1, a2 = (CROPS * s for s in crop_seconds)
    layer_rate, other_rate = (l2 - l1) / (a2 - a1), (o2 - o1) / (a2 - a1)
    act = Activations(l1 - layer_rate * a1, layer_rate, o1 - other_rate * a1, other_rate, masked / a2)
    predicted = act.layer_fixed + act.other_fixed + (layer_rate + other_rate) * a0
    act.line_error = abs(predicted - (l0 + o0)) / (l0 + o0)
    return act


def extrapolated(base: tuple[Counts, Activations], large: tuple[Counts, Activations], counts: Counts
                 ) -> Activations:
    """A size's activations from the measured BASE and LARGE of its family (see the module docstring)."""
    (cb, ab), (cl, al) = base, large
    per_layer_rate = al.layer_rate / cl.layers * counts.width / cl.width
    slope = (al.other_rate - ab.other_rate) / (cl.width - cb.width)
    other_rate = al.other_rate + slope * (counts.width - cl.width)
    fixed_per_param = al.layer_fixed / (cl.layers * cl.layer_params)
    return Activations(fixed_per_param * counts.layers * counts.layer_params, per_layer_rate * counts.layers,
                       al.other_fixed * counts.root_params / cl.root_params, other_rate, al.masked_per_second)


# ------------------------------------------------------------------------------------------------ the table


@dataclass
class Row:
    label: str
    params: int
    states_ddp: float
    states_fsdp: float
    teacher: float
    act_rate: float
    act_rate_ac: float
    act_fixed: float
    act_fixed_ac: float
    max_seconds: dict[str, float]


def largest_batch(budget: float, rate: float, pairwise: float) -> float:
    """The largest ``S`` with ``rate S + pairwise S^2 <= budget`` (0 when nothing fits)."""
    if budget <= 0:
        return 0.0
    if pairwise <= 0:
        return budget / rate
    return (-rate + (rate * rate + 4 * pairwise * budget) ** 0.5) / (2 * pairwise)


def memory_row(label: str, counts: Counts, act: Activations, teacher_bytes: float, contrastive: bool = False
               ) -> Row:
    """``contrastive``: wav2vec 2.0's logits compare every masked frame of a micro-batch with every other, a
    transient fp32 ``[S, S]`` matrix at the end of the forward: ``4 (masked per second x seconds)^2`` bytes."""
    p = counts.params
    states_ddp = 16.0 * p
    states_fsdp = 16.0 * p / FSDP_GPUS + 8.0 * counts.root_params + 12.0 * counts.layer_params
    per_layer_rate = act.layer_rate / counts.layers
    checkpointed_input = 4.0 * counts.width * FRAMES_PER_SECOND
    rate = act.layer_rate + act.other_rate
    rate_ac = act.other_rate + counts.layers * checkpointed_input + per_layer_rate
    fixed = act.layer_fixed + act.other_fixed
    fixed_ac = act.other_fixed + act.layer_fixed / counts.layers  # one layer's weight copies at a time
    fits = {}
    for name, states, r, f in (("DDP", states_ddp, rate, fixed), ("DDP + AC", states_ddp, rate_ac, fixed_ac),
                               (f"FSDP x{FSDP_GPUS}", states_fsdp, rate, fixed),
                               (f"FSDP x{FSDP_GPUS} + AC", states_fsdp, rate_ac, fixed_ac)):
        pairwise = 4.0 * act.masked_per_second ** 2 if contrastive else 0.0
        fits[name] = largest_batch(USABLE_BYTES - states - teacher_bytes - f, r, pairwise)
    return Row(label, p, states_ddp, states_fsdp, teacher_bytes, rate, rate_ac, fixed, fixed_ac, fits)


def compute(smoke: bool) -> tuple[list[Row], dict[str, Any]]:
    """Every size's row, and what was measured."""
    crop = SMOKE_CROP_SECONDS if smoke else CROP_SECONDS
    sources = _smoke_sources() if smoke else {}
    counted = {s.label: count(bundle_config(s, sources.get(s.label))) for s in SIZES}
    measured: dict[tuple[str, str], tuple[Counts, Activations]] = {}
    fp32: dict[str, Activations] = {}
    for size in SIZES:
        if size.measured:
            config = bundle_config(size, sources.get(size.label))
            t0 = time.perf_counter()
            act = measure_activations(config, crop, bf16=True)
            if not smoke:  # the fp32 rates are for the record only
                fp32[size.label] = measure_activations(config, crop, bf16=False)
            C.log(f"{size.label}: activations measured in {time.perf_counter() - t0:.1f} s")
            measured[(size.family, "large" if "LARGE" in size.label else "base")] = (counted[size.label], act)
    teacher = count(bundle_config(Size("teacher", "hubert", TEACHER_CONFIG), sources.get("teacher")))
    teacher_bytes = 4.0 * (teacher.root_params + TEACHER_LAYER * teacher.layer_params)
    rows = []
    for size in SIZES:
        counts = counted[size.label]
        base, large = measured[(size.family, "base")], measured[(size.family, "large")]
        if size.measured:
            act = (large if "LARGE" in size.label else base)[1]
        else:
            act = extrapolated(base, large, counts)
        rows.append(memory_row(size.label, counts, act, teacher_bytes if size.family == "hubert" else 0.0,
                               contrastive=size.family == "wav2vec2"))
    details = {"crop_seconds": list(crop), "crops": CROPS,
               "fp32_rate_bytes_per_second": {k: v.layer_rate + v.other_rate for k, v in fp32.items()},
               "line_error_at_shortest_crop": max(a.line_error for _, a in measured.values()),
               "measured": {f"{f}/{s}": vars(a) for (f, s), (_, a) in measured.items()},
               "layer_rate_ratio_base_to_large": {
                   f: (measured[(f, "base")][1].layer_rate / measured[(f, "base")][0].layers)
                   / (measured[(f, "large")][1].layer_rate / measured[(f, "large")][0].layers)
                   for f in ("hubert", "wav2vec2")},
               "widths_base_large": {f: [measured[(f, k)][0].width for k in ("base", "large")]
                                     for f in ("hubert", "wav2vec2")}}
    return rows, details


def _smoke_sources() -> dict[str, dict[str, Any]]:
    """The tiny demo models' configs in place of every size's (by label): the same code path in seconds."""
    import tempfile

    from continue_pt.demo import CHECKPOINT, WAV2VEC2_CHECKPOINT
    from converters.convert import convert_checkpoint

    configs = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_smoke_") as tmp:
        for family, checkpoint in (("hubert", CHECKPOINT), ("wav2vec2", WAV2VEC2_CHECKPOINT)):
            convert_checkpoint(checkpoint, Path(tmp) / family)
            configs[family] = json.loads((Path(tmp) / family / "config.json").read_text())
    tiny = {}
    for size in SIZES + [Size("teacher", "hubert", TEACHER_CONFIG)]:
        data = copy.deepcopy(configs[size.family])
        if size.shape:  # keep the tiny width; the extrapolated sizes get twice its layers
            data["encoder_args"]["encoder_num_layers"] = 2 * int(data["encoder_args"]["encoder_num_layers"])
        elif "large" in size.config or "big" in size.config:
            data["encoder_args"]["encoder_embed_dim"] = 2 * int(data["encoder_args"]["encoder_embed_dim"])
            data["encoder_args"]["encoder_ff_interm_features"] = 2 * int(
                data["encoder_args"]["encoder_ff_interm_features"])
            if size.family == "wav2vec2":
                data["pretrain_args"]["encoder_embed_dim"] = data["encoder_args"]["encoder_embed_dim"]
        tiny[size.label] = data
    for size in SIZES:
        if size.shape:  # the tiny shapes stand in for X-Large / XLS-R 1B / 2B
            size.shape = {}
            size.final_dim = None
    return tiny


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def render(rows: list[Row], details: dict[str, Any], smoke: bool) -> list[str]:
    headers = ["model", "params", "DDP states GB", f"FSDP x{FSDP_GPUS} states GB", "teacher GB",
               "act. GB / audio-s", "act. + AC GB / audio-s", "fixed act. GB (AC)"] + \
              [f"max s: {k}" for k in rows[0].max_seconds]
    body = [[r.label, f"{r.params / 1e6:,.0f}M", _gb(r.states_ddp), _gb(r.states_fsdp), _gb(r.teacher),
             f"{r.act_rate / 1e9:.3f}", f"{r.act_rate_ac / 1e9:.3f}", f"{_gb(r.act_fixed)} ({_gb(r.act_fixed_ac)})",
             *(f"{v:,.0f}" for v in r.max_seconds.values())] for r in rows]
    ratio = details["layer_rate_ratio_base_to_large"]
    widths = details["widths_base_large"]["hubert"]
    lines = ["## bench_memory: GPU memory per model size; the largest batch on an 80 GB GPU (issue 12, item 2)", "",
             *C.machine_lines(C.machine_info(), "bench/bench_memory.py" + (" --smoke" if smoke else "")), "",
             C.table(headers, body), "",
             f"States: fp32 weights + fp32 gradients + AdamW's 2 fp32 moments = 16 bytes per parameter under DDP "
             f"(bf16-mixed is autocast over the fp32 weights: no other master copy); FSDP over {FSDP_GPUS}: a "
             f"{FSDP_GPUS}th of that plus the root unit (everything outside the layers) whole and 1.5 layers' "
             "fp32 weights and gradients gathered. HuBERT rows add the frozen fp32 teacher (BASE cut at layer "
             f"{TEACHER_LAYER}) in every process. Activations (bf16-mixed, saved for the backward, measured on "
             f"this CPU under bf16 autocast for BASE and LARGE at {details['crops']} crops of "
             f"{' and '.join(f'{s:g}' for s in details['crop_seconds'][1:])} s, extrapolated in width for the others): "
             "per audio-second of a micro-batch, plus a fixed part (autocast's bf16 copies of the weights that "
             "matrix products keep; with AC only one layer's). 'max s' = the largest micro-batch in "
             "audio-seconds per GPU for 77 GiB usable: `--max-batch-seconds` (0: the states alone do not fit); "
             "for wav2vec 2.0 with the contrastive logits' transient [S, S] fp32 matrix of the S masked frames.",
             "",
             f"The width scaling: a BASE layer's activation rate over a LARGE layer's is {ratio['hubert']:.3f} "
             f"(HuBERT) and {ratio['wav2vec2']:.3f} (wav2vec 2.0), their widths' ratio {widths[0]}/{widths[1]} = "
             f"{widths[0] / widths[1]:.3f}: not one rate per width across configs (BASE keeps dropout masks in "
             "more places, and BASE is post-norm, LARGE pre-norm), so the larger sizes are extrapolated from "
             "LARGE, whose configs they share. The line through the "
             f"{' and '.join(f'{s:g}' for s in details['crop_seconds'][1:])} s crops misses the "
             f"{details['crop_seconds'][0]:g} s crop by {100 * details['line_error_at_shortest_crop']:.2f} % at most "
             "(no attention matrix is kept). "
             "fp32 (32-true) rates, GB per audio-second: "
             + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in details["fp32_rate_bytes_per_second"].items()) + "."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny demo models (meaningless numbers), not published")
    parser.add_argument("--no-publish", action="store_true", help="print the section, do not write RESULTS.md")
    parser.add_argument("--out", type=Path, help="write the rows and measurements as JSON")
    args = parser.parse_args()
    rows, details = compute(args.smoke)
    lines = render(rows, details, args.smoke)
    if args.out is not None:
        args.out.write_text(json.dumps({"rows": [vars(r) for r in rows], "details": details}, indent=1))
    C.publish_or_print("bench_memory", lines, not (args.smoke or args.no_publish))


if __name__ == "__main__":
    main()
