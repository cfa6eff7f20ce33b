"""torchaudio ``.pth`` state dicts (the files behind ``torchaudio.pipelines.HUBERT_BASE``, ``WAV2VEC2_ASR_BASE_960H``,
...) -> encoder-only (or CTC) bundles.

Such a file is ``torch.save(Wav2Vec2Model.state_dict())``: torchaudio's own key names, ``aux.*`` for an ASR head, and
no configuration. What the tensors' shapes give, this module reads from them: the conv front end's widths and
kernels, its bias, the extractor mode (``group_norm``: a norm in block 0 only; ``layer_norm``: one in every block),
the encoder width, the number of layers, the feed-forward width, the positional convolution's kernel and groups
(``weight_v`` is ``[D, D / groups, kernel]``) and the ASR vocabulary. What they do not give (attention heads, conv
strides, whether the encoder is pre- or post-LN: ``encoder.transformer.layer_norm`` exists in both, waveform
normalisation, the sample rate, the family: torchaudio's HuBERT and wav2vec 2.0 encoders are the same module) is
taken from the published architecture the shapes match (:data:`ARCHITECTURES`, whose cards are those of
:mod:`bundles.catalogue`). The family is read from that match when only one family has the architecture; BASE
exists in both, so there the user says which with ``--family``. A file that matches no published architecture is
refused: its heads and strides would be guesses.

torchaudio ships no pre-training head, so the bundle holds the encoder only (kind ``encoder``; ``ctc`` when the file
has ``aux``). The file's ``aux`` rows are kept as stored: torchaudio's ASR pipelines drop rows 1-3 (fairseq's unused
``<pad> </s> <unk>``) only when they load it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundles.catalogue import CATALOGUE
from bundles.config import BundleConfig
from bundles.safetensors_stream import PendingTensor

from .errors import ConversionError
from .families.base import ConversionPlan
from .torch_file import TORCH_GLOBALS, LazyTensor, TorchFile, open_torch_file

FAMILY_FLAG = "--family"
_CONV = "feature_extractor.conv_layers.{}.conv.weight"
_LAYER = re.compile(r"encoder\.transformer\.layers\.(\d+)\.")
_POS_CONV = "encoder.transformer.pos_conv_embed.conv."
# Older torchaudio (torch.nn.utils.weight_norm) saved the positional convolution's factors under these names; torch's
# parametrizations read them into original0 / original1, and so does this converter.
_LEGACY_WEIGHT_NORM = {_POS_CONV + "weight_g": _POS_CONV + "parametrizations.weight.original0",
                       _POS_CONV + "weight_v": _POS_CONV + "parametrizations.weight.original1"}
_STANDARD_CONV = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
"""fairseq's ``conv_feature_layers`` of every published HuBERT / wav2vec 2.0 model (torchaudio's pipelines too)."""


@dataclass(frozen=True)
class Architecture:
    """A published encoder: what its tensors' shapes show (``extractor_mode`` .. ``ff_dim``) and what they do not."""

    name: str
    family: str
    cards: tuple[str, ...]
    """:data:`bundles.catalogue.CATALOGUE` names with this architecture (their ``normalize_waveform`` agree)."""
    extractor_mode: str
    conv_bias: bool
    embed_dim: int
    ff_dim: int
    num_heads: int
    layer_norm_first: bool
    num_layers: int
    dropouts: dict[str, float] = field(default_factory=dict)
    """torchaudio's pipeline values for the first card (a state dict stores none; they matter only in training)."""
    conv_layers: tuple[tuple[int, int, int], ...] = _STANDARD_CONV


def _dropouts(projection: float, attention: float, ff: float, dropout: float, layer_drop: float) -> dict[str, float]:
    return {"encoder_projection_dropout": projection, "encoder_attention_dropout": attention,
            "encoder_ff_interm_dropout": ff, "encoder_dropout": dropout, "encoder_layer_drop": layer_drop}


