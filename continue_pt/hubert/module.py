"""``HubertContinuedPretraining``: a thin LightningModule that continues HuBERT's masked prediction on a bundle.

It draws the masks, makes the targets (online from the frozen teacher, or offline labels), runs
:mod:`continue_pt.hubert.objective` and :mod:`continue_pt.hubert.loss` and hands the loss to Lightning; the step's
gradient division, skipping, logging and checkpoint section are the base module's (:mod:`continue_pt.module_base`).
How each loss normalisation stays exact under gradient accumulation and DDP:
:meth:`HubertContinuedPretraining.training_step`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bundles.kmeans import KMeansModel, load_kmeans
from bundles.loading import load_bundle
from bundles.waveform import normalize_waveforms
from continue_pt.device_batch import padded, to_device
from continue_pt.empty_batch import is_empty, zero_loss
from continue_pt.frames import conv_output_frames
from continue_pt.hubert.loss import (
    HubertLossTerms,
    LossWeights,
    StepTotals,
    hubert_loss_terms,
    normalized_loss,
    sample_size,
    unnormalized_loss,
)
from continue_pt.hubert.objective import hubert_forward, hubert_frame_padding_mask
from continue_pt.masking import MaskingOptions, channel_mask, time_mask
from continue_pt.module_base import CHECKPOINT_KEY, ContinuedPretrainingBase, micro_batch_key
from continue_pt.module_options import ModuleOptions
from continue_pt.teacher import OnlineTargets


class HubertContinuedPretraining(ContinuedPretrainingBase):
    """Continue HuBERT's masked-prediction pre-training of a bundle. See the module docstring.

    Args:
        options: :class:`ModuleOptions` or the dict of its fields (what Lightning gives back from a checkpoint).
        kmeans: a :class:`~bundles.kmeans.KMeansModel` to label with, overriding ``options.hubert.kmeans``.
    """

    def __init__(self, options: ModuleOptions | dict[str, Any], kmeans: KMeansModel | None = None):
        super().__init__()
        options = self.take_options(options, "hubert")

        bundle = load_bundle(options.bundle)
        if bundle.kind != "pretrain" and options.hubert.reinit_label_head:  # encoder-only: a new head
            from bundles.new_label_head import with_new_label_head

            bundle = with_new_label_head(bundle)
        if bundle.family != "hubert":
            raise ValueError(f"{bundle.path}: a {bundle.family} bundle; this module continues HuBERT pre-training")
        self.bundle_config = bundle.config
        self.student = bundle.get_pretrain_model()
        extras = bundle.fairseq_extras().get("label_embeddings_non_cluster")
        self.extra_label_embeddings = nn.Parameter(extras.clone()) if extras is not None else None

        # targets
        self.kmeans: KMeansModel | None = None
        self.targets: OnlineTargets | None = None
        self._teacher_conv_layers = None
        if not options.hubert.offline_labels:
            teacher = load_bundle(options.hubert.teacher) if options.hubert.teacher else bundle
            self._teacher_conv_layers = teacher.config.encoder_args["extractor_conv_layer_config"]
            if kmeans is None and options.hubert.kmeans:
                kmeans = load_kmeans(options.hubert.kmeans)
            self.targets = OnlineTargets.from_bundle(teacher, kmeans)
            self.kmeans = self.targets.kmeans
        # The data pipeline normalises each utterance before cropping, as fairseq does, when the student expects
        # it. A teacher that expects raw audio (e.g. a BASE teacher for a LARGE student) must see it raw, so then
        # the data stay raw and the student's input is normalised here, per crop.
        student_normalizes = bundle.normalize_waveform
        teacher_normalizes = self.targets.normalize_waveform if self.targets is not None else student_normalizes
        self.data_normalizes = student_normalizes and teacher_normalizes
        self.normalize_student_input = student_normalizes and not self.data_normalizes
        if self.targets is not None:  # normalised data: the teacher takes the student's input as it is
            self.targets.input_normalized = self.data_normalizes
        num_classes = self.student.logit_generator.label_embeddings.shape[0]
        new_k = self.kmeans.num_clusters if self.kmeans is not None else (options.hubert.num_classes or num_classes)
        if options.hubert.reinit_label_head:
            self._reinit_label_head(new_k)
        elif new_k != num_classes:
            raise ValueError(f"the k-means has {new_k} clusters but the label head of {bundle.path} has "
                             f"{num_classes} rows; pass reinit_label_head=True (--reinit-label-head) to train a new "
                             "label head for the new label set")
        # read once here: under FSDP the parameter is a flat shard between steps, when checkpoints are written
        self._label_rows = int(self.student.logit_generator.label_embeddings.shape[0])

        # objective
        objective = bundle.config.objective or {}
        criterion = objective.get("criterion") or {}
        pen = (criterion.get("loss_weights") or [10.0])[0]
        self.weights = LossWeights(
            masked=options.hubert.masked_weight if options.hubert.masked_weight is not None
            else float(criterion.get("pred_masked_weight", 1.0)),
            unmasked=options.hubert.unmasked_weight if options.hubert.unmasked_weight is not None
            else float(criterion.get("pred_nomask_weight", 0.0)),
            feature_penalty=options.feature_penalty_weight if options.feature_penalty_weight is not None
            else float(pen))
        self.masking = MaskingOptions.from_options({**(bundle.config.pretrain_args or {}), **options.masking})
        fgm = options.feature_grad_mult
        if fgm is None:
            fgm = objective.get("feature_grad_mult", self.student.feature_grad_mult)
        self.feature_grad_mult = 1.0 if fgm is None else float(fgm)
        self.logit_temp = options.logit_temp if options.logit_temp is not None else float(
            objective.get("logit_temp", 0.1))
        self.sample_rate = bundle.sample_rate

        # per optimizer step (reset in on_before_optimizer_step)
        self._step_plan: tuple[list[StepTotals], StepTotals] | None = None  # per-term: planned counts, totals

    # ------------------------------------------------------------------------------------------- set-up

    def _reinit_label_head(self, num_classes: int) -> None:
        """fairseq/torchaudio init: label embeddings uniform in [0, 1), ``final_proj`` nn.Linear's default."""
        generator = self.student.logit_generator
        final_dim = generator.label_embeddings.shape[1]
        generator.label_embeddings = nn.Parameter(torch.empty(num_classes, final_dim).uniform_())
        generator.final_proj.reset_parameters()
        if self.extra_label_embeddings is not None:
            self.extra_label_embeddings = nn.Parameter(torch.empty_like(self.extra_label_embeddings).uniform_())

    @property
    def num_classes(self) -> int:
        return self._label_rows

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.options.hubert.loss_norm == "per-term" and self.trainer.accumulate_grad_batches > 1 \
                and not callable(getattr(self.trainer.datamodule, "micro_batch_plans", None)):
            raise ValueError("per-term with gradient accumulation needs the shapes of a step's micro-batches before "
                             "its first backward: train with a datamodule that has micro_batch_plans(first, stop) "
                             "(AudioDataModule), or use accumulate 1 or loss_norm 'fairseq'")

    def train(self, mode: bool = True) -> "HubertContinuedPretraining":
        super().train(mode)
        if self.targets is not None:
            self.targets.train(mode)  # keeps the teacher in eval mode
        return self

    # ------------------------------------------------------------------------------------------- steps

    def draw_masks(self, batch: dict[str, Any], shape: tuple[int, int], frame_padding: Tensor | None,
                   rng: np.random.Generator) -> tuple[Tensor, Tensor | None]:
        """Time mask ``[batch, frames]`` and channel mask (or None), fairseq's ``apply_mask`` draws, on the CPU:
        counted there (no host sync) and uploaded once by :func:`hubert_forward`."""
        spans = time_mask(shape, frame_padding, self.masking, rng=rng)
        channel = channel_mask(shape[0], self.student.wav2vec2.encoder.transformer.layers[0]
                                      .attention.embed_dim, self.masking, rng=rng)
        return torch.from_numpy(spans), torch.from_numpy(channel) if channel is not None else None

    def _labels(self, batch: dict[str, Any]) -> Tensor:
        if self.targets is not None:
            return self.targets(batch["waveforms"], batch.get("lengths"))
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("the batch has no 'labels' and no teacher makes online targets")
        return labels

    def _label_frames(self, batch: dict[str, Any], num_samples: int) -> int:
        """Frames of the targets, known before they are made: the teacher's conv frames, or the labels' length."""
        if self.targets is not None:
            return conv_output_frames(self._teacher_conv_layers, num_samples)
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("the batch has no 'labels' and no teacher makes online targets")
        return int(labels.shape[1])

    def _forward_terms(self, batch: dict[str, Any], rng: np.random.Generator, feature_grad_mult: float):
        waveforms, lengths = batch["waveforms"], batch.get("lengths")
        # Frames, padding and masks are settled on the CPU (the lengths stay there, continue_pt.device_batch) and
        # before the teacher is launched: none of it waits for the GPU.
        num_samples = waveforms.shape[1]
        conv_frames = conv_output_frames(self.bundle_config.encoder_args["extractor_conv_layer_config"], num_samples)
        num_frames = min(conv_frames, self._label_frames(batch, num_samples))
        frame_padding = None
        if padded(lengths, num_samples):
            frame_padding = hubert_frame_padding_mask(lengths.cpu(), num_samples, num_frames)
        mask, channels = self.draw_masks(batch, (waveforms.shape[0], num_frames), frame_padding, rng)
        counts = StepTotals.of_masks(mask.cpu(), frame_padding)
        if self.normalize_student_input:
            waveforms = normalize_waveforms(waveforms, to_device(lengths, waveforms.device)
                                            if lengths is not None else None)
        labels = self._labels(batch)
        out = hubert_forward(self.student, waveforms, lengths if frame_padding is not None else None, labels,
                             mask, extra_label_embeddings=self.extra_label_embeddings, logit_temp=self.logit_temp,
                             feature_grad_mult=feature_grad_mult, channel_mask=channels,
                             unmasked_grad=self.weights.unmasked != 0,
                             # k-means labels are cluster ids on every unpadded frame: checked only with padding
                             check_labels=self.targets is None or frame_padding is not None)
        return hubert_loss_terms(out), counts

    # ------------------------------------------------------------------------------------------- per-term plan

    def _planned_counts(self, plan: dict[str, Any], step: int, micro: int, rank: int) -> StepTotals:
        """The mask counts micro-batch ``micro`` of ``step`` will have, from its planned shape (no padding: batches
        are cropped to their shortest utterance), drawn with the micro-batch's own random source."""
        num_samples, batch_size = int(plan["num_samples"]), int(plan["batch_size"])
        frames = conv_output_frames(self.bundle_config.encoder_args["extractor_conv_layer_config"], num_samples)
        if self._teacher_conv_layers is not None:
            label_frames = conv_output_frames(self._teacher_conv_layers, num_samples)
        else:
            label_frames = plan.get("label_frames")
            if label_frames is None:
                raise ValueError("a micro-batch plan without label_frames, but the targets are offline labels")
        num_frames = min(frames, int(label_frames))
        if batch_size <= 0 or num_frames <= 0:
            return StepTotals(0, 0, 0)
        rng = np.random.default_rng([self.options.seed, *micro_batch_key(step, micro, rank, self._world()[0])])
        mask, _ = self.draw_masks(plan, (batch_size, num_frames), None, rng)
        return StepTotals.of_masks(mask)

    def _plan_step(self, first_counts: StepTotals, batch_idx: int, step: int, rank: int
                   ) -> tuple[list[StepTotals], StepTotals]:
        """At the first micro-batch of a step: every micro-batch's mask counts on this rank (this one's as drawn,
        the others' planned) and the step's totals over all ranks. The planned shapes come from the data side
        (``AudioDataModule.micro_batch_plans``: the sampler's batches of the epoch, the scanned lengths and the crop
        each batch will get); the step's micro-batches are the epoch's batches ``[k N, (k + 1) N)``
        (``N = accumulate_grad_batches``), the last group of an epoch cut at ``trainer.num_training_batches``, as
        Lightning groups them."""
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches
        counts = [first_counts]
        if accumulate > 1:
            # Lightning steps once the epoch's batch count reaches a multiple of N; after a resume with another N
            # (or world size) a step can start off that grid: it then ends at the next multiple
            stop = (batch_idx // accumulate + 1) * accumulate
            num_batches = trainer.num_training_batches
            if isinstance(num_batches, int) or math.isfinite(num_batches):
                stop = min(stop, int(num_batches))
            plans = trainer.datamodule.micro_batch_plans(batch_idx + 1, stop)
            counts += [self._planned_counts(plan, step, m, rank) for m, plan in enumerate(plans, start=1)]
        local = sum(counts, StepTotals(0, 0, 0))
        reduced = torch.tensor([local.num_masked, local.num_unmasked, local.num_feature_frames],
                               dtype=torch.float64, device=self.device)
        reduced = self.trainer.strategy.reduce(reduced, reduce_op="sum")
        return counts, StepTotals(*(int(round(c)) for c in reduced.tolist()))

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> Tensor:
        """One micro-batch's loss, to be backwarded.

        ``"fairseq"`` and ``"torchaudio"``: the micro-batch's :func:`~continue_pt.hubert.loss.unnormalized_loss`
        times ``accumulate_grad_batches * world_size``. Lightning divides it by ``accumulate_grad_batches`` and DDP
        averages gradients over ranks, so after the step's backwards ``.grad`` holds the gradient of the loss
        *summed* over every micro-batch of every rank; ``on_before_optimizer_step`` then divides every gradient by
        the step's :func:`~continue_pt.hubert.loss.sample_size` summed over micro-batches and ranks
        (all-reduced): fairseq's ``multiply_grads(1 / sample_size)``. Lightning calls it after the fp16 scaler's
        ``unscale_`` and before gradient clipping, so clipping sees the normalised gradient, as in fairseq.

        ``"per-term"`` (each term divided by its own count over the step, pytorch/audio#2947) needs the step's
        masked, unmasked and feature-frame totals before the first backward: masks depend only on
        ``(seed, step, micro-batch, rank)`` and the micro-batch's shape, so the first micro-batch of a step draws
        the others' masks in advance from their planned shapes (:meth:`_plan_step`) and all-reduces the counts;
        each micro-batch then backwards its :func:`~continue_pt.hubert.loss.normalized_loss` share times
        ``N * world_size`` and the gradients are not divided afterwards. Should a micro-batch's mask counts differ
        from the planned ones (a file that failed to load, a length other than the scanned one), a warning says
        that step's normalisation is approximate.
        """
        if is_empty(batch):
            return self._empty_micro_batch(batch_idx)
        step, micro, rank, world_size = self.begin_micro_batch()  # dropout and layer drop: seeded per micro-batch
        rng = np.random.default_rng([self.options.seed, *micro_batch_key(step, micro, rank, world_size)])
        fgm = self.feature_grad_mult
        if step < self.options.freeze_feature_extractor_steps:
            fgm = 0.0
        terms, mask_counts = self._forward_terms(batch, rng, fgm)
        accumulate = self.trainer.accumulate_grad_batches
        if self.options.hubert.loss_norm == "per-term":
            if micro == 0 or self._step_plan is None:
                self._step_plan = self._plan_step(mask_counts, batch_idx, step, rank)
            planned, totals = self._step_plan
            if micro >= len(planned) or planned[micro] != mask_counts:
                expected = planned[micro] if micro < len(planned) else "no micro-batch"
                warnings.warn(f"step {step}, micro-batch {micro} (rank {rank}): the masks count {mask_counts}, the "
                              f"plan made at the step's first micro-batch {expected} (a file that failed to load, "
                              "or a length other than the scanned one): this step's per-term normalisation is "
                              "approximate", RuntimeWarning, stacklevel=2)
            loss = normalized_loss(terms, totals, self.weights, "per-term")
            size = float(terms.num_masked)  # logged as train/sample_size; the gradients are not divided
            logged = loss.detach()  # this micro-batch's share: summed over micro-batches and ranks, the step's loss
            to_backward = loss * (accumulate * world_size)
        else:  # divided by the step's summed sample size in on_before_optimizer_step
            unnormalized = unnormalized_loss(terms, self.weights, self.options.hubert.loss_norm)
            size = float(sample_size(terms, self.weights, self.options.hubert.loss_norm))
            logged = unnormalized.detach()
            to_backward = unnormalized * (accumulate * world_size)
        self._add_stats(terms, logged, size, batch)
        return to_backward

    def _empty_micro_batch(self, batch_idx: int) -> Tensor:
        """Every file of this micro-batch failed to load: it adds nothing to the step but takes part in the step's
        collectives like any other micro-batch (see :mod:`continue_pt.empty_batch`)."""
        micro = self._micro_index
        self._micro_index += 1
        nothing = StepTotals(0, 0, 0)
        if self.options.hubert.loss_norm == "per-term" and (micro == 0 or self._step_plan is None):
            self._step_plan = self._plan_step(nothing, batch_idx, int(self.global_step), self._world()[1])
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        none = torch.zeros((), dtype=torch.long, device=self.device)
        self._add_stats(HubertLossTerms(None, None, zero, 0, 0, 0, none, none), zero, 0.0,
                        {"waveforms": torch.empty(0, 0), "lengths": None})
        return zero_loss(self)

    def _add_stats(self, terms, loss: Tensor, size: float, batch: dict[str, Any]) -> None:
        def value(t: Tensor | None) -> Tensor:
            return t.detach().double() if t is not None else torch.zeros((), dtype=torch.float64, device=self.device)

        lengths = batch.get("lengths")  # on the CPU: summing it is free
        samples = float(lengths.sum()) if lengths is not None else float(batch["waveforms"].numel())
        # the host's numbers go up in one non-blocking copy
        size_t, n_m, n_u, frames, seconds = to_device(torch.tensor(
            [size, terms.num_masked, terms.num_unmasked, terms.num_feature_frames, samples / self.sample_rate],
            dtype=torch.float64), self.device)
        stats = torch.stack([
            loss.double(), size_t, value(terms.masked_correct), n_m, value(terms.unmasked_correct), n_u,
            value(terms.masked_ce_sum), value(terms.unmasked_ce_sum),
            value(terms.feature_penalty) * terms.num_feature_frames, frames, seconds,
        ])
        self._step_stats = stats if self._step_stats is None else self._step_stats + stats

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide every gradient by the step's sample size over all micro-batches and ranks (fairseq's
        ``multiply_grads``), or skip the step if its loss or gradient is not finite, then log the step. Runs after
        fp16 unscaling and before clipping."""
        self._step_plan = None
        if self._step_stats is not None and self.global_step < self.options.hubert.head_only_steps:
            head = {id(p) for p in self.head_parameters()}
            for p in self.parameters():
                if id(p) not in head:
                    p.grad = None  # AdamW skips parameters without gradient: no update, no weight decay
        step = self.close_step()
        if step is None:
            return
        values, health = step
        (loss_sum, size, correct_m, n_m, correct_u, n_u, ce_m, ce_u, pen_sum, frames, audio_seconds) = values
        divisor = size if size > 0 else 1.0
        if self.options.hubert.loss_norm == "per-term":
            divisor = 1.0
        self.step_or_skip(loss_sum, health, divisor)

        metrics = {
            "train/loss": loss_sum / divisor,
            "train/accuracy_masked": correct_m / n_m if n_m else float("nan"),
            "train/accuracy_unmasked": correct_u / n_u if n_u else float("nan"),
            "train/ce_masked": ce_m / n_m if n_m else float("nan"),
            "train/ce_unmasked": ce_u / n_u if n_u else float("nan"),
            "train/feature_penalty": pen_sum / frames if frames else float("nan"),
            "train/sample_size": size,
        }
        self.log_step(metrics, optimizer, audio_seconds, health.grad_norm / divisor)

    def head_parameters(self) -> list[nn.Parameter]:
        params = list(self.student.logit_generator.parameters())
        if self.extra_label_embeddings is not None:
            params.append(self.extra_label_embeddings)
        return params

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if is_empty(batch):  # every file failed to load: nothing to validate on
            return
        _, rank = self._world()
        rng = np.random.default_rng([self.options.seed, 2, batch_idx, rank])
        terms, _ = self._forward_terms(batch, rng, self.feature_grad_mult)
        size = max(sample_size(terms, self.weights, self.options.hubert.loss_norm), 1)
        loss = unnormalized_loss(terms, self.weights, self.options.hubert.loss_norm).detach() / size
        n_m = max(terms.num_masked, 1)
        self.log("val/loss", loss, batch_size=size, sync_dist=True)
        self.log("val/accuracy_masked", terms.masked_correct.double() / n_m, batch_size=n_m, sync_dist=True)

    # ------------------------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add what export needs (bundle config, steps, the k-means of the targets); leave out the frozen
        teacher (it is rebuilt from its bundle)."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("targets.")]:
            del state[key]
        extra = self.checkpoint_section(family="hubert", num_classes=self.num_classes,
                                        loss_norm=self.options.hubert.loss_norm)
        if self.kmeans is not None:
            extra["kmeans"] = {"centroids": self.kmeans.centroids.detach().cpu().clone(),
                               "layer": self.kmeans.layer, "metadata": dict(self.kmeans.metadata)}
        checkpoint[CHECKPOINT_KEY] = extra

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict")
        if state is not None and self.targets is not None:
            for key, value in self.targets.state_dict().items():
                state.setdefault(f"targets.{key}", value)
