"""wav2vec 2.0's part of the module options: the contrastive task's coefficients and the codebook collapse guard;
and wav2vec 2.0's check of the options against the starting bundle (an entry of ``continue_pt.families.FAMILIES``).

No torch here: ``continue_pt.options`` (the CLI's ``--help``) reads these names and defaults; the check imports
what it needs when called.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bundles.kmeans import KMeansModel
    from bundles.loading import Bundle
    from continue_pt.options import PretrainOptions


@dataclass
class Wav2Vec2Options:
    """What only wav2vec 2.0's module is built from (the rest is
    :class:`~continue_pt.module_options.ModuleOptions`)."""

    diversity_weight: float | None = None
    """Weight of the codebook diversity loss (fairseq's loss_weights[0]); None: the checkpoint's."""
    num_negatives: int | None = None
    """Distractors per masked frame from the same utterance; None: the checkpoint's (100)."""
    latent_temp: tuple[float, float, float] | None = None
    """Gumbel temperature schedule ``(max, min, decay)``; None: the checkpoint's. The temperature continues from
    the bundle's ``num_updates`` either way."""
    codebook_warn_threshold: float = 0.1
    """Collapse guard: warn when the code perplexity falls below this fraction of the codewords a step could use
    (``groups * min(latent_vars, masked frames)``)."""
    codebook_warn_every: int = 1000
    """Collapse guard: after the first warning, warn again at most every N steps."""

    def __post_init__(self) -> None:
        if self.latent_temp is not None:
            self.latent_temp = tuple(float(t) for t in self.latent_temp)  # type: ignore[assignment]
            if len(self.latent_temp) != 3:
                raise ValueError(f"latent_temp is {self.latent_temp}; expected (max, min, decay)")


def describe_targets(options: Mapping[str, Any]) -> tuple[str | None, str]:
    """``(teacher, how the targets were made)``: no teacher, the model's own quantizer."""
    return None, "contrastive: the model's own Gumbel quantizer"


def bundle_problems(options: PretrainOptions, bundle: Bundle, kmeans: KMeansModel | None = None,
                    kmeans_name: str | None = None) -> list[str]:
    """What the loaded wav2vec 2.0 starting ``bundle`` says about the options: objective settings and masking the
    contrastive objective does not implement (``kmeans`` is HuBERT's; not read here)."""
    if bundle.kind != "pretrain":
        return []
    from continue_pt.masking import MaskingOptions
    from continue_pt.wav2vec2.module import unsupported_wav2vec2_options

    try:
        masking = MaskingOptions.from_options({**(bundle.config.objective or {}), **options.masking})
    except TypeError as exc:
        return [f"masking: {exc}"]
    return [f"{options.init_from}: {p}" for p in unsupported_wav2vec2_options(bundle.config.objective or {}, masking)]
