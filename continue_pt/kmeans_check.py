"""``continue-pt kmeans check``: does a k-means give the targets a HuBERT checkpoint was trained on? Measured: the
checkpoint's masked-frame accuracy on held-out audio labelled with the k-means, against chance, the marginal
baseline and random relabellings of the cluster ids (:func:`check_kmeans`). The verdict rule and what it was
measured on are in the README, section "Does a k-means match a checkpoint?".
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundles.kmeans import KMeansModel
from bundles.loading import Bundle
from bundles.waveform import normalize_waveforms
from continue_pt.audio import AudioError
from continue_pt.corpus import AUDIO_EXTENSIONS, AudioItem
from continue_pt.frames import conv_output_frames
from continue_pt.hubert.objective import hubert_forward
from continue_pt.masking import MaskingOptions, channel_mask, time_mask
from continue_pt.shard_format import data_source
from continue_pt.shard_read import read_item, scan_source
from continue_pt.teacher import OnlineTargets

logger = logging.getLogger(__name__)

__all__ = ["CheckReport", "check_kmeans", "VERDICT_RULE", "MATCHES", "DOES_NOT_MATCH", "INCONCLUSIVE"]

MATCHES = "matches"
DOES_NOT_MATCH = "does not match"
INCONCLUSIVE = "inconclusive"

MIN_MASKED_FRAMES = 1000
MATCH_FACTOR = 2.0
MATCH_Z = 5.0
NO_MATCH_FACTOR = 1.5
NO_MATCH_QUANTILE = 0.99
SHUFFLES = 1000
TOP_K = 5

VERDICT_RULE = (
    "null = max(1/K, marginal sum_c q_c p_c); se = sqrt(null(1-null)/(masked frames/mask_length)); "
    "relabellings: accuracy against the labels under random permutations of the cluster ids. "
    f"K differs from the label head's rows -> does not match; < {MIN_MASKED_FRAMES} masked frames -> inconclusive; "
    f"accuracy >= max({MATCH_FACTOR:g} null, null + {MATCH_Z:g} se) and > every relabelling -> matches; "
    f"accuracy <= max({NO_MATCH_FACTOR:g} null, {NO_MATCH_QUANTILE:g} quantile of the relabellings) -> does not "
    "match; otherwise inconclusive"
)


@dataclass
class CheckReport:
    """What :func:`check_kmeans` measured. Rates are fractions of masked frames; None where nothing was run
    (K differs) or nothing was masked."""

    verdict: str
    reason: str
    rule: str
    num_clusters: int
    """K of the k-means."""
    label_head_rows: int
    kmeans_layer: int | None
    bundle: str
    teacher: str
    k_differs: bool = False
    accuracy: float | None = None
    """Top-1 masked-prediction accuracy (argmax over the label rows and fairseq's special rows)."""
    top5_accuracy: float | None = None
    chance: float | None = None
    shuffled_mean: float | None = None
    shuffled_q99: float | None = None
    shuffled_max: float | None = None
    shuffled: list[float] = field(default_factory=list)
    """Accuracy against the labels under each random permutation of the cluster ids (the relabelling control)."""
    marginal_baseline: float | None = None
    """sum_c q_c p_c: expected accuracy of predictions independent of the frames."""
    null: float | None = None
    """max(chance, marginal baseline): the expected accuracy of a label set whose ids mean nothing."""
    threshold_matches: float | None = None
    """max(2 null, null + 5 se, best relabelling); "matches" needs the accuracy strictly above the best relabelling."""
    threshold_does_not_match: float | None = None
    """max(1.5 null, 99th percentile of the relabellings)."""
    clusters_used: int | None = None
    """Distinct labels over every frame of the audio (not only masked ones)."""
    label_entropy: float | None = None
    """Entropy of the label distribution over every frame, divided by log K (1 = all clusters equally often)."""
    num_frames: int = 0
    num_masked_frames: int = 0
    num_files: int = 0
    num_chunks: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    masking: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def matches(self) -> bool:
        return self.verdict == MATCHES

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shuffles"] = len(data.pop("shuffled"))  # the 1000 values themselves say nothing mean/q99/max do not
        data["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return data

    def summary_lines(self) -> list[str]:
        verdict = f"{self.verdict} (K differs)" if self.k_differs else self.verdict
        lines = [f"verdict: {verdict}: {self.reason}",
                 f"bundle: {self.bundle}; teacher: {self.teacher}; k-means: K={self.num_clusters}, layer "
                 f"{self.kmeans_layer}; label head rows: {self.label_head_rows}"]
        if self.accuracy is not None:
            lines += [
                f"masked accuracy: top-1 {self.accuracy:.4f}, top-{TOP_K} {self.top5_accuracy:.4f}",
                f"baselines: chance {self.chance:.4f}, marginal {self.marginal_baseline:.4f}; relabelled ids "
                f"({len(self.shuffled)} permutations): mean {self.shuffled_mean:.4f}, 99th percentile "
                f"{self.shuffled_q99:.4f}, max {self.shuffled_max:.4f}",
                f"thresholds: matches >= {self.threshold_matches:.4f}, does not match <= "
                f"{self.threshold_does_not_match:.4f}",
                f"labels: {self.clusters_used}/{self.num_clusters} clusters used, normalised entropy "
                f"{self.label_entropy:.3f}",
                f"audio: {self.num_files} files ({self.num_chunks} chunks), {self.num_frames} frames, "
                f"{self.num_masked_frames} masked",
            ]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} files: " + "; ".join(f"{p} ({r})" for p, r in self.skipped[:5])
                         + (" ..." if len(self.skipped) > 5 else ""))
        lines.append(f"rule: {self.rule}")
        return lines


