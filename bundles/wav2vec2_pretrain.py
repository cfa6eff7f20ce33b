"""The wav2vec 2.0 pre-training heads torchaudio does not ship: quantizer, ``project_q``, ``final_proj``, mask embedding.

The modules hold exactly fairseq's parameters (under torchaudio-style names) and compute what fairseq's
``GumbelVectorQuantizer`` computes, so the contrastive objective can be continued from a published
checkpoint. The training loss itself lives in ``continue_pt``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchaudio.models import Wav2Vec2Model


@dataclass
class QuantizerOutput:
    x: Tensor
    """Quantized vectors, ``[batch, frames, codevector_dim]``."""
    targets: Tensor
    """Chosen code per group, ``[batch, frames, groups]``."""
    code_perplexity: Tensor
    """Perplexity of the hard code choices (summed over groups)."""
    prob_perplexity: Tensor
    """Perplexity of the averaged soft code distribution (summed over groups); the diversity loss uses it."""
    temperature: float


class GumbelVectorQuantizer(nn.Module):
    """fairseq's ``GumbelVectorQuantizer`` with ``combine_groups=False`` and a single linear ``weight_proj``.

    Args:
        input_dim: feature dimension fed to the quantizer (the feature extractor's output channels).
        num_vars: codewords per group (fairseq ``latent_vars``).
        groups: codebook groups (fairseq ``latent_groups``).
        codevector_dim: size of a quantized vector, all groups together (fairseq ``latent_dim`` or ``final_dim``).
        temperature: ``(max, min, decay)``: temperature = ``max(max * decay ** num_updates, min)``.
    """

    def __init__(self, input_dim: int, num_vars: int, groups: int, codevector_dim: int,
                 temperature: tuple[float, float, float] = (2.0, 0.5, 0.999995)):
        super().__init__()
        if codevector_dim % groups:
            raise ValueError(f"codevector_dim {codevector_dim} must be divisible by groups {groups}")
        self.num_vars, self.groups = num_vars, groups
        self.codevectors = nn.Parameter(torch.empty(1, groups * num_vars, codevector_dim // groups))
        self.weight_proj = nn.Linear(input_dim, groups * num_vars)
        nn.init.uniform_(self.codevectors)
        nn.init.normal_(self.weight_proj.weight, mean=0, std=1)
        nn.init.zeros_(self.weight_proj.bias)
        self.max_temperature, self.min_temperature, self.temperature_decay = (float(t) for t in temperature)
        self.temperature = self.max_temperature

    def set_num_updates(self, num_updates: int) -> None:
        """Set the Gumbel temperature for ``num_updates`` (fairseq's schedule)."""
        self.temperature = max(self.max_temperature * self.temperature_decay ** num_updates, self.min_temperature)

    def forward(self, features: Tensor, gumbel_noise: Tensor | None = None) -> QuantizerOutput:
        """Quantize ``features`` ``[batch, frames, input_dim]``.

        In training mode codes are drawn with the straight-through Gumbel-softmax; ``gumbel_noise``
        (shape ``[batch * frames * groups, num_vars]``) replaces the random draw, for reproducible tests.
        In eval mode the highest logit wins.
        """
        bsz, tsz, fsz = features.shape
        logits = self.weight_proj(features.reshape(-1, fsz)).view(bsz * tsz * self.groups, -1)
        k = logits.argmax(-1)
        hard = torch.zeros_like(logits).scatter_(-1, k.view(-1, 1), 1.0).view(bsz * tsz, self.groups, -1)
        hard_probs = _at_least_fp32(hard).mean(dim=0)
        code_ppl = torch.exp(-torch.sum(hard_probs * torch.log(hard_probs + 1e-7), dim=-1)).sum()
        avg_probs = torch.softmax(_at_least_fp32(logits.view(bsz * tsz, self.groups, -1)), dim=-1).mean(dim=0)
        prob_ppl = torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-7), dim=-1)).sum()
        if self.training:
            one_hot = _straight_through_gumbel(_at_least_fp32(logits), self.temperature, gumbel_noise).type_as(logits)
        else:
            one_hot = hard.view(bsz * tsz * self.groups, -1)
        one_hot = one_hot.view(bsz * tsz, -1)
        targets = one_hot.view(bsz * tsz * self.groups, -1).argmax(dim=-1).view(bsz, tsz, self.groups)
        x = _pick_codevectors(one_hot.view(bsz * tsz, self.groups, self.num_vars),
                              self.codevectors.view(self.groups, self.num_vars, -1))
        return QuantizerOutput(x=x.reshape(bsz, tsz, -1), targets=targets.detach(), code_perplexity=code_ppl,
                               prob_perplexity=prob_ppl, temperature=self.temperature)


