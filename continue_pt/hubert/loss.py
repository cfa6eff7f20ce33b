"""HuBERT's loss from the forward's logits (:mod:`continue_pt.hubert.objective`), equal to fairseq's
``HubertCriterion`` + trainer: one micro-batch's cross-entropy sums and counts (:func:`hubert_loss_terms`), the
step's counts (:class:`StepTotals`), and the division that makes the summed micro-batch gradients the step's
(:func:`sample_size`, :func:`unnormalized_loss`, :func:`normalized_loss`; the pipeline is in the objective's
docstring).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from continue_pt.frames import at_least_fp32
from continue_pt.hubert.objective import HubertOutputs
from continue_pt.hubert.options import LOSS_NORMS

__all__ = [
    "LOSS_MODES",
    "HubertLossTerms",
    "LossMode",
    "LossWeights",
    "StepTotals",
    "hubert_loss_terms",
    "normalized_loss",
    "sample_size",
    "unnormalized_loss",
]

LossMode = Literal["fairseq", "torchaudio", "per-term"]
LOSS_MODES: tuple[LossMode, ...] = LOSS_NORMS  # type: ignore[assignment]  (named torch-free there)


# ------------------------------------------------------------------------------------------------ loss terms


@dataclass
class HubertLossTerms:
    """The additive pieces of one micro-batch's loss.

    Attributes:
        masked_ce_sum, unmasked_ce_sum: summed cross-entropy over masked / unmasked frames (fp32 scalars;
            None where the logits were skipped).
        feature_penalty: the micro-batch's mean squared conv feature (fp32 scalar).
        num_masked, num_unmasked: frames that were predicted (0 where skipped).
        num_feature_frames: frames ``feature_penalty`` averages over.
        masked_correct, unmasked_correct: frames whose target scores at least as high as every other class
            (detached long scalars). That is fairseq's ``compute_correct`` (argmax of ``[positive, rows...]`` is
            the positive, which wins ties); its "all logits equal" exclusion never fires in HuBERT, as the
            positive's duplicate column is ``-inf``.
    """

    masked_ce_sum: Tensor | None
    unmasked_ce_sum: Tensor | None
    feature_penalty: Tensor
    num_masked: int
    num_unmasked: int
    num_feature_frames: int
    masked_correct: Tensor
    unmasked_correct: Tensor


def _ce_and_correct(logits: Tensor | None, targets: Tensor | None, like: Tensor) -> tuple[Tensor | None, Tensor, int]:
    if logits is None or targets is None:
        return None, torch.zeros((), dtype=torch.long, device=like.device), 0
    targets = targets.long()
    ce = F.cross_entropy(at_least_fp32(logits), targets, reduction="sum")
    with torch.no_grad():
        if logits.shape[0] == 0:
            correct = torch.zeros((), dtype=torch.long, device=logits.device)
        else:
            target_logit = logits.gather(1, targets[:, None]).squeeze(1)
            correct = (target_logit >= logits.max(dim=1).values).sum()
    return ce, correct, int(logits.shape[0])


def hubert_loss_terms(out: HubertOutputs) -> HubertLossTerms:
    """Cross-entropy sums, counts and accuracy counts of one micro-batch (see :class:`HubertLossTerms`)."""
    ce_m, correct_m, n_m = _ce_and_correct(out.logits_masked, out.targets_masked, out.feature_penalty)
    ce_u, correct_u, n_u = _ce_and_correct(out.logits_unmasked, out.targets_unmasked, out.feature_penalty)
    return HubertLossTerms(ce_m, ce_u, out.feature_penalty, n_m, n_u, out.num_feature_frames, correct_m, correct_u)


# ------------------------------------------------------------------------------------------------ normalisation


@dataclass(frozen=True)
class LossWeights:
    """fairseq's ``pred_masked_weight``, ``pred_nomask_weight`` and ``loss_weights[0]`` (features_pen)."""

    masked: float = 1.0
    unmasked: float = 0.0
    feature_penalty: float = 10.0

    def __post_init__(self) -> None:
        if self.masked < 0 or self.unmasked < 0:
            raise ValueError(f"loss weights of masked ({self.masked}) and unmasked ({self.unmasked}) frames "
                             "must be >= 0")


@dataclass(frozen=True)
class StepTotals:
    """Counts summed over every micro-batch of one optimizer step, on every rank."""

    num_masked: int
    num_unmasked: int
    num_feature_frames: int

    @classmethod
    def of(cls, terms: Iterable[HubertLossTerms]) -> "StepTotals":
        """Totals of the given micro-batches' terms."""
        terms = list(terms)
        return cls(sum(t.num_masked for t in terms), sum(t.num_unmasked for t in terms),
                   sum(t.num_feature_frames for t in terms))

    @classmethod
    def of_masks(cls, mask: Tensor, frame_padding_mask: Tensor | None = None) -> "StepTotals":
        """One micro-batch's counts from its time mask ``[batch, frames]`` and fairseq's frame padding, before
        the forward pass (equal to :meth:`of` of its terms unless masked or unmasked logits are skipped)."""
        mask = mask.bool()
        valid = torch.ones_like(mask) if frame_padding_mask is None else ~frame_padding_mask.bool()
        return cls(int((mask & valid).sum()), int((~mask & valid).sum()), int(mask.numel()))

    def __add__(self, other: "StepTotals") -> "StepTotals":
        return StepTotals(self.num_masked + other.num_masked, self.num_unmasked + other.num_unmasked,
                          self.num_feature_frames + other.num_feature_frames)


