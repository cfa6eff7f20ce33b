"""Benchmark: one HuBERT BASE training step, fairseq-fixed against ours, on CPU; plus online-target overhead.

    .venv/bin/python bench/bench_train_step.py [--steps 7] [--keep] [--no-profile]

A random-weight fairseq HuBERT BASE (the real ``hubert_base_ls960`` config, all 12 layers, K = 500 label
dictionary) is built with fairseq (``tests/fairseq_reference.py``, seed 0), saved as a fairseq checkpoint and
converted with ``converters.convert.convert_checkpoint`` into a bundle (both cached in
``bench/_work/train_step``). One process, ``torch.set_num_threads(2)``, float32, the same batch for everything:
2 utterances x 4 s of 16 kHz noise (seeded, unpadded), 199 frames each, one time mask drawn with the checkpoint's
masking (``time_mask``, mask_prob 0.8, length 10, seeded), random targets in 0..499 (seeded).

* (a) fairseq-fixed: ``HubertModel`` (train mode) forward with the mask injected (``compute_mask_indices``
  patched to return it) + ``HubertCriterion(pred_masked_weight=1, pred_nomask_weight=0, loss_weights=[10])`` +
  ``loss.backward()`` (fairseq's trainer backwards the summed loss and divides the gradients later).
* (b) ours: ``bundle.get_pretrain_model()`` (train mode) + ``StepTotals.of_masks`` + ``hubert_forward(...,
  extra_label_embeddings=bundle.fairseq_extras()[...])`` + ``hubert_loss_terms`` +
  ``normalized_loss(mode="fairseq")`` + ``backward``.
* (c) online targets: ``OnlineTargets.from_bundle(bundle, KMeansModel(random 500 x 768, layer=9))`` (teacher =
  the same bundle's encoder cut at layer 9) on the same batch; ``forward`` runs under ``torch.inference_mode``.

Timing runs with the config's dropout (0.1 everywhere, attention 0.1, layer drop 0.05) in train mode; before
every step ``torch.manual_seed(i)`` and ``np.random.seed(i)`` (fairseq draws layer drop from numpy, torchaudio
from torch), the same ``i`` for (a) and (b) of round ``i``; the layers each step actually ran are counted and
listed. Gradients are set to None before each step (outside the timed region). One warm-up step each, then
``--steps`` rounds interleaved (a, b, c, a, b, c, ...); medians. Targets: (b) / (a) <= 0.8; (c) / (b) <= 0.30.

Equality is checked separately (same models, every dropout and layer drop set to 0, train mode): fairseq's
loss / sample_size against ours, and the global gradient norm (fairseq's gradients / sample_size).

Unless ``--no-profile``, one more step of each of (a) and (b) (layer drop 0, so both run 12 layers) runs under
``torch.profiler``: top operators by self CPU time, (b)'s next to (a)'s. Writes its section of ``bench/RESULTS.md``;
removes ``bench/_work/train_step`` at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

sys.path.insert(0, str(C.REPO))

SECTION = "bench_train_step"
NAME = "hubert_base_ls960"
SEED = 0
NUM_THREADS = 2
BATCH, SECONDS, SAMPLE_RATE, K = 2, 4.0, 16000, 500
TEACHER_LAYER = 9
REL = 1e-5
TARGET_RATIO = 0.8
TARGET_SHARE = 0.30


# ----------------------------------------------------------------------------------------------- setup


def _seed_all(seed: int) -> None:
    """Before each step: fairseq draws layer drop from numpy, torchaudio (and dropout) from torch."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)


def _grad_norm(params: Any, scale: float = 1.0) -> float:
    """Global L2 norm of the parameters' gradients, divided by ``scale`` (fairseq's sample size)."""
    grads = [p.grad for p in params if p.grad is not None]
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)) / scale


def _prepare(work: Path) -> tuple[Any, Any]:
    """(fairseq reference model, bundle): built, saved and converted once (cached in ``work``)."""
    return C.reference_and_bundle(NAME, work, SEED, num_clusters=K)


