"""s3prl's converted fairseq checkpoints -> the :class:`FairseqCheckpoint` the fairseq family readers take.

s3prl's ``upstream/hubert/convert.py`` and ``upstream/wav2vec2/convert.py`` load a fairseq checkpoint with fairseq
and ``torch.save`` a plain dict::

    {"task_cfg": cfg["task"], "model_cfg": cfg["model"], "model_weight": state["model"],
     "dictionaries_symbols": [d.symbols for d in task_state["dictionaries"]]}   # the last: HuBERT only

where ``cfg = OmegaConf.to_container(state["cfg"])``: plain dicts, lists and scalars (``to_container`` keeps enum
members, so a fairseq ``Choices`` member may appear; it reads as its option string), and the fairseq state dict
unchanged, heads included. So the file becomes a fairseq checkpoint of the ``dict`` era with the ``model`` and
``task`` sections, and the HuBERT dictionary's symbols in their row order (label_embs_concat's rows): the existing
family readers then write the complete pre-training bundle (HuBERT's final_proj, label embeddings in cluster order
and mask embedding; wav2vec 2.0's quantizer, project_q, final_proj and mask embedding).

What s3prl does not keep: the criterion section (loss weights: the bundle's objective takes fairseq's defaults, as
for any checkpoint without one) and the training state (``num_updates`` is unknown: wav2vec 2.0's Gumbel temperature
then starts again from ``latent_temp``'s maximum; the bundle's provenance says so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConversionError
from .fairseq_checkpoint import FairseqCheckpoint, LabelDictionary, to_plain
from .torch_file import TORCH_GLOBALS, LazyTensor, TorchFile, open_torch_file

S3PRL_KEYS = ("task_cfg", "model_cfg", "model_weight")
_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq Dictionary's defaults: bos, pad, eos, unk


def _enum_member(value: Any) -> Any:
    # fairseq's ChoiceEnum members pickle as ``Choices(value)``; their value is the option string.
    return value


# What these files hold beyond tensors (checked on files written as s3prl does: OrderedDict, _rebuild_tensor_v2 and
# the storage types only) plus the fairseq enum members OmegaConf.to_container leaves in a config that has them. No
# omegaconf, argparse or fairseq Dictionary objects: s3prl saves plain containers and the symbols as strings.
S3PRL_GLOBALS: dict[str, Any] = {
    **TORCH_GLOBALS,
    "fairseq.dataclass.constants.Choices": _enum_member,
}


def is_s3prl_checkpoint(obj: Any) -> bool:
    """The dict s3prl's converters save (``model_weight`` with ``model_cfg`` and ``task_cfg``)."""
    return isinstance(obj, dict) and all(key in obj for key in S3PRL_KEYS) and "model" not in obj


def _label_dictionaries(symbols: Any, problems: list[str]) -> list[LabelDictionary]:
    if symbols is None:
        return []
    if not isinstance(symbols, list) or not all(isinstance(s, list) and all(isinstance(x, str) for x in s)
                                                for s in symbols):
        problems.append("'dictionaries_symbols' is not a list of symbol lists")
        return []
    out = []
    for listed in symbols:
        unk = listed.index("<unk>") if "<unk>" in listed else 3
        nspecial = 4 if tuple(listed[:4]) == _SPECIALS else sum(1 for s in listed if s in _SPECIALS)
        out.append(LabelDictionary(symbols=list(listed), nspecial=nspecial, unk_index=unk))
    return out


def read_s3prl_checkpoint(path: str | Path) -> FairseqCheckpoint:
    """Read an s3prl converted checkpoint safely (allow-list: tensors, plain containers, fairseq enum members)."""
    path = Path(path)
    file = open_torch_file(
        path, S3PRL_GLOBALS, what="s3prl checkpoint",
        refused_hint="s3prl's converted checkpoints hold tensors and plain configuration only; this file needs "
                     "other code (it is not one, or has been tampered with)",
        unreadable_hint="Is the file complete? Convert it with s3prl again")
    try:
        return _interpret(path, file)
    except BaseException:
        file.close()
        raise


def _interpret(path: Path, file: TorchFile) -> FairseqCheckpoint:
    raw = file.obj
    if not is_s3prl_checkpoint(raw):
        raise ConversionError(path, f"is not an s3prl converted checkpoint (it needs {list(S3PRL_KEYS)})",
                              hint="Pass the file s3prl's upstream/{hubert,wav2vec2}/convert.py wrote")
    problems: list[str] = []
    model_cfg, task_cfg = to_plain(raw["model_cfg"]), to_plain(raw["task_cfg"])
    for name, section in (("model_cfg", model_cfg), ("task_cfg", task_cfg)):
        if not isinstance(section, dict):
            problems.append(f"'{name}' is a {type(section).__name__}, not a configuration dict")
    weights = raw["model_weight"]
    state: dict[str, LazyTensor] = {}
    if not isinstance(weights, dict):
        problems.append("'model_weight' is not a state dict")
    else:
        bad = [str(k) for k, v in weights.items() if not isinstance(v, LazyTensor)]
        if bad:
            problems.append(f"'model_weight' holds non-tensor entries {bad[:5]}")
        state = {str(k): v for k, v in weights.items() if isinstance(v, LazyTensor)}
    dictionaries = _label_dictionaries(raw.get("dictionaries_symbols"), problems)
    if problems:
        raise ConversionError(path, problems, hint="Is this a file s3prl's converter wrote? Convert it again")
    return FairseqCheckpoint(path=path, era="dict", cfg={"model": model_cfg, "task": task_cfg}, state=state,
                             num_updates=None, dictionaries=dictionaries, file=file)


def s3prl_provenance(family: str) -> dict[str, Any]:
    """What the bundle's provenance adds for an s3prl source (what s3prl's converter left out)."""
    notes = {"source_format": "s3prl converted fairseq checkpoint (upstream/{hubert,wav2vec2}/convert.py)",
             "s3prl_note": "s3prl keeps the model and task configuration, the full state dict and (HuBERT) the label "
                           "dictionary's symbols; no criterion (loss weights: fairseq's defaults) and no update count"}
    if family == "wav2vec2":
        notes["num_updates_note"] = ("unknown (s3prl keeps no training state): continued pre-training starts the "
                                     "Gumbel temperature at latent_temp's maximum")
    return notes
