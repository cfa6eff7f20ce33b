"""Bundles: a converted model as ``config.json`` + safetensors, loaded into torchaudio modules.

No pickle and no fairseq here: ``bundles`` reads only JSON and safetensors.

    >>> from bundles import load_bundle
    >>> b = load_bundle("hubert_base_bundle")
    >>> model = b.get_model()             # torchaudio Wav2Vec2Model (eval), normalises waveforms if needed
    >>> heads = b.get_pretrain_model()    # HuBERTPretrainModel / Wav2Vec2PretrainModel
    >>> km = b.get_kmeans()               # .centroids, .layer, km(features) -> labels
"""

from .errors import BundleError, FileProblem

# The rest imports torch (1-2 s): loaded on first use, so `from bundles.errors import FileProblem` (the CLI's error
# boundary, ``--help``, argument checks) stays instant.
_LAZY = {"KMeansModel": "kmeans", "load_kmeans": "kmeans", "save_kmeans": "kmeans", "Bundle": "loading",
         "load_bundle": "loading"}

__all__ = ["Bundle", "BundleError", "FileProblem", "KMeansModel", "load_bundle", "load_kmeans", "save_kmeans"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
