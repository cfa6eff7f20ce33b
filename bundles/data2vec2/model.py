"""data2vec 2.0's audio model (fairseq ``Data2VecMultiModel`` with its ``AudioEncoder``) in plain torch.

The computation follows fairseq's, module by module (its names in brackets), so a converted checkpoint reproduces
fairseq's outputs:

* conv front end [``local_encoder``: ``ConvFeatureExtractionModel``, layer-norm mode, no bias], then a LayerNorm and a
  Linear [``project_features``] -- together :meth:`Data2Vec2Model.local_features`, the teacher's input too;
* :class:`Data2Vec2Encoder`, what the student and the EMA teacher share: a positional encoder of grouped convs
  [``relative_positional_encoder``: conv, non-affine LayerNorm, GELU] added to the features, the prenet
  [``context_encoder``: LayerNorm, dropout, ``prenet_depth`` blocks], then the main blocks [``blocks``]; every block
  gets the same ALiBi bias, scaled by learned per-head scales [``alibi_scale``, clamped at 0];
* :class:`Block` [``AltBlock``]: attention with one ``qkv`` projection; post-LN (or pre-LN) residuals; it returns its
  output and its *layer result* (the FFN output, from which data2vec's targets are made);
* :class:`Decoder1d` [``Decoder1d``]: conv blocks with residuals, then a Linear.

Padded frames are not zeroed before the positional convs (fairseq does not); attention never looks at them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import Data2Vec2DecoderArgs, Data2Vec2EncoderArgs


# --------------------------------------------------------------------------------------------- conv front end


class ConvLayerBlock(nn.Module):
    """conv -> (layer norm over channels | group norm) -> GELU, the norm computed in float32 as fairseq's
    ``Fp32LayerNorm`` / ``Fp32GroupNorm`` do; on time-major ``[batch, frames, channels]``.

    The conv (no groups, a small kernel) is computed as what it is, one matrix product over the frames' windows
    (``unfold``): the windows' features stay in the layout the layer norm and the next layer want. fairseq's
    ``[B, C, T]`` conv with a transpose on each side of the layer norm spent most of the front end's backward on
    copies and on the conv's backward over transposed gradients (``bench/bench_data2vec2_step.py``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, bias: bool, norm: str | None):
        super().__init__()
        self.kernel_size, self.stride = kernel, stride
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, bias=bias)
        self.norm_kind = norm
        self.layer_norm: nn.Module | None = None
        if norm == "layer_norm":
            self.layer_norm = nn.LayerNorm(out_channels)
        elif norm == "group_norm":
            self.layer_norm = nn.GroupNorm(out_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        windows = x.unfold(1, self.kernel_size, self.stride)  # [B, frames, in_channels, kernel]: the weight's order
        x = F.linear(windows.flatten(2), self.conv.weight.flatten(1), self.conv.bias)
        n = self.layer_norm
        if self.norm_kind == "layer_norm":
            x = F.layer_norm(x.float(), n.normalized_shape, n.weight.float(), n.bias.float(), n.eps).type_as(x)
        elif n is not None:  # per channel over time: the one place that needs channels first
            x = F.group_norm(x.float().transpose(1, 2), n.num_groups, n.weight.float(), n.bias.float(),
                             n.eps).transpose(1, 2).type_as(x)
        return F.gelu(x)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        return torch.div(lengths - self.kernel_size, self.stride, rounding_mode="floor") + 1


class FeatureExtractor(nn.Module):
    """Waveform ``[batch, samples]`` -> features ``[batch, frames, channels]`` (and frame lengths)."""

    def __init__(self, args: Data2Vec2EncoderArgs):
        super().__init__()
        layers, in_channels = [], 1
        for i, (channels, kernel, stride) in enumerate(args.extractor_conv_layer_config):
            norm = "layer_norm" if args.extractor_mode == "layer_norm" else "group_norm" if i == 0 else None
            layers.append(ConvLayerBlock(in_channels, channels, kernel, stride, args.extractor_conv_bias, norm))
            in_channels = channels
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, waveforms: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
        x = waveforms.unsqueeze(-1)
        for layer in self.conv_layers:
            x = layer(x)
            if lengths is not None:
                lengths = layer.output_lengths(lengths)
        return x, lengths


class FeatureProjection(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_features)
        self.projection = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.layer_norm(x))