# Heads, pre-/post-LN and dropouts as torchaudio's pipelines (pipelines/_wav2vec2/impl.py) give them for these models;
# tests/converters/test_torchaudio_import.py checks the table against torchaudio's pipeline parameters and the
# catalogue.
ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("HuBERT BASE", "hubert", ("hubert_base_ls960",), "group_norm", False, 768, 3072, 12, False, 12,
                 _dropouts(0.1, 0.1, 0.0, 0.1, 0.05)),
    Architecture("HuBERT LARGE", "hubert", ("hubert_large_ll60k", "hubert_large_ll60k_ft_ls960"), "layer_norm", False,
                 1024, 4096, 16, True, 24, _dropouts(0.0, 0.0, 0.0, 0.0, 0.0)),
    Architecture("HuBERT XLARGE", "hubert", ("hubert_xlarge_ll60k", "hubert_xlarge_ll60k_ft_ls960"), "layer_norm",
                 False, 1280, 5120, 16, True, 48, _dropouts(0.0, 0.0, 0.0, 0.0, 0.0)),
    Architecture("wav2vec 2.0 BASE", "wav2vec2", ("wav2vec2_base_ls960", "wav2vec2_base_ls960_ft_10m",
                                                  "wav2vec2_base_ls960_ft_100h", "wav2vec2_base_ls960_ft_960h"),
                 "group_norm", False, 768, 3072, 12, False, 12, _dropouts(0.1, 0.1, 0.0, 0.1, 0.05)),
    Architecture("wav2vec 2.0 LARGE (LibriSpeech)", "wav2vec2",
                 ("wav2vec2_large_ls960", "wav2vec2_large_ls960_ft_10m", "wav2vec2_large_ls960_ft_100h",
                  "wav2vec2_large_ls960_ft_960h"), "group_norm", False, 1024, 4096, 16, False, 24,
                 _dropouts(0.1, 0.1, 0.0, 0.0, 0.2)),
    Architecture("wav2vec 2.0 LARGE (Libri-Light / XLSR / XLS-R 300M)", "wav2vec2",
                 ("wav2vec2_large_lv60k", "wav2vec2_large_lv60k_ft_10m", "wav2vec2_large_lv60k_ft_100h",
                  "wav2vec2_large_lv60k_ft_960h", "wav2vec2_large_lv60k_st_960h", "wav2vec2_xlsr53",
                  "wav2vec2_xls_r_300m"), "layer_norm", True, 1024, 4096, 16, True, 24,
                 _dropouts(0.1, 0.1, 0.0, 0.0, 0.0)),
    Architecture("XLS-R 1B", "wav2vec2", ("wav2vec2_xls_r_1b",), "layer_norm", True, 1280, 5120, 16, True, 48,
                 _dropouts(0.1, 0.0, 0.0, 0.0, 0.0)),
    Architecture("XLS-R 2B", "wav2vec2", ("wav2vec2_xls_r_2b",), "layer_norm", True, 1920, 7680, 16, True, 48,
                 _dropouts(0.1, 0.0, 0.0, 0.0, 0.0)),
)


# -- recognising the file ------------------------------------------------------------------------------------------

def is_torchaudio_state_dict(obj: Any) -> bool:
    """A plain ``{name: tensor}`` dict with torchaudio ``Wav2Vec2Model`` key names (not a fairseq checkpoint)."""
    return (isinstance(obj, dict) and bool(obj) and all(isinstance(v, LazyTensor) for v in obj.values())
            and _CONV.format(0) in obj and any(_LAYER.match(str(k)) for k in obj))


def open_torchaudio_file(path: str | Path) -> TorchFile:
    """``path`` read with the plain-tensor allow-list (nothing else may be in a state dict)."""
    path = Path(path)
    file = open_torch_file(path, TORCH_GLOBALS, what="torchaudio state dict",
                           refused_hint="A torchaudio state dict holds tensors only; this file needs other code",
                           unreadable_hint="Is the file complete? Download it again")
    if not is_torchaudio_state_dict(file.obj):
        file.close()
        raise ConversionError(path, "is not a torchaudio Wav2Vec2Model state dict",
                              hint="Pass a .pth file of torchaudio.pipelines (HUBERT_*, WAV2VEC2_*)")
    return file


# -- what the shapes say -------------------------------------------------------------------------------------------

@dataclass
class Shapes:
    """The architecture facts a torchaudio state dict's shapes give."""

    extractor_mode: str
    conv_bias: bool
    conv_widths_kernels: tuple[tuple[int, int], ...]
    embed_dim: int
    num_layers: int
    ff_dim: int
    pos_conv_kernel: int
    pos_conv_groups: int
    aux_num_out: int | None

    def matches(self, arch: Architecture) -> bool:
        return (self.extractor_mode == arch.extractor_mode and self.conv_bias == arch.conv_bias
                and self.embed_dim == arch.embed_dim and self.ff_dim == arch.ff_dim
                and self.conv_widths_kernels == tuple((dim, kernel) for dim, kernel, _ in arch.conv_layers))

    def describe(self) -> str:
        return (f"{self.num_layers} layers of width {self.embed_dim} (feed-forward {self.ff_dim}), extractor "
                f"{self.extractor_mode}, conv bias {self.conv_bias}, conv kernels "
                f"{[k for _, k in self.conv_widths_kernels]}")


