"""K-means models as data: centroids in a safetensors file, labelling with plain torch.

fairseq ships its k-means models as joblib pickles of sklearn estimators (see
:mod:`converters.joblib_kmeans` for reading those safely). Only ``cluster_centers_`` matters for
labelling (label = argmin_c ||x - c||^2), so a bundle stores just that tensor plus string metadata,
in a file that needs neither sklearn nor pickle to read. This module imports torch, safetensors and
the stdlib only, so labelling works where sklearn is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file

from .atomic import atomic_write
from .errors import BundleError, DiskFull

FORMAT = "continue-pt-kmeans"
FORMAT_VERSION = "1"
CENTROIDS_KEY = "centroids"
# Keys the file format owns; free-form provenance may not reuse them.
RESERVED_METADATA = frozenset({"format", "format_version", "layer"})
# Rows labelled per matrix product: bounds the distance matrix to ROWS_PER_CHUNK x K floats
# (16k x 500 x 4 bytes = 32 MB) whatever the input size.
ROWS_PER_CHUNK = 16_384


@contextmanager
def highest_matmul_precision() -> Iterator[None]:
    """Full float32 matrix products inside, the caller's setting restored after. Training scripts often allow TF32
    (Lightning suggests it on every tensor-core GPU); its 10-bit mantissa would move frames near a cluster boundary
    to the other cluster, in labelling and in fitting alike."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


