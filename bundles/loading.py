"""``load_bundle``: a bundle directory as models, the way ``torchaudio.pipelines`` bundles give them."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .config import FAIRSEQ_EXTRAS_FILE, KMEANS_FILE, MODEL_FILE, BundleConfig
from .encoder_only import NO_HEAD, has_pretrain_head, ways_on, what_it_is
from .errors import BundleError
from .factory import assign_weights, build_encoder, build_pretrain_model, encoder_prefix
from .kmeans import KMeansModel, load_kmeans
from .waveform import NormalizingWav2Vec2Model


class Bundle:
    """A converted (or exported) model: its configuration, and factories for the modules it holds."""

    def __init__(self, path: Path, config: BundleConfig):
        self.path = path
        self.config = config

    # -- facts -----------------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.config.family

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def normalize_waveform(self) -> bool:
        return self.config.normalize_waveform

    @property
    def num_updates(self) -> int | None:
        return self.config.num_updates

    @property
    def has_kmeans(self) -> bool:
        return bool(self.config.files.get("kmeans"))

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, family={self.family!r}, kind={self.kind!r})"

    # -- tensors ---------------------------------------------------------------------------------------
    def _read_tensors(self, file_name: str) -> dict[str, Tensor]:
        path = self.path / file_name
        if not path.is_file():
            raise BundleError(path, "is missing", hint="The bundle is incomplete; re-create it")
        try:
            return load_file(path)  # memory-mapped: nothing is copied until used
        except (SafetensorError, OSError, ValueError) as exc:
            raise BundleError(path, f"not a readable safetensors file ({exc})", hint="Re-create the bundle") from None

    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor of ``model.safetensors``, under the names of :meth:`get_pretrain_model` (or the CTC model)."""
        return self._read_tensors(self.config.files.get("model") or MODEL_FILE)

    def fairseq_extras(self) -> dict[str, Tensor]:
        """Tensors fairseq had that torchaudio's modules have no place for (e.g. HuBERT's special-symbol rows)."""
        name = self.config.files.get("fairseq_extras")
        return self._read_tensors(name) if name else {}

    # -- modules ---------------------------------------------------------------------------------------
    def _load_into(self, model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
        try:
            return assign_weights(model, state)
        except ValueError as exc:
            raise BundleError(self.path / MODEL_FILE, f"does not fit the model config.json describes: {exc}",
                              hint="Re-create the bundle") from None

    def get_model(self) -> nn.Module:
        """The encoder as a torchaudio ``Wav2Vec2Model`` in eval mode (with the CTC layer for fine-tuned
        bundles), wrapped to normalise waveforms itself when the model expects it. data2vec 2.0: a
        :class:`~bundles.data2vec2.model.Data2Vec2Model`, with the same ``forward`` / ``extract_features``."""
        state = self.state_dict()
        if self.kind == "pretrain":
            prefix = encoder_prefix(self.config)
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        model = self._load_into(build_encoder(self.config), state)
        if self.normalize_waveform:
            model = NormalizingWav2Vec2Model(model)
        return model.eval()

    def get_pretrain_model(self) -> nn.Module:
        """HuBERT: a torchaudio ``HuBERTPretrainModel`` whose label embedding row c is cluster c.
        wav2vec 2.0: a :class:`~bundles.wav2vec2_pretrain.Wav2Vec2PretrainModel`. data2vec 2.0: a
        :class:`~bundles.data2vec2.model.Data2Vec2PretrainModel` (student, decoder, EMA teacher). Returned in train mode,
        without waveform normalisation (the data pipeline applies it, see :attr:`normalize_waveform`)."""
        if not has_pretrain_head(self.kind):
            raise BundleError(self.path, f"is {what_it_is(self.kind)}; it has {NO_HEAD}",
                              hint=ways_on(self.family, str(self.path)))
        return self._load_into(build_pretrain_model(self.config), self.state_dict()).train()

    def get_kmeans(self) -> KMeansModel:
        """The k-means model that labels HuBERT's targets (centroids, layer, and ``__call__`` to label)."""
        name = self.config.files.get("kmeans")
        if not name:
            raise BundleError(self.path, "holds no k-means model",
                              hint="Convert with --kmeans KM.bin --kmeans-layer L, or pass a k-means file separately")
        return load_kmeans(self.path / name)


def load_bundle(path: str | Path) -> Bundle:
    """Open a bundle directory written by ``continue-pt convert`` or ``continue-pt export``."""
    path = Path(path)
    if not path.exists():
        raise BundleError(path, "no such bundle directory", hint="Check the path")
    if not path.is_dir():
        raise BundleError(path, "is a file, not a bundle directory",
                          hint="A .pt checkpoint must be converted first: continue-pt convert SRC.pt -o DIR")
    config = BundleConfig.read(path)
    for role, name in config.files.items():
        if name and not (path / name).is_file():
            raise BundleError(path / name, f"is missing (config.json lists it as the {role} file)",
                              hint="The bundle is incomplete; re-create it")
    return Bundle(path, config)


__all__ = ["Bundle", "load_bundle", "KMEANS_FILE", "FAIRSEQ_EXTRAS_FILE"]
