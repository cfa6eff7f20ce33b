"""HuBERT's masked-prediction objective (continue_pt.hubert.objective, continue_pt.masking).

* Masks: ``compute_mask_indices`` draws what fairseq's draws from the same random source, and
  ``time_mask`` / ``channel_mask`` use ``HubertModel.apply_mask``'s arguments.
* Logits: cross-entropy over plain ``K + E`` cosine logits equals fairseq's ``compute_nce`` (positive first,
  duplicate at -inf), value and gradient.
* Parity: on a converted random-weight fairseq HuBERT (BASE: ``feature_grad_mult`` 0.1, group-norm extractor;
  LARGE: layer-norm extractor, ``layer_norm_first``, waveform normalisation, ``skip_nomask``), the same waveforms,
  mask and targets give ``HubertCriterion``'s loss, sample size, logged terms and accuracy counts, and every
  parameter gradient (mapped through the converter's key map, label rows through the dictionary).
* Accumulation: summed micro-batch gradients equal the step's gradient in every normalisation mode.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from continue_pt.hubert.loss import (
    HubertLossTerms,
    LossWeights,
    StepTotals,
    hubert_loss_terms,
    normalized_loss,
    sample_size,
    unnormalized_loss,
)
from continue_pt.hubert.objective import HubertOutputs, hubert_forward, hubert_frame_padding_mask, label_logits
from continue_pt.frames import conv_output_frames
from continue_pt.masking import (
    TIME_MIN_MASKS,
    MaskingOptions,
    compute_mask_indices,
    channel_mask,
    time_mask,
)

REL = 1e-5  # relative tolerance of losses and gradients

# ============================================================================================ helpers


def _max_rel(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _assert_grads_close(ours: Mapping[str, Tensor], ref: Mapping[str, Tensor], rel: float = REL) -> float:
    """Every gradient within ``rel`` of the reference (relative to its largest entry); returns the worst.

    The key projections' biases are the exception: attention's softmax does not change when a constant is added
    to every score, so their true gradient is 0 and both sides hold rounding noise; they must be zero relative
    to the largest gradient of the model.
    """
    assert set(ours) == set(ref)
    scale = max(g.abs().max().item() for g in ref.values())
    worst = 0.0
    for key, expected in ref.items():
        actual = ours[key]
        assert actual is not None and expected is not None, key
        if key.endswith("k_proj.bias"):
            assert actual.abs().max().item() <= 1e-6 * scale and expected.abs().max().item() <= 1e-6 * scale, key
            continue
        diff = _max_rel(actual, expected)
        assert diff <= rel, f"{key}: relative difference {diff:.3g}"
        worst = max(worst, diff)
    return worst


def _no_dropout(model: nn.Module) -> nn.Module:
    """Train mode with every dropout and layer drop at 0 (torchaudio and fairseq modules alike)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout) or type(module).__name__ == "FairseqDropout":
            module.p = 0.0
        if type(module).__name__ == "SelfAttention":  # torchaudio: attention dropout is a float
            module.dropout = 0.0
        for attr in ("layer_drop", "layerdrop"):
            if hasattr(module, attr):
                setattr(module, attr, 0.0)
        if type(module).__name__ == "TransformerEncoder" and hasattr(module, "required_seq_len_multiple"):
            module.dropout = 0.0  # fairseq: F.dropout(x, p=self.dropout) before the layers
    return model.train()


def _tiny_model(seed: int = 0, feature_grad_mult: float | None = 0.1) -> torchaudio.models.HuBERTPretrainModel:
    torch.manual_seed(seed)
    model = torchaudio.models.hubert_pretrain_model(
        extractor_mode="group_norm", extractor_conv_layer_config=[(16, 10, 5), (16, 3, 2), (16, 2, 2)],
        extractor_conv_bias=False, encoder_embed_dim=24, encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=8, encoder_pos_conv_groups=4, encoder_num_layers=2, encoder_num_heads=4,
        encoder_attention_dropout=0.0, encoder_ff_interm_features=48, encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0, mask_prob=0.8,
        mask_selection="static", mask_other=0.0, mask_length=5, no_mask_overlap=False, mask_min_space=1,
        mask_channel_prob=0.0, mask_channel_selection="static", mask_channel_other=0.0, mask_channel_length=10,
        no_mask_channel_overlap=False, mask_channel_min_space=1, skip_masked=False, skip_nomask=False,
        num_classes=12, final_dim=16, feature_grad_mult=feature_grad_mult,
    )
    return model.train()


# ============================================================================================ masks


@contextmanager
def _fairseq_rng(rng: np.random.Generator | np.random.RandomState) -> Iterator[None]:
    """Make fairseq's ``compute_mask_indices`` draw from ``rng``: it calls ``np.random.default_rng(None)`` for
    every utterance (fresh OS entropy); here each call returns the one shared ``rng``."""
    with mock.patch("numpy.random.default_rng", lambda seed=None: rng):
        yield


