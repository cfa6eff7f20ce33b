"""Build the data2vec 2.0 modules a bundle describes on the meta device (weights are assigned right after)."""

from __future__ import annotations

import torch

from ..config import BundleConfig
from .config import Data2Vec2DecoderArgs, Data2Vec2EncoderArgs
from .model import Data2Vec2Model, Data2Vec2PretrainModel

ENCODER_PREFIX = "student."
"""Where the encoder's tensors live in a pre-training bundle (``get_model`` strips it)."""


def encoder_args(config: BundleConfig) -> Data2Vec2EncoderArgs:
    return Data2Vec2EncoderArgs.from_dict(config.encoder_args)


def build_encoder(config: BundleConfig) -> Data2Vec2Model:
    """The encoder (with the CTC layer when ``aux_num_out`` is set), weights uninitialised on meta."""
    with torch.device("meta"):
        return Data2Vec2Model(encoder_args(config))


def build_pretrain_model(config: BundleConfig) -> Data2Vec2PretrainModel:
    """Student, decoder and EMA teacher, weights uninitialised on meta."""
    if config.kind != "pretrain" or config.pretrain_args is None:
        raise ValueError("only pre-training bundles have pre-training heads")
    args = Data2Vec2EncoderArgs.from_dict({**config.encoder_args, "aux_num_out": None})
    decoder = Data2Vec2DecoderArgs.from_dict(config.pretrain_args["decoder"])
    with torch.device("meta"):
        return Data2Vec2PretrainModel(args, decoder)
