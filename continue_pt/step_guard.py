"""The optimizer step path: fused gradient norm and division, and the guard that skips non-finite steps.

A long run must survive a bad step (a batch that diverges, an fp16 overflow): a step whose loss or gradient is not
finite is *skipped*: every gradient is dropped before ``optimizer.step()``, so AdamW leaves the weights and its
state (moments, step counts) untouched. The step still counts: Lightning's ``global_step`` and the learning-rate
schedule advance as for any step (as they do for the steps the fp16 ``GradScaler`` skips), so ``max_steps``
includes skipped steps and the seeds drawn from the step number, hence an exact resume, are unaffected. After
``max_bad_steps`` consecutive bad steps the run stops with :class:`TrainingStopped`.

Under the fp16 ``GradScaler`` a step with a finite loss but overflowing gradients is the scaler's business (it skips
the step and lowers the scale; at the start of a run this happens several times by design): it is skipped and
counted in ``train/skipped_steps`` but counts towards ``max_bad_steps`` only once the scale has fallen to
fairseq's ``min_loss_scale`` (1e-4), where fairseq too gives up ("the loss is probably exploding").

Everything here costs no GPU->CPU synchronisation: the caller packs :func:`nonfinite_flag` into the step's statistics
tensor it reduces over ranks and reads once (the flag is all-reduced, so every rank skips the same steps).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bundles.errors import FileProblem
from continue_pt.options import DEFAULT_MAX_BAD_STEPS

MIN_LOSS_SCALE = 1e-4
"""fairseq's ``--min-loss-scale``: a GradScaler overflow below this scale counts as a bad step."""


class TrainingStopped(FileProblem):
    """Training stopped itself (too many consecutive non-finite steps); ``path`` is the checkpoint to resume from."""


def gradients(parameters: Iterable[nn.Parameter]) -> list[Tensor]:
    return [p.grad for p in parameters if p.grad is not None]


def fused_grad_norm(grads: list[Tensor]) -> Tensor | None:
    """The 2-norm of all ``grads`` viewed as one vector, as one ``_foreach_norm`` and a stack (no host sync);
    None without gradients."""
    if not grads:
        return None
    norms = torch._foreach_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([n.to(torch.float32) for n in norms]), 2.0)


def divide_(grads: list[Tensor], divisor: float) -> None:
    """Every gradient divided by ``divisor`` in place (one ``_foreach_div_``)."""
    if grads and divisor != 1.0:
        torch._foreach_div_(grads, divisor)


def nonfinite_flag(norm: Tensor | None, device: torch.device) -> Tensor:
    """1.0 where the gradient norm is NaN or infinite (any non-finite element makes the norm so), else 0.0: summed
    over ranks, > 0 means some rank saw a non-finite gradient."""
    if norm is None:
        return torch.zeros(1, dtype=torch.float64, device=device)
    return (~torch.isfinite(norm)).to(torch.float64).reshape(1)


@dataclass
class StepVerdict:
    skip: bool
    """Drop the gradients: no optimizer update."""
    bad: bool
    """Counts towards the consecutive limit."""
    stop: bool
    """The consecutive limit is reached: stop training."""
    reason: str = ""


@dataclass
class BadStepGuard:
    """Counts skipped steps and consecutive bad steps; its state goes into the training checkpoint."""

    max_bad_steps: int = DEFAULT_MAX_BAD_STEPS
    skipped_steps: int = 0
    consecutive_bad: int = 0
    last_good_step: int = -1

    def judge(self, step: int, loss_finite: bool, grads_finite: bool, loss_scale: float | None) -> StepVerdict:
        """Decide about optimizer step ``step``. ``loss_scale``: the GradScaler's scale (fp16), else None."""
        if loss_finite and grads_finite:
            self.consecutive_bad = 0
            self.last_good_step = step
            return StepVerdict(skip=False, bad=False, stop=False)
        self.skipped_steps += 1
        if not loss_finite:
            reason = "non-finite loss"
            bad = True
        elif loss_scale is not None:
            reason = f"fp16 gradient overflow at loss scale {loss_scale:g}"
            bad = loss_scale <= MIN_LOSS_SCALE
        else:
            reason = "non-finite gradient"
            bad = True
        if bad:
            self.consecutive_bad += 1
        return StepVerdict(skip=True, bad=bad, stop=bad and self.consecutive_bad >= self.max_bad_steps,
                           reason=reason)

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "consecutive_bad": self.consecutive_bad,
                "last_good_step": self.last_good_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_bad = int(state.get("consecutive_bad", 0))
        self.last_good_step = int(state.get("last_good_step", -1))


def stop_message(step: int, guard: BadStepGuard, reason: str, precision: str) -> str:
    """Why the run stopped and what to try (bf16 first when fp16 is in use)."""
    weights = (f"the weights are those after step {guard.last_good_step}" if guard.last_good_step >= 0
               else "no step of this run updated the weights")
    advice = []
    if str(precision).startswith("16"):
        advice.append("train in bf16 (--precision bf16-mixed): fp16 overflows in HuBERT/wav2vec 2.0 "
                      "(pytorch/audio#2947, fairseq#3750)")
    advice += ["lower the learning rate (--lr)", "look for broken audio in the batches of these steps"]
    return (f"training stopped at step {step}: {guard.consecutive_bad} consecutive steps were skipped "
            f"(the last: {reason}); {weights} (skipped steps change nothing). Try to "
            + "; ".join(advice) + ", then continue with --resume")
