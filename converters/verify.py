"""``continue-pt verify``: re-read a bundle and its source checkpoint and compare every tensor."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from bundles.config import BundleConfig
from bundles.hashing import file_sha256
from bundles.loading import load_bundle

from .convert import planned_source
from .errors import ConversionError
from .source_format import source_format


@dataclass
class VerifyReport:
    compared: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def verify_bundle(bundle_dir: str | Path, source: str | Path) -> VerifyReport:
    """Every tensor the bundle should hold (re-derived from ``source``) must equal the bundle's, bit for bit."""
    bundle = load_bundle(bundle_dir)
    if not Path(source).is_file():
        raise ConversionError(source, "no such checkpoint file" if not Path(source).exists() else "is not a file",
                              hint="Pass --against the fairseq .pt the bundle was converted from")
    report = VerifyReport()
    recorded = bundle.config.provenance.get("sha256")
    if recorded and recorded != file_sha256(Path(source)):
        report.mismatches.append(f"the bundle was converted from a file with sha256 {recorded[:12]}..., "
                                 f"not from {Path(source).name}")
    stored = bundle.state_dict()
    extras = bundle.fairseq_extras()
    # a torchaudio file does not name its family: the bundle's is the one given to `convert`
    family = bundle.config.family if source_format(source) == "torchaudio" else None
    with planned_source(Path(source), family) as plan:
        _check_same_model(bundle.config, plan.config, bundle_dir, source)
        for group, pending_list in (("model", plan.model_tensors), ("fairseq_extras", plan.fairseq_extras)):
            have = stored if group == "model" else extras
            for pending in pending_list:
                report.compared += 1
                if pending.name not in have:
                    report.mismatches.append(f"{group}: {pending.name} is missing from the bundle")
                    continue
                expected = pending.produce()
                actual = have[pending.name]
                if actual.shape != expected.shape or actual.dtype != expected.dtype:
                    report.mismatches.append(f"{group}: {pending.name} is {list(actual.shape)} {actual.dtype}, "
                                             f"expected {list(expected.shape)} {expected.dtype}")
                elif not torch.equal(actual, expected):
                    diff = (actual.float() - expected.float()).abs().max().item()
                    report.mismatches.append(f"{group}: {pending.name} differs (max abs difference {diff:.3g})")
            expected_names = {p.name for p in pending_list}
            for name in sorted(set(have) - expected_names):
                report.mismatches.append(f"{group}: {name} is in the bundle but not derived from the source")
    return report


def _check_same_model(bundle: BundleConfig, source: BundleConfig, bundle_dir: str | Path, path: str | Path) -> None:
    """A checkpoint of another family, kind or size is not a source with differences: say which it is instead of
    listing every tensor as a mismatch."""
    def what(config: BundleConfig) -> str:
        enc = config.encoder_args
        return (f"{config.family} {config.kind} model ({enc['encoder_num_layers']} layers, "
                f"{enc['encoder_embed_dim']} wide)")

    if what(bundle) != what(source):
        raise ConversionError(path, f"is a {what(source)} checkpoint, but {bundle_dir} holds a {what(bundle)}: it "
                                    "cannot be the bundle's source",
                              hint="Pass --against the checkpoint the bundle was converted from (its provenance "
                                   f"names it: {bundle.provenance.get('source_file', 'unknown')})")
