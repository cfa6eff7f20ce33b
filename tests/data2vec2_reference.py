"""fairseq's data2vec 2.0 (``data2vec_multi``, audio) as the tests' reference (tests only: this imports fairseq).

fairseq-fixed ships the data2vec 2.0 code under its installed ``fairseq/examples/data2vec`` (importable as
``examples.data2vec`` with the fairseq package directory on ``sys.path``). Two things stop it from importing on
Python 3.11, and :func:`data2vec2_modules` works around both, only while it imports and restoring everything after:

* its configs use dataclass *instances* as field defaults (``decoder: D2vDecoderConfig = D2vDecoderConfig()``),
  which Python 3.11 refuses ("mutable default ... use default_factory"): they become ``default_factory`` fields;
* the fairseq package directory holds a ``logging`` package: the directory is appended to ``sys.path`` (never put
  first), so the standard library's ``logging`` still wins.

It also needs ``timm`` and ``torchvision`` (test-only, installed ``--no-deps``; see the Makefile).

* :func:`build_data2vec2_model` -> :class:`Data2Vec2Reference`: a random-weight ``Data2VecMultiModel`` (student,
  decoder and EMA teacher, every tensor re-drawn from a seeded normal; the teacher differs from the student) built
  from a stored configuration the way fairseq builds it, optionally shrunk.
* :func:`build_data2vec2_ctc_model`: the CTC fine-tuned form (fairseq's ``Wav2VecCtc`` around the pre-trained model).
* :func:`save_data2vec2_checkpoint` writes it as fairseq's trainer does (``cfg`` plain dict or pickled DictConfig,
  ``model`` with the teacher under ``_ema``; zip or pre-1.6 format).
* :func:`fairseq_block_outputs`, :func:`fairseq_teacher_outputs`: fairseq's per-block outputs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal
from unittest import mock

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import fairseq
from fairseq import tasks

from tests.fairseq_reference import CONFIG_DIR, _full_config, _plain, norm_weight_names, redraw, skip_weight_init

DATA2VEC2_CONFIGS: tuple[str, ...] = ("data2vec2_base_libri", "data2vec2_large_vox")
"""Stems of the stored pre-training configurations (see ``tests/fairseq_configs/SOURCE.md``)."""

_EXAMPLES_PARENT = str(Path(fairseq.__file__).resolve().parent)


# --------------------------------------------------------------------------------------------- import shim


def _instance_defaults_as_factories(original: Any) -> Any:
    """Wrap ``dataclasses._get_field``: a default that is a dataclass instance becomes a ``default_factory``
    returning a deep copy of it (what Python < 3.11 allowed, and what fairseq's code means)."""

    @functools.wraps(original)
    def get_field(cls: type, a_name: str, a_type: Any, *args: Any) -> Any:
        default = cls.__dict__.get(a_name, dataclasses.MISSING)
        if isinstance(default, dataclasses.Field):
            value = default.default
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                default.default = dataclasses.MISSING
                default.default_factory = functools.partial(copy.deepcopy, value)
        elif dataclasses.is_dataclass(default) and not isinstance(default, type):
            setattr(cls, a_name, dataclasses.field(default_factory=functools.partial(copy.deepcopy, default)))
        return original(cls, a_name, a_type, *args)

    return get_field


@functools.cache
def data2vec2_modules() -> SimpleNamespace:
    """fairseq's data2vec 2.0 modules (``examples.data2vec.models.data2vec2`` and its ``modalities``), imported once
    with the shim; ``sys.path`` and ``dataclasses`` are restored afterwards."""
    original = dataclasses._get_field
    added = _EXAMPLES_PARENT not in sys.path
    dataclasses._get_field = _instance_defaults_as_factories(original)
    if added:
        sys.path.append(_EXAMPLES_PARENT)
    try:
        from examples.data2vec.models import data2vec2
        from examples.data2vec.models.modalities import base, modules

        return SimpleNamespace(data2vec2=data2vec2, base=base, modules=modules)
    finally:
        dataclasses._get_field = original
        if added:
            sys.path.remove(_EXAMPLES_PARENT)


# --------------------------------------------------------------------------------------------- configurations


def load_data2vec2_config(name: str) -> dict[str, Any]:
    if name not in DATA2VEC2_CONFIGS:
        raise ValueError(f"unknown config {name!r}; expected one of {DATA2VEC2_CONFIGS}")
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def shrunk(stored: Mapping[str, Any], *, depth: int = 2, dim: int = 64, heads: int = 4, conv_dim: int = 64,
           prenet_depth: int | None = None, decoder_dim: int = 32) -> dict[str, Any]:
    """``stored`` with fewer, narrower layers (every option that is not a size kept), for fast forward parity."""
    out = copy.deepcopy(dict(stored))
    model = out["model"]
    model.update(depth=depth, embed_dim=dim, num_heads=heads, average_top_k_layers=min(depth, model.get(
        "average_top_k_layers", depth)))
    audio = model["modalities"]["audio"]
    audio["feature_encoder_spec"] = f"[({conv_dim}, 10, 5)] + [({conv_dim}, 3, 2)] * 4 + [({conv_dim},2,2)] * 2"
    if prenet_depth is not None:
        audio["prenet_depth"] = prenet_depth
    audio["decoder"]["decoder_dim"] = decoder_dim
    return out


def _pretrain_cfg(stored: Mapping[str, Any]) -> DictConfig:
    return _full_config(
        model=stored["model"],
        task=stored["task"],
        criterion=stored["criterion"],
        optimizer={"_name": "adam", "adam_betas": "(0.9,0.98)", "adam_eps": 1e-06, "weight_decay": 0.01},
        lr_scheduler={"_name": "cosine", "warmup_updates": 8000},
        optimization={"max_update": stored["optimization"]["max_update"], "lr": [0.00075]},
        common=stored.get("common"),
    )


# --------------------------------------------------------------------------------------------- models


@dataclass
class Data2Vec2Reference:
    """A random-weight fairseq data2vec 2.0 model. ``model`` is the ``Data2VecMultiModel`` (pre-trained) or the
    ``Wav2VecCtc`` around it (fine-tuned); ``cfg`` the top-level config as the trainer saves it."""

    name: str
    fine_tuned: bool
    model: nn.Module
    cfg: DictConfig

    @property
    def backbone(self) -> nn.Module:
        return self.model.w2v_encoder.w2v_model if self.fine_tuned else self.model

    @property
    def audio_encoder(self) -> nn.Module:
        return self.backbone.modality_encoders["AUDIO"]


def reinitialise(model: nn.Module, seed: int) -> None:
    """Redraw the student (and decoder) and, with another stream, the EMA teacher, so teacher != student."""
    gen = torch.Generator().manual_seed(seed)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    redraw(tensors, norm_weight_names(model), gen)
    ema = getattr(model, "ema", None)
    if ema is not None:  # fp32_params share storage with the teacher's float32 tensors (EMAModule.build_fp32_params)
        teacher = ema.model
        redraw(list(teacher.named_parameters()) + list(teacher.named_buffers()), norm_weight_names(teacher), gen)


def build_data2vec2_model(name: str, seed: int = 0, *, stored: Mapping[str, Any] | None = None,
                          device: str | None = None) -> Data2Vec2Reference:
    """A random-weight fairseq ``Data2VecMultiModel`` (audio) from a stored config (or ``stored``), in eval mode.

    ``device="meta"`` builds it without weights (shapes and key names only, for key-map coverage)."""
    data2vec2_modules()
    stored = stored if stored is not None else load_data2vec2_config(name)
    cfg = _pretrain_cfg(stored)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(seed)
    with contextlib.ExitStack() as stack:
        if device:
            stack.enter_context(torch.device(device))
        if device == "meta":  # fairseq's init_bert_params copies through the CPU, which meta tensors cannot
            stack.enter_context(skip_weight_init())
            stack.enter_context(mock.patch("fairseq.modules.transformer_sentence_encoder.init_bert_params",
                                           lambda module: None))
        model = task.build_model(cfg.model)
    if device != "meta":
        reinitialise(model, seed)
    model.eval()
    return Data2Vec2Reference(name, False, model, _plain(cfg))


def build_data2vec2_ctc_model(name: str, seed: int = 0, *, stored: Mapping[str, Any] | None = None,
                              vocabulary: int = 32) -> Data2Vec2Reference:
    """The CTC fine-tuned form: fairseq's ``Wav2VecCtc`` (``wav2vec_ctc``) whose ``w2v_args`` hold the
    pre-training config, as fairseq's data2vec 2.0 fine-tuning builds it (``remove_pretraining_modules``)."""
    data2vec2_modules()
    stored = stored if stored is not None else load_data2vec2_config(name)
    w2v_cfg = _pretrain_cfg(stored)
    model_cfg = {"_name": "wav2vec_ctc", "w2v_path": f"/foo/bar/{name}.pt", "normalize": True, "data": "/foo/bar",
                 "apply_mask": True, "mask_prob": 0.65, "final_dropout": 0.0, "w2v_args": OmegaConf.to_container(w2v_cfg)}
    cfg = _full_config(
        model=model_cfg,
        task={"_name": "audio_finetuning", "data": "/foo/bar", "labels": "ltr", "normalize": True},
        criterion={"_name": "ctc", "zero_infinity": True, "post_process": "letter"},
        optimizer={"_name": "adam", "adam_betas": "(0.9,0.98)", "adam_eps": 1e-08},
        lr_scheduler={"_name": "tri_stage", "phase_ratio": [0.1, 0.4, 0.5], "final_lr_scale": 0.05},
        optimization={"max_update": 320000, "lr": [3e-05], "sentence_avg": True},
    )
    from fairseq.data import Dictionary
    from fairseq.models.wav2vec.wav2vec2_asr import Wav2VecCtc, Wav2VecEncoder

    dictionary = Dictionary()
    for i in range(vocabulary - len(dictionary)):
        dictionary.add_symbol(f"S{i}")
    torch.manual_seed(seed)
    encoder = Wav2VecEncoder(cfg.model, output_size=len(dictionary))
    model = Wav2VecCtc(cfg.model, encoder)
    reinitialise(model, seed)
    model.eval()
    return Data2Vec2Reference(name, True, model, _plain(cfg))


# --------------------------------------------------------------------------------------------- checkpoints

Era = Literal["dict", "dictconfig", "legacy"]
ERAS: tuple[Era, ...] = ("dict", "dictconfig", "legacy")
"""data2vec 2.0 (Dec 2022) postdates the argparse era: its files have ``cfg`` as a plain dict (or, from trainers of
the omegaconf era, a pickled ``DictConfig``); ``legacy`` is the dict form in torch's pre-1.6 non-zip format."""


def checkpoint_dict(ref: Data2Vec2Reference, era: Era = "dict", num_updates: int = 12345) -> dict[str, Any]:
    """What fairseq's ``Trainer.state_dict`` pickles (the teacher under ``model["_ema"]``, as fairseq keeps it)."""
    cfg = ref.cfg if era == "dictconfig" else OmegaConf.to_container(ref.cfg, resolve=True, enum_to_str=True)
    return {
        "args": None,
        "cfg": cfg,
        "model": ref.model.state_dict(),
        "criterion": None,
        "optimizer_history": [{"criterion_name": "CtcCriterion" if ref.fine_tuned else "ModelCriterion",
                               "optimizer_name": "FP16Optimizer", "lr_scheduler_state": {"best": None},
                               "num_updates": num_updates}],
        "task_state": {},
        "extra_state": {"train_iterator": {"epoch": 3, "iterations_in_epoch": 0, "shuffle": True},
                        "previous_training_time": 1234.5},
        "last_optimizer_state": None,
    }


def save_data2vec2_checkpoint(ref: Data2Vec2Reference, path: Path, era: Era = "dict",
                              num_updates: int = 12345) -> None:
    state = checkpoint_dict(ref, era, num_updates)
    with open(path, "wb") as f:
        torch.save(state, f, _use_new_zipfile_serialization=era != "legacy")


# --------------------------------------------------------------------------------------------- reference outputs


def prepare(waveform: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """fairseq's dataset + collater: each waveform layer-normed over its valid samples (data2vec 2.0 audio is always
    trained with ``normalize``), zeros after each length, and the sample padding mask (True = padding)."""
    wav = waveform.float()
    if lengths is None:
        return torch.stack([torch.nn.functional.layer_norm(w, w.shape) for w in wav]), None
    out = torch.zeros_like(wav)
    for b, n in enumerate(lengths.tolist()):
        out[b, :n] = torch.nn.functional.layer_norm(wav[b, :n], (n,))
    return out, torch.arange(wav.shape[1])[None, :] >= lengths[:, None]


@contextlib.contextmanager
def _capture_blocks(blocks: list[nn.Module]) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """Record ``(block output, layer result)`` of each ``AltBlock`` in call order."""
    captured: list[tuple[Tensor, Tensor]] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: captured.append((out[0].detach(), out[1].detach())))
             for b in blocks]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


