"""The data2vec 2.0 parts of a bundle's ``config.json`` as typed dataclasses.

``encoder_args`` describe the encoder (student, teacher and CTC model share it); ``pretrain_args["decoder"]`` the
conv decoder. Every field names the fairseq option it comes from (``converters/families/data2vec2.py`` fills them).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Data2Vec2EncoderArgs:
    extractor_conv_layer_config: tuple[tuple[int, int, int], ...]  # modalities.audio.feature_encoder_spec
    extractor_mode: str = "layer_norm"  # modalities.audio.extractor_mode: "layer_norm" | "group_norm" (fairseq "default")
    extractor_conv_bias: bool = False  # fairseq's AudioEncoder builds the conv front end without bias
    encoder_embed_dim: int = 768  # embed_dim
    encoder_num_layers: int = 12  # depth (the main blocks; the prenet blocks are counted in prenet_depth)
    encoder_num_heads: int = 12  # num_heads
    encoder_ff_interm_features: int = 3072  # int(embed_dim * mlp_ratio)
    encoder_layer_norm_first: bool = False  # layer_norm_first
    encoder_norm_eps: float = 1e-6  # norm_eps
    encoder_norm_affine: bool = True  # norm_affine
    prenet_depth: int = 0  # modalities.audio.prenet_depth
    pos_conv_depth: int = 5  # modalities.audio.conv_pos_depth
    pos_conv_kernel: int = 19  # max(3, conv_pos_width // conv_pos_depth)
    pos_conv_groups: int = 16  # modalities.audio.conv_pos_groups
    use_alibi: bool = True  # modalities.audio.use_alibi_encoder
    alibi_scale_layers: int = 1  # prenet_depth + depth with learned_alibi_scale_per_layer, else 1
    alibi_scale_heads: int = 1  # num_heads with learned_alibi_scale_per_head, else 1
    alibi_scale_learned: bool = True  # modalities.audio.learned_alibi_scale (requires_grad of the scales)
    ffn_targets: bool = True  # not end_of_block_targets: a block's layer result is its FFN output
    encoder_dropout: float = 0.0  # encoder_dropout (attention output projection)
    attention_dropout: float = 0.0  # attention_dropout
    activation_dropout: float = 0.0  # activation_dropout (inside the MLP)
    post_mlp_dropout: float = 0.0  # post_mlp_drop
    encoder_projection_dropout: float = 0.0  # dropout_input (before the main blocks)
    prenet_dropout: float = 0.0  # modalities.audio.prenet_dropout
    encoder_layer_drop: float = 0.0  # layerdrop
    prenet_layer_drop: float = 0.0  # modalities.audio.prenet_layerdrop
    aux_num_out: int | None = None  # CTC output size (fine-tuned bundles)

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> "Data2Vec2EncoderArgs":
        _refuse_unknown(cls, args, "encoder")
        values = dict(args)
        values["extractor_conv_layer_config"] = tuple(tuple(int(v) for v in layer)
                                                      for layer in args["extractor_conv_layer_config"])
        return cls(**values)

    @property
    def extractor_dim(self) -> int:
        return self.extractor_conv_layer_config[-1][0]


@dataclass(frozen=True)
class Data2Vec2DecoderArgs:
    """fairseq's ``D2vDecoderConfig`` (``modalities.audio.decoder``)."""

    decoder_dim: int = 384
    decoder_groups: int = 16
    decoder_kernel: int = 5
    decoder_layers: int = 5
    decoder_residual: bool = True
    projection_layers: int = 1
    projection_ratio: float = 2.0
    input_dropout: float = 0.1

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> "Data2Vec2DecoderArgs":
        _refuse_unknown(cls, args, "decoder")
        return cls(**args)


def _refuse_unknown(cls: type, args: dict[str, Any], part: str) -> None:
    """A bundle's ``part`` arguments may hold only ``cls``'s fields (a newer writer's extra is an error, not ignored)."""
    unknown = sorted(set(args) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown data2vec 2.0 {part} arguments {unknown}")
