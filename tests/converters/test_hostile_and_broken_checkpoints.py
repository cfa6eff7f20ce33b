"""Hostile pickles are refused before anything runs; broken files give one clear error; nothing half-written remains."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from converters.convert import convert_checkpoint
from converters.errors import ConversionError
from converters.fairseq_checkpoint import read_fairseq_checkpoint

DEMO = Path(__file__).resolve().parents[2] / "continue_pt" / "demo_assets" / "tiny_hubert.pt"


class _Payload:
    """Unpickling this runs ``func(*args)`` (if anything ever calls it)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _canary(tmp_path: Path) -> Path:
    return tmp_path / "CANARY"


def _payloads(canary: Path) -> dict[str, tuple[object, str]]:
    return {
        "os.system": (_Payload(os.system, f"touch {canary}"), "posix.system"),
        "exec": (_Payload(exec, f"open({str(canary)!r}, 'w').close()"), "__builtin__.exec"),  # torch.save uses pickle protocol 2
        "subprocess": (_Payload(subprocess.call, ["touch", str(canary)]), "commands.call"),  # protocol 2 writes the Python 2 module name
        "eval": (_Payload(eval, f"open({str(canary)!r}, 'w')"), "__builtin__.eval"),
    }


def _minimal_checkpoint(**overrides) -> dict:
    base = {"cfg": {"model": {"_name": "hubert"}, "task": {}}, "model": {"w": torch.zeros(2)},
            "optimizer_history": [{"num_updates": 1}], "task_state": {}}
    base.update(overrides)
    return base


def _assert_refused(path: Path, canary: Path, global_name: str, tmp_path: Path) -> None:
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(path, tmp_path / "out")
    message = str(err.value)
    assert str(path) in message
    assert global_name in message and "refused" in message
    assert not canary.exists(), "pickled code ran"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("payload", ["os.system", "exec", "subprocess", "eval"])
@pytest.mark.parametrize("where", ["cfg", "task_state", "model", "extra_state"])
def test_hostile_zip_checkpoint_is_refused_and_nothing_runs(tmp_path, payload, where):
    canary = _canary(tmp_path)
    obj, global_name = _payloads(canary)[payload]
    if where == "model":
        ckpt = _minimal_checkpoint(model={"w": obj})
    elif where == "task_state":
        ckpt = _minimal_checkpoint(task_state={"dictionaries": [obj]})
    else:
        ckpt = _minimal_checkpoint(**{where: obj})
    path = tmp_path / "evil.pt"
    torch.save(ckpt, path)
    _assert_refused(path, canary, global_name, tmp_path)


@pytest.mark.parametrize("payload", ["os.system", "subprocess"])
def test_hostile_legacy_format_checkpoint_is_refused(tmp_path, payload):
    canary = _canary(tmp_path)
    obj, global_name = _payloads(canary)[payload]
    path = tmp_path / "evil_legacy.pt"
    torch.save(_minimal_checkpoint(cfg=obj), path, _use_new_zipfile_serialization=False)
    _assert_refused(path, canary, global_name, tmp_path)


def test_forged_zip_with_hostile_data_pkl_is_refused(tmp_path):
    canary = _canary(tmp_path)
    obj, global_name = _payloads(canary)["os.system"]
    path = tmp_path / "forged.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"model": {}, "cfg": obj}, protocol=2))
        z.writestr("archive/version", "3\n")
    _assert_refused(path, canary, global_name, tmp_path)


def test_hostile_pickle_in_the_legacy_header_is_refused(tmp_path):
    canary = _canary(tmp_path)
    obj, global_name = _payloads(canary)["os.system"]
    path = tmp_path / "evil_header.pt"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    _assert_refused(path, canary, global_name, tmp_path)


def test_weights_only_bypass_style_reduce_is_refused(tmp_path):
    """A pickle that calls an allowed-looking torch helper it is not given (a classic weights_only bypass route)."""
    canary = _canary(tmp_path)
    path = tmp_path / "bypass.pt"
    torch.save(_minimal_checkpoint(cfg=_Payload(torch.load, str(canary))), path)
    _assert_refused(path, canary, "torch.serialization.load", tmp_path)