def _at_least_fp32(x: Tensor) -> Tensor:
    # fairseq computes these in fp32 (`.float()`), also under fp16/bf16; a float64 model keeps float64.
    return x if x.dtype == torch.float64 else x.float()


def _pick_codevectors(codes: Tensor, codevectors: Tensor) -> Tensor:
    """``[frames, groups, num_vars] x [groups, num_vars, dim] -> [frames, groups, dim]``: fairseq's
    ``(one_hot.unsqueeze(-1) * vars).view(..., groups, num_vars, dim).sum(-2)`` as one batched matrix product
    per group. The same forward values (each row of ``codes`` has one nonzero entry: the sum adds exact zeros),
    gradients equal up to summation order, and the same dtype (type promotion, autocast off, as the elementwise
    product); without materialising ``[frames, groups * num_vars, dim]`` forward and twice backward (~10x faster
    on CPU for BASE, bench/bench_w2v_train_step.py)."""
    with torch.autocast(device_type=codes.device.type, enabled=False):
        dtype = torch.promote_types(codes.dtype, codevectors.dtype)
        return torch.bmm(codes.to(dtype).transpose(0, 1), codevectors.to(dtype)).transpose(0, 1)


def _straight_through_gumbel(logits: Tensor, tau: float, noise: Tensor | None) -> Tensor:
    # The same arithmetic as torch.nn.functional.gumbel_softmax(hard=True), with the noise injectable.
    if noise is None:
        noise = -torch.empty_like(logits).exponential_().log()
    y_soft = ((logits + noise) / tau).softmax(-1)
    index = y_soft.argmax(-1, keepdim=True)
    y_hard = torch.zeros_like(logits).scatter_(-1, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


class Wav2Vec2PretrainModel(nn.Module):
    """A torchaudio ``Wav2Vec2Model`` plus the heads wav2vec 2.0 pre-training needs.

    Attributes:
        wav2vec2: the encoder (torchaudio ``Wav2Vec2Model``).
        quantizer: :class:`GumbelVectorQuantizer` over the feature extractor's output.
        project_q: projects quantized vectors to ``final_dim``.
        final_proj: projects the transformer's output to ``final_dim``.
        mask_embedding: the learned vector that replaces masked frames.
    """

    def __init__(self, wav2vec2: Wav2Vec2Model, *, extractor_dim: int, encoder_embed_dim: int, final_dim: int,
                 latent_vars: int, latent_groups: int, codevector_dim: int,
                 latent_temp: tuple[float, float, float], num_updates: int = 0):
        super().__init__()
        self.wav2vec2 = wav2vec2
        self.quantizer = GumbelVectorQuantizer(extractor_dim, latent_vars, latent_groups, codevector_dim,
                                               tuple(latent_temp))
        self.quantizer.set_num_updates(num_updates)
        self.project_q = nn.Linear(codevector_dim, final_dim)
        self.final_proj = nn.Linear(encoder_embed_dim, final_dim)
        self.mask_embedding = nn.Parameter(torch.empty(encoder_embed_dim).uniform_())
