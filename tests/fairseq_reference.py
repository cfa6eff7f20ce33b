"""fairseq reference models and checkpoints for parity tests (tests only: this module imports fairseq).

It builds random-weight fairseq models from the published checkpoints' configurations in
``tests/fairseq_configs`` (copied from torchaudio's test assets; see ``SOURCE.md`` there), writes them
as fairseq checkpoint files of each pickle era, and computes fairseq's own outputs for the converters and the
pre-training heads to be compared against.

* :func:`build_fairseq_model` -> :class:`FairseqReference` (model, trainer-style config, task state, dictionary).
* :func:`save_checkpoint` writes a checkpoint of one era: ``"dict"`` (fairseq >= 2021: ``cfg`` is a plain dict),
  ``"dictconfig"`` (Oct 2020 - Mar 2021: ``cfg`` is a pickled omegaconf ``DictConfig``), ``"namespace"`` (up to
  Oct 2020: ``args`` is an ``argparse.Namespace``), ``"legacy"`` (``"dict"`` content in torch's pre-1.6 non-zip format).
* :func:`model_from_state` rebuilds the fairseq model from a loaded checkpoint dict (strict ``load_state_dict``);
  :func:`namespace_to_config` is fairseq's ``convert_namespace_to_omegaconf`` made to work for nested ``w2v_args``.
* Reference outputs (raw audio in; fairseq's waveform normalisation is applied when ``task.normalize``):
  :func:`fairseq_layer_outputs`, :func:`fairseq_hubert_logits`, :func:`fairseq_quantizer_outputs`,
  :func:`fairseq_ctc_logits`; :func:`hubert_valid_frames` is fairseq HuBERT's (non-conv-formula) padded-frame count.

Weights: every parameter and buffer is re-drawn from a seeded normal after construction (see ``_reinitialise``), so
no tensor keeps a zero/default value and swapped keys show up in parity tests. ``encoder.pos_conv.0`` is saved as
fairseq's ``weight_g`` / ``weight_v`` (``torch.nn.utils.weight_norm``), as the published files hold it.

The model is built the way fairseq builds it when it loads a checkpoint: ``tasks.setup_task(cfg.task)``, the task
state (dictionaries) merged in, then ``task.build_model(cfg.model)``. Only ``HubertCtc`` is built by hand:
``HubertEncoder`` reads ``cfg.autoregressive``, which ``HubertCtcConfig`` lacks, so fairseq's own
``build_model`` (which merges the config into the struct dataclass) cannot build it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from fairseq import tasks
from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
from fairseq.data import Dictionary
from fairseq.dataclass.configs import FairseqConfig
from fairseq.logging.meters import AverageMeter, MetersDict, StopwatchMeter, TimeMeter
from fairseq.models import MODEL_DATACLASS_REGISTRY
from fairseq.models.hubert.hubert import HubertModel
from fairseq.models.hubert.hubert_asr import HubertCtc, HubertEncoder
from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Model
from fairseq.optim import OPTIMIZER_DATACLASS_REGISTRY
from fairseq.optim.lr_scheduler import LR_SCHEDULER_DATACLASS_REGISTRY
from fairseq.tasks import TASK_DATACLASS_REGISTRY

__all__ = [
    "CONFIG_DIR",
    "CONFIG_NAMES",
    "ERAS",
    "LETTERS",
    "FairseqReference",
    "build_fairseq_model",
    "cluster_dictionary",
    "fairseq_ctc_logits",
    "fairseq_hubert_logits",
    "fairseq_layer_outputs",
    "fairseq_quantizer_outputs",
    "hubert_valid_frames",
    "letter_dictionary",
    "load_config",
    "model_from_state",
    "namespace_to_config",
    "prepare_waveform",
    "save_checkpoint",
    "skip_weight_init",
]

CONFIG_DIR: Path = Path(__file__).resolve().parent / "fairseq_configs"
"""The stored fairseq configurations: the ``cfg`` of six published checkpoints, kept in the repository."""

CONFIG_NAMES: tuple[str, ...] = (
    "hubert_base_ls960",
    "hubert_large_ll60k",
    "hubert_large_ll60k_finetune_ls960",
    "wav2vec_small",
    "libri960_big",
    "wav2vec_small_960h",
)
"""Stems of the six JSON files in :data:`CONFIG_DIR`, one per published checkpoint."""

Era = Literal["dict", "dictconfig", "namespace", "legacy"]
ERAS: tuple[Era, ...] = ("dict", "dictconfig", "namespace", "legacy")
"""Checkpoint pickle eras understood by :func:`save_checkpoint`."""

LETTERS: tuple[str, ...] = tuple("|ETAONIHSRDLUMWCFGYPBVK'XJQZ")
"""The 28 symbols of fairseq's LibriSpeech ``dict.ltr.txt``; with the 4 specials the CTC vocabulary has 32 rows."""

_FAKE_DATA = "/foo/bar"
_INIT_STD = 0.1  # std of the random re-initialisation


