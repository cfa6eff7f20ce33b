"""k-means files: the safe bundle format (bundles.kmeans) and the joblib reader (converters.joblib_kmeans).

The joblib files are made here with real sklearn and joblib, so the reader is checked against the format
those libraries write, in every compression and pickle protocol joblib offers.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.reference import require

joblib = require("joblib")
sklearn_cluster = require("sklearn.cluster")

from bundles.errors import BundleError  # noqa: E402
from bundles.kmeans import KMeansModel, load_kmeans, save_kmeans  # noqa: E402
from converters import joblib_kmeans  # noqa: E402
from converters.errors import ConversionError  # noqa: E402
from converters.joblib_kmeans import read_joblib_kmeans  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ESTIMATORS = [sklearn_cluster.MiniBatchKMeans, sklearn_cluster.KMeans]
COMPRESSIONS = [0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3)]


def blobs(n: int, dim: int, k: int, seed: int = 0) -> np.ndarray:
    """Well-separated float32 clusters: nearest-centroid labels have no near ties."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(k, dim))
    return (centres[rng.integers(0, k, n)] + rng.normal(size=(n, dim))).astype(np.float32)


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return blobs(400, 16, 6)


@pytest.fixture(scope="module", params=ESTIMATORS, ids=lambda c: c.__name__)
def fitted(request, features):
    return request.param(n_clusters=6, n_init=1, random_state=np.random.RandomState(0)).fit(features)


def assert_same_model(model: KMeansModel, estimator, features: np.ndarray) -> None:
    assert model.centroids.dtype == torch.float32
    assert np.array_equal(model.centroids.numpy(), estimator.cluster_centers_)
    assert np.array_equal(model(torch.from_numpy(features)).numpy(), estimator.predict(features))


# ---------------------------------------------------------------------------------------------- reading joblib

@pytest.mark.parametrize("compress", COMPRESSIONS, ids=str)
def test_reads_joblib_files(tmp_path, fitted, features, compress):
    path = tmp_path / "km.bin"
    joblib.dump(fitted, path, compress=compress)
    model = read_joblib_kmeans(path)
    assert_same_model(model, fitted, features)
    assert model.layer is None
    assert model.metadata["source_file"] == "km.bin"
    assert model.metadata["sklearn_class"] == f"sklearn.cluster._kmeans.{type(fitted).__name__}"
    assert model.metadata["n_clusters"] == "6"
    import sklearn
    assert model.metadata["sklearn_version"] == sklearn.__version__
    assert len(model.metadata["source_sha256"]) == 64


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_reads_every_pickle_protocol(tmp_path, fitted, features, protocol):
    joblib.dump(fitted, tmp_path / "km.bin", protocol=protocol)
    assert_same_model(read_joblib_kmeans(tmp_path / "km.bin"), fitted, features)
    # A k-means pickled the plain way (numpy's own array pickling, incl. protocol 5's _frombuffer).
    (tmp_path / "km.pkl").write_bytes(pickle.dumps(fitted, protocol=protocol))
    assert_same_model(read_joblib_kmeans(tmp_path / "km.pkl"), fitted, features)


def test_reads_joblib_before_1_2_without_alignment_padding(tmp_path, fitted, features, monkeypatch):
    # joblib <= 1.1 wrote no numpy_array_alignment_bytes attribute and no padding before the array bytes.
    from joblib import numpy_pickle
    make_wrapper = numpy_pickle.NumpyPickler._create_array_wrapper

    def old_wrapper(self, array):
        wrapper = make_wrapper(self, array)
        del wrapper.numpy_array_alignment_bytes
        return wrapper

    monkeypatch.setattr(numpy_pickle.NumpyPickler, "_create_array_wrapper", old_wrapper)
    joblib.dump(fitted, tmp_path / "km.bin")
    assert b"numpy_array_alignment_bytes" not in (tmp_path / "km.bin").read_bytes()
    assert_same_model(read_joblib_kmeans(tmp_path / "km.bin"), fitted, features)


