"""The published fairseq HuBERT / wav2vec 2.0 checkpoints and k-means files, as data: one :class:`ModelCard` each.

Sources (checked against these; a fact none of them states is written "unknown"):

- fairseq ``examples/hubert/README.md``, ``examples/wav2vec/README.md``, ``examples/wav2vec/xlsr/README.md``
  (download URLs, data, sizes) and ``examples/hubert/tests/test_feature_and_unit.sh`` (the k-means file is used
  with layer 9 of ``hubert_base_ls960.pt``, 500 units);
- torchaudio ``pipelines/_wav2vec2/impl.py`` (data, waveform normalisation and license of each model it
  redistributes: "originally published ... under MIT License");
- the HuBERT paper (arXiv 2106.07447, section on training iterations) for which targets each HuBERT size was
  trained on;
- the label-set names ``layer6.km500`` (BASE) and ``lyr9.km500`` (LARGE/XLARGE) are the ``task.labels`` of the
  checkpoints as quoted by third-party code and the project notes, not read from the files here;
- fairseq ``models/wav2vec/wav2vec2_asr.py`` and ``models/hubert/hubert_asr.py``: fine-tuning asserts the same
  ``normalize`` as pre-training (so a CTC card inherits its parent's) and calls ``remove_pretraining_modules``;
- data2vec 2.0: fairseq ``examples/data2vec/README.md`` (download URLs, data; "Vision models only are license under
  CC-BY-NC") and the training configs it names, ``examples/data2vec/config/v2/base_audio_only_task.yaml`` and
  ``large_audio_only_task.yaml`` (EMA schedule, targets, masking; ``task.normalize: true``); ``wav2vec2_asr.py``
  asserts ``normalize`` when fine-tuning a ``data2vec_multi`` model.

No sha256 of any of these files is published by fairseq or torchaudio, so every ``sha256`` is ``None``; record one
only from a documented source, never from a local download alone.

Standard library only: importing this module needs neither torch, fairseq nor scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

FAMILIES = ("hubert", "wav2vec2", "data2vec2", "kmeans")
KINDS = ("pretrained", "ctc", "kmeans")

_HUBERT_URL = "https://dl.fbaipublicfiles.com/hubert"
_WAV2VEC_URL = "https://dl.fbaipublicfiles.com/fairseq/wav2vec"
_DATA2VEC2_URL = "https://dl.fbaipublicfiles.com/fairseq/data2vec2"

_HUBERT_PAPER = (
    "HuBERT: Self-Supervised Speech Representation Learning by Masked Prediction of Hidden Units "
    "(Hsu et al., 2021), https://arxiv.org/abs/2106.07447"
)
_WAV2VEC2_PAPER = (
    "wav2vec 2.0: A Framework for Self-Supervised Learning of Speech Representations "
    "(Baevski et al., 2020), https://arxiv.org/abs/2006.11477"
)
_XLSR_PAPER = (
    "Unsupervised Cross-lingual Representation Learning for Speech Recognition "
    "(Conneau et al., 2020), https://arxiv.org/abs/2006.13979"
)
_XLS_R_PAPER = (
    "XLS-R: Self-supervised Cross-lingual Speech Representation Learning at Scale "
    "(Babu et al., 2021), https://arxiv.org/abs/2111.09296"
)
_DATA2VEC2_PAPER = (
    "Efficient Self-supervised Learning with Contextualized Target Representations for Vision, Speech and Language "
    "(Baevski et al., 2022), https://arxiv.org/abs/2212.07525"
)
_SELF_TRAINING_PAPER = (
    "Self-training and Pre-training are Complementary for Speech Recognition "
    "(Xu et al., 2020), https://arxiv.org/abs/2010.11430"
)

# torchaudio's pipeline docs: "Originally published by the authors of ... under MIT License"; fairseq's LICENSE is
# MIT and its READMEs state no other license for these files.
_MIT = "MIT"
_MIT_FAIRSEQ_ONLY = (
    "License: the fairseq README states none; MIT per fairseq's LICENSE (torchaudio does not redistribute this "
    "file, so no second source confirms it)."
)

_LIBRISPEECH_960 = "LibriSpeech 960 h"
_LIBRILIGHT_60K = "Libri-Light 60k h"
_WAV2VEC2_TARGETS = "self-supervised (quantizer codes)"
_OWN_QUANTIZER = "The quantizer that makes its targets is in the checkpoint, so it can continue with its own targets."
_CTC_HEADS_REMOVED = (
    "fairseq's fine-tuning drops the pre-training heads (remove_pretraining_modules: {heads}), so continuing "
    "pre-training from this file needs new heads; prefer {parent}."
)


@dataclass(frozen=True)
class ModelCard:
    """One published file: where it comes from, what it was trained on, and what continuing it needs."""

    name: str
    """Short id, unique in :data:`CATALOGUE` (e.g. ``hubert_base_ls960``)."""
    family: str
    """``hubert``, ``wav2vec2``, ``data2vec2`` or ``kmeans`` (see :data:`FAMILIES`)."""
    kind: str
    """``pretrained`` (self-supervised only), ``ctc`` (fine-tuned for ASR with CTC) or ``kmeans``."""
    size: str
    """Architecture size as its README names it: BASE, LARGE, XLARGE, 300M, 1B, 2B (k-means: its model's size)."""
    url: str
    """Official download URL of the fairseq file."""
    file_name: str
    """Last path component of :attr:`url`: how a downloaded file is recognised."""
    sha256: str | None
    """Hex sha256 of the file, only where a public source documents it; ``None`` otherwise."""
    license: str
    """License the source states."""
    paper: str
    """Title (authors, year), then the arXiv URL."""
    training_data: str
    """Self-supervised pre-training data (k-means: what its features were computed on)."""
    sample_rate: int
    """Audio sample rate in Hz the model expects."""
    normalize_waveform: bool
    """Whether each waveform is normalised to zero mean and unit variance before the model (fairseq's
    ``task.normalize``)."""
    targets: str
    """What produced the pre-training targets."""
    targets_published: bool | None
    """Whether what produced those targets can be downloaded (in this file or another); ``None``: unknown."""
    fine_tuned_from: str | None
    """Card name of the pre-trained model this was fine-tuned from; ``None`` for pre-trained models."""
    notes: str
    """Anything a user continuing pre-training should know."""
    fine_tuning_data: str | None = None
    """Labelled data of the CTC fine-tuning; ``None`` for pre-trained models and k-means."""
    layer: int | None = None
    """k-means only: the 1-based transformer layer whose output it clusters."""
    num_clusters: int | None = None
    """k-means only: number of clusters K."""
    features_from: str | None = None
    """k-means only: card name of the model whose features it clusters."""

    def __post_init__(self) -> None:
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} is not one of {FAMILIES}")
        if self.kind not in KINDS:
            problems.append(f"kind {self.kind!r} is not one of {KINDS}")
        if (self.family == "kmeans") != (self.kind == "kmeans"):
            problems.append(f"family {self.family!r} and kind {self.kind!r} disagree")
        if self.url.rsplit("/", 1)[-1] != self.file_name:
            problems.append(f"url {self.url!r} does not end in file_name {self.file_name!r}")
        if problems:
            raise ValueError(f"model card {self.name!r}: " + "; ".join(problems))