def _fairseq_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """fairseq calls ``mask_selection`` ``mask_type`` in this function (and ``mask_selection`` in its configs)."""
    return {("mask_type" if k == "mask_selection" else k): v for k, v in kwargs.items()}


def _padding(lengths: list[int], size: int) -> Tensor:
    return torch.arange(size)[None, :] >= torch.tensor(lengths)[:, None]


MASK_CASES = [
    # shape, lengths (None: no padding), keyword arguments
    ((3, 50), None, dict(mask_prob=0.65, mask_length=10)),
    ((4, 120), [120, 100, 61, 30], dict(mask_prob=0.8, mask_length=10, min_masks=2, min_space=1)),
    ((2, 500), [500, 377], dict(mask_prob=0.8, mask_length=10, min_masks=2)),
    ((5, 37), None, dict(mask_prob=0.3, mask_length=4, require_same_masks=False)),
    ((3, 90), [90, 80, 45], dict(mask_prob=0.5, mask_length=6, mask_selection="normal", mask_other=2.0)),
    ((3, 90), None, dict(mask_prob=0.5, mask_length=6, mask_selection="poisson", mask_dropout=0.2)),
    ((2, 768), None, dict(mask_prob=0.1, mask_length=10)),  # channel-mask shape
]


@pytest.mark.fairseq
@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("shape,lengths,kwargs", MASK_CASES)
def test_compute_mask_indices_draws_what_fairseq_draws(shape, lengths, kwargs, seed):
    from fairseq.data import data_utils

    padding = None if lengths is None else _padding(lengths, shape[1])
    # a shared Generator
    with _fairseq_rng(np.random.default_rng(seed)):
        expected = data_utils.compute_mask_indices(shape, padding, **_fairseq_kwargs(kwargs))
    ours = compute_mask_indices(shape, padding, **kwargs, rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(ours, expected)
    assert ours.dtype == bool and ours.any()
    if padding is not None:
        assert not (ours & padding.numpy()).any()
    # np.random's global RandomState, seeded with np.random.seed
    np.random.seed(seed)
    with _fairseq_rng(np.random.mtrand._rand):
        expected = data_utils.compute_mask_indices(shape, padding, **_fairseq_kwargs(kwargs))
    np.random.seed(seed)
    np.testing.assert_array_equal(compute_mask_indices(shape, padding, **kwargs, rng=np.random.mtrand._rand), expected)


@pytest.mark.fairseq
@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("kwargs", [
    dict(mask_prob=0.5, mask_length=6, mask_selection="uniform", mask_other=1.0),
    dict(mask_prob=0.4, mask_length=5, no_overlap=True, min_space=1),
    dict(mask_prob=0.4, mask_length=5, mask_selection="uniform", mask_other=2.0, no_overlap=True, min_space=2),
])
def test_uniform_and_no_overlap_masks_match_fairseq_with_a_random_state(kwargs, seed):
    """fairseq calls ``rng.randint`` here (a ``Generator`` has none: fairseq fails with one) and ``np.int``
    (gone from numpy >= 1.24): compared with a ``RandomState`` and ``np.int`` put back."""
    from fairseq.data import data_utils

    padding = _padding([100, 81, 64], 100)
    with mock.patch.object(np, "int", int, create=True), _fairseq_rng(np.random.RandomState(seed)):
        expected = data_utils.compute_mask_indices((3, 100), padding, **_fairseq_kwargs(kwargs))
    ours = compute_mask_indices((3, 100), padding, **kwargs, rng=np.random.RandomState(seed))
    np.testing.assert_array_equal(ours, expected)
    generator_mask = compute_mask_indices((3, 100), padding, **kwargs, rng=np.random.default_rng(seed))
    assert generator_mask.any() and not (generator_mask & padding.numpy()).any()


@pytest.mark.fairseq
def test_fairseq_masks_ignore_np_random_seed():
    """Why the rng is an argument: fairseq-fixed draws each utterance's spans from a fresh, unseeded
    ``np.random.default_rng()``, so seeding numpy does not make its masks reproducible."""
    from fairseq.data import data_utils

    draws = []
    for _ in range(3):
        np.random.seed(0)
        draws.append(data_utils.compute_mask_indices((2, 2000), None, 0.65, 10, min_masks=2))
    assert not all(np.array_equal(draws[0], d) for d in draws[1:])


def test_mask_errors_where_fairseq_fails():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="entire row of 0 positions would be masked"):
        compute_mask_indices((2, 20), _padding([20, 0], 20), 0.8, 10, min_masks=2, rng=rng)
    with pytest.raises(ValueError, match="no mask span drawn"):
        compute_mask_indices((1, 5), None, 0.01, 10, rng=rng)
    with pytest.raises(ValueError, match="unknown mask selection 'gamma'"):
        compute_mask_indices((1, 50), None, 0.5, 10, mask_selection="gamma", rng=rng)
    with pytest.raises(ValueError, match=r"padding_mask has shape \(1, 40\), expected \(1, 50\)"):
        compute_mask_indices((1, 50), _padding([30], 40), 0.5, 10, rng=rng)


