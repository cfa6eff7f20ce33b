"""Build the torchaudio modules a bundle describes, without initialising weights that will be replaced.

Models are built on the ``meta`` device and the bundle's (memory-mapped) tensors are assigned into them with
a strict ``load_state_dict(..., assign=True)``: no random initialisation, no copy.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations
from torchaudio.models import HuBERTPretrainModel, Wav2Vec2Model, wav2vec2_model
from torchaudio.models.wav2vec2 import components

from .config import BundleConfig
from .wav2vec2_pretrain import Wav2Vec2PretrainModel

ENCODER_PREFIX = "wav2vec2."

# Families whose model is ours rather than torchaudio's: the module (with build_encoder, build_pretrain_model and
# ENCODER_PREFIX) that builds it, imported on first use.
OWN_MODEL_FACTORIES: dict[str, str] = {"data2vec2": "bundles.data2vec2.factory"}


def _own_factory(config: BundleConfig) -> Any:
    name = OWN_MODEL_FACTORIES.get(config.family)
    return importlib.import_module(name) if name else None


def encoder_prefix(config: BundleConfig) -> str:
    """Where the encoder's tensors live in the bundle's pre-training state dict."""
    own = _own_factory(config)
    return own.ENCODER_PREFIX if own else ENCODER_PREFIX


def _encoder_factory_args(config: BundleConfig) -> dict:
    args = dict(config.encoder_args)
    args["extractor_conv_layer_config"] = [tuple(layer) for layer in args["extractor_conv_layer_config"]]
    return args


@contextmanager
def _on_meta_device() -> Iterator[None]:
    """Build modules on the meta device, with weight_norm computing only the shapes of its initial g and v.

    torchaudio's positional convolution uses ``parametrizations.weight_norm``, whose ``right_inverse`` calls
    ``torch.norm_except_dim``; on the meta device that imports ``torch._dynamo`` and sympy the first time
    (about 1 s, measured in bench/RESULTS.md). The values are replaced by assignment anyway.
    """
    original = parametrizations._WeightNorm.right_inverse

    def right_inverse(self: parametrizations._WeightNorm, weight: Tensor) -> tuple[Tensor, Tensor]:
        if weight.device.type != "meta" or not 0 <= self.dim < weight.dim():
            return original(self, weight)
        g_shape = [1] * weight.dim()
        g_shape[self.dim] = weight.shape[self.dim]
        return weight.new_empty(g_shape), weight

    parametrizations._WeightNorm.right_inverse = right_inverse
    try:
        with torch.device("meta"):
            yield
    finally:
        parametrizations._WeightNorm.right_inverse = original


def build_encoder(config: BundleConfig) -> nn.Module:
    """``torchaudio.models.wav2vec2_model`` with the bundle's arguments (weights uninitialised, on meta); for a
    family in :data:`OWN_MODEL_FACTORIES`, that family's encoder."""
    own = _own_factory(config)
    if own:
        return own.build_encoder(config)
    with _on_meta_device():
        return wav2vec2_model(**_encoder_factory_args(config))


def build_pretrain_model(config: BundleConfig) -> nn.Module:
    """The encoder with its pre-training heads (weights uninitialised, on meta)."""
    own = _own_factory(config)
    if own:
        return own.build_pretrain_model(config)
    if config.kind != "pretrain" or config.pretrain_args is None:
        raise ValueError("only pre-training bundles have pre-training heads")
    encoder_args = _encoder_factory_args(config)
    encoder_args["aux_num_out"] = None
    with _on_meta_device():
        if config.family == "hubert":
            return _hubert_pretrain_model(wav2vec2_model(**encoder_args), encoder_args["encoder_embed_dim"],
                                          **config.pretrain_args)
        args = dict(config.pretrain_args)
        return Wav2Vec2PretrainModel(wav2vec2_model(**encoder_args), num_updates=config.num_updates or 0, **args)


def _hubert_pretrain_model(wav2vec2: Wav2Vec2Model, encoder_embed_dim: int, *, num_classes: int, final_dim: int,
                           skip_masked: bool, skip_nomask: bool, feature_grad_mult: float | None,
                           **masking: object) -> HuBERTPretrainModel:
    """The module ``torchaudio.models.hubert_pretrain_model`` builds, minus its random re-initialisation
    (which copies through the CPU and so cannot run on the meta device; the weights are replaced anyway)."""
    mask_generator = components.MaskGenerator(encoder_embed_dim, **masking)
    logit_generator = components.LogitGenerator(encoder_embed_dim, num_classes, final_dim, skip_masked, skip_nomask)
    return HuBERTPretrainModel(wav2vec2, mask_generator, logit_generator, feature_grad_mult)


def assign_weights(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """Strictly load ``state`` into a meta-device ``model`` by assignment; report every key problem at once."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            problems.append(f"unexpected tensors: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        for k in wrong[:8]:
            problems.append(f"{k} has shape {list(state[k].shape)}, the model expects {list(expected[k].shape)}")
        raise ValueError("; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)
    return model
