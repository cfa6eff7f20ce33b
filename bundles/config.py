"""``config.json``: the versioned description a bundle carries beside its weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError

FORMAT_NAME = "continue-pt-bundle"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
KMEANS_FILE = "kmeans.safetensors"
FAIRSEQ_EXTRAS_FILE = "fairseq_extras.safetensors"

FAMILIES = ("hubert", "wav2vec2", "data2vec2")
KINDS = ("pretrain", "ctc", "encoder")


@dataclass
class BundleConfig:
    """Everything needed to rebuild the model, and where it came from."""

    family: str
    """``"hubert"``, ``"wav2vec2"`` or ``"data2vec2"`` (data2vec 2.0 audio: ``encoder_args`` / ``pretrain_args`` are
    those of :mod:`bundles.data2vec2.config`, not torchaudio's)."""
    kind: str
    """``"pretrain"`` (encoder + pre-training heads), ``"ctc"`` (fine-tuned encoder + CTC output layer) or
    ``"encoder"`` (the encoder alone: a source without pre-training heads, e.g. a torchaudio ``.pth`` state dict or
    transformers' ``HubertModel``; see :mod:`bundles.encoder_only`)."""
    encoder_args: dict[str, Any]
    """Keyword arguments of ``torchaudio.models.wav2vec2_model`` (``aux_num_out`` set for CTC bundles)."""
    pretrain_args: dict[str, Any] | None
    """HuBERT: the extra arguments of ``torchaudio.models.hubert_pretrain_model``; wav2vec 2.0: those of
    :class:`bundles.wav2vec2_pretrain.Wav2Vec2PretrainModel`. ``None`` for CTC bundles."""
    sample_rate: int
    normalize_waveform: bool
    """Whether the model expects each utterance normalised to zero mean, unit variance (fairseq's ``task.normalize``)."""
    objective: dict[str, Any] | None = None
    """fairseq's settings of the pre-training objective, from the checkpoint (masking, logit temperature,
    negatives, loss weights, label rate). ``continue_pt`` starts from them; flags override them."""
    label_dictionary: dict[str, Any] | None = None
    """HuBERT pre-training: ``num_clusters`` and the fairseq dictionary's symbols in their original row order.
    CTC: ``ctc_symbols``, the output layer's symbols in row order (when the checkpoint had its dictionary)."""
    num_updates: int | None = None
    """Updates the source checkpoint had seen (wav2vec 2.0's Gumbel temperature continues from it)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Source file name, sha256, pickle era, the full fairseq configuration, training history."""
    files: dict[str, str | None] = field(default_factory=lambda: {"model": MODEL_FILE})
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, path: Path, data: Any) -> "BundleConfig":
        if not isinstance(data, dict):
            raise BundleError(path, "config.json does not hold a JSON object", hint="Re-create the bundle")
        problems = []
        if data.get("format") != FORMAT_NAME:
            problems.append(f"'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            problems.append(f"'format_version' is {version!r}; this kit reads versions up to {FORMAT_VERSION}")
        if data.get("family") not in FAMILIES:
            problems.append(f"'family' is {data.get('family')!r}, expected one of {FAMILIES}")
        if data.get("kind") not in KINDS:
            problems.append(f"'kind' is {data.get('kind')!r}, expected one of {KINDS}")
        if not isinstance(data.get("encoder_args"), dict):
            problems.append("'encoder_args' is missing")
        if data.get("kind") == "pretrain" and not isinstance(data.get("pretrain_args"), dict):
            problems.append("'pretrain_args' is missing for a pre-training bundle")
        if not isinstance(data.get("sample_rate"), int):
            problems.append("'sample_rate' is missing")
        if not isinstance(data.get("normalize_waveform"), bool):
            problems.append("'normalize_waveform' is missing")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            problems.append(f"unknown keys {unknown}")
        if problems:
            raise BundleError(path, problems, hint="Is this a continue-pt bundle? Re-create it with `continue-pt convert`")
        return cls(**data)

    @classmethod
    def read(cls, bundle_dir: Path) -> "BundleConfig":
        path = Path(bundle_dir) / CONFIG_FILE
        if not path.is_file():
            raise BundleError(bundle_dir, "not a bundle (no config.json)",
                              hint="Pass a directory written by `continue-pt convert` or `continue-pt export`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(path, f"not valid JSON ({exc})", hint="Re-create the bundle") from None
        return cls.from_dict(path, data)
