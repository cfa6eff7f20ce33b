"""Bundles: a converted model as ``config.json`` + safetensors, loaded into torchaudio modules.

No pickle and no fairseq here: ``bundles`` reads only JSON and safetensors.

    >>> from bundles import load_bundle
    >>> b = load_bundle("hubert_base_bundle")
    >>> model = b.get_model()             # torchaudio Wav2Vec2Model (eval), normalises waveforms if needed
    >>> heads = b.get_pretrain_model()    # HuBERTPretrainModel / Wav2Vec2PretrainModel
    >>> km = b.get_kmeans()               # .centroids, .layer, km(features) -> labels
"""

from .errors import BundleError, FileProblem
from .kmeans import KMeansModel, load_kmeans, save_kmeans
from .loading import Bundle, load_bundle

__all__ = ["Bundle", "BundleError", "FileProblem", "KMeansModel", "load_bundle", "load_kmeans", "save_kmeans"]