# -- broken files -------------------------------------------------------------------------------------------

def _error_for(path: Path, tmp_path: Path) -> str:
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert str(path) in str(err.value)
    return str(err.value)


def test_missing_file(tmp_path):
    assert "no such file" in _error_for(tmp_path / "nope.pt", tmp_path)


def test_directory_instead_of_file(tmp_path):
    (tmp_path / "d").mkdir()
    assert "directory" in _error_for(tmp_path / "d", tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert "empty" in _error_for(path, tmp_path)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(os.urandom(4096))
    assert "not a readable PyTorch checkpoint" in _error_for(path, tmp_path)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_checkpoint(tmp_path, fraction):
    data = DEMO.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    message = _error_for(path, tmp_path)
    assert "truncated" in message or "not a readable PyTorch checkpoint" in message


def test_truncated_legacy_checkpoint(tmp_path):
    buf = io.BytesIO()
    torch.save(_minimal_checkpoint(model={"w": torch.randn(1000)}), buf, _use_new_zipfile_serialization=False)
    path = tmp_path / "truncated_legacy.pt"
    path.write_bytes(buf.getvalue()[:-100])
    assert "truncated" in _error_for(path, tmp_path)


def test_plain_pickle_that_is_not_torch(tmp_path):
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    assert "not one written by torch.save" in _error_for(path, tmp_path)


def test_torch_file_that_is_not_a_fairseq_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    assert "not a fairseq checkpoint" in _error_for(path, tmp_path)


def test_unknown_architecture(tmp_path):
    path = tmp_path / "lm.pt"
    torch.save(_minimal_checkpoint(cfg={"model": {"_name": "transformer_lm"}, "task": {}}), path)
    message = _error_for(path, tmp_path)
    assert "unknown architecture 'transformer_lm'" in message and "HuBERT and wav2vec 2.0" in message


def test_wrong_shape_tensor_is_reported_with_its_name(tmp_path):
    ckpt = torch.load(DEMO, weights_only=False)  # the test's own trusted asset
    ckpt["model"]["encoder.layers.0.fc1.weight"] = torch.zeros(7, 64)
    path = tmp_path / "wrong_shape.pt"
    torch.save(ckpt, path)
    message = _error_for(path, tmp_path)
    assert "encoder.transformer.layers.0.feed_forward.intermediate_dense.weight" in message
    assert "[7, 64]" in message


def test_all_problems_are_reported_together(tmp_path):
    ckpt = torch.load(DEMO, weights_only=False)
    ckpt["model"]["encoder.layers.0.fc1.weight"] = torch.zeros(7, 64)
    ckpt["model"]["surprise.weight"] = torch.zeros(1)
    ckpt["cfg"]["model"]["activation_fn"] = "relu"
    path = tmp_path / "many.pt"
    torch.save(ckpt, path)
    message = _error_for(path, tmp_path)
    assert "surprise.weight" in message and "activation_fn='relu'" in message


def test_existing_output_is_not_touched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Exception) as err:
        convert_checkpoint(DEMO, out)
    assert "already exists" in str(err.value)
    assert (out / "keep.txt").read_text() == "mine"


def test_failure_while_writing_leaves_no_partial_directory(tmp_path, monkeypatch):
    import bundles.writing as writing

    def explode(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writing, "save_kmeans", explode)
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(DEMO, tmp_path / "out", kmeans=DEMO.parent / "tiny_hubert_L1_km20.bin", kmeans_layer=1)
    assert "No space left on device" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_reader_returns_lazy_tensors_equal_to_torch_load():
    reference = torch.load(DEMO, weights_only=False)["model"]
    with read_fairseq_checkpoint(DEMO) as ckpt:
        assert set(ckpt.state) == set(reference)
        for key, value in reference.items():
            assert torch.equal(ckpt.state[key].load(), value), key
        assert ckpt.num_updates == 1000 and ckpt.era == "dict"
        assert ckpt.dictionaries[0].symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