def fairseq_block_outputs(ref: Data2Vec2Reference, waveform: Tensor,
                          lengths: Tensor | None = None) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """(output of every main block, its layer result (the FFN output fairseq's targets are made of), final x)
    for raw audio ``[batch, time]``, as fairseq's ``extract_features`` computes them (eval, no mask)."""
    wav, padding_mask = prepare(waveform, lengths)
    backbone = ref.backbone
    backbone.eval()
    with torch.no_grad(), _capture_blocks(list(backbone.blocks)) as captured:
        res = backbone.extract_features(wav, padding_mask=padding_mask, mask=False)
    return [c[0] for c in captured], [c[1] for c in captured], res["x"]


def fairseq_teacher_outputs(ref: Data2Vec2Reference, local_features: Tensor,
                            padding_mask: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """(block outputs, layer results) of the EMA teacher on the student's projected conv features, as fairseq's
    ``Data2VecMultiModel.forward`` runs it (``ema_encoder_only=False``, ``ema_local_encoder=False``)."""
    teacher = ref.model.ema.model
    teacher.eval()
    with torch.no_grad():
        ema_input = teacher.modality_encoders["AUDIO"].contextualized_features(
            local_features, padding_mask, mask=False, remove_masked=False)
        x, bias, scale = ema_input["x"], ema_input["alibi_bias"], ema_input["alibi_scale"]
        outputs, results = [], []
        for i, blk in enumerate(teacher.blocks):
            ab = bias
            if ab is not None and scale is not None:
                ab = ab * (scale[i] if scale.size(0) > 1 else scale.squeeze(0)).type_as(ab)
            x, lr = blk(x, padding_mask=ema_input["padding_mask"], alibi_bias=ab)
            outputs.append(x)
            results.append(lr)
    return outputs, results


def fairseq_ctc_logits(ref: Data2Vec2Reference, waveform: Tensor, lengths: Tensor | None = None) -> Tensor:
    """The fine-tuned model's CTC logits ``[batch, frames, vocabulary]`` (eval)."""
    wav, padding_mask = prepare(waveform, lengths)
    ref.model.eval()
    with torch.no_grad():
        out = ref.model.w2v_encoder(source=wav, padding_mask=padding_mask)
    return out["encoder_out"].transpose(0, 1)