_SHARED_FIELDS = dict(kind="pretrained", sha256=None, license=_MIT, sample_rate=16000, fine_tuned_from=None)
"""What every card of the catalogue starts from (a family's defaults and the card's own fields override it)."""


def _card(family_defaults: dict, url_base: str, **overrides) -> ModelCard:
    """A card: the shared fields, then the family's defaults, then the card's own; the URL from ``url_base`` and
    the file name unless the card gives one."""
    fields = {**_SHARED_FIELDS, **family_defaults, **overrides}
    fields.setdefault("url", f"{url_base}/{fields['file_name']}")
    return ModelCard(**fields)


def _hubert_card(**overrides) -> ModelCard:
    return _card(dict(family="hubert", paper=_HUBERT_PAPER, training_data=_LIBRILIGHT_60K, normalize_waveform=True,
                      targets="layer-9 km500 of the BASE iteration-2 model (lyr9.km500)", targets_published=None,
                      notes=""), _HUBERT_URL, **overrides)


def _wav2vec2_card(**overrides) -> ModelCard:
    return _card(dict(family="wav2vec2", paper=_WAV2VEC2_PAPER, training_data=_LIBRISPEECH_960,
                      normalize_waveform=False, targets=_WAV2VEC2_TARGETS, targets_published=True,
                      notes=_OWN_QUANTIZER), _WAV2VEC_URL, **overrides)


def _kmeans_card(**overrides) -> ModelCard:
    return _card(dict(family="kmeans", kind="kmeans", paper=_HUBERT_PAPER, normalize_waveform=False,
                      targets="n/a (a k-means model produces targets)", targets_published=None),
                 _HUBERT_URL, **overrides)


def _data2vec2_card(**overrides) -> ModelCard:
    return _card(dict(family="data2vec2", paper=_DATA2VEC2_PAPER, normalize_waveform=True, targets_published=True),
                 _DATA2VEC2_URL, **overrides)