@dataclass(eq=False)
class KMeansModel:
    """A fitted k-means model: label features by their nearest centroid."""

    centroids: torch.Tensor
    """K x D float32 cluster centres (other float dtypes are converted to float32)."""
    layer: int | None = None
    """Transformer layer whose output was clustered, 1-based as in fairseq (HuBERT BASE's published file: 9).
    None when unknown, e.g. straight after reading a fairseq ``.bin``, which does not record it."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Free-form provenance (source file, sklearn class and version, ...); string values only."""
    _on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        c = self.centroids
        if not isinstance(c, torch.Tensor):
            raise ValueError(f"centroids must be a torch.Tensor, not {type(c).__name__}")
        if c.dim() != 2:
            raise ValueError(f"centroids must be a K x D matrix, got shape {tuple(c.shape)}")
        if not c.is_floating_point():
            raise ValueError(f"centroids must be floating point, got {c.dtype}")
        if c.shape[0] < 2 or c.shape[1] < 1:
            raise ValueError(f"centroids must have at least 2 clusters and 1 dimension, got shape {tuple(c.shape)}")
        if not bool(torch.isfinite(c).all()):
            raise ValueError("centroids contain NaN or infinite values")
        self.centroids = c.detach().to(torch.float32).contiguous()
        if self.layer is not None:
            if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
                raise ValueError(f"layer must be None or an int >= 1 (1-based fairseq numbering), got {self.layer!r}")
        for key, value in self.metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"metadata must map str to str, got {key!r}: {value!r}")
            if key in RESERVED_METADATA:
                raise ValueError(f"metadata key {key!r} is reserved for the file format")

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def to(self, device: torch.device | str) -> KMeansModel:
        """A copy with its centroids on ``device``."""
        return KMeansModel(self.centroids.to(device), self.layer, dict(self.metadata))

    def _centroids_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Labelling runs once per batch inside training: copy the centroids to each device once.
        if device not in self._on_device:
            c = self.centroids.to(device)
            self._on_device[device] = (c, (c * c).sum(dim=1))
        return self._on_device[device]

    @torch.no_grad()
    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Labels (...) of ``features`` (..., D): the index of the nearest centroid, as int64 on their device.

        Distances are computed in float32 whatever the input dtype, as sklearn's ``predict`` does for
        float32 input. ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, and ||x||^2 is the same for every c, so
        it is left out of the argmin (sklearn leaves it out too): adding it changes no comparison
        but loses float32 precision. Ties go to the lowest index, as in sklearn.
        """
        if features.dim() < 1 or features.shape[-1] != self.dim:
            raise ValueError(f"features must have shape (..., {self.dim}), got {tuple(features.shape)}")
        lead = features.shape[:-1]
        x = features.reshape(-1, self.dim)
        c, c_sq = self._centroids_on(x.device)
        labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        # Label in full float32 (highest_matmul_precision). Training runs inside Lightning's bf16 autocast, which
        # would cast this product to bf16 whatever the .to(float32) says: autocast is off here.
        with highest_matmul_precision(), torch.autocast(device_type=x.device.type, enabled=False):
            self._label_chunks(x, c, c_sq, labels)
        return labels.reshape(lead)

    @staticmethod
    def _label_chunks(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor, labels: torch.Tensor) -> None:
        for start in range(0, x.shape[0], ROWS_PER_CHUNK):
            rows = x[start:start + ROWS_PER_CHUNK].to(torch.float32)
            # c_sq - 2 x c^T in one fused matrix product.
            distances = torch.addmm(c_sq, rows, c.T, beta=1.0, alpha=-2.0)
            labels[start:start + rows.shape[0]] = distances.argmin(dim=1)


def save_kmeans(model: KMeansModel, path: str | Path) -> None:
    """Write ``model`` to ``path`` as safetensors, atomically (a reader never sees half a file)."""
    path = Path(path)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "layer": "" if model.layer is None else str(model.layer), **model.metadata}
    tensors = {CENTROIDS_KEY: model.centroids.detach().to("cpu", torch.float32).contiguous()}
    hint = "Check that the folder exists, is writable and has free space"
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata),
                     needed=lambda: len(save(tensors, metadata=metadata)))  # small (K x D): the exact size
    except DiskFull:
        raise
    except (OSError, SafetensorError) as exc:
        raise BundleError(path, f"could not be written: {exc}", hint=hint) from exc


def load_kmeans(path: str | Path) -> KMeansModel:
    """Read a k-means file written by :func:`save_kmeans`. Reads data only: nothing is unpickled."""
    path = Path(path)
    remake = "Re-create it from the fairseq .bin with `continue-pt convert --kmeans KM.bin --kmeans-layer L`"
    if not path.is_file():
        raise BundleError(path, "no such file" if not path.exists() else "is not a file",
                          hint="Check the path; a bundle's k-means is its kmeans.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = set(f.keys())
            centroids = f.get_tensor(CENTROIDS_KEY) if CENTROIDS_KEY in keys else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(path, f"is not a readable safetensors file ({exc})", hint=remake) from exc

    if metadata.get("format") != FORMAT:
        raise BundleError(path, f"is a safetensors file but not a k-means file of this kit "
                                f"(format marker {metadata.get('format')!r}, expected {FORMAT!r})", hint=remake)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise BundleError(path, f"has k-means format version {metadata.get('format_version')!r}; this kit reads "
                                f"version {FORMAT_VERSION}", hint="Update continue-pt, or re-create the file")
    if centroids is None:
        raise BundleError(path, f"has no '{CENTROIDS_KEY}' tensor", hint=remake)
    if keys != {CENTROIDS_KEY}:
        raise BundleError(path, f"holds unexpected tensors {sorted(keys - {CENTROIDS_KEY})}", hint=remake)
    if centroids.dtype != torch.float32:
        raise BundleError(path, f"its centroids are {centroids.dtype}, expected float32", hint=remake)
    layer_text = metadata.pop("layer", "")
    try:
        layer = int(layer_text) if layer_text else None
    except ValueError:
        raise BundleError(path, f"has layer {layer_text!r}, which is not a number", hint=remake) from None
    provenance = {k: v for k, v in metadata.items() if k not in RESERVED_METADATA}
    try:
        return KMeansModel(centroids, layer, provenance)
    except ValueError as exc:
        raise BundleError(path, f"holds an invalid k-means model: {exc}", hint=remake) from exc
