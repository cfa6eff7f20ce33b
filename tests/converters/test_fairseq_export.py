"""`continue-pt export --to fairseq`: a bundle written back as a fairseq checkpoint.

fairseq-fixed loads the exported file with its own ``checkpoint_utils.load_model_ensemble_and_task`` (nothing but
the file) and reproduces the bundle's outputs layer by layer; HuBERT's ``HubertCriterion`` on the loaded model gives
the kit's loss on the bundle. Round trips: fairseq ``.pt`` -> bundle -> ``.pt`` gives the same tensors (bit for bit,
same names), configuration, dictionaries and updates for every stored configuration and pickle era; bundle -> ``.pt``
-> bundle gives the same bundle. The streamed file is, byte for byte, what ``torch.save`` writes for the same checkpoint
with every tensor in memory (the former path), for every configuration and era.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.reference import require

require("fairseq")

from bundles.loading import load_bundle  # noqa: E402
from converters.convert import convert_checkpoint  # noqa: E402
from converters.fairseq_checkpoint import read_fairseq_checkpoint  # noqa: E402
from converters.fairseq_export import export_fairseq  # noqa: E402
from converters.families import hubert, wav2vec2  # noqa: E402
from converters.families.reverse_map import IrreversibleRule, reverse_key_map, reverse_rule  # noqa: E402
from tests import fairseq_reference as fr  # noqa: E402
from tests.converters.test_fairseq_export_streaming import assert_same_file, in_memory_export  # noqa: E402

pytestmark = pytest.mark.fairseq

TOLERANCE = {"hubert": 3e-5, "wav2vec2": 1.5e-5}  # the per-layer tolerances of tests/converters/test_convert_parity.py
NUM_UPDATES = 4321


def _with_model(ref: fr.FairseqReference, model: torch.nn.Module) -> fr.FairseqReference:
    return fr.FairseqReference(ref.name, ref.family, ref.fine_tuned, model, ref.cfg, ref.task_state, ref.dictionary)


def _audio(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16000, generator=torch.Generator().manual_seed(seed)) * 0.5


def _fairseq_load(path, monkeypatch) -> torch.nn.Module:
    """fairseq's own loader, given nothing but the file (torch >= 2.6 needs weights_only off for fairseq's pickles)."""
    from fairseq import checkpoint_utils

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with fr.skip_weight_init():  # every weight is loaded from the file right after construction
        models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(path)], strict=True)
    return models[0].eval()


_EXPORTED: dict[str, tuple] = {}


def _exported(name: str, tmp_path_factory):
    """(fairseq reference, bundle converted from its checkpoint, the bundle exported back to fairseq); once each."""
    if name not in _EXPORTED:
        work = tmp_path_factory.mktemp(f"export-{name}")
        ref = fr.build_fairseq_model(name, num_layers=2, seed=1, shuffle_dictionary=True)
        fr.save_checkpoint(ref, work / "source.pt", "dict", num_updates=NUM_UPDATES)
        bundle_dir = convert_checkpoint(work / "source.pt", work / "bundle")
        _EXPORTED[name] = ref, load_bundle(bundle_dir), export_fairseq(bundle_dir, work / "exported.pt")
    return _EXPORTED[name]


# -- fairseq loads it and computes what the bundle computes ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["hubert_base_ls960", "wav2vec_small", "wav2vec_small_960h"])
def test_fairseq_loads_the_export_and_matches_the_bundle_layer_by_layer(name, tmp_path_factory, monkeypatch):
    ref, bundle, out = _exported(name, tmp_path_factory)
    model = _fairseq_load(out, monkeypatch)
    loaded = _with_model(ref, model)
    for key, value in ref.model.state_dict().items():  # the very weights fairseq saved, under fairseq's names
        assert torch.equal(model.state_dict()[key], value), key
    wav = _audio()
    expected = fr.fairseq_layer_outputs(loaded, wav)
    with torch.no_grad():
        actual, _ = bundle.get_model().extract_features(wav)
    assert len(actual) == len(expected) == 2
    for layer, (a, e) in enumerate(zip(actual, expected), start=1):
        assert (a - e).abs().max().item() <= TOLERANCE[bundle.family], f"layer {layer}"
    if ref.fine_tuned:
        with torch.no_grad():
            logits, _ = bundle.get_model()(wav)
        assert (logits - fr.fairseq_ctc_logits(loaded, wav)).abs().max().item() <= 4 * TOLERANCE[bundle.family]
    if name == "hubert_base_ls960":  # the dictionary came from the file: shuffled rows, cluster logits in place
        assert model.num_classes == [len(ref.dictionary)]
        mask = torch.zeros(1, 49, dtype=torch.bool)
        mask[0, 5:15] = True
        theirs = fr.fairseq_hubert_logits(loaded, wav, mask)
        assert torch.equal(theirs, fr.fairseq_hubert_logits(ref, wav, mask))


@pytest.mark.slow
def test_hubert_criterion_on_the_export_gives_the_kits_loss_on_the_bundle(tmp_path_factory, monkeypatch):
    from continue_pt.hubert.loss import LossWeights
    from tests.continue_pt.test_hubert_objective import (REL, _batch, _fairseq_step, _mapped_grads, _no_dropout,
                                                         _our_step, _targets_some_correct)

    ref, bundle, out = _exported("hubert_base_ls960", tmp_path_factory)
    loaded = _with_model(ref, _no_dropout(_fairseq_load(out, monkeypatch)))
    batches = [_batch(loaded, bundle, [6400, 4400], 6400, None, seed=10)]
    _targets_some_correct(bundle, batches[0])
    fairseq_loss, fairseq_size, _logs, fairseq_grads = _fairseq_step(loaded, batches, 0.5, torch.float64)
    loss, totals, _terms, model, extra = _our_step(bundle, batches, LossWeights(1.0, 0.5, 10.0), torch.float64)
    assert totals.num_masked + totals.num_unmasked == fairseq_size
    assert abs(loss - fairseq_loss) <= REL * abs(fairseq_loss)
    ours, expected = _mapped_grads(loaded, bundle, fairseq_grads, model, extra)
    for key in ("logit_generator.label_embeddings", "extra_label_embeddings", "logit_generator.final_proj.weight"):
        assert (ours[key] - expected[key]).norm() <= 1e-5 * expected[key].norm(), key


# -- round trips ----------------------------------------------------------------------------------------------------

_REFS: dict[str, fr.FairseqReference] = {}


def _small_ref(name: str) -> fr.FairseqReference:
    """One encoder layer and 50 clusters: the round trips are about names and bytes, not depth."""
    if name not in _REFS:
        _REFS[name] = fr.build_fairseq_model(name, num_layers=1, seed=2, shuffle_dictionary=True, num_clusters=50)
    return _REFS[name]


def _read(path):
    """(tensors, cfg, task dictionaries' states, num_updates, era) through our own allow-list reader."""
    with read_fairseq_checkpoint(path) as ckpt:
        tensors = {k: v.load() for k, v in ckpt.state.items()}
        dictionaries = [d.state for d in ckpt.dictionaries]
        return tensors, ckpt.cfg, (ckpt.task_state_key, dictionaries), ckpt.num_updates, ckpt.era


@pytest.mark.slow
@pytest.mark.parametrize("era", fr.ERAS)
@pytest.mark.parametrize("name", fr.CONFIG_NAMES)
def test_fairseq_to_bundle_to_fairseq_is_bit_identical(name, era, tmp_path):
    ref = _small_ref(name)
    fr.save_checkpoint(ref, tmp_path / "source.pt", era, num_updates=NUM_UPDATES)
    bundle_dir = convert_checkpoint(tmp_path / "source.pt", tmp_path / "bundle")
    out = export_fairseq(bundle_dir, tmp_path / "exported.pt")
    assert_same_file(out, in_memory_export(bundle_dir, tmp_path / "in_memory.pt"))
    tensors, cfg, task_state, updates, _ = _read(tmp_path / "source.pt")
    tensors2, cfg2, task_state2, updates2, era2 = _read(out)
    assert era2 == "dict"
    assert tensors.keys() == tensors2.keys()
    for key, value in tensors.items():
        assert value.dtype == tensors2[key].dtype and torch.equal(value, tensors2[key]), key
    assert cfg2 == cfg
    assert task_state2 == task_state
    assert updates2 == updates == NUM_UPDATES


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hubert_base_ls960", "libri960_big", "hubert_large_ll60k_finetune_ls960"])
def test_bundle_to_fairseq_to_bundle_is_identical(name, tmp_path):
    ref = _small_ref(name)
    fr.save_checkpoint(ref, tmp_path / "source.pt", "dict", num_updates=NUM_UPDATES)
    first = convert_checkpoint(tmp_path / "source.pt", tmp_path / "first")
    export_fairseq(first, tmp_path / "exported.pt")
    second = convert_checkpoint(tmp_path / "exported.pt", tmp_path / "second")
    a, b = load_bundle(first), load_bundle(second)
    for tensors_a, tensors_b in ((a.state_dict(), b.state_dict()), (a.fairseq_extras(), b.fairseq_extras())):
        assert tensors_a.keys() == tensors_b.keys()
        assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    config_a = json.loads((first / "config.json").read_text())
    config_b = json.loads((second / "config.json").read_text())
    # the source file (its name and checksum) is the one thing that differs
    for config in (config_a, config_b):
        config["provenance"].pop("source_file")
        config["provenance"].pop("sha256")
    assert config_a == config_b


def test_reverse_rules_are_derived_from_the_forward_tables():
    for family in (hubert, wav2vec2):
        for key_map in (family.PRETRAIN_KEY_MAP, family.CTC_KEY_MAP):
            reverse = reverse_key_map(key_map)
            assert len(reverse.rules) == len(key_map.rules)
    assert reverse_rule((r"encoder\.layers\.(\d+)\.fc(1|2)\.(weight|bias)", r"t.\3.\1.x\2")) == \
        (r"t\.(weight|bias)\.(\d+)\.x(1|2)", r"encoder.layers.\2.fc\3.\1")
    with pytest.raises(IrreversibleRule):
        reverse_rule((r"a\.(\d+)\.b", "c"))  # the group is dropped: the source key cannot be rebuilt
    with pytest.raises(IrreversibleRule):
        reverse_rule((r"a.*\.(\d+)", r"c.\1"))  # regex syntax outside a group
