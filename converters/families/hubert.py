"""HuBERT: fairseq ``HubertModel`` (pre-trained) and ``HubertCtc`` (fine-tuned) -> torchaudio modules."""

from __future__ import annotations

import torch

from bundles.config import BundleConfig
from bundles.factory import ENCODER_PREFIX
from bundles.safetensors_stream import PendingTensor

from ..fairseq_checkpoint import FairseqCheckpoint, LabelDictionary
from .base import ConversionPlan, cfg_section, direct_tensors, plan_ctc, plan_encoder
from .encoder import ENCODER_RULES, final_dim, masking_args
from .key_map import KeyMap, prefixed

NAME = "hubert"
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")

PRETRAIN_KEY_MAP = KeyMap(
    rules=prefixed(ENCODER_RULES, "", ENCODER_PREFIX) + (
        (r"mask_emb", "mask_generator.mask_embedding"),
        (r"final_proj\.(weight|bias)", r"logit_generator.final_proj.\1"),
        # Rows are reordered so that row c is cluster c (see label_rows); special rows go to fairseq_extras.
        (r"label_embs_concat", "logit_generator.label_embeddings"),
    ),
)

CTC_KEY_MAP = KeyMap(
    rules=prefixed(ENCODER_RULES, "w2v_encoder.w2v_model.", "") + (
        (r"w2v_encoder\.proj\.(weight|bias)", r"aux.\1"),
    ),
    drops=(
        (r"w2v_encoder\.w2v_model\.mask_emb", "fine-tuning's time-masking vector; torchaudio's Wav2Vec2Model has no slot"),
        (r"w2v_encoder\.w2v_model\.label_embs_concat",
         "pre-training label embeddings fairseq keeps after fine-tuning; unused by the CTC model"),
    ),
)


def detect(ckpt: FairseqCheckpoint) -> str | None:
    """"pretrain", "ctc" or None, from the configuration's model name and the tensors present."""
    name = str(cfg_section(ckpt, "model").get("_name") or "")
    if name == "hubert" or (not name and "label_embs_concat" in ckpt.state):
        return "pretrain"
    if name == "hubert_ctc":
        return "ctc"
    return None


def label_rows(dictionary: LabelDictionary, num_rows: int) -> tuple[list[int], list[int], int]:
    """(row of cluster c for c in 0..K-1, rows that are not clusters, K).

    Cluster c is the symbol ``str(c)``; it usually sits at row c+4 but need not (dictionaries are built from
    label counts). A cluster the dictionary lacks maps to ``<unk>``'s row, as fairseq's label encoding does.
    """
    cluster_of_row = {}
    for row, symbol in enumerate(dictionary.symbols[:num_rows]):
        if symbol.isdigit() and (symbol == "0" or not symbol.startswith("0")):
            cluster_of_row[row] = int(symbol)
    k = max(cluster_of_row.values()) + 1 if cluster_of_row else 0
    row_of_cluster = {c: r for r, c in cluster_of_row.items()}
    rows = [row_of_cluster.get(c, dictionary.unk_index) for c in range(k)]
    others = [r for r in range(num_rows) if r not in cluster_of_row]
    return rows, others, k


def _default_dictionary(num_rows: int) -> LabelDictionary:
    return LabelDictionary(symbols=list(SPECIALS) + [str(i) for i in range(num_rows - len(SPECIALS))],
                           nspecial=len(SPECIALS), unk_index=3)


DEFAULT_LABEL_RATE = 50.0
"""fairseq's HuBERT label rate: every published HuBERT configuration labels 20 ms feature frames (50 Hz)."""


def _label_rate(*values: object) -> dict[str, object]:
    """The objective's ``label_rate``: the first positive number of ``values`` (the model's, then the task's: the
    model's may be an unresolved ``${task.label_rate}``); fairseq's 50 Hz, with a note saying so, when there is none
    (the task's -1 default means "sequence labels", which masked prediction cannot use either)."""
    for value in values:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return {"label_rate": float(value)}
    return {"label_rate": DEFAULT_LABEL_RATE,
            "label_rate_note": f"assumed: the checkpoint's configuration gives no label_rate ({values[-1]!r}); "
                               f"fairseq's HuBERT recipes label at {DEFAULT_LABEL_RATE:g} Hz"}