# --------------------------------------------------------------------------------------------- configurations


def load_config(name: str) -> dict[str, Any]:
    """The stored JSON configuration ``CONFIG_DIR / f"{name}.json"`` as a dict."""
    if name not in CONFIG_NAMES:
        raise ValueError(f"unknown config {name!r}; expected one of {CONFIG_NAMES}")
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def _family_of(name: str) -> Literal["hubert", "wav2vec2"]:
    return "hubert" if name.startswith("hubert") else "wav2vec2"


def _structured(registry: Mapping[str, Any], values: Mapping[str, Any]) -> DictConfig:
    """``values`` (with ``_name``) merged into the defaults of the dataclass registered under ``values["_name"]``."""
    dc = registry[values["_name"]]
    node = OmegaConf.structured(dc)
    # like fairseq's merge_with_parent(remove_missing=True): keys of older fairseq versions are dropped
    known = set(dc.__dataclass_fields__)
    return OmegaConf.merge(node, {k: v for k, v in values.items() if k in known})


def _full_config(
    *,
    model: Mapping[str, Any],
    task: Mapping[str, Any],
    criterion: Mapping[str, Any],
    optimizer: Mapping[str, Any],
    lr_scheduler: Mapping[str, Any],
    optimization: Mapping[str, Any],
    common: Mapping[str, Any] | None = None,
) -> DictConfig:
    """A top-level fairseq config in the form fairseq's ``hydra_train`` hands to the trainer.

    ``hydra_train`` composes the structured ``FairseqConfig`` and then flattens it with
    ``OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))`` and ``set_struct(True)``:
    a plain ``DictConfig`` of resolved primitive values (no dataclass types, no enums, no interpolations).
    """
    top = OmegaConf.structured(FairseqConfig)
    with open_dict(top):
        top.model = _structured(MODEL_DATACLASS_REGISTRY, model)
        top.task = _structured(TASK_DATACLASS_REGISTRY, task)
        top.criterion = _structured(CRITERION_DATACLASS_REGISTRY, criterion)
        top.optimizer = _structured(OPTIMIZER_DATACLASS_REGISTRY, optimizer)
        top.lr_scheduler = _structured(LR_SCHEDULER_DATACLASS_REGISTRY, lr_scheduler)
        top.optimization = OmegaConf.merge(top.optimization, dict(optimization))
        top.common = OmegaConf.merge(top.common, {"fp16": True, "log_format": "json", "log_interval": 200, **(common or {})})
        top.checkpoint.save_dir = "/checkpoint/foo/bar"
        top.distributed_training.distributed_world_size = 64
    return _plain(top)


def _plain(cfg: DictConfig) -> DictConfig:
    """``cfg`` as fairseq's ``hydra_train`` leaves it: resolved, enums as strings, no dataclass types, struct."""
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(plain, True)
    return plain


def _pretrain_config(name: str, stored: Mapping[str, Any], num_layers: int) -> DictConfig:
    """Top-level config of a pre-training run from the stored (``hubert``: model+task, ``wav2vec2``: flat model)."""
    if _family_of(name) == "hubert":
        model = {**stored["model"], "encoder_layers": num_layers}
        task = {**stored["task"]}
        large = model["encoder_embed_dim"] > 768
        return _full_config(
            model=model,
            task=task,
            criterion={"_name": "hubert", "pred_masked_weight": 1.0, "pred_nomask_weight": 0.0, "loss_weights": [10.0]},
            optimizer={"_name": "adam", "adam_betas": "(0.9,0.98)", "adam_eps": 1e-06, "weight_decay": 0.01},
            lr_scheduler={"_name": "polynomial_decay", "warmup_updates": 32000},
            optimization={"max_update": 400000, "lr": [0.0015 if large else 0.0005], "clip_norm": 1.0 if large else 10.0},
        )
    model = {**stored, "encoder_layers": num_layers}
    large = model["encoder_embed_dim"] > 768
    task = {
        "_name": "audio_pretraining",
        "data": _FAKE_DATA,
        "max_sample_size": 250000,
        "min_sample_size": 32000,
        "normalize": False,  # LibriSpeech-960 BASE and LARGE were trained without waveform normalisation
        "sample_rate": 16000,
    }
    return _full_config(
        model=model,
        task=task,
        criterion={
            "_name": "wav2vec",
            "infonce": True,
            "log_keys": ["prob_perplexity", "code_perplexity", "temp"],
            "loss_weights": [0.1, 0.0 if large else 10.0],
        },
        optimizer={"_name": "adam", "adam_betas": "(0.9,0.98)", "adam_eps": 1e-06, "weight_decay": 0.01},
        lr_scheduler={"_name": "polynomial_decay", "warmup_updates": 32000},
        optimization={"max_update": 400000, "lr": [0.0005], "clip_norm": 25.0},
    )


