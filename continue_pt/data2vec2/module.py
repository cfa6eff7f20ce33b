"""Continue data2vec 2.0's pre-training of a bundle: a thin LightningModule over the plain functions of
:mod:`continue_pt.data2vec2` (masks, targets, loss, EMA).

Per micro-batch: the ``clone_batch`` masked copies of each utterance (fairseq's ``MaskSeed(seed, num_updates, id)``
seeding, so masks follow the utterance and the update, not the batching), the EMA teacher's targets, the student
and decoder, the summed loss of the masked frames. Per optimizer step: every gradient divided by the step's masked
frames over all micro-batches and ranks (fairseq's ``sample_size``), then, after the optimizer moved the student, the
EMA update of the teacher with the decay of that update (fairseq's ``set_num_updates``). The teacher takes no
gradient and is not in the optimizer, but it is in the state dict: checkpoints, exact resume and export carry it.

Logged every step: loss, ema_decay, target_var, pred_var (fairseq's collapse signs); a warning once per run when
either falls below the checkpoint's ``min_target_var`` / ``min_pred_var`` (fairseq stops; we warn and continue).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import Tensor

from bundles.loading import load_bundle
from continue_pt.data2vec2.ema import ema_update
from continue_pt.data2vec2.masking import clone_masks
from continue_pt.data2vec2.objective import Data2Vec2Objective, RegressionLoss, data2vec2_loss
from continue_pt.data2vec2.options import run_schedule, unsupported_common_options
from continue_pt.device_batch import frames_and_padding, to_device
from continue_pt.empty_batch import is_empty, zero_loss
from continue_pt.module_base import CHECKPOINT_KEY, ContinuedPretrainingBase
from continue_pt.module_options import ModuleOptions

MIN_TARGET_VAR, MIN_PRED_VAR = 0.1, 0.01
"""fairseq's ``Data2VecMultiConfig`` defaults, for checkpoints whose config does not store them."""


class CollapseWarning(UserWarning):
    """The targets or the predictions lost their variance across frames: data2vec 2.0 is collapsing."""


def variance_of_sums(count: float, sums: Tensor, squares: Tensor) -> float:
    """fairseq's ``compute_var`` from all-reduced sums: the mean over dimensions of the per-dimension standard
    deviation (unbiased variance, +1e-6 under the root)."""
    if count < 2:
        return float("nan")
    var = squares / (count - 1) - sums ** 2 / (count * (count - 1))
    return float(torch.sqrt(var + 1e-6).mean())


