"""data2vec 2.0's targets, regression loss and EMA update equal fairseq's (its own data2vec 2.0 code as reference)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.reference import require

require("fairseq")

from bundles.loading import load_bundle  # noqa: E402
from continue_pt.data2vec2.ema import annealed_rate, ema_decay_at, ema_update  # noqa: E402
from continue_pt.data2vec2.objective import elementwise_loss, make_targets, regression_loss  # noqa: E402
from converters.convert import convert_checkpoint  # noqa: E402
from converters.families import data2vec2  # noqa: E402
from tests.data2vec2_reference import (  # noqa: E402
    build_data2vec2_model,
    data2vec2_modules,
    load_data2vec2_config,
    save_data2vec2_checkpoint,
    shrunk,
)

pytestmark = pytest.mark.fairseq

GRAD_TOLERANCE = 2e-5
NORM_FLAGS = ("instance_norm_target_layer", "layer_norm_target_layer", "batch_norm_target_layer",
              "instance_norm_targets", "layer_norm_targets")


def _fairseq_model_class():
    return data2vec2_modules().data2vec2.Data2VecMultiModel


@pytest.mark.parametrize("flags", [
    {"instance_norm_target_layer": True},  # the published configs
    {},
    {"layer_norm_target_layer": True, "layer_norm_targets": True},
    {"batch_norm_target_layer": True, "instance_norm_targets": True},
], ids=["published", "none", "layer_norms", "batch_instance"])
@pytest.mark.parametrize("top_k", [1, 3])
def test_targets_equal_fairseqs(flags, top_k):
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(2, 11, 8, generator=g) * (i + 1) + i for i in range(4)]
    cfg = SimpleNamespace(**{name: flags.get(name, False) for name in NORM_FLAGS})
    theirs = _fairseq_model_class().make_targets(SimpleNamespace(cfg=cfg), [t.clone() for t in layers], top_k)
    ours = make_targets(layers, top_k, **flags)
    assert torch.equal(ours, theirs)
    assert torch.equal(layers[-1], layers[-1].clone())  # the teacher's tensors are left as they were


@pytest.mark.parametrize(("beta", "scale"), [(0.0, None), (0.25, None), (0.0, 2.0)])
def test_elementwise_loss_equals_fairseqs(beta, scale):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 7, 16, generator=g), torch.randn(5, 7, 16, generator=g)
    theirs = _fairseq_model_class().d2v_loss(SimpleNamespace(loss_beta=beta, loss_scale=scale), x, y)
    assert torch.equal(elementwise_loss(x, y, beta, scale), theirs)


def test_regression_loss_sums_the_masked_frames_of_every_copy():
    g = torch.Generator().manual_seed(2)
    targets = torch.randn(2, 6, 4, generator=g)
    prediction = torch.randn(6, 6, 4, generator=g)  # 2 utterances x 3 copies
    mask = torch.rand(6, 6, generator=g) < 0.5
    out = regression_loss(prediction, targets, mask, clone_batch=3)
    expected = sum(((prediction[i][mask[i]] - targets[i // 3][mask[i]]) ** 2).sum() / 2.0 for i in range(6))
    assert torch.allclose(out.loss, expected) and out.sample_size == mask.sum()


def test_annealed_decay_follows_fairseqs_schedule():
    base = data2vec2_modules().base
    for step in (0, 1, 30000, 74999, 75000, 400000):
        assert annealed_rate(0.999, 0.99999, step, 75000) == base.get_annealed_rate(0.999, 0.99999, step, 75000)
    assert ema_decay_at(75000, 0.999, 0.99999, 75000) == 0.99999
    assert ema_decay_at(10, 0.9997, 0.9997, 300000) == 0.9997
    assert ema_decay_at(10**6, 0.9997, 1.0, 300000) == 1.0


@pytest.fixture
def reference_and_bundle(tmp_path_factory):
    """A fresh pair for each test: the EMA test moves fairseq's model in place."""
    name = "data2vec2_base_libri"
    ref = build_data2vec2_model(name, seed=5, stored=shrunk(load_data2vec2_config(name)))
    work = tmp_path_factory.mktemp("d2v_ema")
    save_data2vec2_checkpoint(ref, work / "ck.pt", num_updates=29999)
    return ref, load_bundle(convert_checkpoint(work / "ck.pt", work / "bundle"))