def _finetune_config(name: str, stored: Mapping[str, Any], num_layers: int) -> DictConfig:
    """Top-level config of a CTC fine-tuning run, with the pre-training config (cut to ``num_layers``) as w2v_args."""
    if _family_of(name) == "hubert":
        ctc = dict(stored)
        w2v = ctc.pop("w2v_args")
        w2v_cfg = _pretrain_config("hubert", w2v, num_layers)
        task = {
            "_name": "hubert_pretraining",
            "data": ctc["data"],
            "fine_tuning": True,
            "label_dir": ctc["data"],
            "labels": ["ltr"],
            "normalize": ctc["normalize"],
            "single_target": True,
            "max_sample_size": 250000,
            "min_sample_size": 32000,
            "sample_rate": 16000,
        }
        ctc["w2v_path"] = "/foo/bar/hubert_large_ll60k.pt"
    else:
        ctc = dict(stored["model"])
        w2v = ctc.pop("w2v_args")
        w2v_model = {**w2v["model"], "encoder_layers": num_layers}
        w2v_cfg = _full_config(
            model=w2v_model,
            task={**w2v["task"], "data": _FAKE_DATA},
            criterion={**w2v["criterion"]},
            optimizer={**w2v["optimizer"]},
            lr_scheduler={**w2v["lr_scheduler"]},
            optimization={**w2v["optimization"]},
            # task.tpu interpolates common.tpu: keep the two equal, as one flat --tpu flag made them
            common={"tpu": w2v["task"].get("tpu", False)},
        )
        ctc.setdefault("data", _FAKE_DATA)
        ctc["w2v_path"] = "/foo/bar/wav2vec_small.pt"
        task = {
            "_name": "audio_finetuning",
            "data": ctc["data"],
            "labels": "ltr",
            "normalize": ctc["normalize"],
            "max_sample_size": 250000,
            "min_sample_size": 32000,
            "sample_rate": 16000,
        }
    with open_dict(w2v_cfg.task):
        w2v_cfg.task.data = ctc["data"]
    ctc["w2v_args"] = OmegaConf.to_container(w2v_cfg)
    return _full_config(
        model=ctc,
        task=task,
        criterion={"_name": "ctc", "zero_infinity": True, "post_process": "letter"},
        optimizer={"_name": "adam", "adam_betas": "(0.9,0.98)", "adam_eps": 1e-08},
        lr_scheduler={"_name": "tri_stage", "phase_ratio": [0.1, 0.4, 0.5], "final_lr_scale": 0.05},
        optimization={"max_update": 320000, "lr": [3e-05], "sentence_avg": True, "update_freq": [1]},
    )


# --------------------------------------------------------------------------------------------- dictionaries


def _dictionary(lines: list[str]) -> Dictionary:
    """A dictionary read by fairseq's own ``Dictionary.add_from_file`` from ``dict.*.txt`` lines ``"<sym> <count>"``."""
    d = Dictionary()
    d.add_from_file(io.StringIO("".join(f"{line}\n" for line in lines)))
    return d


def cluster_dictionary(num_clusters: int, shuffle: bool = False, seed: int = 0) -> Dictionary:
    """HuBERT label dictionary: ``<s> <pad> </s> <unk>`` then the cluster ids ``"0".."K-1"`` as symbols.

    With ``shuffle`` the clusters are listed in a random order, so symbol ``"c"`` is not at row ``c + 4``
    (fairseq's ``dict.km.txt`` is sorted by count, and the published ones are not always in id order).
    """
    order = np.random.default_rng(seed + 1000).permutation(num_clusters) if shuffle else np.arange(num_clusters)
    return _dictionary([f"{c} {num_clusters - i}" for i, c in enumerate(order)])


def letter_dictionary() -> Dictionary:
    """fairseq's LibriSpeech letter dictionary (4 specials + :data:`LETTERS` = 32 rows)."""
    return _dictionary([f"{s} {1000 - i}" for i, s in enumerate(LETTERS)])


# --------------------------------------------------------------------------------------------- models