def _batch(bundle: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    from continue_pt.frames import conv_output_frames
    from continue_pt.masking import MaskingOptions, time_mask

    g = torch.Generator().manual_seed(SEED)
    samples = int(SECONDS * SAMPLE_RATE)
    wav = 0.1 * torch.randn(BATCH, samples, generator=g)  # task.normalize is False for BASE
    frames = conv_output_frames(bundle.config.encoder_args["extractor_conv_layer_config"], samples)
    masking = MaskingOptions.from_options(bundle.config.pretrain_args)
    mask = torch.from_numpy(time_mask((BATCH, frames), None, masking, rng=np.random.default_rng(SEED)))
    labels = torch.randint(0, K, (BATCH, frames), generator=g)
    rows = torch.tensor(bundle.config.label_dictionary["cluster_rows"])[labels]  # fairseq's targets: dict rows
    return {"wav": wav, "labels": labels, "rows": rows, "mask": mask, "frames": frames, "masking": masking,
            "padding": torch.zeros(BATCH, samples, dtype=torch.bool)}


@contextlib.contextmanager
def _dropout_off(*models: Any, layer_drop_only: bool = False) -> Iterator[None]:
    """Every dropout and layer drop at 0 (torchaudio and fairseq modules alike), put back afterwards; with
    ``layer_drop_only`` only the layer drop (so that both models run all 12 layers, dropout kept)."""
    from torch import nn

    saved: list[tuple[Any, str, Any]] = []

    def zero(obj: Any, attr: str) -> None:
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, 0.0)

    for model in models:
        for module in model.modules():
            for attr in ("layer_drop", "layerdrop"):
                if hasattr(module, attr):
                    zero(module, attr)
            if layer_drop_only:
                continue
            if isinstance(module, nn.Dropout) or type(module).__name__ == "FairseqDropout":
                zero(module, "p")
            if type(module).__name__ == "SelfAttention":  # torchaudio: attention dropout is a float
                zero(module, "dropout")
            if type(module).__name__ == "TransformerEncoder" and hasattr(module, "required_seq_len_multiple"):
                zero(module, "dropout")  # fairseq: F.dropout(x, p=self.dropout) before the layers
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


class _LayerCounter:
    """Counts the transformer layers that ran (layer drop skips some in train mode)."""

    def __init__(self, layers: Any):
        self.count = 0
        for layer in layers:
            layer.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


# ----------------------------------------------------------------------------------------------- the steps


