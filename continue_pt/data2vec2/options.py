"""data2vec 2.0's part of the module options: the EMA teacher's schedule and the number of masked copies; its checks
against the starting bundle, and the teacher-continuation policy (entries of ``continue_pt.families.FAMILIES``).

The policy: by default the teacher's decay continues the checkpoint's own schedule from its ``num_updates`` (what
fairseq would do if the run went on). The published checkpoints end their schedules at 0.99999 (BASE) or 1.0
(LARGE): the teacher then barely moves, or not at all, and the targets stay the published model's. That is a sound
start, but a user who wants the teacher to follow the student on new audio restarts an anneal with ``--ema-decay
START:END:STEPS`` (counted from this run's first step); :func:`teacher_policy_warning` says so at the start.

No torch here: ``continue_pt.options`` (the CLI's ``--help``) reads these names and defaults.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bundles.kmeans import KMeansModel
    from bundles.loading import Bundle
    from continue_pt.options import PretrainOptions

NEARLY_FROZEN = 0.9999
"""A decay at or above this leaves the teacher (nearly) frozen: it moves by at most 1e-4 of the student's change
per step, ~10 % of the way after 1000 steps."""
EXAMPLE_RESTART = "0.999:0.9999:20000"


@dataclass(frozen=True)
class EmaSchedule:
    """fairseq's ``ema_decay`` -> ``ema_end_decay`` over ``ema_anneal_end_step`` updates, linear."""

    start: float
    end: float
    anneal_steps: int

    def decay_at(self, updates: int) -> float:
        """The decay the EMA update after update ``updates`` uses (``continue_pt.data2vec2.ema.ema_decay_at``)."""
        if self.start == self.end:
            return self.start
        if updates >= self.anneal_steps:
            return self.end
        return self.end - (self.end - self.start) * (1 - updates / self.anneal_steps)

    def text(self) -> str:
        return f"{self.start:g}:{self.end:g}:{self.anneal_steps}"


def parse_ema_decay(text: str) -> EmaSchedule:
    """``"START:END:STEPS"`` (an anneal over STEPS updates) or ``"DECAY"`` (constant); each decay in [0, 1].
    Raises ValueError saying what was expected."""
    expected = (f"expected START:END:STEPS (decays in [0, 1], STEPS an integer >= 1; e.g. {EXAMPLE_RESTART}) or "
                "one constant decay such as 0.9999")
    parts = [p.strip() for p in str(text).split(":")]
    try:
        if len(parts) == 1:
            start = end = float(parts[0])
            steps = 1
        elif len(parts) == 3:
            start, end, steps = float(parts[0]), float(parts[1]), int(parts[2])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"ema_decay {text!r}: {expected}") from None
    if not all(math.isfinite(d) and 0 <= d <= 1 for d in (start, end)) or steps < 1:
        raise ValueError(f"ema_decay {text!r}: {expected}")
    return EmaSchedule(start, end, steps)


def checkpoint_schedule(objective: Mapping[str, Any]) -> EmaSchedule:
    """The schedule the checkpoint was trained with (fairseq's defaults where its config is silent)."""
    return EmaSchedule(float(objective.get("ema_decay", 0.999)), float(objective.get("ema_end_decay", 0.9999)),
                       int(objective.get("ema_anneal_end_step", 1) or 1))


@dataclass
class Data2Vec2Options:
    """What only data2vec 2.0's module is built from (the rest is :class:`~continue_pt.module_options.ModuleOptions`;
    ``masking`` there overrides ``mask_prob`` / ``mask_length``)."""

    ema_decay: str | None = None
    """``START:END:STEPS``: a new anneal of the teacher's decay from this run's first step; ``DECAY``: constant.
    None: the checkpoint's schedule continued from its ``num_updates``."""
    clone_batch: int | None = None
    """Masked copies of each utterance per step; None: the checkpoint's (8 in the published audio recipes)."""


def describe_targets(options: Mapping[str, Any]) -> tuple[str | None, str]:
    """``(teacher, how the targets were made)``: the EMA teacher inside the bundle, and its schedule."""
    schedule = options.get("ema_decay")
    how = f"restarted anneal {schedule}" if schedule else "the checkpoint's schedule continued"
    return None, f"EMA teacher (top-K block outputs, instance-normalised, averaged); decay: {how}"