def test_hubert_masking_options_from_a_bundle_config():
    options = {"mask_prob": 0.8, "mask_length": 10, "mask_channel_prob": 0.0, "num_classes": 500, "skip_nomask": True}
    masking = MaskingOptions.from_options(options)
    assert (masking.mask_prob, masking.mask_length, masking.mask_min_space) == (0.8, 10, 1)
    assert channel_mask(2, 768, masking, rng=np.random.default_rng(0)) is None
    assert not time_mask((2, 50), None, MaskingOptions(mask_prob=0.0), rng=np.random.default_rng(0)).any()
    assert TIME_MIN_MASKS == 2


# ============================================================================================ logits


@pytest.mark.fairseq
def test_plain_logits_cross_entropy_equals_fairseq_compute_nce():
    """fairseq scores ``[positive, row 0, ..., row C-1]`` with the positive's own row at -inf and takes class 0;
    cross-entropy over ``[row 0, ..., row C-1]`` with the target row as class is the same, value and gradient."""
    from fairseq.models.hubert.hubert import HubertModel

    g = torch.Generator().manual_seed(0)
    proj = torch.randn(37, 16, generator=g, dtype=torch.float64)
    rows = torch.rand(24, 16, generator=g, dtype=torch.float64)  # fairseq initialises label rows U(0, 1)
    targets = torch.randint(0, 20, (37,), generator=g)  # the last 4 rows (specials) are never targets

    def run(loss_of: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        p, r = proj.clone().requires_grad_(True), rows.clone().requires_grad_(True)
        loss = loss_of(p, r)
        loss.backward()
        return loss.detach(), p.grad, r.grad

    def fairseq_loss(p: Tensor, r: Tensor) -> Tensor:
        pos = torch.index_select(r, 0, targets)
        negs = r.unsqueeze(1).expand(-1, p.shape[0], -1)
        logits = HubertModel.compute_nce(types.SimpleNamespace(logit_temp=0.1), p, pos, negs)
        assert logits.shape == (37, 25) and torch.isinf(logits).sum() == 37
        return F.cross_entropy(logits, torch.zeros(37, dtype=torch.long), reduction="sum")

    def plain_loss(p: Tensor, r: Tensor) -> Tensor:
        return F.cross_entropy(label_logits(p, r, 0.1), targets, reduction="sum")

    expected, ours = run(fairseq_loss), run(plain_loss)
    for e, o in zip(expected, ours):
        assert _max_rel(o.double(), e) <= REL


def _fairseq_compute_correct(logits: Tensor) -> int:
    """fairseq's ``HubertCriterion`` ``compute_correct`` (on fairseq's ``[positive, rows...]`` logits)."""
    top = logits.argmax(-1) == 0
    bottom = logits.argmin(-1) == 0
    return int(top.long().sum() - (top & bottom).long().sum())


def test_accuracy_counts_like_fairseq_including_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0],   # target 1 ties with 2: fairseq's positive comes first: correct
                           [1.0, 3.0, 3.0, 0.0],   # target 2 ties with 1: correct too
                           [1.0, 3.0, 2.0, 0.0],   # target 2 below 1: wrong
                           [2.0, 2.0, 2.0, 2.0],   # all equal: the -inf duplicate keeps fairseq's exclusion off
                           [5.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([1, 2, 2, 3, 0])
    fairseq_layout = torch.stack([torch.cat([row[t:t + 1], row.index_fill(0, t[None], -math.inf)])
                                  for row, t in zip(logits, targets)])
    out = HubertOutputs(logits, targets, None, None, torch.tensor(0.0), 5)
    terms = hubert_loss_terms(out)
    assert int(terms.masked_correct) == _fairseq_compute_correct(fairseq_layout) == 4
    assert terms.unmasked_correct.item() == 0 and terms.unmasked_ce_sum is None


# ============================================================================================ fairseq parity

_converted_cache: dict[str, tuple[Any, Any]] = {}


def _converted(name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """(fairseq reference with dropout off, bundle) for a stored config, 2 layers, shuffled dictionary."""
    if name not in _converted_cache:
        from bundles.loading import load_bundle
        from converters.convert import convert_checkpoint
        from tests.fairseq_reference import build_fairseq_model, save_checkpoint

        ref = build_fairseq_model(name, num_layers=2, seed=1, shuffle_dictionary=True)
        _no_dropout(ref.model)
        work = tmp_path_factory.mktemp(f"objective-{name}")
        save_checkpoint(ref, work / f"{name}.pt", "dict")
        _converted_cache[name] = (ref, load_bundle(convert_checkpoint(work / f"{name}.pt", work / "bundle")))
    return _converted_cache[name]


def _given_masks(time_mask: Tensor, channel_mask: Tensor | None) -> Callable[..., np.ndarray]:
    """Stand-in for fairseq's compute_mask_indices inside HubertModel: the given masks, chosen by shape."""
    def given(shape: tuple[int, int], *args: Any, **kwargs: Any) -> np.ndarray:
        if tuple(shape) == tuple(time_mask.shape):
            return time_mask.numpy()
        assert channel_mask is not None and tuple(shape) == tuple(channel_mask.shape), shape
        return channel_mask.numpy()
    return given


def _fairseq_step(ref: Any, batches: list[dict[str, Any]], w_u: float,
                  dtype: torch.dtype) -> tuple[float, int, list[dict], dict]:
    """fairseq's trainer on micro-batches: sum of HubertCriterion losses, backward, gradients / total sample size."""
    from fairseq.criterions.hubert_criterion import HubertCriterion

    criterion = HubertCriterion(None, pred_masked_weight=1.0, pred_nomask_weight=w_u, loss_weights=[10.0])
    model = ref.model.to(dtype)  # in place; put back to float32 below
    model.zero_grad(set_to_none=True)
    total, size, logs = 0.0, 0, []
    for b in batches:
        sample = {"net_input": {"source": b["wav"].to(dtype), "padding_mask": b["padding"]}, "target_list": [b["rows"]],
                  "id": torch.arange(b["wav"].shape[0])}
        channel_prob = 0.0 if b["channels"] is None else 0.2  # any value > 0 makes fairseq draw a channel mask
        with mock.patch("fairseq.models.hubert.hubert.compute_mask_indices", _given_masks(b["mask"], b["channels"])), \
                mock.patch.object(model, "mask_channel_prob", channel_prob):
            loss, sample_size, log = criterion(model, sample)
        loss.backward()
        total, size = total + loss.item(), size + sample_size
        logs.append(log)
    grads = {k: p.grad / size for k, p in model.named_parameters()}
    model.float().zero_grad(set_to_none=True)
    return total / size, size, logs, grads


def _our_step(bundle: Any, batches: list[dict[str, Any]], weights: LossWeights, dtype: torch.dtype):
    """Ours on the same micro-batches: totals from the masks first, then forward + backward per micro-batch."""
    model = _no_dropout(bundle.get_pretrain_model()).to(dtype)
    extra = bundle.fairseq_extras()["label_embeddings_non_cluster"].to(dtype).clone().requires_grad_(True)
    totals = StepTotals(0, 0, 0)
    for b in batches:
        totals = totals + StepTotals.of_masks(b["mask"], b["frame_padding"])
    loss_sum, terms_list = 0.0, []
    for b in batches:
        out = hubert_forward(model, b["wav"].to(dtype), b["lengths"], b["labels"], b["mask"],
                             extra_label_embeddings=extra, logit_temp=bundle.config.objective["logit_temp"],
                             channel_mask=b["channels"])
        terms = hubert_loss_terms(out)
        loss = normalized_loss(terms, totals, weights, "fairseq")
        loss.backward()
        loss_sum += loss.item()
        terms_list.append(terms)
    return loss_sum, totals, terms_list, model, extra


def _batch(ref: Any, bundle: Any, lengths: list[int], num_samples: int, label_frames: int | None,
           seed: int, channel_prob: float = 0.0) -> dict[str, Any]:
    """One micro-batch: waveforms as fairseq's dataset makes them, labels, fairseq's frame padding, a mask."""
    from tests.fairseq_reference import prepare_waveform

    g = torch.Generator().manual_seed(seed)
    wav = torch.randn(len(lengths), num_samples, generator=g) * torch.tensor([0.1, 3.0, 1.0])[:len(lengths), None]
    length_t = torch.tensor(lengths)
    wav, padding = prepare_waveform(ref, wav, length_t)
    conv_frames = conv_output_frames(bundle.config.encoder_args["extractor_conv_layer_config"], num_samples)
    label_frames = conv_frames if label_frames is None else label_frames
    frames = min(conv_frames, label_frames)
    frame_padding = hubert_frame_padding_mask(length_t, num_samples, frames)
    rng = np.random.default_rng(seed)
    # the checkpoint's masking, with spans of 5 to fit the short test utterances (the mask is an input here)
    masking = MaskingOptions.from_options({**bundle.config.pretrain_args, "mask_length": 5,
                                          "mask_channel_prob": channel_prob})
    mask = torch.from_numpy(time_mask((len(lengths), frames), frame_padding, masking, rng=rng))
    channels = channel_mask(len(lengths), bundle.config.encoder_args["encoder_embed_dim"], masking, rng=rng)
    labels = torch.randint(0, bundle.config.label_dictionary["num_clusters"], (len(lengths), label_frames), generator=g)
    return {"wav": wav, "padding": padding, "lengths": length_t, "labels": labels, "mask": mask,
            "frame_padding": frame_padding, "channels": None if channels is None else torch.from_numpy(channels)}


def _targets_some_correct(bundle: Any, b: dict[str, Any]) -> None:
    """Set the labels of every other masked (and unmasked) frame to the model's own best cluster, so that the
    accuracy counts are not trivially 0; then the fairseq targets: dictionary rows of the cluster symbols."""
    model = _no_dropout(bundle.get_pretrain_model())
    with torch.no_grad():
        out = hubert_forward(model, b["wav"], b["lengths"], b["labels"], b["mask"], channel_mask=b["channels"],
                             skip_nomask=False)
    k = bundle.config.label_dictionary["num_clusters"]
    valid = ~b["frame_padding"]
    for chosen, logits in ((b["mask"] & valid, out.logits_masked), (~b["mask"] & valid, out.logits_unmasked)):
        where = chosen.nonzero()[::2]
        b["labels"][where[:, 0], where[:, 1]] = logits[::2, :k].argmax(1)
    rows = torch.tensor(bundle.config.label_dictionary["cluster_rows"])
    b["rows"] = rows[b["labels"]]  # fairseq trims them to the features itself (forward_targets)


def _mapped_grads(ref: Any, bundle: Any, fairseq_grads: dict[str, Tensor], model: nn.Module, extra: Tensor):
    """(ours, fairseq's) gradients keyed by our parameter names; label_embs_concat split by dictionary rows."""
    from converters.families.hubert import PRETRAIN_KEY_MAP

    mapping = PRETRAIN_KEY_MAP.classify(fairseq_grads).mapped
    ours = {name: p.grad for name, p in model.named_parameters()}
    expected = {mapping[k]: g for k, g in fairseq_grads.items() if k != "label_embs_concat"}
    cluster_rows = bundle.config.label_dictionary["cluster_rows"]
    special_rows = [r for r in range(len(ref.dictionary)) if r not in set(cluster_rows)]
    assert [ref.dictionary.symbols[r] for r in special_rows] == bundle.config.label_dictionary["non_cluster_symbols"]
    expected["logit_generator.label_embeddings"] = fairseq_grads["label_embs_concat"][cluster_rows]
    expected["extra_label_embeddings"] = fairseq_grads["label_embs_concat"][special_rows]
    ours["extra_label_embeddings"] = extra.grad
    assert set(ours) == set(expected)
    return ours, expected


PARITY_CASES = [
    # config, pred_nomask_weight, micro-batches as (utterance lengths, padded size, label frames), channel prob.
    # 6400 samples make 20 frames, 4800 make 14 (short: the conv extractor's backward dominates the time).
    pytest.param("hubert_base_ls960", 0.0, [([6400, 6400], 6400, None)], 0.0, id="base"),
    pytest.param("hubert_base_ls960", 0.5, [([6400, 4400], 6400, 19), ([4800], 4800, None)], 0.0,
                 id="base-nomask0.5-padded-labels-shorter-2-micro-batches"),
    pytest.param("hubert_base_ls960", 0.0, [([4800, 3600], 4800, 16)], 0.2, id="base-channel-mask-labels-longer"),
    pytest.param("hubert_large_ll60k", 0.0, [([6400], 6400, None), ([3600, 4800], 4800, None)], 0.0,
                 id="large-padded-2-micro-batches"),
]

# float64 on both sides (fairseq's own .float() casts stay fp32): every gradient within 1e-5 (measured <= 7e-7).
# float32: the weight-norm gain of the positional conv sums ~37k products per entry and shows ~1e-5 of rounding
# noise on either side (measured <= 9.2e-6, and 20x less in float64), so fp32 gradients are held to 2e-5.
DTYPES = [pytest.param(torch.float64, REL, id="float64"), pytest.param(torch.float32, 2 * REL, id="float32")]


@pytest.mark.slow
@pytest.mark.fairseq
@pytest.mark.parametrize("dtype,grad_rel", DTYPES)
@pytest.mark.parametrize("name,w_u,micro_batches,channel_prob", PARITY_CASES)
def test_loss_and_every_gradient_match_fairseq(name, w_u, micro_batches, channel_prob, dtype, grad_rel,
                                               tmp_path_factory):
    ref, bundle = _converted(name, tmp_path_factory)
    batches = [_batch(ref, bundle, lengths, size, label_frames, seed=10 + i, channel_prob=channel_prob)
               for i, (lengths, size, label_frames) in enumerate(micro_batches)]
    if channel_prob:
        assert batches[0]["channels"] is not None and batches[0]["channels"].any()
    for b in batches:
        _targets_some_correct(bundle, b)
    fairseq_loss, fairseq_size, logs, fairseq_grads = _fairseq_step(ref, batches, w_u, dtype)
    weights = LossWeights(masked=1.0, unmasked=w_u, feature_penalty=10.0)
    loss, totals, terms_list, model, extra = _our_step(bundle, batches, weights, dtype)

    assert StepTotals.of(terms_list) == totals or bundle.config.pretrain_args["skip_nomask"]
    assert totals.num_masked + (totals.num_unmasked if w_u > 0 else 0) == fairseq_size
    assert abs(loss - fairseq_loss) <= REL * abs(fairseq_loss)
    for log, terms in zip(logs, terms_list):
        assert log["sample_size"] == terms.num_masked + (terms.num_unmasked if w_u > 0 else 0)
        # the pieces the training module runs (HubertContinuedPretraining.training_step, loss_norm "fairseq")
        assert sample_size(terms, weights, "fairseq") == log["sample_size"]
        assert abs(unnormalized_loss(terms, weights, "fairseq").item() - log["loss"]) <= REL * abs(log["loss"])
        assert abs(terms.masked_ce_sum.item() - log["loss_m_0"]) <= REL * log["loss_m_0"]
        penalty = 10.0 * terms.feature_penalty.item() * log["sample_size"]
        assert abs(penalty - log["loss_features_pen"]) <= REL * log["loss_features_pen"]
        assert (int(terms.masked_correct), terms.num_masked) == (log["correct_m_0"], log["count_m_0"])
        assert int(terms.masked_correct) > 0
        if "loss_u_0" in log:
            assert abs(terms.unmasked_ce_sum.item() - log["loss_u_0"]) <= REL * log["loss_u_0"]
            assert (int(terms.unmasked_correct), terms.num_unmasked) == (log["correct_u_0"], log["count_u_0"])
        else:
            assert terms.unmasked_ce_sum is None  # LARGE: skip_nomask
    ours, expected = _mapped_grads(ref, bundle, fairseq_grads, model, extra)
    worst = _assert_grads_close(ours, expected, grad_rel)
    print(f"{name} w_u={w_u} {dtype}: loss rel diff {abs(loss - fairseq_loss) / abs(fairseq_loss):.2e}, "
          f"worst gradient rel diff {worst:.2e}")


@pytest.mark.fairseq
def test_frame_padding_mask_is_fairseqs(tmp_path_factory):
    ref, _bundle = _converted("hubert_base_ls960", tmp_path_factory)
    lengths = torch.tensor([8000, 5123, 321, 7999])
    for frames in (24, 23, 17):
        padding = torch.arange(8000)[None, :] >= lengths[:, None]
        expected = ref.model.forward_padding_mask(torch.zeros(4, frames, 1), padding)
        assert torch.equal(hubert_frame_padding_mask(lengths, 8000, frames), expected)


@pytest.mark.fairseq
@pytest.mark.parametrize("seed", [0, 5])
def test_hubert_masks_use_apply_mask_arguments(seed, tmp_path_factory):
    """fairseq's HubertModel.apply_mask, drawing from a shared generator, makes the masks time_mask and
    then channel_mask make from the same generator."""
    ref, bundle = _converted("hubert_base_ls960", tmp_path_factory)
    model = ref.model
    masking = MaskingOptions.from_options({**bundle.config.pretrain_args, "mask_channel_prob": 0.3})
    padding = _padding([120, 97, 60], 120)
    x = torch.ones(3, 120, 768)
    with mock.patch.object(model, "mask_channel_prob", 0.3), _fairseq_rng(np.random.default_rng(seed)):
        x, mask = model.apply_mask(x, padding, None)
    rng = np.random.default_rng(seed)
    np.testing.assert_array_equal(time_mask((3, 120), padding, masking, rng=rng), mask.numpy())
    channels = channel_mask(3, 768, masking, rng=rng)
    np.testing.assert_array_equal(channels, (x == 0).all(dim=1).numpy())
    assert channels.any()


# ============================================================================================ accumulation


def _accumulated_grads(model: nn.Module, extra: Tensor, wav: Tensor, labels: Tensor, mask: Tensor,
                       groups: list[list[int]], weights: LossWeights, mode: str) -> dict[str, Tensor]:
    """Gradients of one step made of micro-batches ``groups`` (utterance indices), each its own forward and
    backward, with the step's totals counted from the masks beforehand."""
    model.zero_grad(set_to_none=True)
    extra.grad = None
    totals = StepTotals(0, 0, 0)
    for idx in groups:
        totals = totals + StepTotals.of_masks(mask[idx])
    seen = []
    for idx in groups:
        terms = hubert_loss_terms(hubert_forward(model, wav[idx], None, labels[idx], mask[idx],
                                                 extra_label_embeddings=extra))
        normalized_loss(terms, totals, weights, mode).backward()
        seen.append(terms)
    assert StepTotals.of(seen) == totals
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    grads["extra"] = extra.grad.clone()
    return grads


ACCUMULATION_SPLITS = [[[0], [1], [2], [3]], [[0, 1], [2, 3]], [[2], [0, 3, 1]]]


@pytest.mark.parametrize("mode", ["fairseq", "torchaudio", "per-term"])
@pytest.mark.parametrize("w_u", [0.0, 0.5])
def test_micro_batch_gradients_sum_to_the_big_batch_gradient(mode, w_u):
    """Equal lengths and fairseq's same-count masks: in every mode the step's gradient does not depend on how
    the batch is split (fairseq's and torchaudio's penalty weighting S_i / F_i is the same in each split)."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    extra = torch.rand(3, 16, generator=g).requires_grad_(True)
    wav = torch.randn(4, 4000, generator=g)
    frames = conv_output_frames([(16, 10, 5), (16, 3, 2), (16, 2, 2)], 4000)
    labels = torch.randint(0, 12, (4, frames), generator=g)
    mask = torch.from_numpy(time_mask((4, frames), None, MaskingOptions(mask_prob=0.8, mask_length=5),
                                             rng=np.random.default_rng(0)))
    assert len(set(mask.sum(1).tolist())) == 1  # fairseq's require_same_masks
    weights = LossWeights(1.0, w_u, 10.0)
    big = _accumulated_grads(model, extra, wav, labels, mask, [[0, 1, 2, 3]], weights, mode)
    for split in ACCUMULATION_SPLITS:
        _assert_grads_close(_accumulated_grads(model, extra, wav, labels, mask, split, weights, mode), big)


@pytest.mark.parametrize("w_u", [0.0, 0.5])
def test_per_term_gradients_are_split_invariant_for_any_mask_counts(w_u):
    model = _tiny_model(seed=3, feature_grad_mult=None)
    g = torch.Generator().manual_seed(2)
    extra = torch.rand(2, 16, generator=g).requires_grad_(True)
    wav = torch.randn(4, 3000, generator=g)
    frames = conv_output_frames([(16, 10, 5), (16, 3, 2), (16, 2, 2)], 3000)
    labels = torch.randint(0, 12, (4, frames), generator=g)
    mask = torch.from_numpy(compute_mask_indices((4, frames), None, 0.5, 5, min_masks=2, require_same_masks=False,
                                                 rng=np.random.default_rng(4)))
    mask[3] = False  # one utterance without masked frames
    assert len(set(mask.sum(1).tolist())) == 4
    weights = LossWeights(1.0, w_u, 10.0)
    big = _accumulated_grads(model, extra, wav, labels, mask, [[0, 1, 2, 3]], weights, "per-term")
    for split in ACCUMULATION_SPLITS:
        _assert_grads_close(_accumulated_grads(model, extra, wav, labels, mask, split, weights, "per-term"), big)


def test_fairseq_mode_weights_the_penalty_by_each_micro_batchs_sample_size():
    """With unequal masked counts, fairseq's penalty (w_p * pen_i * S_i summed, / S) is not the big batch's
    (w_p * pen * S / S): the formula fairseq's trainer applies across GPUs and accumulated batches."""
    pens = [torch.tensor(2.0, requires_grad=True), torch.tensor(5.0, requires_grad=True)]
    terms = [HubertLossTerms(torch.tensor(30.0), None, pens[0], 10, 40, 50, torch.tensor(0), torch.tensor(0)),
             HubertLossTerms(torch.tensor(6.0), None, pens[1], 2, 48, 50, torch.tensor(0), torch.tensor(0))]
    totals = StepTotals.of(terms)
    assert totals == StepTotals(12, 88, 100)
    loss = sum(normalized_loss(t, totals, LossWeights(), "fairseq") for t in terms)
    assert loss.item() == pytest.approx((30 + 6 + 10 * (2 * 10 + 5 * 2)) / 12)
    per_term = sum(normalized_loss(t, totals, LossWeights(), "per-term") for t in terms)
    assert per_term.item() == pytest.approx(36 / 12 + 10 * (2 + 5) / 2)


def test_torchaudio_mode_is_torchaudios_recipe_loss():
    """torchaudio's examples/hubert: (CE_m * w_m + CE_u * w_u + pen * w_p * n_m) / n_m."""
    terms = HubertLossTerms(torch.tensor(30.0), torch.tensor(50.0), torch.tensor(0.5), 10, 40, 50,
                            torch.tensor(0), torch.tensor(0))
    loss = normalized_loss(terms, StepTotals.of([terms]), LossWeights(1.0, 0.5, 10.0), "torchaudio")
    assert loss.item() == pytest.approx((30 + 0.5 * 50 + 0.5 * 10 * 10) / 10)
    fairseq = normalized_loss(terms, StepTotals.of([terms]), LossWeights(1.0, 0.5, 10.0), "fairseq")
    assert fairseq.item() == pytest.approx((30 + 0.5 * 50 + 0.5 * 10 * 50) / 50)


# ============================================================================================ edge cases


@pytest.mark.parametrize("mode", ["fairseq", "torchaudio", "per-term"])
@pytest.mark.parametrize("weights", [LossWeights(), LossWeights(1.0, 0.5, 10.0), LossWeights(0.0, 0.0, 0.0),
                                     LossWeights(0.0, 1.0, 0.0), LossWeights(1.0, 0.0, 0.0)])
@pytest.mark.parametrize("masked", ["none", "all", "some"])
def test_zero_weights_and_zero_counts_give_finite_losses_and_gradients(mode, weights, masked):
    model = _tiny_model(seed=2)
    g = torch.Generator().manual_seed(3)
    wav = torch.randn(2, 2000, generator=g)
    frames = conv_output_frames([(16, 10, 5), (16, 3, 2), (16, 2, 2)], 2000)
    labels = torch.randint(0, 12, (2, frames), generator=g)
    mask = torch.zeros(2, frames, dtype=torch.bool)
    if masked == "all":
        mask[:] = True
    elif masked == "some":
        mask[0, 3:9] = True
    terms = hubert_loss_terms(hubert_forward(model, wav, None, labels, mask))
    loss = normalized_loss(terms, StepTotals.of([terms]), weights, mode)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    if masked == "none" and mode == "torchaudio":
        assert loss.item() == 0.0  # every term is normalised by the (zero) masked count


def test_zero_step_totals_give_zero():
    terms = HubertLossTerms(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0, requires_grad=True), 0, 0, 0,
                            torch.tensor(0), torch.tensor(0))
    for mode in ("fairseq", "torchaudio", "per-term"):
        loss = normalized_loss(terms, StepTotals(0, 0, 0), LossWeights(1.0, 1.0, 10.0), mode)
        assert loss.item() == 0.0 and loss.requires_grad


def test_user_errors_are_named():
    model = _tiny_model()
    wav = torch.randn(2, 2000)
    frames = conv_output_frames([(16, 10, 5), (16, 3, 2), (16, 2, 2)], 2000)
    labels = torch.zeros(2, frames, dtype=torch.long)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 10\), expected \[batch=2, frames=\d+\]"):
        hubert_forward(model, wav, None, labels, torch.zeros(2, 10, dtype=torch.bool))
    out = hubert_forward(model, wav, None, labels, torch.ones(2, frames, dtype=torch.bool), skip_nomask=True)
    terms = hubert_loss_terms(out)
    with pytest.raises(ValueError, match="unmasked loss weight is 0.5 but the unmasked logits were skipped"):
        normalized_loss(terms, StepTotals.of([terms]), LossWeights(1.0, 0.5, 10.0))
    with pytest.raises(ValueError, match="unknown loss mode 'mean'"):
        normalized_loss(terms, StepTotals.of([terms]), mode="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be >= 0"):
        LossWeights(masked=-1.0)
    bad = labels.clone()
    bad[1, 7] = -100
    with pytest.raises(ValueError, match="label -100 at frame 7 of utterance 1 is not a cluster id \\(0..11\\)"):
        hubert_forward(model, wav, None, bad, torch.ones(2, frames, dtype=torch.bool))
    bad[1, 7] = 12
    with pytest.raises(ValueError, match="label 12 at frame 7 of utterance 1"):
        hubert_forward(model, wav, None, bad, torch.ones(2, frames, dtype=torch.bool))
    bad[1, 7] = 0
    bad[1, 80:] = -100  # padded frames may hold anything
    hubert_forward(model, wav, torch.tensor([2000, 1500]), bad, torch.ones(2, frames, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"extra_label_embeddings must be \[E, 16\]"):
        hubert_forward(model, wav, None, labels, torch.ones(2, frames, dtype=torch.bool),
                       extra_label_embeddings=torch.zeros(4, 8))


def test_frozen_extractor_and_labels_shorter_than_the_features():
    """feature_grad_mult=0 freezes the conv extractor (fairseq's semantics); labels shorter than the conv
    output trim the features, as fairseq's forward_targets does."""
    model = _tiny_model()
    wav = torch.randn(2, 2000)
    frames = conv_output_frames([(16, 10, 5), (16, 3, 2), (16, 2, 2)], 2000)
    labels = torch.zeros(2, frames - 3, dtype=torch.long)
    mask = torch.zeros(2, frames - 3, dtype=torch.bool)
    mask[:, 2:8] = True
    out = hubert_forward(model, wav, None, labels, mask, feature_grad_mult=0.0)
    assert out.num_feature_frames == 2 * (frames - 3)
    assert out.logits_masked.shape == (12, 12) and out.logits_unmasked.shape == (2 * (frames - 3) - 12, 12)
    normalized_loss(hubert_loss_terms(out), StepTotals.of_masks(mask), LossWeights(1.0, 0.5, 10.0)).backward()
    assert all(p.grad is None for p in model.wav2vec2.feature_extractor.parameters())
    assert model.logit_generator.final_proj.weight.grad is not None


def test_conv_output_frames_is_the_extractors():
    model = _tiny_model()
    for n in (400, 1999, 2000, 16000):
        feats, _ = model.wav2vec2.feature_extractor(torch.zeros(1, n), None)
        assert conv_output_frames([(16, 10, 5), (16, 3, 2), (16, 2, 2)], n) == feats.shape[1]


def test_logits_and_losses_stay_fp32_under_bf16_autocast():
    model = _tiny_model()
    wav = torch.randn(2, 2000)
    frames = conv_output_frames([(16, 10, 5), (16, 3, 2), (16, 2, 2)], 2000)
    mask = torch.zeros(2, frames, dtype=torch.bool)
    mask[:, 10:40] = True
    extra = torch.rand(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hubert_forward(model, wav, None, torch.zeros(2, frames, dtype=torch.long), mask,
                             extra_label_embeddings=extra)
        terms = hubert_loss_terms(out)
        loss = normalized_loss(terms, StepTotals.of([terms]), LossWeights(1.0, 0.5, 10.0), "per-term")
    assert out.logits_masked.dtype == out.feature_penalty.dtype == loss.dtype == torch.float32
    assert out.logits_masked.shape == (60, 16)
    loss.backward()
    assert torch.isfinite(extra.grad).all() and extra.grad.abs().sum() > 0