class Steps:
    """The three measured operations on the shared batch, each returning its timings."""

    def __init__(self, ref: Any, bundle: Any, batch: dict[str, Any]):
        import torch
        from fairseq.criterions.hubert_criterion import HubertCriterion

        from bundles.kmeans import KMeansModel
        from continue_pt.hubert.loss import LossWeights
        from continue_pt.teacher import OnlineTargets

        self.torch = torch
        self.batch = batch
        # (a) fairseq
        self.fs_model = ref.model.train()
        self.criterion = HubertCriterion(None, pred_masked_weight=1.0, pred_nomask_weight=0.0, loss_weights=[10.0])
        self.sample = {"net_input": {"source": batch["wav"], "padding_mask": batch["padding"]},
                       "target_list": [batch["rows"]], "id": torch.arange(BATCH)}
        self.fs_layers = _LayerCounter(self.fs_model.encoder.layers)
        # (b) ours
        self.model = bundle.get_pretrain_model().train()
        self.extra = bundle.fairseq_extras()["label_embeddings_non_cluster"].clone().requires_grad_(True)
        self.logit_temp = bundle.config.objective["logit_temp"]
        self.weights = LossWeights(masked=1.0, unmasked=0.0, feature_penalty=10.0)
        self.our_layers = _LayerCounter(self.model.wav2vec2.encoder.transformer.layers)
        # (c) online targets
        g = torch.Generator().manual_seed(SEED + 1)
        kmeans = KMeansModel(torch.randn(K, bundle.config.encoder_args["encoder_embed_dim"], generator=g),
                             layer=TEACHER_LAYER)
        self.targets = OnlineTargets.from_bundle(bundle, kmeans)
        # extra keyword arguments of hubert_forward (none in the measured step)
        self.forward_kwargs: dict[str, Any] = {}

    def fairseq(self, seed: int) -> dict[str, Any]:
        mask = self.batch["mask"]
        given = lambda shape, *a, **k: mask.numpy()  # noqa: E731  (the injected time mask)
        self.fs_model.zero_grad(set_to_none=True)
        self.fs_layers.take()
        _seed_all(seed)
        with mock.patch("fairseq.models.hubert.hubert.compute_mask_indices", given):
            t0 = time.perf_counter()
            loss, size, _log = self.criterion(self.fs_model, self.sample)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
        return {"s": t2 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "loss": loss.item() / size, "layers": self.fs_layers.take(),
                "grad_norm": _grad_norm(self.fs_model.parameters(), size)}

    def ours(self, seed: int) -> dict[str, Any]:
        from continue_pt.hubert.loss import StepTotals, hubert_loss_terms, normalized_loss
        from continue_pt.hubert.objective import hubert_forward

        b = self.batch
        self.model.zero_grad(set_to_none=True)
        self.extra.grad = None
        self.our_layers.take()
        _seed_all(seed)
        t0 = time.perf_counter()
        totals = StepTotals.of_masks(b["mask"])
        out = hubert_forward(self.model, b["wav"], None, b["labels"], b["mask"], extra_label_embeddings=self.extra,
                             logit_temp=self.logit_temp, **self.forward_kwargs)
        terms = hubert_loss_terms(out)
        loss = normalized_loss(terms, totals, self.weights, mode="fairseq")
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        return {"s": t2 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "loss": loss.item(), "layers": self.our_layers.take(),
                "grad_norm": _grad_norm([*self.model.parameters(), self.extra])}

    def online(self, seed: int) -> dict[str, Any]:
        _seed_all(seed)
        t0 = time.perf_counter()
        labels = self.targets(self.batch["wav"], None)
        t1 = time.perf_counter()
        assert labels.shape == (BATCH, self.batch["frames"]) and labels.min() >= 0 and labels.max() < K
        return {"s": t1 - t0}


# ----------------------------------------------------------------------------------------------- profile