@dataclass
class FairseqReference:
    """A random-weight fairseq model with everything a checkpoint of it holds.

    Attributes:
        name: the stored configuration's stem (one of :data:`CONFIG_NAMES`).
        family: ``"hubert"`` or ``"wav2vec2"``.
        fine_tuned: True for the CTC models.
        model: the fairseq module in eval mode: ``HubertModel`` / ``Wav2Vec2Model``, or ``HubertCtc`` /
            ``Wav2VecCtc`` (wrapping ``HubertEncoder`` / ``Wav2VecEncoder``) for fine-tuned configs.
        cfg: the top-level fairseq config as the trainer holds it (a resolved, struct ``DictConfig`` with
            ``common``, ``optimization``, ``model``, ``task``, ``criterion``, ``optimizer``, ``lr_scheduler``, ...).
            For fine-tuned models ``cfg.model.w2v_args`` is the pre-training run's top-level config.
        task_state: what the fairseq task's ``state_dict()`` returns: ``{"dictionaries": [Dictionary]}`` for
            HuBERT pre-training, ``{"target_dictionary": Dictionary}`` for fine-tuning, ``{}`` for wav2vec 2.0
            pre-training.
        dictionary: the HuBERT label dictionary (pre-training), the 32-symbol letter dictionary (fine-tuned), or
            None (wav2vec 2.0 pre-training).
    """

    name: str
    family: Literal["hubert", "wav2vec2"]
    fine_tuned: bool
    model: nn.Module
    cfg: DictConfig
    task_state: dict[str, Any]
    dictionary: Dictionary | None

    @property
    def normalize(self) -> bool:
        """Whether fairseq's dataset layer-normalises each waveform (``cfg.task.normalize``)."""
        return bool(self.cfg.task.normalize)

    @property
    def backbone(self) -> HubertModel | Wav2Vec2Model:
        """The HuBERT / wav2vec 2.0 model (inside ``w2v_encoder.w2v_model`` for fine-tuned models)."""
        return self.model.w2v_encoder.w2v_model if self.fine_tuned else self.model


def _build_from_config(cfg: DictConfig, task_state: Mapping[str, Any], from_checkpoint: bool = False) -> nn.Module:
    """Build the fairseq model from a top-level config and task state, as fairseq does when loading.

    ``HubertCtc`` is built by hand: ``HubertEncoder`` reads ``cfg.autoregressive``, which ``HubertCtcConfig`` lacks,
    so fairseq's ``task.build_model`` (it merges the config into the struct dataclass) cannot build it.
    """
    task = tasks.setup_task(cfg.task, from_checkpoint=from_checkpoint)
    task.load_state_dict(dict(task_state))
    if cfg.model._name == "hubert_ctc":
        model_cfg = copy.deepcopy(cfg.model)
        OmegaConf.set_struct(model_cfg, False)
        model_cfg.autoregressive = False
        return HubertCtc(model_cfg, HubertEncoder(model_cfg, task))
    return task.build_model(cfg.model, from_checkpoint=from_checkpoint)


def _reinitialise(model: nn.Module, seed: int) -> None:
    """Give every floating parameter and buffer seeded random values (no zero/default weight is left): see
    :func:`redraw`."""
    redraw(model.state_dict(keep_vars=True).items(), norm_weight_names(model), torch.Generator().manual_seed(seed))


def norm_weight_names(module: nn.Module) -> set[str]:
    """The names of ``module``'s layer-norm and group-norm weights."""
    return {f"{name}.weight" if name else "weight" for name, mod in module.named_modules()
            if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) and getattr(mod, "weight", None) is not None}


POSITIVE_SUFFIXES = ("weight_g", "alibi_scale")
"""Tensors that must stay positive: weight-norm gains, data2vec 2.0's ALiBi scales (fairseq clamps them at 0)."""


def redraw(named: Iterable[tuple[str, Tensor]], norm_weights: set[str], gen: torch.Generator) -> None:
    """Seeded values, in ``named``'s order, for every floating tensor of ``named``.

    Matrices and kernels get N(0, min(0.1, 1/sqrt(fan_in))) so that activations stay O(1) through the deep stack
    (soft attention rather than saturated one-hot attention); vectors get N(0, 0.1). Layer-norm / group-norm weights
    (``norm_weights``) are 1 + N(0, 0.1); :data:`POSITIVE_SUFFIXES` tensors are 1 + |N(0, 0.1)|.
    """
    with torch.no_grad():
        for key, tensor in named:
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            if key in norm_weights:
                value = 1.0 + _INIT_STD * noise
            elif key.endswith(POSITIVE_SUFFIXES):
                value = 1.0 + _INIT_STD * noise.abs()
            elif tensor.dim() >= 2:
                fan_in = tensor.numel() // max(tensor.shape[0], 1)
                value = min(_INIT_STD, 1.0 / math.sqrt(max(fan_in, 1))) * noise
            else:
                value = _INIT_STD * noise
            tensor.data.copy_(value.to(tensor.dtype))