def checkpoint_facts(extra: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher's schedule and its last decay in a training checkpoint (``inspect``)."""
    return {"ema_schedule": extra.get("ema_schedule"), "ema_decay": extra.get("ema_decay"),
            "clone_batch": extra.get("clone_batch", options.get("clone_batch"))}


def option_problems(options: PretrainOptions) -> list[str]:
    problems = []
    if options.ema_decay is not None:
        try:
            parse_ema_decay(options.ema_decay)
        except ValueError as exc:
            problems.append(str(exc))
    if options.clone_batch is not None and options.clone_batch < 1:
        problems.append(f"clone_batch must be >= 1 (masked copies of each utterance), got {options.clone_batch}")
    return problems


_NOT_APPLICABLE = {"feature_penalty_weight": None, "feature_grad_mult": None, "freeze_feature_extractor_steps": 0,
                   "logit_temp": None}
"""Common options data2vec 2.0's objective has no use for (no feature penalty, no contrastive logits; its conv front
end trains with the rest), with their defaults."""
MASKING_OVERRIDES = ("mask_prob", "mask_length")
"""The masking overrides data2vec 2.0 reads (its span masks are fairseq's data2vec ones, not MaskingOptions)."""


def unsupported_common_options(values: Mapping[str, Any], masking: Mapping[str, Any]) -> list[str]:
    """Common options set to something data2vec 2.0 would silently ignore."""
    problems = [f"{name} does not apply to data2vec 2.0 (it regresses the teacher's outputs; no feature penalty, "
                "contrastive logits or separate feature-extractor schedule)"
                for name, default in _NOT_APPLICABLE.items() if values.get(name, default) != default]
    others = sorted(set(masking) - set(MASKING_OVERRIDES))
    if others:
        problems.append(f"masking {others} do not apply to data2vec 2.0 (only {', '.join(MASKING_OVERRIDES)} can "
                        "be overridden; the rest is the checkpoint's)")
    return problems


def run_schedule(ema_decay: str | None, objective: Mapping[str, Any], start_updates: int) -> tuple[EmaSchedule, int]:
    """The schedule a run uses and the update its step 0 is at in that schedule: the checkpoint's, at
    ``start_updates``; or a restarted one, at 0."""
    if ema_decay:
        return parse_ema_decay(ema_decay), 0
    return checkpoint_schedule(objective), start_updates


def teacher_policy_warning(bundle_path: str, objective: Mapping[str, Any], start_updates: int,
                           ema_decay: str | None) -> str | None:
    """The start-of-run warning when the teacher's decay leaves it frozen or nearly so (None otherwise)."""
    schedule, offset = run_schedule(ema_decay, objective, start_updates)
    decay = schedule.decay_at(offset)
    if decay < NEARLY_FROZEN:
        return None
    how = (f"the checkpoint's schedule ({schedule.text()}) continued from its update {start_updates:,}"
           if not ema_decay else f"--ema-decay {ema_decay}")
    state = "frozen: the teacher never moves" if decay >= 1 else \
        f"nearly frozen: each step moves the teacher {1 - decay:.0e} of the way to the student"
    return (f"{bundle_path}: the EMA teacher's decay is {decay:g} ({how}), {state}, so the targets stay those of "
            f"the starting model. To let the teacher follow the student on your audio, restart an anneal with "
            f"--ema-decay START:END:STEPS, for example --ema-decay {EXAMPLE_RESTART}")


def bundle_problems(options: PretrainOptions, bundle: Bundle, kmeans: KMeansModel | None = None,
                    kmeans_name: str | None = None) -> list[str]:
    """What the loaded data2vec 2.0 starting ``bundle`` says about the options; warns about a frozen teacher."""
    from continue_pt.options import PretrainOptionsWarning
    from continue_pt.sharding import FSDP_STRATEGY

    if bundle.kind != "pretrain":
        return []  # a fine-tuned bundle is refused before (no pre-training head)
    problems = unsupported_common_options(vars(options), options.masking)
    if options.strategy == FSDP_STRATEGY:
        problems.append(f"--strategy {FSDP_STRATEGY} is not available for data2vec 2.0 yet (its EMA teacher lives "
                        "inside the model FSDP would shard, and each EMA update needs the student's whole weights); "
                        "train with DDP (--strategy auto) and, for long batches, --activation-checkpointing: "
                        "data2vec 2.0 BASE and LARGE fit one GPU")
    objective = dict(bundle.config.objective or {})
    if int(objective.get("mask_length", 5)) <= 1 and "mask_length" not in options.masking:
        problems.append(f"{bundle.path}: mask_length {objective.get('mask_length')} (random masking) is not "
                        "implemented; the audio recipes use spans (pass masking mask_length: 5)")
    if options.ema_decay is None and bundle.num_updates is None:
        warnings.warn(f"{bundle.path}: the updates it was pre-trained for are unknown, so the teacher's decay "
                      f"starts from its schedule's update 0; convert again with --num-updates N, or pass "
                      f"--ema-decay", PretrainOptionsWarning, stacklevel=2)
    if not problems and options.ema_decay is not None and option_problems(options):
        return problems  # reported by option_problems
    if not problems:
        text = teacher_policy_warning(str(bundle.path), objective, int(bundle.num_updates or 0), options.ema_decay)
        if text is not None:
            warnings.warn(text, PretrainOptionsWarning, stacklevel=2)
    return problems