def plan(ckpt: FairseqCheckpoint, kind: str, problems: list[str]) -> ConversionPlan | None:
    key_map = PRETRAIN_KEY_MAP if kind == "pretrain" else CTC_KEY_MAP
    common = plan_encoder(ckpt, kind, key_map, problems)
    if kind == "ctc":
        return plan_ctc(ckpt, NAME, common, problems)
    model_cfg, enc, result = common.model_cfg, common.encoder_args, common.key_map_result

    labels = cfg_section(ckpt, "task").get("labels")
    if isinstance(labels, list) and len(labels) > 1:
        problems.append(f"it was trained on {len(labels)} label sets {labels}; a bundle holds one "
                        "(continue from a single-target HuBERT checkpoint)")
    embs = ckpt.state.get("label_embs_concat")
    if embs is None or len(embs.shape) != 2:
        problems.append("it has no 2-D 'label_embs_concat' (HuBERT's label embeddings)")
        return None
    num_rows, dim = embs.shape
    if ckpt.dictionaries:
        dictionary, assumed = ckpt.dictionaries[0], False
        if len(dictionary.symbols) != num_rows:
            problems.append(f"its label dictionary has {len(dictionary.symbols)} symbols but label_embs_concat has "
                            f"{num_rows} rows")
    else:
        dictionary, assumed = _default_dictionary(num_rows), True
    rows, other_rows, k = label_rows(dictionary, num_rows)
    if k < 2:
        problems.append("its label dictionary holds no cluster ids ('0', '1', ...)")
    if problems:
        return None
    fdim = final_dim(model_cfg)
    fgm = float(model_cfg.get("feature_grad_mult", 1.0))
    pretrain_args = {
        **masking_args(model_cfg),
        "skip_masked": bool(model_cfg.get("skip_masked", False)),
        "skip_nomask": bool(model_cfg.get("skip_nomask", False)),
        "num_classes": k,
        "final_dim": fdim,
        # torchaudio takes None for "no scaling" and refuses 1.0; 0 (a frozen extractor) is left to training.
        "feature_grad_mult": fgm if 0.0 < fgm < 1.0 else None,
    }
    objective = {
        "feature_grad_mult": fgm,
        "logit_temp": float(model_cfg.get("logit_temp", 0.1)),
        **_label_rate(model_cfg.get("label_rate"), cfg_section(ckpt, "task").get("label_rate")),
        "untie_final_proj": bool(model_cfg.get("untie_final_proj", False)),
        "labels": labels,
        "criterion": cfg_section(ckpt, "criterion") or None,
    }
    label_dictionary = {
        "num_clusters": k,
        "source_symbols": dictionary.symbols,
        "cluster_rows": rows,
        "non_cluster_symbols": [dictionary.symbols[r] for r in other_rows],
        "missing_clusters": [c for c, r in enumerate(rows) if r == dictionary.unk_index],
        "assumed_default_order": assumed,
    }
    config = BundleConfig(family=NAME, kind="pretrain", encoder_args=enc, pretrain_args=pretrain_args,
                          objective=objective, sample_rate=common.sample_rate, normalize_waveform=common.normalize,
                          label_dictionary=label_dictionary, num_updates=ckpt.num_updates, provenance=common.provenance)

    def cluster_rows() -> torch.Tensor:
        return embs.load()[rows].contiguous()

    def special_rows() -> torch.Tensor:
        return embs.load()[other_rows].contiguous()

    tensors = direct_tensors(ckpt, result.mapped, skip={"label_embs_concat"}) + common.derived
    tensors.append(PendingTensor("logit_generator.label_embeddings", (k, dim), embs.dtype, cluster_rows))
    extras = [PendingTensor("label_embeddings_non_cluster", (len(other_rows), dim), embs.dtype, special_rows)]
    return ConversionPlan(config, tensors, extras, key_map_result=result)