def test_reads_old_module_names(tmp_path, fitted, features):
    """sklearn < 0.22 (``k_means_``), joblib vendored in sklearn, numpy 1.x (``numpy.core``)."""
    path = tmp_path / "km.bin"
    joblib.dump(fitted, path, protocol=2)  # protocol 2 names globals as text lines, easy to rewrite
    data = path.read_bytes()
    for new, old, count in [(b"csklearn.cluster._kmeans\n", b"csklearn.cluster.k_means_\n", {1}),
                            (b"cjoblib.numpy_pickle\n", b"csklearn.externals.joblib.numpy_pickle\n", {1}),
                            (b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n", {0, 1})]:  # numpy scalars
        assert data.count(new) in count
        data = data.replace(new, old)
    path.write_bytes(data)
    model = read_joblib_kmeans(path)
    assert_same_model(model, fitted, features)
    assert model.metadata["sklearn_class"] == f"sklearn.cluster.k_means_.{type(fitted).__name__}"


def test_shared_references_are_resolved(tmp_path, fitted, features):
    # The pickle memo hands a second reference to an array the stand-in it made first: it must read as the array.
    estimator = pickle.loads(pickle.dumps(fitted))
    state = {"alias": estimator.cluster_centers_, **vars(estimator)}
    vars(estimator).clear()
    vars(estimator).update(state)
    (tmp_path / "km.pkl").write_bytes(pickle.dumps(estimator, protocol=2))
    assert_same_model(read_joblib_kmeans(tmp_path / "km.pkl"), fitted, features)


def test_float64_centres_become_float32(tmp_path):
    estimator = sklearn_cluster.KMeans(n_clusters=3, n_init=1, random_state=0).fit(blobs(60, 4, 3).astype(np.float64))
    joblib.dump(estimator, tmp_path / "km.bin")
    model = read_joblib_kmeans(tmp_path / "km.bin")
    assert model.metadata["source_dtype"] == "float64"
    assert torch.equal(model.centroids, torch.from_numpy(estimator.cluster_centers_.astype(np.float32)))


def test_big_endian_arrays_are_read(tmp_path, features):
    estimator = sklearn_cluster.KMeans(n_clusters=6, n_init=1, random_state=0).fit(features)
    expected = estimator.cluster_centers_.copy()
    estimator.cluster_centers_ = expected.astype(">f4")
    joblib.dump(estimator, tmp_path / "km.bin")
    assert np.array_equal(read_joblib_kmeans(tmp_path / "km.bin").centroids.numpy(), expected)


# ---------------------------------------------------------------------------------------------- hostile files

class Payload:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("make", [
    lambda canary: (os.system, (f"touch {canary}",)),
    lambda canary: (exec, (f"open({str(canary)!r}, 'w').close()",)),
    lambda canary: (subprocess.call, (["touch", str(canary)],)),
], ids=["os.system", "exec", "subprocess.call"])
@pytest.mark.parametrize("compress", [0, 3])
def test_hostile_pickles_are_refused_without_running(tmp_path, features, make, compress):
    canary = tmp_path / "CANARY"
    func, args = make(canary)
    estimator = sklearn_cluster.MiniBatchKMeans(n_clusters=3, n_init=1, random_state=0).fit(features)
    estimator.payload = Payload(func, args)
    path = tmp_path / "evil.bin"
    joblib.dump(estimator, path, compress=compress)
    with pytest.raises(ConversionError) as info:
        read_joblib_kmeans(path)
    message = str(info.value)
    assert message.startswith(f"{path}: it is not a k-means file this kit can read safely: "
                              f"it asks for the global '{func.__module__}.{func.__name__}'")
    assert "nothing in the file was run" in message
    assert not canary.exists()


def test_hostile_plain_pickle_is_refused(tmp_path):
    canary = tmp_path / "CANARY"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Payload(os.system, (f"touch {canary}",))))
    with pytest.raises(ConversionError, match=r"asks for the global 'posix\.system'|asks for the global 'nt\.system'"):
        read_joblib_kmeans(tmp_path / "evil.pkl")
    assert not canary.exists()


def test_state_may_only_be_set_on_stubs(tmp_path):
    (tmp_path / "x.pkl").write_bytes(b"\x80\x04}}b.")  # BUILD on a dict
    with pytest.raises(ConversionError, match="it sets the state of a dict"):
        read_joblib_kmeans(tmp_path / "x.pkl")


