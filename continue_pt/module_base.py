"""What the two continued pre-training modules share, written once: options, the checkpoint section, micro-batch
seeding, world size, the all-reduced step statistics, fairseq's gradient division (or skipping a bad step), step
logging and the optimiser with its schedule.

:class:`~continue_pt.hubert.module.HubertContinuedPretraining` and
:class:`~continue_pt.wav2vec2.module.Wav2Vec2ContinuedPretraining` differ only in the objective they run.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from continue_pt.device_batch import batch_to_device
from continue_pt.empty_batch import skip_update
from continue_pt.families import FAMILIES
from continue_pt.module_options import ModuleOptions
from continue_pt.step_guard import (
    BadStepGuard,
    divide_,
    fused_grad_norm,
    gradients,
    nonfinite_flag,
    stop_message,
)

CHECKPOINT_KEY = "continue_pt"
"""Key of the dict this module adds to a Lightning checkpoint (read by :mod:`continue_pt.export`)."""
CHECKPOINT_FORMAT = "continue-pt-lightning-checkpoint"
STEP_GUARD_KEY = "continue_pt_step_guard"
"""Key of the skipped-step counters in a Lightning checkpoint (an exact resume continues them)."""


def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] % (2 ** 63))


def micro_batch_key(step: int, micro: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """What the random draws of micro-batch ``micro`` of optimizer step ``step`` on global ``rank`` are seeded
    with: ``(step, micro * world_size + rank, 0)``, its place in the step's global batch. The sampler deals the
    epoch's batches round-robin (batch i to rank i % world_size), so rank r's m-th micro-batch of a step is the
    global batch's micro-batch ``m * world_size + r``: masks, dropout and noise follow the batch, not how the global
    batch is split over devices, nodes and accumulation (2 nodes of 1 device draw what 1 device accumulating 2
    micro-batches draws). On one process it is ``(step, micro, 0)``, the key of earlier versions."""
    return step, micro * world_size + rank, 0


class SkippedStepWarning(RuntimeWarning):
    """An optimizer step was skipped because its loss or gradient was not finite."""


@dataclass
class StepHealth:
    """What the one host read of an optimizer step says besides its statistics."""

    grads_finite: bool
    """On every rank (all-reduced)."""
    grad_norm: float
    """Of the gradients as they are in ``on_before_optimizer_step`` (before the division by the sample size)."""


class ContinuedPretrainingBase(pl.LightningModule):
    """World size and rank, gradient division by the step's sample size, skipping of non-finite steps, AdamW with
    warm-up and decay."""

    options: ModuleOptions

    def __init__(self) -> None:
        super().__init__()
        self._step_started = time.perf_counter()
        self.bad_steps = BadStepGuard()
        """Skipped-step counters; ``bad_steps.max_bad_steps`` is a run setting (``run_pretraining`` sets it), not
        a module option, so a resumed run can change it."""
        self.stop_reason: str | None = None
        """Set when the guard stopped training (too many consecutive bad steps)."""
        self._micro_index = 0
        """Micro-batches run so far in this optimizer step (reset by :meth:`close_step`)."""
        self._step_stats: Tensor | None = None
        """The step's statistics summed over its micro-batches so far, audio seconds last (read by
        :meth:`close_step`)."""

    def take_options(self, options: ModuleOptions | Mapping[str, Any], family: str) -> ModuleOptions:
        """Keep ``options`` (or the flat dict Lightning gives back from a checkpoint) as ``self.options`` and in the
        checkpoint's hyper-parameters; another family's options, set to anything but their defaults, are refused."""
        options = ModuleOptions.of(options)
        foreign = [f"{name} ({other.title})" for key, other in FAMILIES.items() if key != family
                   for name, value in vars(options.family_part(key)).items()
                   if value != getattr(other.options(), name)]
        if foreign:
            raise ValueError(f"{', '.join(foreign)} do not apply to {FAMILIES[family].title} pre-training: "
                             f"{FAMILIES[family].without}")
        self.options = options
        self.save_hyperparameters({"options": options.to_hparams()})
        return options

    def begin_micro_batch(self) -> tuple[int, int, int, int]:
        """``(step, micro-batch, rank, world size)`` of the micro-batch about to run, with torch's global RNG (dropout,
        layer drop, Gumbel noise) seeded from the seed and :func:`micro_batch_key`: an exact resume."""
        world_size, rank = self._world()
        step, micro = int(self.global_step), self._micro_index
        self._micro_index += 1
        torch.manual_seed(seed_of(self.options.seed, 1, *micro_batch_key(step, micro, rank, world_size)))
        return step, micro, rank, world_size

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch_to_device(batch, device)  # lengths, indices, starts stay on the CPU (no host syncs)

    def checkpoint_section(self, **extra: Any) -> dict[str, Any]:
        """What export needs in the checkpoint (``checkpoint[CHECKPOINT_KEY]``): the bundle config it started from,
        the steps trained and the options, with the family's ``extra``."""
        return {"format": CHECKPOINT_FORMAT, "bundle_config": self.bundle_config.to_json(),
                "steps": int(self.global_step), "options": json.dumps(self.options.to_hparams()), **extra}

    def log_step(self, metrics: dict[str, float], optimizer: torch.optim.Optimizer, audio_seconds: float,
                 grad_norm: float | None = None) -> None:
        """Log one optimizer step's ``metrics`` with the learning rate, audio seconds per second of wall time
        since the previous step, the global gradient norm (after normalisation, before clipping; ``None``: computed
        here, one more host read, for callers without :meth:`read_step`) and the number of steps skipped so far."""
        if grad_norm is None:
            norm = fused_grad_norm(gradients(self.parameters()))
            grad_norm = float(norm) if norm is not None else 0.0
        now = time.perf_counter()
        elapsed, self._step_started = now - self._step_started, now
        metrics = {**metrics, "train/lr": optimizer.param_groups[0]["lr"],
                   "train/audio_seconds_per_second": audio_seconds / elapsed if elapsed > 0 else float("nan"),
                   "train/grad_norm": grad_norm, "train/skipped_steps": float(self.bad_steps.skipped_steps)}
        self.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)

    def _world(self) -> tuple[int, int]:
        trainer = self._trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def read_step(self, stats: Tensor) -> tuple[list[float], StepHealth]:
        """Sum the step's statistics over ranks together with a non-finite-gradient flag, and read them and the
        gradient norm with one host synchronisation (one fused norm over all gradients, no per-tensor ``.item()``)."""
        norm = fused_grad_norm(gradients(self.parameters()))
        local = torch.cat([stats.to(torch.float64).reshape(-1), nonfinite_flag(norm, stats.device)])
        if getattr(self.trainer.strategy, "shards_gradients", False):  # FSDP: the norm is the shards' norms summed
            squared = norm.detach().to(torch.float64) ** 2 if norm is not None else torch.zeros((), dtype=torch.float64)
            local = torch.cat([local, squared.to(local.device).reshape(1)])
            values = self.trainer.strategy.reduce(local, reduce_op="sum").tolist()
            values[-1] = math.sqrt(values[-1])
        else:
            reduced = self.trainer.strategy.reduce(local, reduce_op="sum")
            tail = (norm.detach().to(device=reduced.device, dtype=torch.float64).reshape(1) if norm is not None
                    else torch.zeros(1, dtype=torch.float64, device=reduced.device))
            values = torch.cat([reduced, tail]).tolist()
        return values[:-2], StepHealth(grads_finite=values[-2] == 0, grad_norm=values[-1])

    def close_step(self) -> tuple[list[float], StepHealth] | None:
        """At the optimizer step: the step's statistics (``self._step_stats``, summed over its micro-batches, with
        the audio seconds last) summed over ranks and read once, with the step's health; the per-step state is
        reset. None when no micro-batch ran, or when every micro-batch of the step on every rank was empty (then
        no update is made)."""
        stats, self._step_stats, self._micro_index = self._step_stats, None, 0
        if stats is None:
            return None
        values, health = self.read_step(stats)
        if values[-1] == 0:  # no audio seconds: every micro-batch of the step, on every rank, was empty
            skip_update(self, int(self.global_step))
            return None
        return values, health

    def step_or_skip(self, loss: float, health: StepHealth, divisor: float) -> bool:
        """Divide every gradient by ``divisor`` (fairseq's ``multiply_grads(1 / sample_size)``), or, when the
        step's loss or gradient is not finite, drop every gradient so that the optimizer changes nothing (AdamW
        skips parameters without a gradient: no update, no weight decay, no moment or step-count change). Every
        rank decides alike (``loss`` and the flag are all-reduced). Returns True when the step is skipped."""
        loss_finite = math.isfinite(loss)
        scale = self._loss_scale() if loss_finite and not health.grads_finite else None
        step = int(self.global_step)
        verdict = self.bad_steps.judge(step, loss_finite, health.grads_finite, scale)
        if not verdict.skip:
            divide_(gradients(self.parameters()), divisor)
            return False
        for p in self.parameters():
            p.grad = None
        if self._world()[1] == 0:
            warnings.warn(f"step {step}: {verdict.reason}; optimizer step skipped ({self.bad_steps.skipped_steps} "
                          f"skipped so far, {self.bad_steps.consecutive_bad} consecutive of at most "
                          f"{self.bad_steps.max_bad_steps})", SkippedStepWarning, stacklevel=2)
        if verdict.stop:
            self.stop_reason = stop_message(step, self.bad_steps, verdict.reason, str(self.trainer.precision))
            self.trainer.should_stop = True
        return True

    def _loss_scale(self) -> float | None:
        """The fp16 GradScaler's current scale, None without one (bf16, 32-bit)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None else None

    def divide_gradients(self, divisor: float) -> None:
        """fairseq's ``multiply_grads(1 / sample_size)``: every gradient divided by the step's sample size."""
        divide_(gradients(self.parameters()), divisor)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[STEP_GUARD_KEY] = self.bad_steps.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.bad_steps.load_state_dict(checkpoint.get(STEP_GUARD_KEY) or {})

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (fairseq's recipes: betas (0.9, 0.98), eps 1e-6, weight decay 0.01), linear warm-up to
        ``lr`` then linear (or cosine) decay to 0 at the trainer's ``max_steps``, stepped every update."""
        o = self.options
        params = self.optimized_parameters()
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                      weight_decay=o.weight_decay, **self._fused_adamw(params))
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None:
            raise ValueError("set the Trainer's max_steps: the learning-rate schedule decays to 0 at max_steps")
        schedule = lr_factor(o.warmup_steps, total, o.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def optimized_parameters(self) -> list[torch.nn.Parameter]:
        """What AdamW updates: every parameter (a family leaves out what must not be in the optimizer)."""
        return list(self.parameters())

    def _fused_adamw(self, params: list[torch.nn.Parameter]) -> dict[str, bool]:
        """``fused=True`` when every parameter is on CUDA and no fp16 GradScaler runs (a fused AdamW unscales in its
        own step, which Lightning then refuses to clip, and the division in ``on_before_optimizer_step`` needs
        unscaled gradients); otherwise torch's default (CPU runs unchanged, so their results stay bit-identical)."""
        if not params or not all(p.is_cuda for p in params):
            return {}
        trainer = self._trainer
        if trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None:
            return {}
        return {"fused": True}


def lr_factor(warmup: int, total: int, schedule: str):
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup  # fairseq's polynomial_decay: lr * num_updates / warmup (from update 1)
        remaining = max(total - warmup, 1)
        progress = min(max(step - warmup, 0) / remaining, 1.0)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor
