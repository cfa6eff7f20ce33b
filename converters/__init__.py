"""Converters: fairseq HuBERT / wav2vec 2.0 checkpoints and sklearn/joblib k-means -> bundles.

Nothing is unpickled with code: an allow-list unpickler maps every pickled global to a stand-in of ours.
"""

from .convert import convert_checkpoint, plan_conversion, read_kmeans_file
from .errors import ConversionError
from .fairseq_checkpoint import FairseqCheckpoint, read_fairseq_checkpoint
from .joblib_kmeans import read_joblib_kmeans
from .verify import verify_bundle

__all__ = ["ConversionError", "FairseqCheckpoint", "convert_checkpoint", "plan_conversion", "read_fairseq_checkpoint",
           "read_joblib_kmeans", "read_kmeans_file", "verify_bundle"]