_REMOVED_HEADS = {"hubert": "final_proj, target_glu", "wav2vec2": "quantizer, project_q, final_proj, target_glu",
                  "data2vec2": "the conv decoder and the EMA teacher (_ema)"}


def _fine_tuned(parent: ModelCard, *, name: str, file_name: str, fine_tuning_data: str, notes: str = "",
                **overrides) -> ModelCard:
    """A CTC card: data, size, targets, license and normalisation follow the parent (fairseq asserts the same
    ``normalize`` for fine-tuning as for pre-training)."""
    heads = _REMOVED_HEADS[parent.family]
    note = _CTC_HEADS_REMOVED.format(heads=heads, parent=parent.name)
    fields = dict(
        name=name,
        kind="ctc",
        file_name=file_name,
        url=parent.url.rsplit("/", 1)[0] + "/" + file_name,
        fine_tuned_from=parent.name,
        fine_tuning_data=fine_tuning_data,
        notes=f"{notes} {note}".strip(),
    )
    fields.update(overrides)
    return replace(parent, **fields)


# ---------------------------------------------------------------------------------------------------- HuBERT
_HUBERT_BASE = _hubert_card(
    name="hubert_base_ls960",
    size="BASE",
    file_name="hubert_base_ls960.pt",
    training_data=_LIBRISPEECH_960,
    normalize_waveform=False,
    targets="layer-6 km500 of an unpublished iteration-1 HuBERT model (itself trained on MFCC km100 targets)",
    targets_published=False,
    notes=(
        "~95M parameters. The second-iteration BASE model. Its label set (layer6.km500) is not published; the "
        "published hubert_base_ls960_L9_km500 k-means is a different label set, so continuing with it means "
        "re-initialising the label embeddings."
    ),
)
_HUBERT_LARGE = _hubert_card(
    name="hubert_large_ll60k",
    size="LARGE",
    file_name="hubert_large_ll60k.pt",
    notes=(
        "~316M parameters. Whether the published hubert_base_ls960_L9_km500 file is the k-means that made its "
        "targets is unknown: measure it (masked-prediction accuracy with those labels vs chance 1/500)."
    ),
)
_HUBERT_XLARGE = _hubert_card(
    name="hubert_xlarge_ll60k",
    size="XLARGE",
    file_name="hubert_xtralarge_ll60k.pt",
    notes=(
        "~1B parameters (the file is named 'xtralarge'). Whether the published hubert_base_ls960_L9_km500 file "
        "is the k-means that made its targets is unknown: measure it."
    ),
)

# ---------------------------------------------------------------------------------------------- wav2vec 2.0
_W2V2_BASE = _wav2vec2_card(
    name="wav2vec2_base_ls960",
    size="BASE",
    file_name="wav2vec_small.pt",
)
_W2V2_LARGE = _wav2vec2_card(
    name="wav2vec2_large_ls960",
    size="LARGE",
    file_name="libri960_big.pt",
)
_W2V2_LV60K = _wav2vec2_card(
    name="wav2vec2_large_lv60k",
    size="LARGE",
    file_name="wav2vec_vox_new.pt",
    training_data=_LIBRILIGHT_60K,
    normalize_waveform=True,
    notes=_OWN_QUANTIZER + " Updated Oct. 24, 2020 (fairseq README).",
)
_XLSR_53 = _wav2vec2_card(
    name="wav2vec2_xlsr53",
    size="LARGE",
    file_name="xlsr_53_56k.pt",
    paper=_XLSR_PAPER,
    training_data="56k h in 53 languages (MLS, CommonVoice, BABEL)",
    normalize_waveform=True,
)


def _xls_r(size: str, file_name: str) -> ModelCard:
    return _wav2vec2_card(
        name=f"wav2vec2_xls_r_{size.lower()}",
        size=size,
        file_name=file_name,
        paper=_XLS_R_PAPER,
        training_data="436k h in 128 languages (VoxPopuli, MLS, CommonVoice, VoxLingua107, BABEL)",
        normalize_waveform=True,
    )


# ------------------------------------------------------------------------------------------- data2vec 2.0
_D2V_LICENSE_NOTE = ("License: MIT per fairseq's LICENSE; the data2vec README restricts only its vision models "
                     "(CC-BY-NC).")