# --------------------------------------------------------------------------------------------- positional encoder


class PositionalConvLayer(nn.Module):
    """Grouped conv (``SamePad``: an even kernel drops the last frame), non-affine LayerNorm, GELU; on time-major
    ``[B, T, C]`` (``in_dim`` channels in, ``dim`` out; the positional encoder keeps the width, a decoder block may
    not).

    The conv runs as a 2-d conv over ``[B, C, 1, T]`` in channels-last memory, which is the time-major tensor itself:
    no transpose on either side of the layer norm (fairseq's ``[B, C, T]`` layout copied the features four times per
    layer, forward and backward)."""

    def __init__(self, dim: int, kernel: int, groups: int, in_dim: int | None = None):
        super().__init__()
        self.conv = nn.Conv1d(dim if in_dim is None else in_dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        weight = conv.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x.transpose(1, 2).unsqueeze(2), weight, conv.bias, padding=(0, conv.padding[0]),
                     groups=conv.groups)
        x = y.squeeze(2).transpose(1, 2)  # [B, T, C]: contiguous when the conv kept channels last
        if self.trim:
            x = x[:, :-self.trim]
        return F.gelu(F.layer_norm(x, x.shape[-1:]))


class PositionalEncoder(nn.Module):
    def __init__(self, dim: int, depth: int, kernel: int, groups: int):
        super().__init__()
        self.layers = nn.ModuleList(PositionalConvLayer(dim, kernel, groups) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# --------------------------------------------------------------------------------------------- blocks


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's per-head slopes (Press et al.), as fairseq's ``get_alibi`` computes them (any number of heads)."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_2(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


def alibi_bias(heads: int, positions: Tensor) -> Tensor:
    """``[rows, heads, frames, frames]`` for ``positions`` ``[rows, frames]`` (each row's frames' original
    positions): slope_h * -|p_i - p_j| (float32, symmetric: the encoder is not causal)."""
    distance = -(positions[:, None, :, None] - positions[:, None, None, :]).abs()
    slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float32, device=positions.device)
    return slopes[None, :, None, None] * distance


class Attention(nn.Module):
    """Multi-head self-attention with one ``qkv`` projection and an additive bias (ALiBi and padding)."""

    def __init__(self, dim: int, heads: int, attention_dropout: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.attention_dropout = attention_dropout
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        batch, frames, dim = x.shape
        heads, width = self.heads, dim // self.heads
        qkv = self.qkv(x).reshape(batch, frames, 3, heads, width).permute(2, 0, 3, 1, 4)
        dropout = self.attention_dropout if self.training else 0.0
        # torch's CPU attention kernels take no bias that needs a gradient (the learned ALiBi scales in training):
        # they fall back to a slower path of the same products, so write them out
        cpu_learned_bias = bias is not None and bias.requires_grad and torch.is_grad_enabled() and not x.is_cuda
        if bias is None or (qkv.dtype == torch.float32 and not cpu_learned_bias):
            q, k, v = qkv.unbind(0)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        else:
            # fairseq's explicit products; in bf16/fp16 an ALiBi bias of -slope * distance (up to hundreds) would
            # lose its low bits, so (as fairseq) it is added and the softmax taken in float32.
            q, k, v = qkv.contiguous().view(3, batch * heads, frames, width).unbind(0)
            if q.dtype == torch.float32:  # bias + scale * q k^T as one batched product
                bias = bias.expand(batch, heads, frames, frames).reshape(batch * heads, frames, frames)
                scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=width ** -0.5)
            else:  # the bias broadcast over the rows, not copied for each (a [rows * heads, T, T] float32 tensor)
                scores = ((q * width ** -0.5) @ k.transpose(1, 2)).view(batch, heads, frames, frames)
                scores = (scores.float() + bias.float()).view(batch * heads, frames, frames)
            weights = scores.softmax(dim=-1).to(q.dtype)
            x = (F.dropout(weights, dropout, training=self.training) @ v).view(batch, heads, frames, width)
        return self.proj_dropout(self.proj(x.transpose(1, 2).reshape(batch, frames, dim)))