def _required(ce: Tensor | None, weight: float, what: str) -> Tensor | None:
    if weight == 0:
        return None
    if ce is None:
        raise ValueError(f"the {what} loss weight is {weight} but the {what} logits were skipped "
                         f"(skip_{'masked' if what == 'masked' else 'nomask'})")
    return ce


def sample_size(terms: HubertLossTerms | StepTotals, weights: LossWeights = LossWeights(),
                mode: LossMode = "fairseq") -> int:
    """fairseq's ``sample_size`` of one micro-batch (or, given :class:`StepTotals`, of the step): what the step's
    summed gradient is divided by.

    ``"fairseq"`` (``HubertCriterion``: a kind of frame counts only if its weight is > 0) and ``"per-term"`` (the
    size validation divides by): ``n_m [w_m > 0] + n_u [w_u > 0]``; ``"torchaudio"``: ``n_m``."""
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown loss mode {mode!r}; expected one of {LOSS_MODES}")
    if mode == "torchaudio":
        return terms.num_masked
    return terms.num_masked * (weights.masked > 0) + terms.num_unmasked * (weights.unmasked > 0)


def unnormalized_loss(terms: HubertLossTerms, weights: LossWeights = LossWeights(),
                      mode: LossMode = "fairseq") -> Tensor:
    """``HubertCriterion``'s loss of one micro-batch before the trainer's division:
    ``w_p * pen_i * S_i + w_m CE_m_i + w_u CE_u_i`` with ``S_i`` = :func:`sample_size` (a term with weight 0 is
    left out, as fairseq leaves it out)."""
    ce_m = _required(terms.masked_ce_sum, weights.masked, "masked")
    ce_u = _required(terms.unmasked_ce_sum, weights.unmasked, "unmasked")
    loss = terms.feature_penalty * (weights.feature_penalty * sample_size(terms, weights, mode))
    if ce_m is not None:
        loss = loss + ce_m * weights.masked
    if ce_u is not None:
        loss = loss + ce_u * weights.unmasked
    return loss


def _zero_with_graph(terms: HubertLossTerms) -> Tensor:
    """Nothing to learn from: a zero that keeps the graph (every parameter gets a zero gradient)."""
    graph = [t for t in (terms.masked_ce_sum, terms.unmasked_ce_sum, terms.feature_penalty) if t is not None]
    return sum((t * 0.0 for t in graph), torch.zeros((), device=terms.feature_penalty.device))


def normalized_loss(
    terms: HubertLossTerms,
    totals: StepTotals,
    weights: LossWeights = LossWeights(),
    mode: LossMode = "fairseq",
) -> Tensor:
    """This micro-batch's share of the step's loss: summed over the step's micro-batches (with ``totals`` of
    them all), the gradients are those of the whole step. Terms with weight 0 or a zero total contribute 0.

    Modes (``n_m``, ``n_u``, ``F``: masked, unmasked, penalty frames; ``_i`` this micro-batch, plain: totals):

    * ``"fairseq"`` (fairseq's ``HubertCriterion`` + trainer): :func:`unnormalized_loss` divided by the step's
      :func:`sample_size` ``S = n_m [w_m > 0] + n_u [w_u > 0]``:
      ``loss_i = (w_m CE_m_i + w_u CE_u_i + w_p * pen_i * S_i) / max(S, 1)``. Note the penalty is weighted by
      each micro-batch's sample size, as fairseq weights it across GPUs and accumulated batches; so it equals
      the one-batch loss only when the micro-batches' ``S_i / F_i`` agree (e.g. equal lengths, fairseq's
      same-count masks).
    * ``"torchaudio"`` (torchaudio's ``examples/hubert`` loss): as fairseq, with ``S_i = n_m_i`` always.
    * ``"per-term"`` (pytorch/audio#2947): ``w_m CE_m_i / n_m + w_u CE_u_i / n_u + w_p * pen_i * F_i / F``:
      each term a mean over its own frames of the step, the penalty a mean over all feature frames.

    The training module runs exactly this: :func:`unnormalized_loss` per micro-batch and the division by the
    step's summed :func:`sample_size` on the summed gradients (``"fairseq"``, ``"torchaudio"``), or this function
    itself (``"per-term"``).
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown loss mode {mode!r}; expected one of {LOSS_MODES}")
    if mode != "per-term":
        size = sample_size(totals, weights, mode)
        if size <= 0:
            _required(terms.masked_ce_sum, weights.masked, "masked")
            _required(terms.unmasked_ce_sum, weights.unmasked, "unmasked")
            return _zero_with_graph(terms)
        return unnormalized_loss(terms, weights, mode) / size
    ce_m = _required(terms.masked_ce_sum, weights.masked, "masked")
    ce_u = _required(terms.unmasked_ce_sum, weights.unmasked, "unmasked")
    pieces: list[Tensor] = []
    if ce_m is not None and totals.num_masked > 0:
        pieces.append(ce_m * (weights.masked / totals.num_masked))
    if ce_u is not None and totals.num_unmasked > 0:
        pieces.append(ce_u * (weights.unmasked / totals.num_unmasked))
    if weights.feature_penalty != 0 and totals.num_feature_frames > 0:
        share = terms.num_feature_frames / totals.num_feature_frames
        pieces.append(terms.feature_penalty * (weights.feature_penalty * share))
    if not pieces:
        return _zero_with_graph(terms)
    return torch.stack(pieces).sum()