_D2V2_BASE = _data2vec2_card(
    name="data2vec2_base_libri",
    size="BASE",
    file_name="base_libri.pt",
    training_data=_LIBRISPEECH_960,
    targets="its EMA teacher: mean of the top 8 blocks' FFN outputs, each instance-normalised",
    notes=(
        "~93M parameters (student), plus the conv decoder and the EMA teacher, both in the file. Config "
        "examples/data2vec/config/v2/base_audio_only_task.yaml: 400k updates, EMA decay 0.999 annealed to 0.99999 "
        "by update 75k (the teacher ends nearly frozen), clone_batch 8, mask_prob 0.5, mask_length 5, L2 loss "
        "scaled by 1/sqrt(768). " + _D2V_LICENSE_NOTE
    ),
)
_D2V2_LARGE = _data2vec2_card(
    name="data2vec2_large_vox",
    size="LARGE",
    file_name="large_vox.pt",
    training_data=_LIBRILIGHT_60K,
    targets="its EMA teacher: mean of the top 16 blocks' FFN outputs, each instance-normalised",
    notes=(
        "~313M parameters (student: 8 prenet + 16 blocks), plus the conv decoder and the EMA teacher, both in the "
        "file. Config examples/data2vec/config/v2/large_audio_only_task.yaml: 600k updates, EMA decay 0.9997 "
        "annealed to 1.0 by update 300k (the teacher ends frozen), clone_batch 12, mask_prob 0.55, mask_length 5. "
        + _D2V_LICENSE_NOTE
    ),
)
_D2V2_FT_NOTE = ("Fine-tuned with one of fairseq's examples/wav2vec/config/finetuning configs (the data2vec README "
                 "names the directory, not the file).")

_LS_10M = "Libri-Light 10 min labelled (train-10min)"
_LS_100H = "LibriSpeech train-clean-100 (100 h labelled)"
_LS_960H = "LibriSpeech 960 h labelled"

_CARDS = (
    _HUBERT_BASE,
    _HUBERT_LARGE,
    _HUBERT_XLARGE,
    _fine_tuned(_HUBERT_LARGE, name="hubert_large_ll60k_ft_ls960",
                file_name="hubert_large_ll60k_finetune_ls960.pt", fine_tuning_data=_LS_960H),
    _fine_tuned(_HUBERT_XLARGE, name="hubert_xlarge_ll60k_ft_ls960",
                file_name="hubert_xtralarge_ll60k_finetune_ls960.pt", fine_tuning_data=_LS_960H),
    _W2V2_BASE,
    _fine_tuned(_W2V2_BASE, name="wav2vec2_base_ls960_ft_10m", file_name="wav2vec_small_10m.pt",
                fine_tuning_data=_LS_10M),
    _fine_tuned(_W2V2_BASE, name="wav2vec2_base_ls960_ft_100h", file_name="wav2vec_small_100h.pt",
                fine_tuning_data=_LS_100H),
    _fine_tuned(_W2V2_BASE, name="wav2vec2_base_ls960_ft_960h", file_name="wav2vec_small_960h.pt",
                fine_tuning_data=_LS_960H),
    _W2V2_LARGE,
    _fine_tuned(_W2V2_LARGE, name="wav2vec2_large_ls960_ft_10m", file_name="wav2vec_big_10m.pt",
                fine_tuning_data=_LS_10M),
    _fine_tuned(_W2V2_LARGE, name="wav2vec2_large_ls960_ft_100h", file_name="wav2vec_big_100h.pt",
                fine_tuning_data=_LS_100H),
    _fine_tuned(_W2V2_LARGE, name="wav2vec2_large_ls960_ft_960h", file_name="wav2vec_big_960h.pt",
                fine_tuning_data=_LS_960H),
    _W2V2_LV60K,
    _fine_tuned(_W2V2_LV60K, name="wav2vec2_large_lv60k_ft_10m", file_name="wav2vec_vox_10m_new.pt",
                fine_tuning_data=_LS_10M),
    _fine_tuned(_W2V2_LV60K, name="wav2vec2_large_lv60k_ft_100h", file_name="wav2vec_vox_100h_new.pt",
                fine_tuning_data=_LS_100H),
    _fine_tuned(_W2V2_LV60K, name="wav2vec2_large_lv60k_ft_960h", file_name="wav2vec2_vox_960h_new.pt",
                fine_tuning_data=_LS_960H,
                notes="The file name starts 'wav2vec2_', unlike its 10m/100h siblings."),
    _fine_tuned(_W2V2_LV60K, name="wav2vec2_large_lv60k_st_960h", file_name="wav2vec_vox_960h_pl.pt",
                fine_tuning_data=_LS_960H + " + pseudo-labelled Libri-Light (self-training)",
                paper=_SELF_TRAINING_PAPER,
                notes=("Self-training variant. That it was fine-tuned from exactly wav2vec_vox_new.pt is "
                       "inferred from the README table, not stated. " + _MIT_FAIRSEQ_ONLY)),
    _XLSR_53,
    _xls_r("300M", "xlsr2_300m.pt"),
    _xls_r("1B", "xlsr2_960m_1000k.pt"),
    _xls_r("2B", "xlsr2_2B_1000k.pt"),
    _D2V2_BASE,
    _fine_tuned(_D2V2_BASE, name="data2vec2_base_libri_ft_960h", file_name="base_libri_960h.pt",
                fine_tuning_data=_LS_960H, notes=_D2V2_FT_NOTE),
    _D2V2_LARGE,
    _fine_tuned(_D2V2_LARGE, name="data2vec2_large_vox_ft_960h", file_name="large_vox_960h.pt",
                fine_tuning_data=_LS_960H, notes=_D2V2_FT_NOTE),
    _kmeans_card(
        name="hubert_base_ls960_L9_km500",
        size="BASE",
        file_name="hubert_base_ls960_L9_km500.bin",
        training_data=(
            "LibriSpeech 960 h (listed with the BASE model; the subset used to fit it is not documented)"
        ),
        layer=9,
        num_clusters=500,
        features_from="hubert_base_ls960",
        notes=(
            "joblib pickle of a scikit-learn MiniBatchKMeans; only cluster_centers_ (500 x 768) matters. The only "
            "published HuBERT k-means. HuBERT BASE itself was trained on layer-6 km500 targets of an unpublished "
            "iteration-1 model, so continuing BASE with this k-means is a new label set (re-initialise the label "
            "embeddings). Whether it made the LARGE/XLARGE targets (lyr9.km500) is unknown. `continue-pt kmeans "
            "check --bundle <converted hubert_large_ll60k> --teacher <converted hubert_base_ls960> --kmeans "
            "hubert_base_ls960_L9_km500.bin --kmeans-layer 9 --audio <LibriSpeech dev audio>` answers it (the "
            "k-means labels BASE's 768-wide layer-9 features, hence --teacher; likewise for XLARGE); this has not "
            "been run here because the published weights cannot be downloaded in our build environment. "
            + _MIT_FAIRSEQ_ONLY
        ),
    ),
)