@pytest.mark.slow
@pytest.mark.parametrize("num_updates", [30000, 80000])
def test_ema_update_equals_fairseqs_bit_for_bit(reference_and_bundle, num_updates):
    """After an optimizer step moved the student, fairseq's set_num_updates(n) and ema_update(decay at n) give the
    same teacher, tensor for tensor (annealed decay at 30k, the end decay 0.99999 at 80k)."""
    ref, bundle = reference_and_bundle
    model = ref.model
    ours = bundle.get_pretrain_model()
    student_state = {k: v for k, v in model.state_dict().items() if k != "_ema"}
    mapping = data2vec2.PRETRAIN_KEY_MAP.classify(student_state).mapped
    ours_params = dict(ours.named_parameters())
    g = torch.Generator().manual_seed(num_updates)
    with torch.no_grad():  # the optimizer step: the same change in both students
        for name, param in model.named_parameters():
            delta = torch.randn(param.shape, generator=g) * 0.01
            param.add_(delta)
            ours_params[mapping[name]].add_(delta)
    teacher_before = {k: v.clone() for k, v in model.ema.fp32_params.items()}
    model.train()
    model.num_updates = num_updates - 1
    model.set_num_updates(num_updates)
    objective = bundle.config.objective
    decay = ema_decay_at(num_updates, objective["ema_decay"], objective["ema_end_decay"],
                         objective["ema_anneal_end_step"])
    assert decay == model.ema.get_decay() < 1
    assert ema_update(ours.teacher, ours.student.encoder, decay)
    teacher_map = data2vec2.PRETRAIN_KEY_MAP.classify({f"_ema.{k}": v for k, v in teacher_before.items()}).mapped
    ours_state = ours.state_dict()
    moved = 0
    for key, value in model.ema.fp32_params.items():
        assert torch.equal(ours_state[teacher_map[f"_ema.{key}"]], value), key
        moved += not torch.equal(value, teacher_before[key])
    assert moved == len(teacher_before)  # every teacher tensor moved, so the comparison means something
    model.eval()


def test_a_decay_of_one_leaves_the_teacher_frozen(reference_and_bundle):
    _, bundle = reference_and_bundle
    ours = bundle.get_pretrain_model()
    before = {k: v.clone() for k, v in ours.teacher.state_dict().items()}
    with torch.no_grad():
        for p in ours.student.parameters():
            p.add_(1.0)
    assert ema_update(ours.teacher, ours.student.encoder, 1.0) is False
    assert all(torch.equal(before[k], v) for k, v in ours.teacher.state_dict().items())


# --------------------------------------------------------------------------------------------- the whole loss


@pytest.fixture(scope="module")
def deterministic_pair(tmp_path_factory):
    """A shrunk BASE model whose mask tokens are zeros (``mask_noise_std`` 0: fairseq draws them from the global RNG
    in its own order), as fairseq model and as bundle."""
    name = "data2vec2_base_libri"
    stored = shrunk(load_data2vec2_config(name))
    stored["model"]["modalities"]["audio"]["mask_noise_std"] = 0.0
    ref = build_data2vec2_model(name, seed=6, stored=stored)
    work = tmp_path_factory.mktemp("d2v_loss")
    save_data2vec2_checkpoint(ref, work / "ck.pt", num_updates=1234)
    return ref, load_bundle(convert_checkpoint(work / "ck.pt", work / "bundle"))


@pytest.mark.slow
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_masks_loss_and_every_gradient_equal_fairseqs(deterministic_pair, padded):
    """fairseq's Data2VecMultiModel.forward (clone_batch 8 copies seeded with MaskSeed(seed, num_updates, ids), the
    EMA teacher's instance-normalised top-k targets, the conv decoder, the scaled L2 loss over masked frames) and
    ours on the same batch: the same masks, loss and sample size, and the same gradient for every student and decoder
    tensor."""
    from continue_pt.data2vec2.masking import clone_masks
    from continue_pt.data2vec2.objective import Data2Vec2Objective, data2vec2_loss
    from tests.data2vec2_reference import prepare

    ref, bundle = deterministic_pair
    model = ref.model
    model.eval()
    model.zero_grad()
    model.num_updates = 1234
    g = torch.Generator().manual_seed(7)
    wav = torch.randn(2, 8000, generator=g) * torch.tensor([[0.1], [3.0]])
    lengths = torch.tensor([8000, 6100]) if padded else None
    source, sample_padding = prepare(wav, lengths)
    ids = torch.tensor([3, 11])
    captured = []
    encoder = ref.audio_encoder
    original = encoder.make_maskinfo
    encoder.make_maskinfo = lambda x, mask, shape=None: captured.append(mask.clone()) or original(x, mask, shape)
    try:
        result = model(source=source, padding_mask=sample_padding, id=ids)
    finally:
        del encoder.make_maskinfo
    their_loss = sum(v.float().sum() for v in result["losses"].values())
    their_loss.backward()

    ours = bundle.get_pretrain_model().eval()
    cfg = bundle.config
    objective = cfg.objective
    with torch.no_grad():
        features, frame_lengths = ours.student.local_features(source, lengths)
    frames = features.shape[1]
    frame_padding = None if lengths is None else torch.arange(frames)[None, :] >= frame_lengths[:, None]
    mask = clone_masks(frame_padding, frames, ids, clone_batch=objective["clone_batch"],
                       mask_prob=objective["mask_prob"], mask_length=objective["mask_length"],
                       seed=objective["seed"], update=1234, mask_dropout=objective["mask_dropout"],
                       add_masks=objective["add_masks"])
    assert len(captured) == 1 and torch.equal(mask, captured[0].bool())
    assert mask.shape[0] == 2 * objective["clone_batch"] == 16
    options = Data2Vec2Objective.from_bundle(objective, cfg.pretrain_args["decoder"])
    out = data2vec2_loss(ours, source, lengths, mask, options)
    assert int(out.sample_size) == int(result["sample_size"]) == int(mask.sum())
    assert torch.allclose(out.loss, their_loss, rtol=1e-5, atol=1e-5), (out.loss, their_loss)
    out.loss.backward()

    mapping = data2vec2.PRETRAIN_KEY_MAP.classify({k: v for k, v in model.state_dict().items() if k != "_ema"}).mapped
    our_params = dict(ours.named_parameters())
    checked, worst = 0, 0.0
    for name, param in model.named_parameters():
        theirs, mine = param.grad, our_params[mapping[name]].grad
        assert theirs is not None and mine is not None, name
        # float32 sums in another order: equal to ~1e-6 of the gradient's own scale (a wrong term is O(1) of it)
        error = float((mine - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12))
        worst = max(worst, error)
        assert error <= GRAD_TOLERANCE, (name, error)
        checked += 1
    assert checked == len(mapping) - sum(k.startswith("_ema.") for k in mapping)
    assert all(p.grad is None for p in ours.teacher.parameters())
    print(f"worst relative gradient difference {worst:.2e}")


@pytest.mark.parametrize("options", [{}, {"mask_dropout": 0.2}, {"add_masks": True}], ids=["plain", "dropout", "add"])
def test_seeded_masks_equal_fairseqs_compute_mask_indices(options):
    from fairseq.data.data_utils import compute_mask_indices

    from continue_pt.data2vec2.masking import clone_ids, seeded_span_mask

    padding = torch.zeros(6, 50, dtype=torch.bool)
    padding[3:, 37:] = True
    ids = clone_ids(torch.tensor([5, 9]), seed=1, clone_batch=3)
    assert ids[0] == 5 and ids[3] == 9 and len(set(ids.tolist())) == 6
    theirs = compute_mask_indices((6, 50), padding, 0.5, 5, min_masks=1, require_same_masks=True, seed=1, epoch=77,
                                  indices=ids, **options)
    ours = seeded_span_mask((6, 50), padding, 0.5, 5, seed=1, update=77, ids=ids, **options)
    assert (ours == theirs).all() and ours.any()
    # fairseq's add_masks fills rows up from every unmasked frame, padding included; the spans never touch padding
    assert options.get("add_masks") or not (ours & padding.numpy()).any()


@pytest.mark.slow
def test_the_teacher_runs_in_eval_mode_without_gradients(deterministic_pair):
    """In train mode (dropout in the student and decoder) the teacher still makes the same targets: it runs in eval
    mode, like fairseq's, and gets no gradient."""
    from continue_pt.data2vec2.masking import clone_masks
    from continue_pt.data2vec2.objective import Data2Vec2Objective, data2vec2_loss

    _, bundle = deterministic_pair
    model = bundle.get_pretrain_model()
    assert model.training
    options = Data2Vec2Objective.from_bundle(bundle.config.objective, bundle.config.pretrain_args["decoder"])
    wav = torch.randn(2, 8000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        frames = model.student.local_features(wav)[0].shape[1]
    mask = clone_masks(None, frames, torch.tensor([0, 1]), clone_batch=options.clone_batch, mask_prob=0.5,
                       mask_length=5, seed=1, update=10)
    data2vec2_loss(model, wav, None, mask, options).loss.backward()
    assert not model.teacher.training and model.student.training
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