def test_huge_claimed_buffer_is_refused_before_allocating(tmp_path):
    (tmp_path / "x.pkl").write_bytes(b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b"xx.")
    with pytest.raises(ConversionError, match="far more than any k-means file"):
        read_joblib_kmeans(tmp_path / "x.pkl")


def test_decompressed_size_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(joblib_kmeans, "MAX_DATA_BYTES", 1000)
    joblib.dump({"filler": b"\0" * 100_000}, tmp_path / "bomb.bin", compress=9)
    assert (tmp_path / "bomb.bin").stat().st_size < 1000
    with pytest.raises(ConversionError, match="more than 0 GiB of data"):
        read_joblib_kmeans(tmp_path / "bomb.bin")


def test_object_arrays_are_refused(tmp_path, fitted):
    fitted = pickle.loads(pickle.dumps(fitted))
    fitted.feature_names_in_ = np.array(["a", "b"], dtype=object)
    joblib.dump(fitted, tmp_path / "km.bin")
    with pytest.raises(ConversionError, match=r"array of Python objects \(numpy dtype 'O'\)"):
        read_joblib_kmeans(tmp_path / "km.bin")


# ---------------------------------------------------------------------------------------------- not k-means files

def test_plain_dict_pickle(tmp_path):
    (tmp_path / "d.pkl").write_bytes(pickle.dumps({"cluster_centers_": [[0.0, 1.0]]}))
    with pytest.raises(ConversionError) as info:
        read_joblib_kmeans(tmp_path / "d.pkl")
    assert str(info.value) == (f"{tmp_path / 'd.pkl'}: it holds a dict, not a fitted sklearn KMeans or MiniBatchKMeans. "
                               "Pass the k-means file fairseq's learn_kmeans.py wrote")


def test_bare_array(tmp_path):
    joblib.dump(np.zeros((3, 2), np.float32), tmp_path / "a.bin")
    with pytest.raises(ConversionError, match=r"it holds a numpy array of shape \(3, 2\), not a fitted"):
        read_joblib_kmeans(tmp_path / "a.bin")