def _audio_items(audio: str | Path, sample_rate: int,
                 min_seconds: float) -> tuple[list[AudioItem], list[tuple[str, str]]]:
    if isinstance(audio, Path) and audio.is_file() and audio.suffix.lower() in AUDIO_EXTENSIONS:
        return [AudioItem(audio, 0, audio.name)], []
    scan = scan_source(audio, sample_rate, min_seconds)
    return scan.items, [(str(p), r) for p, r in scan.skipped]


def _chunks(wav: torch.Tensor, max_samples: int) -> list[torch.Tensor]:
    """Equal consecutive pieces of at most ``max_samples`` (bounds memory; no short tail piece)."""
    n = wav.shape[0]
    pieces = max(1, math.ceil(n / max_samples))
    size = math.ceil(n / pieces)
    return [wav[i:i + size] for i in range(0, n, size)]


def _verdict(acc: float, null: float, shuffled: list[float], n_masked: int, mask_length: int,
             min_masked_frames: int) -> tuple[str, str, float, float]:
    n_eff = max(n_masked / max(mask_length, 1), 1.0)
    se = math.sqrt(max(null * (1 - null), 0.0) / n_eff)
    tail = max(shuffled) if shuffled else 0.0
    q99 = float(np.quantile(shuffled, NO_MATCH_QUANTILE)) if shuffled else 0.0
    effect = max(MATCH_FACTOR * null, null + MATCH_Z * se)
    hi = max(effect, tail)
    lo = max(NO_MATCH_FACTOR * null, q99)
    if n_masked < min_masked_frames:
        return INCONCLUSIVE, f"only {n_masked} masked frames (need {min_masked_frames}); give more audio", hi, lo
    if acc >= effect and acc > tail:
        return MATCHES, (f"accuracy {acc:.4f} >= {effect:.4f} = max({MATCH_FACTOR:g} x baseline {null:.4f}, baseline "
                         f"+ {MATCH_Z:g} se) and > {tail:.4f}, the best of {len(shuffled)} relabellings of the "
                         "cluster ids"), hi, lo
    if acc <= lo:
        return DOES_NOT_MATCH, (f"accuracy {acc:.4f} <= {lo:.4f} = max({NO_MATCH_FACTOR:g} x baseline {null:.4f}, "
                                f"{NO_MATCH_QUANTILE:g} quantile {q99:.4f} of {len(shuffled)} relabellings): the "
                                "ids carry no evidence of being the checkpoint's training ids"), hi, lo
    return INCONCLUSIVE, (f"accuracy {acc:.4f} is between {lo:.4f} (does not match) and {hi:.4f} (matches): partial "
                          "agreement, or too little audio"), hi, lo


