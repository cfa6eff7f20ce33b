"""``Wav2Vec2ContinuedPretraining``: a thin LightningModule that continues wav2vec 2.0's contrastive task on a bundle.

Masks and negatives are drawn from ``(seed, step, micro-batch, rank)`` (an exact resume), the Gumbel temperature
continues from the bundle's ``num_updates`` plus the steps trained, and each micro-batch backwards its
:func:`~continue_pt.wav2vec2.objective.unnormalized_loss`; the base module (:mod:`continue_pt.module_base`) divides
the step's summed gradient by its summed :func:`~continue_pt.wav2vec2.objective.sample_size`, as HuBERT's
``"fairseq"`` mode does. A collapse guard warns when the quantizer uses few of its codewords.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bundles.loading import load_bundle
from continue_pt.device_batch import frames_and_padding, to_device
from continue_pt.empty_batch import is_empty, zero_loss
from continue_pt.masking import MaskingOptions, time_mask
from continue_pt.module_base import CHECKPOINT_KEY, ContinuedPretrainingBase, micro_batch_key, seed_of
from continue_pt.module_options import ModuleOptions
from continue_pt.wav2vec2.objective import (
    Wav2Vec2LossTerms,
    Wav2Vec2LossWeights,
    Wav2Vec2Outputs,
    normalized_wav2vec2_loss,
    sample_size,
    unnormalized_loss,
    wav2vec2_forward,
    wav2vec2_loss_terms,
)

__all__ = [
    "CodebookCollapseWarning",
    "Wav2Vec2ContinuedPretraining",
    "codebook_usage",
    "unsupported_wav2vec2_options",
]

_NUM_STATS = 11  # the step statistics _add_stats sums (an empty micro-batch adds as many zeros)
# fairseq Wav2Vec2Model options the objective does not implement, with the value every published checkpoint has
_SUPPORTED = {"codebook_negatives": 0, "negatives_from_everywhere": False}


class CodebookCollapseWarning(UserWarning):
    """The quantizer uses few of its codewords: the contrastive task is collapsing."""


def unsupported_wav2vec2_options(objective: dict[str, Any], masking: MaskingOptions) -> list[str]:
    """Why the wav2vec 2.0 objective cannot continue this checkpoint (empty: it can)."""
    problems = [f"{name}={objective.get(name)!r} is not supported (only {value!r}, as in every published "
                "wav2vec 2.0 / XLS-R checkpoint)"
                for name, value in _SUPPORTED.items() if objective.get(name, value) != value]
    if masking.mask_channel_prob > 0:
        problems.append(f"mask_channel_prob={masking.mask_channel_prob} (channel masking) is not implemented for "
                        "wav2vec 2.0 pre-training (the published recipes use 0); pass masking mask_channel_prob: 0")
    return problems


def codebook_usage(code_perplexity: float, groups: int, latent_vars: int, num_masked: float) -> float:
    """Code perplexity as a fraction of what a batch of ``num_masked`` frames could reach
    (``groups * min(latent_vars, num_masked)``): 1 = every code used evenly, near 0 = collapse."""
    reachable = groups * min(latent_vars, max(num_masked, 1.0))
    return code_perplexity / reachable if reachable > 0 else float("nan")


@dataclass(frozen=True)
class _Objective:
    """The objective's settings: the checkpoint's, overridden by the options."""

    weights: Wav2Vec2LossWeights
    num_negatives: int
    cross_sample_negatives: int
    logit_temp: float
    feature_grad_mult: float
    dropout_features: float


class Wav2Vec2ContinuedPretraining(ContinuedPretrainingBase):
    """Continue wav2vec 2.0's contrastive pre-training of a bundle. See the module docstring.

    Args:
        options: :class:`~continue_pt.module_base.ModuleOptions` or the dict of its fields (what Lightning gives
            back from a checkpoint). The HuBERT-only fields (teacher, kmeans, labels, label head) must be unset.
    """

    def __init__(self, options: ModuleOptions | dict[str, Any]):
        super().__init__()
        options = self.take_options(options, "wav2vec2")  # refuses HuBERT's options (targets, label head, loss_norm)

        bundle = load_bundle(options.bundle)
        if bundle.family != "wav2vec2":
            raise ValueError(f"{bundle.path}: a {bundle.family} bundle; this module continues wav2vec 2.0")
        self.bundle_config = bundle.config
        self.student = bundle.get_pretrain_model()  # raises for fine-tuned (CTC) bundles
        objective = dict(bundle.config.objective or {})
        self.masking = MaskingOptions.from_options({**objective, **options.masking})
        problems = unsupported_wav2vec2_options(objective, self.masking)
        if problems:
            raise ValueError(f"{bundle.path}: " + "; ".join(problems))
        quantizer = self.student.quantizer
        if options.wav2vec2.latent_temp is not None:
            quantizer.max_temperature, quantizer.min_temperature, quantizer.temperature_decay = options.wav2vec2.latent_temp
        self.start_updates = int(bundle.num_updates or 0)
        quantizer.set_num_updates(self.start_updates)
        if bundle.num_updates is None:  # e.g. converted from transformers, which does not record it
            from continue_pt.options import PretrainOptionsWarning

            warnings.warn(f"{bundle.path}: the updates it was pre-trained for are unknown, so the Gumbel temperature "
                          f"starts from {quantizer.temperature:g} (its schedule at update 0: max "
                          f"{quantizer.max_temperature:g}, min {quantizer.min_temperature:g}, decay "
                          f"{quantizer.temperature_decay:g} per update); to continue the schedule where it was, "
                          "convert again with `continue-pt convert SRC -o BUNDLE --num-updates N`",
                          PretrainOptionsWarning, stacklevel=2)

        criterion = objective.get("criterion") or {}
        fairseq_weights = [float(w) for w in (criterion.get("loss_weights") or [])]
        defaults = Wav2Vec2LossWeights()  # only for a checkpoint without criterion weights: the BASE recipe's
        diversity = fairseq_weights[0] if len(fairseq_weights) > 0 else defaults.diversity
        penalty = fairseq_weights[1] if len(fairseq_weights) > 1 else defaults.feature_penalty
        fgm = options.feature_grad_mult if options.feature_grad_mult is not None else objective.get(
            "feature_grad_mult", 1.0)
        self.objective = _Objective(
            weights=Wav2Vec2LossWeights(
                diversity=options.wav2vec2.diversity_weight if options.wav2vec2.diversity_weight is not None else diversity,
                feature_penalty=(options.feature_penalty_weight if options.feature_penalty_weight is not None
                                 else penalty)),
            num_negatives=int(options.wav2vec2.num_negatives if options.wav2vec2.num_negatives is not None
                              else objective.get("num_negatives", 100)),
            cross_sample_negatives=int(objective.get("cross_sample_negatives", 0)),
            logit_temp=float(options.logit_temp if options.logit_temp is not None
                             else objective.get("logit_temp", 0.1)),
            feature_grad_mult=float(fgm),
            dropout_features=float(objective.get("dropout_features", 0.0)))
        self.sample_rate = bundle.sample_rate
        self.data_normalizes = bundle.normalize_waveform  # the data pipeline normalises each utterance
        self._conv_layers = bundle.config.encoder_args["extractor_conv_layer_config"]

        self._last_collapse_warning: int | None = None

    # ------------------------------------------------------------------------------------------- steps

    def temperature_updates(self) -> int:
        """fairseq's ``num_updates`` for the Gumbel temperature: the bundle's plus the steps trained here."""
        return self.start_updates + int(self.global_step)

    def draw_mask(self, shape: tuple[int, int], frame_padding: Tensor | None, rng: np.random.Generator) -> Tensor:
        """fairseq's ``Wav2Vec2Model.apply_mask`` time mask (``min_masks=2``, same count in every utterance)."""
        return torch.from_numpy(time_mask(shape, frame_padding, self.masking, rng=rng))

    def draw_negatives_and_noise(self, batch: dict[str, Any], mask: Tensor, seeds: tuple[int, ...]
                                 ) -> tuple[Tensor | None, Tensor | None]:
        """Negatives (indices into the masked frames) and Gumbel noise for this micro-batch; None, None: the
        forward draws them where fairseq does (negatives from a generator seeded by ``seeds``, noise from torch's
        global RNG). A subclass can fix them per utterance, e.g. to compare micro-batchings."""
        return None, None

    def _forward(self, batch: dict[str, Any], seeds: tuple[int, ...], feature_grad_mult: float
                 ) -> tuple[Wav2Vec2Outputs, Wav2Vec2LossTerms]:
        waveforms = batch["waveforms"]  # lengths on the CPU: reading them is free
        num_frames, frame_padding, lengths = frames_and_padding(self._conv_layers, waveforms, batch.get("lengths"))
        # drawn on the CPU and given as it is: wav2vec2_forward counts it there and uploads it without blocking
        mask = self.draw_mask((waveforms.shape[0], num_frames), frame_padding, np.random.default_rng(list(seeds)))
        o = self.objective
        negatives, noise = self.draw_negatives_and_noise(batch, mask, seeds)
        out = wav2vec2_forward(
            self.student, waveforms, lengths, mask, negative_indices=negatives, gumbel_noise=noise,
            num_negatives=o.num_negatives,
            cross_sample_negatives=o.cross_sample_negatives, logit_temp=o.logit_temp,
            feature_grad_mult=feature_grad_mult, dropout_features=o.dropout_features,
            rng=torch.Generator().manual_seed(seed_of(*seeds, 3)))
        return out, wav2vec2_loss_terms(out)

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> Tensor:
        if is_empty(batch):  # every file failed to load: nothing to add, but take part (continue_pt.empty_batch)
            self._micro_index += 1
            stats = torch.zeros(_NUM_STATS, dtype=torch.float64, device=self.device)
            self._step_stats = stats if self._step_stats is None else self._step_stats
            return zero_loss(self)
        step, micro, rank, world_size = self.begin_micro_batch()  # dropout, layer drop, Gumbel noise: seeded
        self.student.quantizer.set_num_updates(self.temperature_updates())
        fgm = 0.0 if step < self.options.freeze_feature_extractor_steps else self.objective.feature_grad_mult
        out, terms = self._forward(batch, (self.options.seed, *micro_batch_key(step, micro, rank, world_size)), fgm)
        unnormalized = unnormalized_loss(terms, self.objective.weights)  # divided by the step's S in the step hook
        self._add_stats(out, terms, unnormalized.detach(), batch)
        return unnormalized * (self.trainer.accumulate_grad_batches * world_size)

    def _add_stats(self, out: Wav2Vec2Outputs, terms: Wav2Vec2LossTerms, loss: Tensor,
                   batch: dict[str, Any]) -> None:
        lengths = batch.get("lengths")  # on the CPU: summing it is free
        samples = float(lengths.sum()) if lengths is not None else float(batch["waveforms"].numel())
        n = float(sample_size(terms))
        # the host's numbers go up in one non-blocking copy
        n_t, count, one, seconds = to_device(torch.tensor([n, terms.count, 1.0, samples / self.sample_rate],
                                                          dtype=torch.float64), self.device)
        values = [loss.double(), n_t, terms.correct.double(), count, terms.infonce_sum.detach().double(),
                  terms.diversity.detach().double() * n, terms.feature_penalty.detach().double() * n,
                  out.code_perplexity.detach().double(), out.prob_perplexity.detach().double(), one, seconds]
        stats = torch.stack([v.to(device=self.device, dtype=torch.float64) for v in values])
        assert stats.numel() == _NUM_STATS
        self._step_stats = stats if self._step_stats is None else self._step_stats + stats

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide every gradient by the step's masked frames over all micro-batches and ranks (fairseq's
        ``multiply_grads``), or skip the step if its loss or gradient is not finite, log the step and watch the
        codebook. Runs after fp16 unscaling, before clipping."""
        step = self.close_step()
        if step is None:
            return
        values, health = step
        (loss_sum, size, correct, count, infonce, diversity, penalty, code_ppl, prob_ppl, batches,
         audio_seconds) = values
        divisor = size if size > 0 else 1.0
        self.step_or_skip(loss_sum, health, divisor)
        code_ppl, prob_ppl = code_ppl / batches, prob_ppl / batches  # mean over micro-batches (and ranks)
        quantizer = self.student.quantizer
        usage = codebook_usage(code_ppl, quantizer.groups, quantizer.num_vars, size / batches)
        metrics = {
            "train/loss": loss_sum / max(size, 1.0),
            "train/infonce": infonce / max(size, 1.0),
            "train/diversity": diversity / max(size, 1.0),
            "train/feature_penalty": penalty / max(size, 1.0),
            "train/accuracy": correct / count if count else float("nan"),
            "train/code_perplexity": code_ppl,
            "train/prob_perplexity": prob_ppl,
            "train/codebook_usage": usage,
            "train/gumbel_temperature": quantizer.temperature,
            "train/sample_size": size,
        }
        self.log_step(metrics, optimizer, audio_seconds, health.grad_norm / divisor)
        self._watch_codebook(usage, code_ppl, size / batches)

    def _watch_codebook(self, usage: float, code_ppl: float, masked_per_batch: float) -> None:
        o, step = self.options.wav2vec2, int(self.global_step)
        if not usage < o.codebook_warn_threshold:
            return
        if self._last_collapse_warning is not None and step - self._last_collapse_warning < o.codebook_warn_every:
            return
        self._last_collapse_warning = step
        if self._world()[1] != 0:
            return
        quantizer = self.student.quantizer
        warnings.warn(
            f"step {step}: codebook collapse? code perplexity {code_ppl:.1f} of the "
            f"{quantizer.groups} x {quantizer.num_vars} codewords ({usage:.1%} of what {masked_per_batch:.0f} masked "
            f"frames per batch could use; warning below {o.codebook_warn_threshold:.0%}). Try a lower learning rate "
            f"(--lr, now {self.options.lr:g}), a higher diversity loss weight (--diversity-weight, now "
            f"{self.objective.weights.diversity:g}), or check the audio (long silences, one repeated sound)",
            CodebookCollapseWarning, stacklevel=2)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if is_empty(batch):  # every file failed to load: nothing to validate on
            return
        _, rank = self._world()
        self.student.quantizer.set_num_updates(self.temperature_updates())
        _, terms = self._forward(batch, (self.options.seed, 2, batch_idx, rank), self.objective.feature_grad_mult)
        size = max(sample_size(terms), 1)
        loss = normalized_wav2vec2_loss(terms, size, self.objective.weights).detach()
        self.log("val/loss", loss, batch_size=size, sync_dist=True)
        self.log("val/accuracy", terms.correct.double() / max(terms.count, 1), batch_size=max(terms.count, 1),
                 sync_dist=True)

    # ------------------------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add what export needs: the bundle config it started from and the steps trained."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_section(family="wav2vec2", loss_norm="fairseq")