def _shape(state: dict[str, LazyTensor], key: str, problems: list[str]) -> tuple[int, ...]:
    tensor = state.get(key)
    if tensor is None:
        problems.append(f"it has no '{key}'")
        return ()
    return tensor.shape


def read_shapes(state: dict[str, LazyTensor], problems: list[str]) -> Shapes | None:
    """The facts the shapes give; every missing tensor or odd shape is appended to ``problems``."""
    convs = []
    while _CONV.format(len(convs)) in state:
        shape = state[_CONV.format(len(convs))].shape
        if len(shape) != 3:
            problems.append(f"{_CONV.format(len(convs))} has shape {list(shape)}, expected [out, in, kernel]")
            return None
        convs.append((int(shape[0]), int(shape[2])))
    norm_blocks = [i for i in range(len(convs)) if f"feature_extractor.conv_layers.{i}.layer_norm.weight" in state]
    if norm_blocks == [0]:
        mode = "group_norm"
    elif norm_blocks == list(range(len(convs))):
        mode = "layer_norm"
    else:
        problems.append(f"its conv blocks {norm_blocks} have norms: neither torchaudio's group_norm (block 0) nor "
                        "layer_norm (every block) extractor")
        mode = "?"
    projection = _shape(state, "encoder.feature_projection.projection.weight", problems)
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER.match(k))})
    ff = _shape(state, "encoder.transformer.layers.0.feed_forward.intermediate_dense.weight", problems)
    pos = state.get(_POS_CONV + "weight_v", state.get(_POS_CONV + "parametrizations.weight.original1"))
    if pos is None:
        problems.append(f"it has no positional convolution weight ('{_POS_CONV}weight_v' or "
                        f"'{_POS_CONV}parametrizations.weight.original1')")
    if layers != list(range(len(layers))):
        problems.append(f"its transformer layers are numbered {layers[:8]}, not 0..{len(layers) - 1}")
    if problems or len(projection) != 2 or len(ff) != 2 or pos is None or len(pos.shape) != 3 or not convs:
        if not problems:
            problems.append("its feature projection, feed-forward or positional convolution has an unexpected shape")
        return None
    embed_dim = int(projection[0])
    aux = state.get("aux.weight")
    return Shapes(mode, "feature_extractor.conv_layers.0.conv.bias" in state, tuple(convs), embed_dim, len(layers),
                  int(ff[0]), pos_conv_kernel=int(pos.shape[2]), pos_conv_groups=embed_dim // max(int(pos.shape[1]), 1),
                  aux_num_out=int(aux.shape[0]) if aux is not None else None)


# -- family and architecture ---------------------------------------------------------------------------------------

def match_architecture(path: Path, shapes: Shapes, family: str | None) -> Architecture:
    """The published architecture the shapes match, of ``family`` (from ``--family``) or the only family that has it.
    Raises :class:`ConversionError` naming the flag when the file cannot tell the family, or what matched."""
    candidates = [a for a in ARCHITECTURES if shapes.matches(a)]
    if not candidates:
        raise ConversionError(path, f"its encoder ({shapes.describe()}) matches no published HuBERT or wav2vec 2.0 "
                              "architecture", hint="A torchaudio state dict does not store the attention heads, conv "
                              "strides or pre-/post-LN order, so only the published architectures are read; convert "
                              "the model's fairseq checkpoint instead")
    if family is not None:
        chosen = [a for a in candidates if a.family == family]
        if not chosen:
            others = sorted({a.family for a in candidates})
            raise ConversionError(path, f"{FAMILY_FLAG} {family} was given, but no published {family} model has its "
                                  f"encoder ({shapes.describe()}); {' and '.join(others)} models do",
                                  hint=f"Pass {FAMILY_FLAG} {others[0]} (or leave it out)")
        return chosen[0]
    families = sorted({a.family for a in candidates})
    if len(families) > 1:
        names = " and ".join(a.name for a in candidates)
        raise ConversionError(path, f"its encoder is the {names} architecture: a torchaudio state dict cannot tell "
                              "HuBERT from wav2vec 2.0 (torchaudio builds both with the same module)",
                              hint=f"Say which it is with {FAMILY_FLAG} hubert or {FAMILY_FLAG} wav2vec2 (e.g. "
                                   f"{FAMILY_FLAG} hubert for torchaudio.pipelines.HUBERT_BASE)")
    return candidates[0]