def build_fairseq_model(
    name: str,
    num_layers: int = 2,
    seed: int = 0,
    shuffle_dictionary: bool = False,
    num_clusters: int = 500,
) -> FairseqReference:
    """A random-weight fairseq model for the stored configuration ``name``, in eval mode.

    Args:
        name: one of :data:`CONFIG_NAMES`.
        num_layers: transformer layers kept (``encoder_layers``); every width is the published one.
        seed: seeds the weights (and the dictionary shuffle).
        shuffle_dictionary: HuBERT pre-training only: add the cluster symbols in a random order.
        num_clusters: HuBERT pre-training only: number of k-means clusters (``label_embs_concat`` gets K + 4 rows).
    """
    stored = load_config(name)
    family = _family_of(name)
    fine_tuned = "w2v_args" in stored or "w2v_args" in stored.get("model", {})
    if fine_tuned:
        cfg = _finetune_config(name, stored, num_layers)
        dictionary: Dictionary | None = letter_dictionary()
        task_state: dict[str, Any] = {"target_dictionary": dictionary}
    else:
        cfg = _pretrain_config(name, stored, num_layers)
        if family == "hubert":
            dictionary = cluster_dictionary(num_clusters, shuffle=shuffle_dictionary, seed=seed)
            task_state = {"dictionaries": [dictionary]}
        else:
            dictionary, task_state = None, {}
    torch.manual_seed(seed)
    model = _build_from_config(cfg, task_state)
    _reinitialise(model, seed)
    model.eval()
    # fairseq's audio tasks write the encoder's actualised w2v_args back into cfg.model (with enum members in it,
    # e.g. layer_type); the trainer saves it converted with enum_to_str=True, so keep the plain form.
    return FairseqReference(name, family, fine_tuned, model, _plain(cfg), task_state, dictionary)


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Make torch's ``nn.init`` functions and fairseq's ``init_bert_params`` no-ops while building a model whose
    weights are loaded right afterwards with ``load_state_dict(strict=True)`` (every parameter and buffer is then
    overwritten). Rebuilding a model gets several times faster; never use it for a model that is not loaded."""
    names = ("uniform_", "normal_", "constant_", "ones_", "zeros_", "xavier_uniform_", "xavier_normal_",
             "kaiming_uniform_", "kaiming_normal_", "trunc_normal_")  # fmt: skip
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(nn.init, name, lambda tensor, *args, **kwargs: tensor))
        stack.enter_context(mock.patch("fairseq.models.wav2vec.wav2vec2.init_bert_params", lambda module: None))
        yield


def namespace_to_config(args: argparse.Namespace) -> DictConfig:
    """fairseq's ``convert_namespace_to_omegaconf``, also for fine-tuned args whose ``w2v_args`` is a Namespace.

    fairseq turns a nested ``w2v_args`` Namespace into ``model.w2v_args.<section>.<key>=...`` overrides, which
    hydra >= 1.1 rejects (the keys do not exist under ``model.w2v_args: None``; hydra 1.0, fairseq's original pin,
    accepted them). So the outer and the nested Namespace are converted separately, both by fairseq.
    """
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    inner = getattr(args, "w2v_args", None)
    if not isinstance(inner, argparse.Namespace):
        return convert_namespace_to_omegaconf(args)
    outer = copy.copy(args)
    outer.w2v_args = None
    cfg = convert_namespace_to_omegaconf(outer)
    with open_dict(cfg):
        cfg.model.w2v_args = convert_namespace_to_omegaconf(inner)
    return cfg


def model_from_state(state: Mapping[str, Any], task_state: Mapping[str, Any] | None = None) -> nn.Module:
    """Rebuild the fairseq model from a loaded checkpoint dict (any era) and load its weights with strict=True.

    Uses ``cfg`` (dict or DictConfig) or converts ``args`` with :func:`namespace_to_config`. ``task_state``
    stands in for a missing ``state["task_state"]`` (wav2vec 2.0 "namespace" files have none: fairseq would read
    ``dict.ltr.txt`` from the data directory). For everything but ``hubert_ctc`` fairseq's own
    ``checkpoint_utils.load_model_ensemble_and_task`` works too.
    """
    if state.get("cfg") is not None:
        cfg = state["cfg"] if isinstance(state["cfg"], DictConfig) else OmegaConf.create(state["cfg"])
    else:
        cfg = namespace_to_config(state["args"])
    saved_task_state = state.get("task_state") or task_state or {}
    with skip_weight_init():
        model = _build_from_config(cfg, saved_task_state, from_checkpoint=True)
    model.load_state_dict(state["model"], strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------- checkpoints


def _flatten_to_namespace(cfg: DictConfig) -> argparse.Namespace:
    """The flat ``argparse.Namespace`` a pre-Hydra fairseq (<= Oct 2020) trainer would have saved as ``args``.

    Every field of the train-time sections and of the task/model/criterion/optimizer/lr_scheduler configs becomes
    one attribute; the registry choices become ``task``, ``arch``, ``criterion``, ``optimizer``, ``lr_scheduler``.
    A fine-tuned model's ``w2v_args`` becomes a nested Namespace of the pre-training run's args.
    """
    flat: dict[str, Any] = {}
    for section in ("common", "distributed_training", "dataset", "optimization", "checkpoint", "bmuf"):
        flat.update(OmegaConf.to_container(cfg[section], resolve=True))
    for section in ("task", "criterion", "optimizer", "lr_scheduler", "model"):
        values = OmegaConf.to_container(cfg[section], resolve=True)
        values.pop("_name", None)
        if section == "model" and values.get("w2v_args") is not None:
            values["w2v_args"] = _flatten_to_namespace(cfg.model.w2v_args)
        # nested dataclass configs (e.g. audio_finetuning's eval_wer_config) had no flat argparse form
        flat.update({k: v for k, v in values.items() if not isinstance(v, dict)})
    flat["task"] = cfg.task._name
    flat["arch"] = cfg.model._name
    flat["criterion"] = cfg.criterion._name
    flat["optimizer"] = cfg.optimizer._name
    flat["lr_scheduler"] = cfg.lr_scheduler._name
    return argparse.Namespace(**flat)


_CRITERION_CLASS = {"hubert": "HubertCriterion", "wav2vec": "Wav2vecCriterion", "ctc": "CtcCriterion"}


def _checkpoint_dict(ref: FairseqReference, era: Era, num_updates: int) -> dict[str, Any]:
    """The dict a fairseq trainer of ``era`` pickles (see fairseq's ``Trainer.state_dict`` / ``save_state``)."""
    meters = MetersDict()
    meters.add_meter("loss", AverageMeter(round=3), priority=0)
    meters["loss"].update(2.345, 17)
    meters.add_meter("wps", TimeMeter(round=1), priority=90)
    meters.add_meter("train_wall", StopwatchMeter(round=0), priority=800)
    extra_state = {
        "metrics": OrderedDict([("default", meters.state_dict())]),
        "previous_training_time": 123456.7,
        "train_iterator": {"epoch": 7, "iterations_in_epoch": 0, "shuffle": True},
        "val_loss": 2.5,
        "best": 2.4,
    }
    optimizer_history = [
        {
            "criterion_name": _CRITERION_CLASS[ref.cfg.criterion._name],
            "optimizer_name": "FP16Optimizer",  # cfg.common.fp16 wraps FairseqAdam
            "lr_scheduler_state": {"best": 2.4},
            "num_updates": num_updates,
        }
    ]
    # A (tiny) FP16Optimizer state: the published files either drop or keep the Adam moments.
    last_optimizer_state = {
        "state": {0: {"step": num_updates, "exp_avg": torch.zeros(4), "exp_avg_sq": torch.ones(4)}},
        "param_groups": [
            {"lr": 0.0005, "betas": (0.9, 0.98), "eps": 1e-06, "weight_decay": 0.01, "amsgrad": False, "params": [0]}
        ],
        "loss_scale": 128.0,
    }
    model_state = ref.model.state_dict()
    if era == "namespace":
        state: dict[str, Any] = {
            "args": _flatten_to_namespace(ref.cfg),
            "model": model_state,
            "optimizer_history": optimizer_history,
            "extra_state": extra_state,
            "last_optimizer_state": last_optimizer_state,
        }
        # wav2vec 2.0 files of that era have no task_state; HuBERT needs its dictionaries (it postdates the era).
        if ref.family == "hubert":
            state["task_state"] = ref.task_state
        return state
    if era == "dictconfig":
        cfg_value: Any = ref.cfg  # fairseq v0.10.x save_state pickled the DictConfig itself
    else:
        cfg_value = OmegaConf.to_container(ref.cfg, resolve=True, enum_to_str=True)  # Trainer.state_dict (0.12)
    return {
        "args": None,
        "cfg": cfg_value,
        "model": model_state,
        "criterion": None,
        "optimizer_history": optimizer_history,
        "task_state": ref.task_state,
        "extra_state": extra_state,
        "last_optimizer_state": last_optimizer_state,
    }


def save_checkpoint(ref: FairseqReference, path: Path, era: Era, num_updates: int = 12345) -> None:
    """Write ``ref`` as a fairseq checkpoint file of pickle era ``era`` (see :data:`ERAS`).

    The file is written with ``torch.save`` as fairseq's ``checkpoint_utils.torch_persistent_save`` does; era
    ``"legacy"`` uses the pre-1.6 sequential (non-zip) format. ``num_updates`` goes to
    ``optimizer_history[-1]["num_updates"]``.
    """
    if era not in ERAS:
        raise ValueError(f"unknown era {era!r}; expected one of {ERAS}")
    state = _checkpoint_dict(ref, "dict" if era == "legacy" else era, num_updates)
    with open(path, "wb") as f:
        if era == "legacy":
            torch.save(state, f, _use_new_zipfile_serialization=False)
        else:
            torch.save(state, f)


# --------------------------------------------------------------------------------------------- reference outputs


def prepare_waveform(
    ref: FairseqReference, waveform: Tensor, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """What fairseq's dataset + collater make of raw audio ``[batch, time]``: per-utterance ``F.layer_norm`` over
    the valid samples (if ``task.normalize``), zeros after each length, and the sample-level padding mask
    (True = padding; None without ``lengths``)."""
    if waveform.dim() != 2:
        raise ValueError(f"waveform must be [batch, time], got {tuple(waveform.shape)}")
    wav = waveform.float()
    if lengths is None:
        if ref.normalize:
            wav = torch.stack([F.layer_norm(w, w.shape) for w in wav])
        return wav, None
    out = torch.zeros_like(wav)
    for b, n in enumerate(lengths.tolist()):
        w = wav[b, :n]
        out[b, :n] = F.layer_norm(w, w.shape) if ref.normalize else w
    padding_mask = torch.arange(wav.shape[1])[None, :] >= lengths[:, None]
    return out, padding_mask


@contextlib.contextmanager
def _capture_layer_results(encoder: nn.Module) -> Iterator[list[Any]]:
    """Record the ``layer_results`` fairseq's ``TransformerEncoder.extract_features`` computes (already un-padded)."""
    captured: list[Any] = []
    original = encoder.extract_features

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        x, layer_results = original(*args, **kwargs)
        captured.append(layer_results)
        return x, layer_results

    encoder.extract_features = wrapped
    try:
        yield captured
    finally:
        del encoder.extract_features


def fairseq_layer_outputs(ref: FairseqReference, waveform: Tensor, lengths: Tensor | None = None) -> list[Tensor]:
    """fairseq's output of every transformer layer, each ``[batch, frames, dim]``.

    This is what torchaudio's ``Wav2Vec2Model.extract_features`` returns: the residual stream after each layer,
    before the encoder's final layer norm (which fairseq applies only for ``layer_norm_first`` models, after the
    last layer). fairseq pads the time axis to a multiple of 2 inside the encoder; its ``layer_results`` are
    already trimmed back. The waveform is raw audio: it is normalised here when the task config says so.
    Frames past an utterance's length are whatever fairseq computes there (compare valid frames only).

    Padding (``lengths``): wav2vec 2.0 derives the frame mask from the conv output-length formula (as torchaudio
    does), but ``HubertModel.forward_padding_mask`` cuts the sample mask into ``frames`` equal chunks of
    ``T // frames`` samples and pads a frame only if its whole chunk is padding. For HuBERT this often leaves one
    more valid frame than the conv formula (e.g. T=8000, length 5123: fairseq 16 frames, formula 15), and then
    every valid frame differs through attention; see :func:`hubert_valid_frames`.
    """
    wav, padding_mask = prepare_waveform(ref, waveform, lengths)
    backbone = ref.backbone
    backbone.eval()
    with torch.no_grad(), _capture_layer_results(backbone.encoder) as captured:
        backbone.extract_features(wav, padding_mask=padding_mask, mask=False)
    (layer_results,) = captured
    return [x.transpose(0, 1).contiguous() for x, _, _ in layer_results]


def hubert_valid_frames(ref: FairseqReference, num_samples: int, lengths: Tensor) -> Tensor:
    """Valid frames per utterance as fairseq's ``HubertModel.forward_padding_mask`` counts them for a batch padded
    to ``num_samples`` (torchaudio's conv-formula lengths can be one lower)."""
    backbone = ref.backbone
    if not isinstance(backbone, HubertModel):
        raise TypeError("hubert_valid_frames needs a HuBERT model")
    frames = num_samples
    for block in backbone.feature_extractor.conv_layers:
        conv = block[0]
        frames = (frames - conv.kernel_size[0]) // conv.stride[0] + 1
    padding = torch.arange(num_samples)[None, :] >= lengths[:, None]
    return (~backbone.forward_padding_mask(torch.zeros(len(lengths), frames, 1), padding)).sum(-1)


def fairseq_hubert_logits(
    ref: FairseqReference, waveform: Tensor, mask_indices: Tensor, lengths: Tensor | None = None
) -> Tensor:
    """HuBERT's masked-prediction logits against every dictionary row, ``[num_masked_frames, len(dictionary)]``.

    The model runs fairseq's own ``HubertModel.forward`` with ``mask_indices`` (``[batch, frames]`` bool) injected
    in place of ``compute_mask_indices`` (masked frames get ``mask_emb``). Row order of the result is the order of
    ``x[mask & ~padding]`` (batch-major), column ``j`` is dictionary row ``j`` of ``label_embs_concat``:
    ``L[s, j] = cos(final_proj(x_s), label_embs_concat[j]) / logit_temp``.

    Relation to fairseq's ``compute_nce``: for a frame with target row ``y`` fairseq returns
    ``[L[s, y], L[s, 0], ..., L[s, y-1], -inf, L[s, y+1], ...]`` (positive first, then every row as a negative
    with the positive's own column set to -inf) and takes cross-entropy against class 0; that equals
    ``F.cross_entropy(L, y)`` with ``y`` the *dictionary row* of the cluster symbol (``dictionary.index(str(c))``,
    usually ``c + 4``). Here the forward runs with targets all 0 and ``L`` is read back from fairseq's logits
    (column 0 and columns 2..). Only one label set is supported (the published configs have one).
    """
    model = ref.model
    if not isinstance(model, HubertModel):
        raise TypeError("fairseq_hubert_logits needs a HuBERT pre-training model")
    if model.mask_channel_prob > 0:
        raise ValueError("channel masking would draw random masks; this helper supports mask_channel_prob == 0")
    wav, padding_mask = prepare_waveform(ref, waveform, lengths)
    if padding_mask is None:
        padding_mask = torch.zeros(wav.shape, dtype=torch.bool)  # fairseq's masked forward needs a tensor
    mask_np = mask_indices.detach().cpu().numpy().astype(bool)
    batch, frames = mask_np.shape

    def given_mask(shape: tuple[int, int], *args: Any, **kwargs: Any) -> np.ndarray:
        if tuple(shape) != (batch, frames):
            raise ValueError(f"mask_indices has shape {(batch, frames)}, fairseq asked for {tuple(shape)}")
        return mask_np

    targets = [torch.zeros(batch, frames, dtype=torch.long) for _ in model.num_classes]
    model.eval()
    with torch.no_grad(), mock.patch("fairseq.models.hubert.hubert.compute_mask_indices", given_mask):
        out = model(wav, target_list=targets, padding_mask=padding_mask, mask=True)
    # [S, 1 + rows]: the positive (row 0, as every target is 0), then every row as a negative with row 0 at -inf
    (logits,) = out["logit_m_list"]
    if logits is None:
        raise ValueError("skip_masked is set: fairseq computes no masked logits")
    return torch.cat([logits[:, :1], logits[:, 2:]], dim=1)


def _gumbel_softmax_with(noise: Tensor) -> Any:
    """A drop-in for ``F.gumbel_softmax`` that uses ``noise`` as the Gumbel sample (torch's exact arithmetic)."""

    def gumbel_softmax(logits: Tensor, tau: float = 1.0, hard: bool = False, eps: float = 1e-10, dim: int = -1) -> Tensor:
        g = noise.reshape(logits.shape).to(logits.dtype)
        y_soft = ((logits + g) / tau).softmax(dim)
        if not hard:
            return y_soft
        index = y_soft.max(dim, keepdim=True)[1]
        y_hard = torch.zeros_like(logits, memory_format=torch.legacy_contiguous_format).scatter_(dim, index, 1.0)
        return y_hard - y_soft.detach() + y_soft

    return gumbel_softmax


def fairseq_quantizer_outputs(
    ref: FairseqReference,
    features: Tensor,
    gumbel_noise: Tensor | None = None,
    num_updates: int | None = None,
) -> dict[str, Any]:
    """The output dict of wav2vec 2.0's ``GumbelVectorQuantizer`` for ``features`` ``[batch, time, channels]``.

    Keys: ``x`` (``[B, T, vq_dim]`` quantized vectors), ``code_perplexity``, ``prob_perplexity``, ``temp``,
    ``targets`` (``[B, T, groups]`` chosen code per group), ``num_vars``.

    * ``gumbel_noise is None``: eval mode, hard argmax of the logits.
    * otherwise: train mode with ``F.gumbel_softmax(logits, tau=temp, hard=True)`` using ``gumbel_noise`` as its
      Gumbel sample instead of drawing one. The quantizer's logits are ``weight_proj(features)`` viewed as
      ``[B * T * groups, num_vars]`` (frame-major, then group); ``gumbel_noise`` may have that shape or
      ``[B, T, groups, num_vars]``. A reimplementation consumes it as ``y = softmax((logits + g) / tau)``, one-hot
      of ``argmax(y)`` in the forward pass, straight-through ``y_hard - y.detach() + y`` for gradients.

    ``num_updates`` (if given) sets the temperature for this call like training does:
    ``max(max_t * decay**n, min_t)``; otherwise it is the quantizer's current one (``max_t`` on a fresh model).
    """
    model = ref.model
    if not isinstance(model, Wav2Vec2Model) or model.quantizer is None:
        raise TypeError("fairseq_quantizer_outputs needs a wav2vec 2.0 pre-training model with a quantizer")
    quantizer = model.quantizer
    was_training, old_temp = quantizer.training, quantizer.curr_temp
    if num_updates is not None:
        quantizer.set_num_updates(num_updates)
    try:
        with torch.no_grad():
            if gumbel_noise is None:
                quantizer.eval()
                return quantizer(features.float(), produce_targets=True)
            quantizer.train()
            with mock.patch.object(F, "gumbel_softmax", _gumbel_softmax_with(gumbel_noise)):
                return quantizer(features.float(), produce_targets=True)
    finally:
        quantizer.train(was_training)
        quantizer.curr_temp = old_temp


def fairseq_ctc_logits(ref: FairseqReference, waveform: Tensor, lengths: Tensor | None = None) -> Tensor:
    """A fine-tuned model's CTC logits ``[batch, frames, vocab]`` (``encoder_out`` before any log-softmax)."""
    if not ref.fine_tuned:
        raise TypeError("fairseq_ctc_logits needs a fine-tuned (CTC) model")
    wav, padding_mask = prepare_waveform(ref, waveform, lengths)
    ref.model.eval()
    with torch.no_grad():
        out = ref.model(source=wav, padding_mask=padding_mask)
    return out["encoder_out"].transpose(0, 1).contiguous()