class MLP(nn.Module):
    """timm's ``Mlp`` as fairseq uses it: fc1, GELU, dropout, fc2, dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """fairseq's ``AltBlock``: returns (output, layer result). The layer result is the FFN output before the
    residual (``ffn_targets``) or the block output."""

    def __init__(self, args: Data2Vec2EncoderArgs):
        super().__init__()
        dim = args.encoder_embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=args.encoder_norm_eps, elementwise_affine=args.encoder_norm_affine)
        self.attn = Attention(dim, args.encoder_num_heads, args.attention_dropout, args.encoder_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=args.encoder_norm_eps, elementwise_affine=args.encoder_norm_affine)
        self.mlp = MLP(dim, args.encoder_ff_interm_features, args.activation_dropout)
        self.post_mlp_dropout = nn.Dropout(args.post_mlp_dropout)
        self.layer_norm_first = args.encoder_layer_norm_first
        self.ffn_targets = args.ffn_targets

    def forward(self, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.layer_norm_first:
            x = x + self.attn(self.norm1(x), bias)
            # fairseq's pre-LN branch adds the MLP output to itself, not to x (``r = x = self.mlp(...)``): kept as is.
            r = x = self.mlp(self.norm2(x))
            t = x
            x = r + self.post_mlp_dropout(x)
        else:
            x = x + self.attn(x, bias)
            r = x = self.norm1(x)
            x = self.mlp(x)
            t = x
            x = self.norm2(r + self.post_mlp_dropout(x))
        return x, (t if self.ffn_targets else x)


def _layer_dropped(module: nn.Module, rate: float) -> bool:
    return module.training and rate > 0 and float(torch.rand(())) < rate


class Data2Vec2Encoder(nn.Module):
    """Everything after the projected conv features: the part the student and the EMA teacher share.

    ``forward(features, padding_mask)`` -> (output of each main block, layer result of each main block); the
    features are ``[batch, frames, dim]``, ``padding_mask`` ``[batch, frames]`` (True = padding) or None.
    """

    def __init__(self, args: Data2Vec2EncoderArgs):
        super().__init__()
        dim = args.encoder_embed_dim
        self.args = args
        self.pos_conv = PositionalEncoder(dim, args.pos_conv_depth, args.pos_conv_kernel, args.pos_conv_groups)
        # fairseq's prenet (BlockEncoder) normalises its input in post-LN models and has no norm in pre-LN ones.
        self.prenet_norm = None if args.encoder_layer_norm_first else nn.LayerNorm(
            dim, eps=args.encoder_norm_eps, elementwise_affine=args.encoder_norm_affine)
        self.prenet_dropout = nn.Dropout(args.prenet_dropout)
        self.prenet = nn.ModuleList(Block(args) for _ in range(args.prenet_depth))
        self.input_dropout = nn.Dropout(args.encoder_projection_dropout)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.encoder_num_layers))
        self.layer_norm = nn.LayerNorm(dim, eps=args.encoder_norm_eps, elementwise_affine=args.encoder_norm_affine) \
            if args.encoder_layer_norm_first else None
        self.alibi_scale = nn.Parameter(torch.ones(args.alibi_scale_layers, 1, args.alibi_scale_heads, 1, 1),
                                        requires_grad=args.alibi_scale_learned) if args.use_alibi else None

    def _biases(self, positions: Tensor, padding_mask: Tensor | None) -> list[Tensor | None]:
        """The additive attention bias of each block (prenet blocks first): ALiBi over the frames' original
        ``positions`` (``[1 or rows, frames]``) times its (clamped) scale, and -inf at padded keys. One tensor for all
        blocks unless the scales are per layer."""
        num_blocks = len(self.prenet) + len(self.layers)
        pad = None
        if padding_mask is not None and padding_mask.any():
            batch, frames = padding_mask.shape
            pad = torch.zeros(batch, 1, 1, frames, device=padding_mask.device).masked_fill(
                padding_mask[:, None, None, :], float("-inf"))
        if self.alibi_scale is None:
            return [pad] * num_blocks
        base = alibi_bias(self.args.encoder_num_heads, positions)
        scale = self.alibi_scale.clamp_min(0).float()
        if scale.size(0) == 1:
            bias = base * scale[0]
            bias = bias if pad is None else bias + pad
            return [bias] * num_blocks
        return [base * scale[i] if pad is None else base * scale[i] + pad for i in range(num_blocks)]

    def forward(self, x: Tensor, padding_mask: Tensor | None = None,
                num_layers: int | None = None) -> tuple[list[Tensor], list[Tensor]]:
        x = x + self.pos_conv(x)
        positions = torch.arange(x.shape[1], device=x.device)[None]
        return self._blocks(x, self._biases(positions, padding_mask), num_layers)

    def forward_kept(self, x: Tensor, keep: Tensor, padding_mask: Tensor | None = None,
                     num_layers: int | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """The student's forward on masked copies, as fairseq's (``remove_masked``, ``encoder_zero_mask``): ``x``
        ``[rows, frames, dim]`` the projected features of each copy, ``keep`` ``[rows, kept]`` the positions that are
        not masked (ascending; the same count in every row). The positional encoder sees the features with the
        masked frames zeroed; the blocks see only the kept frames (feature + its positional encoding), with the
        ALiBi distances and the padding of their original positions. Returns what :meth:`forward` does, for the kept
        frames."""
        kept_index = keep[..., None].expand(-1, -1, x.shape[-1])
        masked = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device).scatter(1, keep, False)
        x_pos = self.pos_conv(x * (1 - masked.to(x.dtype)[..., None]))
        x = torch.gather(x, 1, kept_index) + torch.gather(x_pos, 1, kept_index)
        kept_padding = torch.gather(padding_mask, 1, keep) if padding_mask is not None else None
        return self._blocks(x, self._biases(keep, kept_padding), num_layers)

    def _blocks(self, x: Tensor, biases: list[Tensor | None],
                num_layers: int | None) -> tuple[list[Tensor], list[Tensor]]:
        if self.prenet_norm is not None:
            x = self.prenet_norm(x)
        x = self.prenet_dropout(x)
        for i, block in enumerate(self.prenet):
            if not _layer_dropped(self, self.args.prenet_layer_drop):
                x, _ = block(x, biases[i])
        x = self.input_dropout(x)
        outputs, results = [], []
        for i, block in enumerate(self.layers[:num_layers]):
            if not _layer_dropped(self, self.args.encoder_layer_drop):
                x, result = block(x, biases[len(self.prenet) + i])
                outputs.append(x)
                results.append(result)
        return outputs, results

    def final(self, x: Tensor) -> Tensor:
        """The encoder's output from its last block's: the final LayerNorm of pre-LN models."""
        return self.layer_norm(x) if self.layer_norm is not None else x


# --------------------------------------------------------------------------------------------- models


def padding_mask_of(lengths: Tensor | None, frames: int) -> Tensor | None:
    if lengths is None:
        return None
    return torch.arange(frames, device=lengths.device)[None, :] >= lengths[:, None]


class Data2Vec2Model(nn.Module):
    """The data2vec 2.0 encoder with the interface of torchaudio's ``Wav2Vec2Model``.

    ``forward(waveforms, lengths)`` -> (output ``[batch, frames, dim]``, or the CTC logits when the bundle is
    fine-tuned; frame lengths). ``extract_features(waveforms, lengths, num_layers)`` -> (output of each of the first
    ``num_layers`` main blocks, frame lengths). Waveforms are expected normalised (the bundle's loader wraps the
    model to do it); samples past ``lengths`` are ignored.
    """

    def __init__(self, args: Data2Vec2EncoderArgs):
        super().__init__()
        self.args = args
        self.feature_extractor = FeatureExtractor(args)
        self.feature_projection = FeatureProjection(args.extractor_dim, args.encoder_embed_dim)
        self.encoder = Data2Vec2Encoder(args)
        self.aux = nn.Linear(args.encoder_embed_dim, args.aux_num_out) if args.aux_num_out else None

    def local_features(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Projected conv features ``[batch, frames, dim]`` and frame lengths: the input of the student's and the
        teacher's :class:`Data2Vec2Encoder`."""
        if lengths is not None:  # fairseq's collater pads with zeros: make the model independent of what is there
            valid = torch.arange(waveforms.shape[-1], device=waveforms.device)[None, :] < lengths[:, None]
            waveforms = waveforms * valid.to(waveforms.dtype)
        x, frame_lengths = self.feature_extractor(waveforms, lengths)
        return self.feature_projection(x), frame_lengths

    def extract_features(self, waveforms: Tensor, lengths: Tensor | None = None,
                         num_layers: int | None = None) -> tuple[list[Tensor], Tensor | None]:
        x, frame_lengths = self.local_features(waveforms, lengths)
        outputs, _ = self.encoder(x, padding_mask_of(frame_lengths, x.shape[1]), num_layers)
        return outputs, frame_lengths

    def layer_results(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[list[Tensor], Tensor | None]:
        """Each main block's layer result (FFN output): what data2vec's teacher targets average."""
        x, frame_lengths = self.local_features(waveforms, lengths)
        _, results = self.encoder(x, padding_mask_of(frame_lengths, x.shape[1]))
        return results, frame_lengths

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x, frame_lengths = self.local_features(waveforms, lengths)
        outputs, _ = self.encoder(x, padding_mask_of(frame_lengths, x.shape[1]))
        x = self.encoder.final(outputs[-1] if outputs else x)
        if self.aux is not None:
            x = self.aux(x)
        return x, frame_lengths


class DecoderBlock(PositionalConvLayer):
    """fairseq's ``Decoder1d`` block: the same conv, non-affine LayerNorm and GELU, from ``in_dim`` channels."""

    def __init__(self, in_dim: int, dim: int, kernel: int, groups: int):
        super().__init__(dim, kernel, groups, in_dim=in_dim)


class Decoder1d(nn.Module):
    """fairseq's ``Decoder1d``: conv blocks (each added to its input where the widths agree), then a projection
    back to the encoder's width. ``[batch, frames, dim]`` in and out."""

    def __init__(self, args: Data2Vec2DecoderArgs, input_dim: int):
        super().__init__()
        self.residual = args.decoder_residual
        self.blocks = nn.ModuleList(
            DecoderBlock(input_dim if i == 0 else args.decoder_dim, args.decoder_dim, args.decoder_kernel,
                         args.decoder_groups) for i in range(args.decoder_layers))
        projections: list[nn.Module] = []
        dim = args.decoder_dim
        for i in range(args.projection_layers - 1):
            next_dim = int(dim * args.projection_ratio) if i == 0 else dim
            projections += [nn.Linear(dim, next_dim), nn.GELU()]
            dim = next_dim
        projections.append(nn.Linear(dim, input_dim))
        self.proj = projections[0] if len(projections) == 1 else nn.Sequential(*projections)

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        for block in self.blocks:
            x = block(x)
            if self.residual and residual.size(-1) == x.size(-1):
                x = x + residual
            residual = x
        return self.proj(x)


class Data2Vec2PretrainModel(nn.Module):
    """What continuing data2vec 2.0 pre-training needs: the ``student`` (:class:`Data2Vec2Model`), its ``decoder``
    (:class:`Decoder1d`) and the EMA ``teacher`` (a :class:`Data2Vec2Encoder` fed the student's
    :meth:`~Data2Vec2Model.local_features`, as fairseq's ``ema_local_encoder=False`` teacher is; no gradients)."""

    def __init__(self, args: Data2Vec2EncoderArgs, decoder: Data2Vec2DecoderArgs):
        super().__init__()
        self.student = Data2Vec2Model(args)
        self.decoder = Decoder1d(decoder, args.encoder_embed_dim)
        self.teacher = Data2Vec2Encoder(args)
        self.teacher.requires_grad_(False)