def _cards(arch: Architecture, ctc: bool) -> list[Any]:
    """The architecture's cards of the file's kind; all of them when the catalogue has none of that kind (fine-tuning
    keeps the pre-trained model's sample rate and normalisation)."""
    known = [CATALOGUE[name] for name in arch.cards if name in CATALOGUE]
    kind = "ctc" if ctc else "pretrained"
    return [card for card in known if card.kind == kind] or known


def encoder_args(shapes: Shapes, arch: Architecture) -> dict[str, Any]:
    return {
        "extractor_mode": shapes.extractor_mode,
        "extractor_conv_layer_config": [list(layer) for layer in arch.conv_layers],
        "extractor_conv_bias": shapes.conv_bias,
        "encoder_embed_dim": shapes.embed_dim,
        "encoder_pos_conv_kernel": shapes.pos_conv_kernel,
        "encoder_pos_conv_groups": shapes.pos_conv_groups,
        "encoder_num_layers": shapes.num_layers,
        "encoder_num_heads": arch.num_heads,
        "encoder_ff_interm_features": shapes.ff_dim,
        "encoder_layer_norm_first": arch.layer_norm_first,
        **arch.dropouts,
        "aux_num_out": shapes.aux_num_out,
    }


def plan_torchaudio(path: Path, file: TorchFile, family: str | None = None) -> ConversionPlan:
    """The bundle a torchaudio state dict becomes (kind ``encoder``, or ``ctc`` with ``aux``)."""
    state: dict[str, LazyTensor] = {str(k): v for k, v in file.obj.items()}
    problems: list[str] = []
    if any(".rel_attn_embed." in k or ".gru_rel_pos" in k for k in state):
        raise ConversionError(path, "is a torchaudio WavLM state dict",
                              hint="Only HuBERT and wav2vec 2.0 are supported")
    shapes = read_shapes(state, problems)
    if shapes is None:
        raise ConversionError(path, problems, hint="Is it a complete torchaudio Wav2Vec2Model state dict?")
    arch = match_architecture(path, shapes, family)
    cards = _cards(arch, shapes.aux_num_out is not None)
    normalize = {card.normalize_waveform for card in cards}
    rates = {card.sample_rate for card in cards}
    if len(normalize) != 1 or len(rates) != 1:  # the table and the catalogue disagree: a bug of ours, said plainly
        raise ConversionError(path, f"the catalogue cards of the {arch.name} architecture ({[c.name for c in cards]}) "
                              "do not agree on waveform normalisation and sample rate", hint="Please report this")
    kind = "ctc" if shapes.aux_num_out is not None else "encoder"
    provenance = {
        "source_file": path.name,
        "source_format": "torchaudio Wav2Vec2Model state dict (.pth)",
        "architecture": arch.name,
        "catalogue_cards": [card.name for card in cards],
        "not_in_file": {
            "family": f"{family} ({FAMILY_FLAG})" if family else f"{arch.family} (only {arch.family} has this "
                                                                 "architecture)",
            "encoder_num_heads, conv strides, encoder_layer_norm_first, dropouts": f"the published {arch.name}",
            "normalize_waveform, sample_rate": f"the catalogue cards {[card.name for card in cards]}",
        },
    }
    if shapes.num_layers != arch.num_layers:
        provenance["num_layers_note"] = (f"{shapes.num_layers} layers; the published {arch.name} has "
                                         f"{arch.num_layers}")
    if shapes.aux_num_out is not None:
        provenance["aux_note"] = ("aux rows kept as stored; torchaudio's ASR pipelines drop rows 1-3 (fairseq's "
                                  "<pad> </s> <unk>) when they load the file")
    config = BundleConfig(family=arch.family, kind=kind, encoder_args=encoder_args(shapes, arch), pretrain_args=None,
                          sample_rate=rates.pop(), normalize_waveform=normalize.pop(), provenance=provenance)
    tensors = [PendingTensor(_LEGACY_WEIGHT_NORM.get(key, key), lazy.shape, lazy.dtype, lazy.load,
                             source_span=lazy.file_span()) for key, lazy in state.items()]
    return ConversionPlan(config, tensors)