def _index(cards: tuple[ModelCard, ...]) -> dict[str, ModelCard]:
    index: dict[str, ModelCard] = {}
    for card in cards:
        if card.name in index:
            raise ValueError(f"two model cards are named {card.name!r}")
        index[card.name] = card
    return index


CATALOGUE: dict[str, ModelCard] = _index(_CARDS)
"""Every card by name, in the order of the table: HuBERT, wav2vec 2.0 (each pre-trained model followed by its
fine-tuned ones), XLSR, XLS-R, data2vec 2.0, k-means."""


class UnknownModelError(KeyError):
    """No card has that name. A :class:`KeyError` whose message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message with repr()
        return str(self.args[0])


def get_card(name: str) -> ModelCard:
    """The card named ``name``; :class:`UnknownModelError` (a ``KeyError``) listing the known names otherwise."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise UnknownModelError(
            f"no published model is named {name!r}; known names: {', '.join(CATALOGUE)}"
        ) from None


def find_card_by_file_name(file_name: str) -> ModelCard | None:
    """The card whose published file is called ``file_name`` (a bare name; any directory part is ignored)."""
    base = file_name.replace("\\", "/").rsplit("/", 1)[-1]
    return next((card for card in CATALOGUE.values() if card.file_name == base), None)


def find_card_by_sha256(sha: str) -> ModelCard | None:
    """The card with this documented sha256 (hex, any case); ``None`` if no card documents it."""
    sha = sha.strip().lower()
    return next((card for card in CATALOGUE.values() if card.sha256 is not None and card.sha256.lower() == sha), None)


_TABLE_COLUMNS = ("name", "family", "kind", "size", "data", "normalise?", "targets", "license")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table_row(card: ModelCard) -> tuple[str, ...]:
    data = card.training_data
    if card.fine_tuning_data:
        data += f"; CTC: {card.fine_tuning_data}"
    if card.kind == "kmeans":
        targets = f"layer {card.layer} of {card.features_from}, K={card.num_clusters}"
    else:
        targets = card.targets
    return (
        f"`{card.name}`", card.family, card.kind, card.size, data,
        "yes" if card.normalize_waveform else "no", targets, card.license,
    )


def catalogue_markdown_table() -> str:
    """The catalogue as a Markdown table, one row per card (``docs_catalogue_table.md`` holds its output)."""
    lines = [
        "| " + " | ".join(_TABLE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in _TABLE_COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in _table_row(card)) + " |" for card in CATALOGUE.values()]
    return "\n".join(lines) + "\n"