def _profile(fn: Callable[[], Any], rows: int) -> tuple[list[tuple[str, float, int]], float]:
    """(name, self CPU s, calls) of the top ``rows`` operators of one call of ``fn``, and the profiled total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in top], total


def _profile_table(steps: Steps, rows: int = 14) -> str:
    with _dropout_off(steps.fs_model, steps.model, layer_drop_only=True):  # all 12 layers in both
        ours, ours_total = _profile(lambda: steps.ours(10_000), rows)
        fs, fs_total = _profile(lambda: steps.fairseq(10_000), 10_000)  # every op, to look ours' up
    fs_by_name = {name: (s, n) for name, s, n in fs}
    body = []
    for name, s, n in ours:
        other = fs_by_name.get(name)
        body.append([f"`{name}`", f"{s:.3f}", str(n), f"{100 * s / ours_total:.1f} %",
                     f"{other[0]:.3f}" if other else "-", str(other[1]) if other else "-"])
    tbl = C.table(["operator (top by self CPU time in (b))", "(b) self s", "(b) calls", "(b) share",
                   "(a) self s", "(a) calls"], body)
    fs_top = C.table(["operator (top by self CPU time in (a))", "(a) self s", "(a) calls", "(a) share"],
                     [[f"`{name}`", f"{s:.3f}", str(n), f"{100 * s / fs_total:.1f} %"] for name, s, n in fs[:8]])
    return (f"One more step each under `torch.profiler` (config dropout, **layer drop 0**: both run all 12 "
            f"layers). Self CPU time summed over operators (profiling adds overhead): (b) {ours_total:.2f} s, "
            f"(a) {fs_total:.2f} s.\n\n{tbl}\n\n{fs_top}")


# ----------------------------------------------------------------------------------------------- main


def _fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.3f}" for x in xs)


def main() -> None:
    C.step_bench_main(__doc__, "bench_train_step.py", "train_step", run, "a, b, c")


def run(args: argparse.Namespace, command: str, work: Path) -> None:
    warnings.filterwarnings("ignore")
    info = C.machine_info()
    import torch

    torch.set_num_threads(NUM_THREADS)
    ref, bundle = _prepare(work)
    batch = _batch(bundle)
    steps = Steps(ref, bundle, batch)
    masked = int(batch["mask"].sum())
    C.log(f"batch: {BATCH} x {SECONDS:g} s, {batch['frames']} frames each, {masked} masked frames")

    # equality, dropout 0
    with _dropout_off(steps.fs_model, steps.model):
        eq_a, eq_b = steps.fairseq(123), steps.ours(123)
    loss_rel = abs(eq_b["loss"] - eq_a["loss"]) / abs(eq_a["loss"])
    grad_rel = abs(eq_b["grad_norm"] - eq_a["grad_norm"]) / abs(eq_a["grad_norm"])
    C.log(f"equality (dropout 0): loss fairseq {eq_a['loss']:.7f} ours {eq_b['loss']:.7f} rel {loss_rel:.2e}; "
          f"grad norm rel {grad_rel:.2e}")

    # warm-up, then interleaved rounds
    runs, loads = C.interleaved_rounds({"a": steps.fairseq, "b": steps.ours, "c": steps.online}, args.steps)

    def med(key: str, field: str = "s") -> float:
        return statistics.median(r[field] for r in runs[key])

    a, b, c = med("a"), med("b"), med("c")
    ratio, share = b / a, c / b
    pair_ratio = statistics.median(rb["s"] / ra["s"] for ra, rb in zip(runs["a"], runs["b"]))

    def verdict(value: float, target: float) -> str:
        return "meets" if value <= target else "**misses**"

    rows = []
    for key, label in (("a", "(a) fairseq-fixed `HubertModel` + `HubertCriterion` + backward"),
                       ("b", "(b) ours: `get_pretrain_model` + `hubert_forward` + loss + backward"),
                       ("c", "(c) `OnlineTargets` (teacher to layer 9 + k-means 500), inference mode")):
        rs = runs[key]
        rows.append([label, f"{med(key):.3f}", _fmt([r["s"] for r in rs]),
                     f"{med(key, 'fwd'):.3f}" if key != "c" else "", f"{med(key, 'bwd'):.3f}" if key != "c" else "",
                     ", ".join(str(r["layers"]) for r in rs) if key != "c" else ""])
    tbl = C.table(["measurement", "s / step (median)", "runs (s)", "forward s (median)", "backward s (median)",
                   "layers run per step"], rows)
    ratios = C.table(["ratio", "value", "target", "verdict"], [
        ["(b) / (a) step time", f"{ratio:.2f}×", f"≤ {TARGET_RATIO}×", verdict(ratio, TARGET_RATIO)],
        ["(c) / (b): online targets' share of our step", f"{100 * share:.1f} %", f"≤ {100 * TARGET_SHARE:.0f} %",
         verdict(share, TARGET_SHARE)],
        ["median over rounds of (b_i / a_i) (same-round pairs; robust to load drift)", f"{pair_ratio:.2f}×",
         "(context)", ""],
        ["(b) / (a) forward only", f"{med('b', 'fwd') / med('a', 'fwd'):.2f}×", "(context)", ""],
        ["(b) / (a) backward only", f"{med('b', 'bwd') / med('a', 'bwd'):.2f}×", "(context)", ""],
    ])
    equal = loss_rel <= REL and grad_rel <= REL
    layers_a = statistics.mean(r["layers"] for r in runs["a"])
    layers_b = statistics.mean(r["layers"] for r in runs["b"])
    fairness = ("(a) ran fewer layers on average, which favours (a)" if layers_a < layers_b else
                "(b) ran fewer layers on average, which favours (b)" if layers_b < layers_a else "equal on average")
    body = [
        "## bench_train_step: one HuBERT BASE training step, fairseq-fixed vs ours; online-target overhead",
        "",
        *C.machine_lines(info, command),
        f"- Torch threads set to {NUM_THREADS} in the process (`torch.set_num_threads`); float32; one process.",
        f"- Model: random-weight fairseq HuBERT BASE from the real `{NAME}` config (12 layers, 768-d, "
        f"feature_grad_mult 0.1, K = {K} + 4 special label rows), built with fairseq "
        "(`tests/fairseq_reference.py`, seed 0), saved as a checkpoint and converted to a bundle "
        "(`converters.convert.convert_checkpoint`); (b) and (c) load the bundle.",
        f"- Batch (the same for all): {BATCH} utterances × {SECONDS:g} s of 16 kHz noise (seeded, unpadded), "
        f"{batch['frames']} frames each; one time mask from the checkpoint's masking (`time_mask`, "
        f"mask_prob {batch['masking'].mask_prob}, length {batch['masking'].mask_length}, seeded): {masked} of "
        f"{BATCH * batch['frames']} frames masked; random targets in 0..{K - 1}. fairseq gets the mask injected "
        "(`compute_mask_indices` patched) and the dictionary rows of the targets.",
        "- (a): `HubertCriterion(pred_masked_weight=1, pred_nomask_weight=0, loss_weights=[10])(model, sample)` + "
        "`loss.backward()`. (b): `StepTotals.of_masks` + `hubert_forward(..., extra_label_embeddings=...)` + "
        "`hubert_loss_terms` + `normalized_loss(mode=\"fairseq\")` + `backward()`. (c): "
        f"`OnlineTargets.from_bundle(bundle, KMeansModel(random {K} × 768 centroids, layer={TEACHER_LAYER}))` on the "
        "same waveforms (its forward runs under `torch.inference_mode`).",
        "- Timing: train mode **with the config's dropout** (0.1, attention 0.1, input/feature dropout 0.1, layer "
        "drop 0.05); `torch.manual_seed(i)` + `np.random.seed(i)` before step i (the same i for (a) and (b) of a "
        "round; fairseq draws layer drop from numpy, torchaudio from torch, so they drop different layers: the "
        "layers each step ran are listed). Gradients set to None before each step, outside the timed region. "
        f"1 warm-up step each, then {args.steps} rounds interleaved (a, b, c); medians. Forward = up to the loss, "
        "backward = `loss.backward()`.",
        "",
        tbl,
        "",
        ratios,
        "",
        f"- 1-minute load average before each round: {', '.join(loads)} (this process alone is ~2). With 2 "
        "cores and 2 torch threads, any other busy process stalls the threads' barriers: rounds can take 3-4× "
        "longer than on an idle machine; compare within rounds.",
        f"- Layers run (layer drop): (a) {layers_a:.2f}, (b) {layers_b:.2f} on average over the timed steps: "
        f"{fairness}.",
        f"- Equality check (separate, **dropout and layer drop 0**, train mode, same models and batch): loss "
        f"fairseq (loss / sample_size) {eq_a['loss']:.7f}, ours {eq_b['loss']:.7f}: relative difference "
        f"{loss_rel:.2e}; global gradient norm (fairseq's gradients / sample_size) {eq_a['grad_norm']:.6e} vs "
        f"{eq_b['grad_norm']:.6e}: relative difference {grad_rel:.2e}. "
        f"{'Equal' if equal else '**NOT equal**'} within {REL:g}. Steps with dropout 0: (a) {eq_a['s']:.3f} s, "
        f"(b) {eq_b['s']:.3f} s (single runs, context).",
    ]
    if args.profile:
        C.log("profiling one step of (b) and (a) ...")
        body += ["", "### Where (b)'s time goes", "", _profile_table(steps)]
        if ratio <= TARGET_RATIO:
            body += ["", f"(b) meets its target ({ratio:.2f}× ≤ {TARGET_RATIO}×), so no change to "
                     "`continue_pt/hubert/objective.py` is measured here; the profile is context."]
    C.publish(SECTION, body)


if __name__ == "__main__":
    main()