@torch.inference_mode()
def check_kmeans(
    bundle: Bundle,
    kmeans: KMeansModel | None,
    audio: str | Path,
    *,
    teacher: Bundle | None = None,
    max_files: int | None = None,
    seed: int = 0,
    shuffles: int = SHUFFLES,
    min_seconds: float = 1.0,
    max_seconds: float = 15.625,
    min_masked_frames: int = MIN_MASKED_FRAMES,
) -> CheckReport:
    """Measure whether ``kmeans`` (on the teacher's layer ``kmeans.layer``) gives ``bundle``'s training targets.

    Args:
        bundle: a HuBERT pre-training bundle (its label head and masking options are used).
        kmeans: the k-means to test; None: the bundle's own (a bundle exported by ``continue-pt pretrain`` keeps
            the k-means of its training targets), else the teacher's.
        audio: held-out audio: a directory (recursive), a fairseq manifest ``.tsv``, a shard set (its directory or
            base URL) or one audio file. Unusable files (unreadable, corrupt, shorter than ``min_seconds``) are
            skipped and listed in the report.
        teacher: the bundle whose layer-L features the k-means labels (default: ``bundle``). For a checkpoint
            trained on targets of an earlier model (HuBERT iteration 2 on iteration 1's), pass that model; for a
            bundle exported by ``continue-pt pretrain`` with online targets, the teacher it trained with (by
            default the bundle it started from): training moves the bundle's own layer-L features, so its own
            labels are no longer the ones it learned.
        max_files: use at most this many files (a seeded random subset, in corpus order).
        seed: seeds the subset, the masks and the permutations: the same inputs give the same report.
        shuffles: number of random permutations of the cluster ids for the relabelling control.
        max_seconds: longer files are cut into equal pieces of at most this length (fairseq's 250k-sample crop).
        min_masked_frames: fewer masked frames than this give "inconclusive".

    Returns:
        A :class:`CheckReport`; its ``verdict`` follows the rule in this module's docstring
        (:data:`VERDICT_RULE`). A k-means with a K other than the label head's rows gives "does not match"
        with ``k_differs`` set, without running anything.

    Raises:
        ValueError: for a bundle that is not a HuBERT pre-training bundle, a k-means without a layer, a layer
            outside the teacher, centroids of the wrong width, or no usable audio.
        bundles.errors.FileProblem: for an unusable ``audio`` source (missing, no audio files).
    """
    if bundle.family != "hubert" or bundle.kind != "pretrain":
        raise ValueError(f"{bundle.path}: a {bundle.family} {bundle.kind} bundle; the k-means check needs a HuBERT "
                         "pre-training bundle (its label head predicts the cluster ids)")
    teacher = teacher if teacher is not None else bundle
    if kmeans is None:  # the bundle's own k-means is the one it was trained with (export stores the targets')
        kmeans = bundle.get_kmeans() if bundle.has_kmeans else teacher.get_kmeans()
    student = bundle.get_pretrain_model().eval()
    rows = int(student.logit_generator.label_embeddings.shape[0])
    k = kmeans.num_clusters
    masking = MaskingOptions.from_options(bundle.config.pretrain_args or {})
    report = CheckReport(verdict=DOES_NOT_MATCH, reason="", rule=VERDICT_RULE, num_clusters=k, label_head_rows=rows,
                         kmeans_layer=kmeans.layer, bundle=str(bundle.path), teacher=str(teacher.path),
                         masking=asdict(masking), seed=seed)
    if k != rows:
        report.k_differs = True
        report.reason = (f"the k-means has K={k} clusters but the label head of {bundle.path} has {rows} rows (one per "
                         "training cluster): a label set of another size cannot be the training targets")
        return report

    targets = OnlineTargets.from_bundle(teacher, kmeans)  # validates layer and width
    extras = bundle.fairseq_extras().get("label_embeddings_non_cluster")
    objective = bundle.config.objective or {}
    logit_temp = float(objective.get("logit_temp", 0.1))
    conv_layers = bundle.config.encoder_args["extractor_conv_layer_config"]
    width = int(bundle.config.encoder_args["encoder_embed_dim"])

    items, skipped = _audio_items(data_source(audio), bundle.sample_rate, min_seconds)
    rng = np.random.default_rng(seed)
    if max_files is not None and len(items) > max_files:
        keep = sorted(rng.choice(len(items), size=max(int(max_files), 0), replace=False).tolist())
        items = [items[i] for i in keep]

    max_samples = max(int(max_seconds * bundle.sample_rate), 1)
    label_counts = torch.zeros(k, dtype=torch.long)
    pred_counts = torch.zeros(k, dtype=torch.long)
    masked_targets: list[torch.Tensor] = []
    masked_preds: list[torch.Tensor] = []
    correct_top1 = correct_topk = 0
    num_files = num_chunks = 0
    for item in items:
        try:
            wav = read_item(item, bundle.sample_rate)
        except AudioError as error:
            skipped.append((str(item.path), f"unreadable: {error.problems[0]}"))
            continue
        used = False
        for piece in _chunks(wav, max_samples):
            piece = piece[None]
            labels = targets(piece)  # [1, label frames]; the teacher normalises if it expects it
            frames = min(conv_output_frames(conv_layers, piece.shape[1]), labels.shape[1])
            if frames < 2 * masking.mask_length:
                continue
            try:
                mask = time_mask((1, frames), None, masking, rng=rng)
            except ValueError:
                continue
            channel = channel_mask(1, width, masking, rng=rng)
            student_in = normalize_waveforms(piece) if bundle.normalize_waveform else piece
            out = hubert_forward(student, student_in, None, labels, torch.from_numpy(mask),
                                 extra_label_embeddings=extras, logit_temp=logit_temp,
                                 channel_mask=torch.from_numpy(channel) if channel is not None else None,
                                 skip_masked=False, skip_nomask=True)
            label_counts += torch.bincount(labels[0, :frames], minlength=k)
            logits, tgt = out.logits_masked, out.targets_masked
            if logits is None or logits.shape[0] == 0:
                continue
            pred = logits.argmax(dim=1)
            topk = logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices
            correct_top1 += int((pred == tgt).sum())
            correct_topk += int((topk == tgt[:, None]).any(dim=1).sum())
            pred_counts += torch.bincount(pred[pred < k], minlength=k)
            masked_targets.append(tgt)
            masked_preds.append(pred)
            num_chunks += 1
            used = True
        num_files += used
        if not used:
            skipped.append((str(item.path), "too short to mask"))

    report.skipped = skipped
    report.num_files, report.num_chunks = num_files, num_chunks
    report.num_frames = int(label_counts.sum())
    if not masked_targets:
        raise ValueError(f"{audio}: no usable audio to check with ({len(skipped)} files skipped)")
    tgt = torch.cat(masked_targets)
    pred = torch.cat(masked_preds)
    n = int(tgt.numel())
    report.num_masked_frames = n
    report.accuracy = correct_top1 / n
    report.top5_accuracy = correct_topk / n
    report.chance = 1.0 / k
    # relabelling control: under permutation perm, a frame with label d is right iff pred == perm[d], so the
    # number right is sum_d counts[perm[d], d] over the (prediction, label) count matrix; row k holds every
    # prediction of a special-symbol row, which no permutation makes right
    counts = torch.bincount(pred.clamp(max=k) * k + tgt, minlength=(k + 1) * k).view(k + 1, k)
    gen = torch.Generator().manual_seed(seed)
    columns = torch.arange(k)
    for _ in range(max(int(shuffles), 0)):
        perm = torch.randperm(k, generator=gen)
        report.shuffled.append(int(counts[perm, columns].sum()) / n)
    report.shuffled_mean = float(np.mean(report.shuffled)) if report.shuffled else None
    report.shuffled_q99 = float(np.quantile(report.shuffled, NO_MATCH_QUANTILE)) if report.shuffled else None
    report.shuffled_max = max(report.shuffled) if report.shuffled else None
    p = torch.bincount(tgt, minlength=k).double() / n
    q = pred_counts.double() / n
    report.marginal_baseline = float((p * q).sum())
    dist = label_counts.double() / max(int(label_counts.sum()), 1)
    nz = dist[dist > 0]
    report.clusters_used = int(nz.numel())
    report.label_entropy = float(-(nz * nz.log()).sum() / math.log(k))
    report.null = max(report.chance, report.marginal_baseline)
    report.verdict, report.reason, report.threshold_matches, report.threshold_does_not_match = _verdict(
        report.accuracy, report.null, report.shuffled, n, masking.mask_length, min_masked_frames)
    return report
