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