def test_unfitted_estimator(tmp_path):
    joblib.dump(sklearn_cluster.MiniBatchKMeans(n_clusters=5), tmp_path / "u.bin")
    with pytest.raises(ConversionError, match="it holds an unfitted sklearn.cluster._kmeans.MiniBatchKMeans: "
                                              "there is no cluster_centers_"):
        read_joblib_kmeans(tmp_path / "u.bin")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ConversionError, match="nope.bin: no such file"):
        read_joblib_kmeans(tmp_path / "nope.bin")
    with pytest.raises(ConversionError, match="it is not a file"):
        read_joblib_kmeans(tmp_path)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match="empty.bin: the file is empty"):
        read_joblib_kmeans(tmp_path / "empty.bin")


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("xz", 3)], ids=str)
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.9, 0.999])
def test_truncated_files(tmp_path, fitted, compress, fraction):
    joblib.dump(fitted, tmp_path / "km.bin", compress=compress)
    data = (tmp_path / "km.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:max(3, int(len(data) * fraction))])
    with pytest.raises(ConversionError, match="cut.bin: it ends early: the file is truncated"):
        read_joblib_kmeans(tmp_path / "cut.bin")


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes(tmp_path, seed):
    (tmp_path / "r.bin").write_bytes(np.random.default_rng(seed).bytes(4096))
    with pytest.raises(ConversionError, match=r"r\.bin: "):
        read_joblib_kmeans(tmp_path / "r.bin")


@pytest.mark.parametrize("compress", [3, ("gzip", 3), ("bz2", 3), ("xz", 3)], ids=str)
def test_corrupt_compressed_data(tmp_path, fitted, compress):
    joblib.dump(fitted, tmp_path / "km.bin", compress=compress)
    data = bytearray((tmp_path / "km.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.bin").write_bytes(data)
    with pytest.raises(ConversionError, match=r"bad\.bin: (its compressed data is corrupt|it ends early)"):
        read_joblib_kmeans(tmp_path / "bad.bin")


def test_pre_0_10_joblib_is_refused(tmp_path):
    (tmp_path / "old.pkl").write_bytes(b"\x80\x02cjoblib.numpy_pickle\nNDArrayWrapper\n)\x81.")
    with pytest.raises(ConversionError, match="written by joblib older than 0.10"):
        read_joblib_kmeans(tmp_path / "old.pkl")
    (tmp_path / "old_z.pkl").write_bytes(b"ZF0x00000000000000ab" + b"\0" * 20)
    with pytest.raises(ConversionError, match="written by joblib older than 0.10"):
        read_joblib_kmeans(tmp_path / "old_z.pkl")


def test_lz4_is_refused_with_advice(tmp_path):
    (tmp_path / "km.bin").write_bytes(b"\x04\x22\x4d\x18" + b"\0" * 20)
    with pytest.raises(ConversionError, match="compressed with lz4.*lz4 -d"):
        read_joblib_kmeans(tmp_path / "km.bin")


# ---------------------------------------------------------------------------------------------- KMeansModel

@pytest.fixture(scope="module")
def big():
    x = blobs(2000, 64, 20, seed=1)
    estimator = sklearn_cluster.KMeans(n_clusters=20, n_init=1, random_state=0).fit(x)
    return x, estimator


def test_labels_match_sklearn_predict(big, monkeypatch):
    x, estimator = big
    model = KMeansModel(torch.from_numpy(estimator.cluster_centers_))
    expected = estimator.predict(x)
    assert np.array_equal(model(torch.from_numpy(x)).numpy(), expected)
    # (B, T, D) batches, other dtypes, and chunking over rows give the same labels.
    batched = model(torch.from_numpy(x).reshape(4, 500, 64))
    assert batched.shape == (4, 500) and batched.dtype == torch.long
    assert np.array_equal(batched.reshape(-1).numpy(), expected)
    assert np.array_equal(model(torch.from_numpy(x).double()).numpy(), expected)
    # TF32 allowed by the caller is not used for labelling, and the caller's setting is restored.
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    seen = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", seen.append)
    assert np.array_equal(model(torch.from_numpy(x)).numpy(), expected)
    assert seen == ["highest", "high"]
    monkeypatch.setattr("bundles.kmeans.ROWS_PER_CHUNK", 7)
    assert np.array_equal(model(torch.from_numpy(x)).numpy(), expected)
    assert model(torch.zeros(0, 64)).shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_labels_on_gpu(big):
    x, estimator = big
    model = KMeansModel(torch.from_numpy(estimator.cluster_centers_))
    labels = model(torch.from_numpy(x).cuda())
    assert labels.device.type == "cuda" and labels.dtype == torch.long
    assert np.array_equal(labels.cpu().numpy(), estimator.predict(x))
    assert model(torch.from_numpy(x).cuda().reshape(4, 500, 64).bfloat16()).shape == (4, 500)


def test_wrong_feature_dim(big):
    model = KMeansModel(torch.from_numpy(big[1].cluster_centers_))
    with pytest.raises(ValueError, match=r"features must have shape \(\.\.\., 64\), got \(3, 32\)"):
        model(torch.zeros(3, 32))


def test_to_returns_a_new_model():
    model = KMeansModel(torch.eye(3), layer=9, metadata={"a": "b"})
    moved = model.to("cpu")
    assert moved is not model and moved.layer == 9 and moved.metadata == {"a": "b"}
    assert (moved.num_clusters, moved.dim) == (3, 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"centroids": torch.zeros(4)}, "K x D matrix"),
    ({"centroids": torch.zeros(1, 4)}, "at least 2 clusters"),
    ({"centroids": torch.tensor([[0.0, float("nan")], [1.0, 1.0]])}, "NaN or infinite"),
    ({"centroids": torch.zeros(2, 2, dtype=torch.long)}, "floating point"),
    ({"centroids": torch.zeros(2, 2), "layer": 0}, "1-based"),
    ({"centroids": torch.zeros(2, 2), "metadata": {"a": 1}}, "str to str"),
    ({"centroids": torch.zeros(2, 2), "metadata": {"layer": "9"}}, "reserved"),
])
def test_invalid_models(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KMeansModel(**kwargs)


# ---------------------------------------------------------------------------------------------- bundle k-means files

def test_save_load_round_trip(tmp_path):
    model = KMeansModel(torch.randn(5, 8), layer=9, metadata={"source_file": "km.bin"})
    save_kmeans(model, tmp_path / "kmeans.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["kmeans.safetensors"]  # no temporary file left
    loaded = load_kmeans(tmp_path / "kmeans.safetensors")
    assert torch.equal(loaded.centroids, model.centroids)
    assert loaded.layer == 9 and loaded.metadata == {"source_file": "km.bin"}

    save_kmeans(KMeansModel(torch.randn(2, 3)), tmp_path / "none.safetensors")
    assert load_kmeans(tmp_path / "none.safetensors").layer is None


def test_joblib_to_bundle_round_trip(tmp_path, fitted, features):
    joblib.dump(fitted, tmp_path / "km.bin", compress=3)
    save_kmeans(read_joblib_kmeans(tmp_path / "km.bin"), tmp_path / "km.safetensors")
    assert_same_model(load_kmeans(tmp_path / "km.safetensors"), fitted, features)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "kmeans.safetensors"
    target.write_bytes(b"old")

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("bundles.kmeans.save_file", failing_save)
    with pytest.raises(BundleError, match="could not be written: disk full"):
        save_kmeans(KMeansModel(torch.randn(2, 3)), target)
    assert [p.name for p in tmp_path.iterdir()] == ["kmeans.safetensors"] and target.read_bytes() == b"old"
    with pytest.raises(BundleError, match="could not be written"):
        save_kmeans(KMeansModel(torch.randn(2, 3)), tmp_path / "no_such_dir" / "k.safetensors")


def _write_safetensors(path: Path, tensors: dict, metadata: dict) -> Path:
    from safetensors.torch import save_file
    save_file(tensors, path, metadata=metadata)
    return path


MARKER = {"format": "continue-pt-kmeans", "format_version": "1", "layer": "9"}


@pytest.mark.parametrize("tensors, metadata, message", [
    ({"weights": torch.zeros(2, 2)}, MARKER, "has no 'centroids' tensor"),
    ({"centroids": torch.zeros(2, 2)}, {}, "not a k-means file of this kit"),
    ({"centroids": torch.zeros(2, 2)}, {**MARKER, "format_version": "2"}, "format version '2'"),
    ({"centroids": torch.zeros(4)}, MARKER, "invalid k-means model: centroids must be a K x D matrix"),
    ({"centroids": torch.zeros(2, 2, dtype=torch.float64)}, MARKER, "float64, expected float32"),
    ({"centroids": torch.zeros(2, 2), "extra": torch.zeros(1)}, MARKER, r"unexpected tensors \['extra'\]"),
    ({"centroids": torch.zeros(2, 2)}, {**MARKER, "layer": "nine"}, "layer 'nine'"),
])
def test_load_rejects_bad_files(tmp_path, tensors, metadata, message):
    path = _write_safetensors(tmp_path / "k.safetensors", tensors, metadata)
    with pytest.raises(BundleError, match=message) as info:
        load_kmeans(path)
    assert str(info.value).startswith(str(path))


def test_load_rejects_missing_and_non_safetensors(tmp_path):
    with pytest.raises(BundleError, match="k.safetensors: no such file"):
        load_kmeans(tmp_path / "k.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(np.random.default_rng(0).bytes(100))
    with pytest.raises(BundleError, match="is not a readable safetensors file"):
        load_kmeans(tmp_path / "junk.safetensors")
    joblib.dump({"a": 1}, tmp_path / "km.bin")  # a pickle is never unpickled
    with pytest.raises(BundleError, match="is not a readable safetensors file"):
        load_kmeans(tmp_path / "km.bin")


@pytest.mark.slow
def test_neither_sklearn_nor_joblib_is_imported(tmp_path, features):
    """bundles.kmeans (labelling) and the joblib reader work where sklearn and joblib are not installed."""
    estimator = sklearn_cluster.KMeans(n_clusters=6, n_init=1, random_state=0).fit(features)
    joblib.dump(estimator, tmp_path / "km.bin", compress=3)
    code = ("import sys\n"
            "def bad(): return sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'joblib'))\n"
            "import bundles.kmeans\n"
            "assert not bad(), bad()\n"
            "from converters.joblib_kmeans import read_joblib_kmeans\n"
            f"print(read_joblib_kmeans({str(tmp_path / 'km.bin')!r}).num_clusters)\n"
            "assert not bad(), bad()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "6"
