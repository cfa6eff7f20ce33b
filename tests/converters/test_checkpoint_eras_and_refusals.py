"""Checkpoint shapes not covered by the trainer-saved fixtures: enum-holding plain-dict configs, several label
sets, dictionaries whose cluster symbols are missing, and the import boundaries of the packages."""

from __future__ import annotations

import enum
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.reference import require
from bundles.loading import load_bundle
from converters.convert import convert_checkpoint
from converters.errors import ConversionError
from converters.families.hubert import label_rows
from converters.fairseq_checkpoint import LabelDictionary, read_fairseq_checkpoint

DEMO = Path(__file__).resolve().parents[2] / "continue_pt" / "demo_assets" / "tiny_hubert.pt"


def _demo_checkpoint() -> dict:
    return torch.load(DEMO, weights_only=False)  # the test suite's own trusted asset


@pytest.mark.fairseq
def test_plain_dict_config_holding_fairseq_enum_members(tmp_path, monkeypatch):
    """2021 checkpoints could keep fairseq ChoiceEnum members in the plain-dict cfg; they pickle as
    ``fairseq.dataclass.constants.Choices(value)``."""
    constants = require("fairseq.dataclass.constants")

    class Choices(enum.Enum):
        default = "default"
        static = "static"

    Choices.__module__, Choices.__qualname__ = constants.__name__, "Choices"
    monkeypatch.setattr(constants, "Choices", Choices, raising=False)
    ckpt = _demo_checkpoint()
    ckpt["cfg"]["model"]["extractor_mode"] = Choices.default
    ckpt["cfg"]["model"]["mask_selection"] = Choices.static
    path = tmp_path / "enum_era.pt"
    torch.save(ckpt, path)
    assert b"fairseq.dataclass.constants" in path.read_bytes()
    with read_fairseq_checkpoint(path) as read:
        assert read.cfg["model"]["extractor_mode"] == "default"
    bundle = load_bundle(convert_checkpoint(path, tmp_path / "b"))
    assert bundle.config.encoder_args["extractor_mode"] == "group_norm"
    assert bundle.config.pretrain_args["mask_selection"] == "static"


def test_several_label_sets_are_refused_clearly(tmp_path):
    ckpt = _demo_checkpoint()
    ckpt["cfg"]["task"]["labels"] = ["km", "phn"]
    path = tmp_path / "two_label_sets.pt"
    torch.save(ckpt, path)
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(path, tmp_path / "b")
    assert "2 label sets ['km', 'phn']" in str(err.value)


def test_checkpoint_without_task_state_assumes_fairseqs_default_dictionary_and_says_so(tmp_path):
    ckpt = _demo_checkpoint()
    del ckpt["task_state"]
    path = tmp_path / "no_task_state.pt"
    torch.save(ckpt, path)
    bundle = load_bundle(convert_checkpoint(path, tmp_path / "b"))
    assert bundle.config.label_dictionary["assumed_default_order"] is True
    rows = bundle.config.label_dictionary["cluster_rows"]
    assert rows == [c + 4 for c in range(20)]


def test_label_rows_follow_the_symbols_not_the_position():
    symbols = ["<s>", "<pad>", "</s>", "<unk>", "2", "0", "madeupword0000", "1", "03"]
    rows, others, k = label_rows(LabelDictionary(symbols, nspecial=4, unk_index=3), len(symbols))
    assert k == 3 and rows == [5, 7, 4]
    assert others == [0, 1, 2, 3, 6, 8]  # "03" is not a cluster id


def test_cluster_missing_from_the_dictionary_maps_to_unk_like_fairseq():
    symbols = ["<s>", "<pad>", "</s>", "<unk>", "0", "2"]
    rows, _others, k = label_rows(LabelDictionary(symbols, nspecial=4, unk_index=3), len(symbols))
    assert k == 3 and rows == [4, 3, 5]


@pytest.mark.slow
@pytest.mark.parametrize("package", ["bundles", "bundles.loading", "bundles.kmeans", "bundles.catalogue"])
def test_bundles_imports_neither_fairseq_nor_sklearn_nor_converters(package):
    code = (f"import sys, {package}; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('fairseq', 'sklearn', 'joblib', 'converters', 'continue_pt', 'omegaconf')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_converters_do_not_import_fairseq_or_sklearn():
    code = ("import sys, converters, converters.describe; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('fairseq', 'sklearn', 'joblib', 'omegaconf', 'continue_pt')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_training_bookkeeping_with_numpy_values_does_not_block_conversion(tmp_path):
    import numpy as np

    ckpt = _demo_checkpoint()
    ckpt["extra_state"]["metrics"] = {"train": [(0, "loss", "AverageMeter",
                                                 {"val": np.float64(2.5), "sum": np.arange(3.0), "count": 4})]}
    ckpt["last_optimizer_state"] = {"state": {0: {"exp_avg": torch.zeros(3), "shape": torch.Size([3, 4])}}}
    path = tmp_path / "with_metrics.pt"
    torch.save(ckpt, path)
    bundle = load_bundle(convert_checkpoint(path, tmp_path / "b"))
    assert bundle.num_updates == 1000