class Data2Vec2ContinuedPretraining(ContinuedPretrainingBase):
    """Continue data2vec 2.0's pre-training of a bundle. See the module docstring.

    Args:
        options: :class:`~continue_pt.module_options.ModuleOptions` or the dict of its fields (what Lightning gives
            back from a checkpoint). The other families' fields must be unset.
    """

    def __init__(self, options: ModuleOptions | dict[str, Any]):
        super().__init__()
        options = self.take_options(options, "data2vec2")
        problems = unsupported_common_options(vars(options), options.masking)
        if problems:
            raise ValueError("; ".join(problems))
        bundle = load_bundle(options.bundle)
        if bundle.family != "data2vec2":
            raise ValueError(f"{bundle.path}: a {bundle.family} bundle; this module continues data2vec 2.0")
        self.bundle_config = bundle.config
        self.student = bundle.get_pretrain_model()  # student, decoder and EMA teacher; raises for CTC bundles
        self.student.teacher.requires_grad_(False)
        objective = dict(bundle.config.objective or {})
        own = options.data2vec2
        self.objective = Data2Vec2Objective.from_bundle(objective, bundle.config.pretrain_args["decoder"])
        if own.clone_batch is not None:
            self.objective = dataclasses.replace(self.objective, clone_batch=int(own.clone_batch))
        masking = {**objective, **options.masking}
        self.mask_prob, self.mask_length = float(masking.get("mask_prob", 0.65)), int(masking.get("mask_length", 10))
        self.mask_settings = {name: objective.get(name, default) for name, default in
                              (("mask_dropout", 0.0), ("add_masks", False), ("inverse_mask", False))}
        # fairseq's cfg.seed (common.seed, 1 in the recipes): the masks equal fairseq's; --seed drives the rest
        self.mask_seed = int(objective["seed"]) if objective.get("seed") is not None else 1
        self.start_updates = int(bundle.num_updates or 0)
        self.schedule, self.schedule_offset = run_schedule(own.ema_decay, objective, self.start_updates)
        self.min_target_var = float(objective.get("min_target_var", MIN_TARGET_VAR))
        self.min_pred_var = float(objective.get("min_pred_var", MIN_PRED_VAR))
        self.sample_rate = bundle.sample_rate
        self.data_normalizes = bundle.normalize_waveform
        self._conv_layers = bundle.config.encoder_args["extractor_conv_layer_config"]
        self._dim = int(bundle.config.encoder_args["encoder_embed_dim"])
        self._update_made = False
        self._warned: set[str] = set()
        self.ema_decay = self.decay_after_update(0)

    # ------------------------------------------------------------------------------------------- schedule

    def decay_after_update(self, step: int) -> float:
        """The teacher's decay for the EMA update after this run's optimizer step ``step`` (1-based, fairseq's
        ``set_num_updates(n)``)."""
        return self.schedule.decay_at(self.schedule_offset + step)

    def mask_updates(self) -> int:
        """fairseq's ``num_updates`` at the forward (what the masks are seeded with)."""
        return self.start_updates + int(self.global_step)

    def unused_parameter_reasons(self) -> list[str]:
        """Why DDP may see trainable parameters without a gradient (the teacher is frozen: DDP leaves it out)."""
        args = self.student.student.args
        rates = [r for r in (args.encoder_layer_drop, args.prenet_layer_drop) if r > 0]
        return [f"layer drop {max(rates):g} skips whole blocks"] if rates else []

    def optimized_parameters(self) -> list[torch.nn.Parameter]:
        """Everything but the EMA teacher, which only the EMA update moves."""
        teacher = {id(p) for p in self.student.teacher.parameters()}
        return [p for p in self.parameters() if id(p) not in teacher]

    # ------------------------------------------------------------------------------------------- steps

    def draw_mask(self, batch: dict[str, Any], frames: int, frame_padding: Tensor | None) -> Tensor:
        """``[batch * clone_batch, frames]`` bool, seeded as fairseq's (``continue_pt.data2vec2.masking``)."""
        return clone_masks(frame_padding, frames, batch["indices"].cpu(), clone_batch=self.objective.clone_batch,
                           mask_prob=self.mask_prob, mask_length=self.mask_length, seed=self.mask_seed,
                           update=self.mask_updates(), **self.mask_settings)

    def _forward(self, batch: dict[str, Any]) -> RegressionLoss:
        waveforms = batch["waveforms"]
        frames, frame_padding, lengths = frames_and_padding(self._conv_layers, waveforms, batch.get("lengths"))
        mask = to_device(self.draw_mask(batch, frames, frame_padding), waveforms.device)
        return data2vec2_loss(self.student, waveforms, lengths, mask, self.objective)

    def _stats_size(self) -> int:
        return 4 * self._dim + 5  # loss, sample size, frames, 2 x (sums, squares) of dim, audio seconds

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> Tensor:
        if is_empty(batch):  # every file failed to load: nothing to add, but take part (continue_pt.empty_batch)
            self._micro_index += 1
            stats = torch.zeros(self._stats_size(), dtype=torch.float64, device=self.device)
            self._step_stats = stats if self._step_stats is None else self._step_stats
            return zero_loss(self)
        _, _, _, world_size = self.begin_micro_batch()  # dropout, layer drop, mask noise: seeded
        out = self._forward(batch)
        self._add_stats(out, batch)
        # Lightning divides by the accumulation, DDP averages over ranks: undone here, divided by the step's
        # sample size in on_before_optimizer_step (fairseq's multiply_grads(1 / sample_size))
        return out.loss * (self.trainer.accumulate_grad_batches * world_size)

    def _add_stats(self, out: RegressionLoss, batch: dict[str, Any]) -> None:
        lengths = batch.get("lengths")
        samples = float(lengths.sum()) if lengths is not None else float(batch["waveforms"].numel())
        pred, target = out.prediction.double(), out.target.double()
        rows = torch.tensor([float(pred.shape[0]), samples / self.sample_rate], dtype=torch.float64)
        rows = to_device(rows, self.device)
        stats = torch.cat([out.loss.detach().double().reshape(1), out.sample_size.double().reshape(1),
                           rows[:1], pred.sum(0), (pred ** 2).sum(0), target.sum(0), (target ** 2).sum(0),
                           rows[1:]])
        self._step_stats = stats if self._step_stats is None else self._step_stats + stats

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide every gradient by the step's masked frames (all micro-batches and ranks), or skip a non-finite
        step; log the step and watch the collapse signs. Runs after fp16 unscaling, before clipping."""
        self._update_made = False
        step = self.close_step()
        if step is None:
            return
        values, health = step
        d = self._dim
        loss_sum, size, count = values[0], values[1], values[2]
        pred_s, pred_ss = torch.tensor(values[3:3 + d]), torch.tensor(values[3 + d:3 + 2 * d])
        tgt_s, tgt_ss = torch.tensor(values[3 + 2 * d:3 + 3 * d]), torch.tensor(values[3 + 3 * d:3 + 4 * d])
        divisor = size if size > 0 else 1.0
        self._update_made = not self.step_or_skip(loss_sum, health, divisor)
        pred_var, target_var = variance_of_sums(count, pred_s, pred_ss), variance_of_sums(count, tgt_s, tgt_ss)
        # the decay of the EMA update that follows this step (fairseq logs the decay set for the update it counts)
        metrics = {"train/loss": loss_sum / max(size, 1.0), "train/ema_decay": self.decay_after_update(
                   int(self.global_step) + 1),
                   "train/target_var": target_var, "train/pred_var": pred_var, "train/sample_size": size}
        self.log_step(metrics, optimizer, values[-1], health.grad_norm / divisor)
        self._watch_collapse(target_var, pred_var)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the teacher's EMA update (once per optimizer step, never per micro-batch; not
        after a skipped step, as fairseq's trainer does not count an overflowed one)."""
        super().optimizer_step(*args, **kwargs)
        if self._update_made:
            self.ema_decay = self.decay_after_update(int(self.global_step) + 1)
            ema_update(self.student.teacher, self.student.student.encoder, self.ema_decay)
        self._update_made = False

    def _watch_collapse(self, target_var: float, pred_var: float) -> None:
        step = int(self.global_step)
        checks = (("target_var", target_var, self.min_target_var,
                   "the teacher's targets are nearly constant across frames: check the audio (silence, one repeated "
                   "sound), lower --lr, or restart from the bundle with a slower teacher (--ema-decay with a higher "
                   "START)"),
                  ("pred_var", pred_var, self.min_pred_var,
                   "the student's predictions are nearly constant: lower --lr or raise --warmup-steps"))
        for name, value, low, advice in checks:
            if not value < low or name in self._warned:
                continue
            self._warned.add(name)
            if self._world()[1] == 0:
                warnings.warn(f"step {step}: collapse? {name} {value:.3g} is below the checkpoint's min_{name} "
                              f"{low:g} (fairseq stops here; this run continues). {advice}", CollapseWarning,
                              stacklevel=2)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if is_empty(batch):
            return
        out = self._forward(batch)
        size = max(int(out.sample_size), 1)
        self.log("val/loss", out.loss.detach() / size, batch_size=size, sync_dist=True)

    # ------------------------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_section(family="data2vec2", loss_norm="fairseq",
                                                             ema_decay=self.ema_decay,
                                                             ema_schedule=self.schedule.text(),
                                                             clone_batch=self.objective.clone_batch)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        section = checkpoint.get(CHECKPOINT_KEY) or {}
        if "ema_decay" in section:
            self.ema_decay = float(section["ema_decay"])
