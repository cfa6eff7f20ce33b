"""``ModuleOptions``: what a continued pre-training module is built from: the common part (bundle, optimiser,
schedule, masking, seed) holding each family's part (:class:`~continue_pt.hubert.options.HubertOptions`,
:class:`~continue_pt.wav2vec2.options.Wav2Vec2Options`).

Lightning stores the options in every checkpoint as one flat dict of primitives (:meth:`ModuleOptions.to_hparams`),
which ``torch.load(weights_only=True)`` reads and :meth:`ModuleOptions.from_hparams` takes back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from continue_pt.data2vec2.options import Data2Vec2Options
from continue_pt.families import FAMILIES
from continue_pt.hubert.options import HubertOptions
from continue_pt.masking import MaskingOptions
from continue_pt.options import DEFAULT_PEAK_LR  # defined torch-free there, for the CLI's --help
from continue_pt.wav2vec2.options import Wav2Vec2Options


@dataclass
class ModuleOptions:
    """The options both modules share, and each family's part."""

    bundle: str
    """The bundle directory of the student (``continue-pt convert`` output)."""
    feature_penalty_weight: float | None = None
    """Weight of the feature penalty; None: the bundle's ``objective.criterion`` (HuBERT: loss_weights[0],
    wav2vec 2.0: loss_weights[1])."""
    masking: dict[str, Any] = field(default_factory=dict)
    """Overrides of the bundle's masking options (``MaskingOptions`` field names, e.g. ``mask_prob``)."""
    feature_grad_mult: float | None = None
    """Gradient scale of the conv feature extractor (0 freezes it); None: the bundle's objective value."""
    freeze_feature_extractor_steps: int = 0
    """The conv feature extractor gets no gradient during the first N steps."""
    logit_temp: float | None = None
    lr: float = DEFAULT_PEAK_LR
    warmup_steps: int = 1000
    schedule: str = "linear"
    """Decay after warm-up, to 0 at ``max_steps``: ``"linear"`` (fairseq's polynomial_decay, power 1) or
    ``"cosine"``."""
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    seed: int = 0
    """Masks and dropout of each micro-batch are drawn from ``(seed, step, micro-batch, rank)``: a resumed run
    draws exactly what the uninterrupted run drew."""
    hubert: HubertOptions = field(default_factory=HubertOptions)
    wav2vec2: Wav2Vec2Options = field(default_factory=Wav2Vec2Options)
    data2vec2: Data2Vec2Options = field(default_factory=Data2Vec2Options)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule is {self.schedule!r}; expected 'linear' or 'cosine'")
        unknown = sorted(set(self.masking) - {f.name for f in fields(MaskingOptions)})
        if unknown:
            raise ValueError(f"unknown masking options {unknown}")

    def family_part(self, family: str) -> Any:
        """``self.hubert`` or ``self.wav2vec2``."""
        return getattr(self, FAMILIES[family].name)

    def to_hparams(self) -> dict[str, Any]:
        """One flat dict of primitives (what checkpoints store; the family parts' field names are distinct)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in FAMILIES}
        for family in FAMILIES:
            data.update(asdict(self.family_part(family)))
        data["masking"] = dict(self.masking)
        data["betas"] = list(self.betas)
        data["latent_temp"] = list(self.wav2vec2.latent_temp) if self.wav2vec2.latent_temp is not None else None
        return data

    @classmethod
    def from_hparams(cls, values: Mapping[str, Any]) -> "ModuleOptions":
        """Back from :meth:`to_hparams` (a checkpoint's ``hyper_parameters["options"]``); a name no part has is
        refused."""
        values = dict(values)
        parts = {name: family.options(**{k: values.pop(k) for k in family.option_names() if k in values})
                 for name, family in FAMILIES.items()}
        common = {f.name for f in fields(cls)} - set(FAMILIES)
        unknown = sorted(set(values) - common)
        if unknown:
            raise ValueError(f"unknown module options {unknown}")
        return cls(**values, **parts)

    @classmethod
    def of(cls, options: "ModuleOptions | Mapping[str, Any]") -> "ModuleOptions":
        """``options`` itself, or the options of a flat dict (what Lightning gives back from a checkpoint)."""
        return options if isinstance(options, ModuleOptions) else cls.from_hparams(options)
