"""Benchmark: one wav2vec 2.0 BASE training step, fairseq-fixed against ours, on CPU.

    .venv/bin/python bench/bench_w2v_train_step.py [--steps 7] [--keep] [--no-profile]

A random-weight fairseq wav2vec 2.0 BASE (the real ``wav2vec_small`` config, all 12 layers) is built with fairseq
(``tests/fairseq_reference.py``, seed 0), saved as a fairseq checkpoint and converted with
``converters.convert.convert_checkpoint`` into a bundle (both cached in ``bench/_work/w2v_train_step``). One
process, ``torch.set_num_threads(2)``, float32, the same batch for both: 2 utterances x 4 s of 16 kHz noise
(seeded, unpadded), 199 frames each, one time mask drawn with the checkpoint's masking (``time_mask`` with
``MaskingOptions.from_options(bundle.config.objective)``: mask_prob 0.65, length 10, seeded; the same number of
masked frames in each utterance, which fairseq needs).

* (a) fairseq-fixed: ``Wav2Vec2Model`` (train mode) forward with the mask injected (``compute_mask_indices``
  patched to return it) + ``Wav2vecCriterion(infonce=True, loss_weights=[0.1, 10])`` + ``loss.backward()``
  (fairseq's trainer backwards the summed loss and divides the gradients later).
* (b) ours: ``bundle.get_pretrain_model()`` (train mode) + ``wav2vec2_forward(..., feature_grad_mult=0.1,
  dropout_features=0.1, rng=torch.Generator().manual_seed(i))`` + ``wav2vec2_loss_terms`` +
  ``normalized_wav2vec2_loss(terms, terms.num_masked, (0.1, 10))`` + ``backward``: what
  ``continue_pt/wav2vec2/module.py`` runs per micro-batch.

Timing runs with the config's dropout (0.1, attention 0.1, dropout_input / dropout_features 0.1, layer drop 0.05)
in train mode; before every step ``torch.manual_seed(i)`` and ``np.random.seed(i)`` (fairseq draws layer drop
from numpy, torchaudio from torch), the same ``i`` for (a) and (b) of round ``i``; each draws its own negatives
and Gumbel noise (fairseq from torch's global RNG, ours from a generator seeded by ``i`` and the global RNG); the
layers each step actually ran are counted and listed. Gradients are set to None before each step (outside the
timed region). One warm-up step each, then ``--steps`` rounds interleaved (a, b, a', b', a, b, ...); medians.
Target: (b) / (a) <= 0.8. (a') and (b') are context: the quantizer + ``project_q`` alone, forward + backward, on
the same seeded features (the part of the step where fairseq and ours compute differently; ours picks the
codevectors with a batched matrix product, fairseq with a ``[frames, 640, 128]`` elementwise product + sum).

Equality is checked separately (same models, every dropout and layer drop set to 0, train mode, the same Gumbel
noise: ``F.gumbel_softmax`` patched for fairseq, ``gumbel_noise=`` for ours; the same negatives: fairseq's own
``sample_negatives`` from a fixed seed, its indices passed to ours as ``negative_indices=``): fairseq's
loss / sample_size against ours, and the global gradient norm (fairseq's gradients / sample_size).

Unless ``--no-profile``, one more step of each of (a) and (b) (layer drop 0, so both run 12 layers) runs under
``torch.profiler``: top operators by self CPU time, (b)'s next to (a)'s (``bench_train_step``'s table).
Writes its section of ``bench/RESULTS.md``; removes ``bench/_work/w2v_train_step`` at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_train_step import (  # noqa: E402
    _dropout_off,
    _fmt,
    _grad_norm,
    _LayerCounter,
    _profile_table,
    _seed_all,
)

sys.path.insert(0, str(C.REPO))

SECTION = "bench_w2v_train_step"
NAME = "wav2vec_small"
SEED = 0
NUM_THREADS = 2
BATCH, SECONDS, SAMPLE_RATE = 2, 4.0, 16000
LOSS_WEIGHTS = (0.1, 10.0)  # wav2vec_small's criterion.loss_weights
LOG_KEYS = ["prob_perplexity", "code_perplexity", "temp"]
EQUALITY_SEED = 123
REL = 1e-5
TARGET_RATIO = 0.8


# ----------------------------------------------------------------------------------------------- setup


def _prepare(work: Path) -> tuple[Any, Any]:
    """(fairseq reference model, bundle): built, saved and converted once (cached in ``work``)."""
    return C.reference_and_bundle(NAME, work, SEED)


def _batch(bundle: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    from continue_pt.frames import conv_output_frames
    from continue_pt.masking import MaskingOptions, time_mask

    g = torch.Generator().manual_seed(SEED)
    samples = int(SECONDS * SAMPLE_RATE)
    wav = 0.1 * torch.randn(BATCH, samples, generator=g)  # task.normalize is False for BASE
    frames = conv_output_frames(bundle.config.encoder_args["extractor_conv_layer_config"], samples)
    masking = MaskingOptions.from_options(bundle.config.objective)
    mask = torch.from_numpy(time_mask((BATCH, frames), None, masking, rng=np.random.default_rng(SEED)))
    counts = mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise RuntimeError(f"fairseq needs the same masked count in every utterance, got {counts.tolist()}")
    # Gumbel noise for the equality check: [masked frames * groups, latent_vars], batch-major as both order it
    pretrain = bundle.config.pretrain_args
    groups, num_vars = pretrain["latent_groups"], pretrain["latent_vars"]
    noise = -torch.empty(int(counts.sum()) * groups, num_vars).exponential_(generator=g).log()
    return {"wav": wav, "mask": mask, "frames": frames, "masking": masking, "noise": noise,
            "padding": torch.zeros(BATCH, samples, dtype=torch.bool)}


def _other_busy_processes(interval: float = 2.0, threshold: float = 5.0) -> str:
    """Other processes that used more than ``threshold`` % of one core over ``interval`` seconds (from /proc)."""
    def ticks() -> dict[int, tuple[str, int]]:
        out = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            out[int(d.name)] = (name, int(rest[11]) + int(rest[12]))  # utime + stime
        return out

    before = ticks()
    time.sleep(interval)
    after = ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (name, t) in after.items():
        pct = 100 * (t - before.get(pid, (name, t))[1]) / hz / interval
        if pct > threshold:
            busy.append(f"{name} (pid {pid}) {pct:.0f} %")
    return ", ".join(busy) if busy else f"none (no other process above {threshold:g} % of a core over {interval:g} s)"


# ----------------------------------------------------------------------------------------------- the steps


class Steps:
    """The two measured operations on the shared batch, each returning its timings.

    ``fs_model``, ``model``, ``fairseq`` and ``ours`` are the names ``bench_train_step._profile_table`` uses."""

    def __init__(self, ref: Any, bundle: Any, batch: dict[str, Any]):
        import torch
        from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion

        self.torch = torch
        self.batch = batch
        objective = bundle.config.objective
        self.objective = objective
        # (a) fairseq
        self.fs_model = ref.model.train()
        self.fs_model.set_num_updates(0)
        self.criterion = Wav2vecCriterion(None, infonce=True, loss_weights=list(LOSS_WEIGHTS),
                                          log_keys=list(LOG_KEYS)).train()
        self.sample = {"net_input": {"source": batch["wav"], "padding_mask": batch["padding"]},
                       "id": torch.arange(BATCH)}
        self.fs_layers = _LayerCounter(self.fs_model.encoder.layers)
        # (b) ours
        self.model = bundle.get_pretrain_model().train()
        self.model.quantizer.set_num_updates(0)
        self.forward_kwargs = dict(
            num_negatives=int(objective["num_negatives"]),
            cross_sample_negatives=int(objective.get("cross_sample_negatives", 0)),
            logit_temp=float(objective["logit_temp"]), feature_grad_mult=float(objective["feature_grad_mult"]),
            dropout_features=float(objective["dropout_features"]))
        self.our_layers = _LayerCounter(self.model.wav2vec2.encoder.transformer.layers)
        # the quantizer heads alone: [batch, masked frames per utterance, conv channels], seeded
        masked_per_row = int(batch["mask"].sum()) // BATCH
        channels = self.model.quantizer.weight_proj.in_features
        self.head_input = torch.randn(BATCH, masked_per_row, channels, generator=torch.Generator().manual_seed(SEED))
        # the equality check fixes the Gumbel noise and fairseq's negatives (set by ``fixed_draws``)
        self.fixed = False
        self.negatives: list[Any] = []

    def fairseq(self, seed: int) -> dict[str, Any]:
        import torch.nn.functional as F
        from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Model

        from tests.fairseq_reference import _gumbel_softmax_with

        mask = self.batch["mask"]
        given = lambda shape, *a, **k: mask.numpy()  # noqa: E731  (the injected time mask)
        patches = [mock.patch("fairseq.models.wav2vec.wav2vec2.compute_mask_indices", given)]
        if self.fixed:  # equality check: the given noise; fairseq's own negatives from a fixed seed, captured
            original = Wav2Vec2Model.sample_negatives
            captured = self.negatives

            def seeded(model: Any, y: Any, num: int, padding_count: Any = None) -> Any:
                self.torch.manual_seed(seed)
                negs, idx = original(model, y, num, padding_count)
                captured.append(idx.reshape(-1, idx.shape[-1] // num))
                return negs, idx

            patches += [mock.patch.object(Wav2Vec2Model, "sample_negatives", seeded),
                        mock.patch.object(F, "gumbel_softmax", _gumbel_softmax_with(self.batch["noise"]))]
        self.fs_model.zero_grad(set_to_none=True)
        self.fs_layers.take()
        _seed_all(seed)
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            t0 = time.perf_counter()
            loss, size, _log = self.criterion(self.fs_model, self.sample)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
        return {"s": t2 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "loss": loss.item() / size, "size": int(size),
                "layers": self.fs_layers.take(), "grad_norm": _grad_norm(self.fs_model.parameters(), size)}

    def ours(self, seed: int) -> dict[str, Any]:
        from continue_pt.wav2vec2.objective import normalized_wav2vec2_loss, wav2vec2_forward, wav2vec2_loss_terms

        b = self.batch
        extra: dict[str, Any] = {}
        if self.fixed:
            extra = {"gumbel_noise": b["noise"], "negative_indices": self.negatives[-1]}
        self.model.zero_grad(set_to_none=True)
        self.our_layers.take()
        _seed_all(seed)
        t0 = time.perf_counter()
        out = wav2vec2_forward(self.model, b["wav"], None, b["mask"], rng=self.torch.Generator().manual_seed(seed),
                               **self.forward_kwargs, **extra)
        terms = wav2vec2_loss_terms(out)
        loss = normalized_wav2vec2_loss(terms, terms.num_masked, LOSS_WEIGHTS)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        return {"s": t2 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "loss": loss.item(), "size": terms.num_masked,
                "layers": self.our_layers.take(), "grad_norm": _grad_norm(self.model.parameters())}

    def _head(self, quantizer: Any, project_q: Any, seed: int, ours: bool) -> dict[str, Any]:
        """Quantizer + ``project_q`` alone, forward + backward, on the batch's shared quantizer input."""
        feats = self.head_input.detach().requires_grad_(True)
        quantizer.zero_grad(set_to_none=True)
        project_q.zero_grad(set_to_none=True)
        _seed_all(seed)
        t0 = time.perf_counter()
        if ours:
            q = quantizer(feats)
            x, ppl = q.x, q.prob_perplexity
        else:
            q = quantizer(feats, produce_targets=False)
            x, ppl = q["x"], q["prob_perplexity"]
        (project_q(x).square().mean() - ppl).backward()
        return {"s": time.perf_counter() - t0}

    def fairseq_head(self, seed: int) -> dict[str, Any]:
        return self._head(self.fs_model.quantizer, self.fs_model.project_q, seed, ours=False)

    def ours_head(self, seed: int) -> dict[str, Any]:
        return self._head(self.model.quantizer, self.model.project_q, seed, ours=True)

    def equality(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(a) then (b) with every dropout and layer drop 0, the same Gumbel noise and the same negatives."""
        self.fixed, self.negatives = True, []
        saved = self.forward_kwargs["dropout_features"]
        self.forward_kwargs["dropout_features"] = 0.0
        try:
            with _dropout_off(self.fs_model, self.model):
                return self.fairseq(EQUALITY_SEED), self.ours(EQUALITY_SEED)
        finally:
            self.fixed = False
            self.forward_kwargs["dropout_features"] = saved


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    C.step_bench_main(__doc__, "bench_w2v_train_step.py", "w2v_train_step", run, "a, b")


def run(args: argparse.Namespace, command: str, work: Path) -> None:
    warnings.filterwarnings("ignore")
    info = C.machine_info()
    busy_start = _other_busy_processes()
    C.log(f"other busy processes at start: {busy_start}")
    import torch

    torch.set_num_threads(NUM_THREADS)
    ref, bundle = _prepare(work)
    batch = _batch(bundle)
    steps = Steps(ref, bundle, batch)
    masked = int(batch["mask"].sum())
    objective = bundle.config.objective
    C.log(f"batch: {BATCH} x {SECONDS:g} s, {batch['frames']} frames each, {masked} masked frames")

    # equality, dropout 0, same noise and negatives
    eq_a, eq_b = steps.equality()
    loss_rel = abs(eq_b["loss"] - eq_a["loss"]) / abs(eq_a["loss"])
    grad_rel = abs(eq_b["grad_norm"] - eq_a["grad_norm"]) / abs(eq_a["grad_norm"])
    C.log(f"equality (dropout 0): loss fairseq {eq_a['loss']:.7f} ours {eq_b['loss']:.7f} rel {loss_rel:.2e}; "
          f"grad norm {eq_a['grad_norm']:.6e} vs {eq_b['grad_norm']:.6e} rel {grad_rel:.2e}; "
          f"sample size {eq_a['size']} vs {eq_b['size']}")

    # warm-up, then interleaved rounds
    runs, loads = C.interleaved_rounds(
        {"a": steps.fairseq, "b": steps.ours, "qa": steps.fairseq_head, "qb": steps.ours_head}, args.steps)

    def med(key: str, field: str = "s") -> float:
        return statistics.median(r[field] for r in runs[key])

    busy_end = _other_busy_processes()
    C.log(f"other busy processes after the timed rounds: {busy_end}")
    a, b = med("a"), med("b")
    ratio = b / a
    head_a, head_b = med("qa"), med("qb")
    pair_ratio = statistics.median(rb["s"] / ra["s"] for ra, rb in zip(runs["a"], runs["b"]))
    verdict = "meets" if ratio <= TARGET_RATIO else "**misses**"

    rows = []
    for key, label in (("a", "(a) fairseq-fixed `Wav2Vec2Model` + `Wav2vecCriterion` + backward"),
                       ("b", "(b) ours: `get_pretrain_model` + `wav2vec2_forward` + loss + backward")):
        rs = runs[key]
        rows.append([label, f"{med(key):.3f}", _fmt([r["s"] for r in rs]), f"{med(key, 'fwd'):.3f}",
                     f"{med(key, 'bwd'):.3f}", ", ".join(str(r["layers"]) for r in rs)])
    for key, label in (("qa", "(a′) part of (a): fairseq `GumbelVectorQuantizer` + `project_q` alone"),
                       ("qb", "(b′) part of (b): our `GumbelVectorQuantizer` + `project_q` alone")):
        rows.append([label, f"{med(key):.3f}", _fmt([r["s"] for r in runs[key]]), "", "", ""])
    tbl = C.table(["measurement", "s / step (median)", "runs (s)", "forward s (median)", "backward s (median)",
                   "layers run per step"], rows)
    ratios = C.table(["ratio", "value", "target", "verdict"], [
        ["(b) / (a) step time", f"{ratio:.2f}×", f"≤ {TARGET_RATIO}×", verdict],
        ["median over rounds of (b_i / a_i) (same-round pairs; robust to load drift)", f"{pair_ratio:.2f}×",
         "(context)", ""],
        ["(b) / (a) forward only", f"{med('b', 'fwd') / med('a', 'fwd'):.2f}×", "(context)", ""],
        ["(b) / (a) backward only", f"{med('b', 'bwd') / med('a', 'bwd'):.2f}×", "(context)", ""],
        ["(a′) / (a): fairseq's quantizer head's share of its step", f"{100 * head_a / a:.1f} %", "(context)", ""],
        ["(b′) / (b): our quantizer head's share of our step", f"{100 * head_b / b:.1f} %", "(context)", ""],
    ])
    equal = loss_rel <= REL and grad_rel <= REL and eq_a["size"] == eq_b["size"]
    layers_a = statistics.mean(r["layers"] for r in runs["a"])
    layers_b = statistics.mean(r["layers"] for r in runs["b"])
    fairness = ("(a) ran fewer layers on average, which favours (a)" if layers_a < layers_b else
                "(b) ran fewer layers on average, which favours (b)" if layers_b < layers_a else "equal on average")
    m = batch["masking"]
    body = [
        "## bench_w2v_train_step: one wav2vec 2.0 BASE training step, fairseq-fixed vs ours",
        "",
        *C.machine_lines(info, command),
        f"- Torch threads set to {NUM_THREADS} in the process (`torch.set_num_threads`); float32; one process.",
        f"- Model: random-weight fairseq wav2vec 2.0 BASE from the real `{NAME}` config (12 layers, 768-d, "
        f"feature_grad_mult {objective['feature_grad_mult']:g}, quantizer {bundle.config.pretrain_args['latent_groups']}"
        f" × {bundle.config.pretrain_args['latent_vars']} codes, {objective['num_negatives']} negatives, logit_temp "
        f"{objective['logit_temp']:g}), built with fairseq (`tests/fairseq_reference.py`, seed 0), saved as a "
        "checkpoint and converted to a bundle (`converters.convert.convert_checkpoint`); (b) loads the bundle.",
        f"- Batch (the same for both): {BATCH} utterances × {SECONDS:g} s of 16 kHz noise (seeded, unpadded), "
        f"{batch['frames']} frames each; one time mask from the checkpoint's masking (`time_mask` with "
        f"`MaskingOptions.from_options(bundle.config.objective)`: mask_prob {m.mask_prob}, length {m.mask_length}, "
        f"seeded): {masked} of {BATCH * batch['frames']} frames masked, the same count in each utterance (fairseq "
        "needs it). fairseq gets the mask injected (`compute_mask_indices` patched).",
        "- (a): `Wav2vecCriterion(infonce=True, loss_weights=[0.1, 10], log_keys=[prob_perplexity, "
        "code_perplexity, temp])(model, sample)` + `loss.backward()`. (b): `wav2vec2_forward(model, wav, None, "
        "mask, num_negatives, logit_temp, feature_grad_mult, dropout_features, rng=Generator(i))` + "
        "`wav2vec2_loss_terms` + `normalized_wav2vec2_loss(terms, terms.num_masked, (0.1, 10))` + `backward()` "
        "(what `continue_pt/wav2vec2/module.py` runs per micro-batch).",
        f"- (a′), (b′) (context; timed in every round after (a) and (b)): the quantizer head alone, forward + "
        "backward of `mean(project_q(quantizer(f).x)²) − prob_perplexity` on the same seeded features f "
        f"{list(steps.head_input.shape)} (the masked frames' count), train mode (Gumbel sampling). Ours picks the "
        "codevectors with one batched matrix product per group (`bundles/wav2vec2_pretrain.py`, "
        "`_pick_codevectors`); fairseq multiplies the one-hot codes into a `[frames, 640, 128]` tensor and sums it "
        "(forward, and two more such products in backward).",
        "- Timing: train mode **with the config's dropout** (0.1, attention 0.1, dropout_input / dropout_features "
        "0.1, layer drop 0.05); `torch.manual_seed(i)` + `np.random.seed(i)` before step i (the same i for (a) "
        "and (b) of a round; fairseq draws layer drop from numpy, torchaudio from torch, so they drop different "
        "layers: the layers each step ran are listed; each draws its own negatives and Gumbel noise). Gradients "
        f"set to None before each step, outside the timed region. 1 warm-up step each, then {args.steps} rounds "
        "interleaved (a, b, a′, b′); medians. Forward = up to the loss, backward = `loss.backward()`.",
        "",
        tbl,
        "",
        ratios,
        "",
        f"- 1-minute load average before each round: {', '.join(loads)} (this process alone is ~2). With 2 "
        "cores and 2 torch threads, any other busy process stalls the threads' barriers: rounds can take 3-4× "
        "longer than on an idle machine; compare within rounds.",
        f"- Other processes using CPU (sampled from /proc over 2 s) before the run: {busy_start}; after the timed "
        f"rounds: {busy_end}.",
        f"- Layers run (layer drop): (a) {layers_a:.2f}, (b) {layers_b:.2f} on average over the timed steps: "
        f"{fairness}.",
        f"- Equality check (separate, **dropout, dropout_features and layer drop 0**, train mode, same models and "
        "batch, the same Gumbel noise (`F.gumbel_softmax` patched / `gumbel_noise=`) and the same negatives "
        "(fairseq's `sample_negatives` from a fixed seed, its indices passed as `negative_indices=`)): sample size "
        f"{eq_a['size']} vs {eq_b['size']}; loss fairseq (loss / sample_size) {eq_a['loss']:.7f}, ours "
        f"{eq_b['loss']:.7f}: relative difference {loss_rel:.2e}; global gradient norm (fairseq's gradients / "
        f"sample_size) {eq_a['grad_norm']:.6e} vs {eq_b['grad_norm']:.6e}: relative difference {grad_rel:.2e}. "
        f"{'Equal' if equal else '**NOT equal**'} within {REL:g}. Steps with dropout 0: (a) {eq_a['s']:.3f} s, "
        f"(b) {eq_b['s']:.3f} s (single runs, context).",
    ]
    if ratio > TARGET_RATIO:
        body += ["", f"(b) misses its target ({ratio:.2f}× > {TARGET_RATIO}×). Both steps do the same backbone work: "
                 "the conv feature extractor (forward, and backward: feature_grad_mult 0.1 is not 0) and 12 "
                 "transformer layers (`aten::mm`, `addmm`, `bmm`, `convolution_backward`, `mkldnn_convolution`, "
                 "`bernoulli_` in the profile), run by torchaudio's modules in (b) and fairseq's in (a) at about the same "
                 "cost. "
                 "Ours can only save in what differs, the wav2vec 2.0 head: the quantizer (median (a′) − (b′) = "
                 f"{head_a - head_b:.3f} s per step) and the contrastive logits (fairseq's `[1 + N, B, M, D]` "
                 "cosine against our `[S, S]` matrix product plus a gather)."]
    if args.profile:
        C.log("profiling one step of (b) and (a) ...")
        body += ["", "### Where (b)'s time goes", "", _profile_table(steps)]
    C.publish(SECTION, body)


if __name__ == "__main__":
    main()
