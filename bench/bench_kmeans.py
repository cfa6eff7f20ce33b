"""Benchmark: fitting a HuBERT k-means + dumping labels, fairseq's ``simple_kmeans`` recipe against ours.

    .venv/bin/python bench/bench_kmeans.py [--repeats 1] [--scales 1,4,16] [--keep]

Teacher (the same for both): the tiny demo checkpoint ``continue_pt/demo_assets/tiny_hubert.pt`` converted once
with ``converters.convert.convert_checkpoint`` (2 layers, 64-d), cut at **layer 2**; **K = 50**. Audio:
``continue_pt.demo.demo_audio`` in 10 s 16 kHz wav files (seeds 1000 + i), 12 / 48 / 192 files = 2 / 8 / 32 min
for the 1x / 4x / 16x scales (written once, hard-linked into one directory per scale). A held-out set (6 x 10 s,
seeds 900000 + i, never seen by either fit) gives the common quality measure: mean squared distance of a
held-out frame to its nearest centroid (``continue_pt.kmeans_fit.inertia_of``), for both pipelines' centroids.

Each stage runs in a fresh process (``bench/_common.measure``: wall time around the process, peak RSS):

* fairseq (``examples/hubert/simple_kmeans``, reproduced step by step in the worker modes below because fairseq's
  examples are not an importable module; the lines are cited there):
  1. ``dump_hubert_feature.py`` / ``feature_utils.dump_feature``: per utterance of ``{split}.tsv`` the layer-L
     features (``max_chunk`` 1,600,000 samples) appended to ``{feat_dir}/{split}_0_1.npy`` (NpyAppendArray, here a
     byte-identical minimal equivalent since ``npy_append_array`` is not installed) + frame counts to ``.len``.
     The forward is **our** teacher forward (``continue_pt.teacher.Teacher.features`` on ``read_audio``), so only
     the k-means pipeline differs;
  2. ``learn_kmeans.py``: ``load_feature`` (``percent = -1``, fairseq's default: all features, ``np.load(mmap)``)
     + ``MiniBatchKMeans(n_clusters=50, init="k-means++", max_iter=100, batch_size=10000, verbose=1,
     compute_labels=False, tol=0.0, max_no_improvement=100, init_size=None, n_init=N_INIT, reassignment_ratio=0.0)``
     ``.fit`` + ``joblib.dump`` + its final ``-km.score(feat) / len(feat)``. **n_init is 3, not fairseq's 20**
     (time budget of this 2-core machine);
  3. ``dump_km_label.py``: reads the ``.npy`` back (mmap) utterance by utterance, ``ApplyKmeans`` (numpy path),
     writes ``{split}_0_1.km``.
* ours: (1) ``continue_pt.kmeans_fit.fit_kmeans`` (streaming, two teacher passes, reservoir + mini-batch; defaults:
  reservoir 10,000 frames, 60 s mini-batches, seed 0) + ``bundles.kmeans.save_kmeans``; (2)
  ``continue_pt.label_dump.dump_labels`` (teacher + nearest centroid per file, ``train.tsv/.km/dict.km.txt``).

Disk: each pipeline writes into its own output directory and gets its own empty ``TMPDIR``; the bytes of every
file there are counted after each stage ("feature bytes" = fairseq's ``feat_dir``; for ours every file that is not
the k-means or a label file, and ``TMPDIR``); each worker also reports its ``/proc/self/io`` ``wchar`` (bytes
passed to ``write()``, stdout included). Writes its section of ``bench/RESULTS.md``; removes
``bench/_work/kmeans`` unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SECTION = "bench_kmeans"
LAYER = 2
K = 50
N_INIT = 3  # fairseq's learn_kmeans.py default is 20
FILE_SECONDS = 10.0
BASE_FILES = 12  # 1x = 12 x 10 s = 2 min
HELDOUT_FILES = 6
SPLIT = "train"
RATE = 16000


# ----------------------------------------------------------------------------------------------- workers

def _io_report() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("wchar", "write_bytes"):
                out[key] = int(value)
    return out


def _emit(result: dict[str, Any]) -> None:
    result.update(_io_report())
    print("RESULT " + json.dumps(result), flush=True)


def _teacher(bundle_dir: str):
    from bundles.loading import load_bundle
    from continue_pt.teacher import Teacher

    bundle = load_bundle(bundle_dir)
    return bundle, Teacher.from_bundle(bundle, LAYER)


class _NpyAppend:
    """What ``npy_append_array.NpyAppendArray`` does for ``feature_utils.dump_feature``: a ``.npy`` whose header
    (padded to leave room for a growing shape) is rewritten as rows are appended."""

    HEADER = 128

    def __init__(self, path: str):
        self.fh = open(path, "wb")
        self.rows, self.dim, self.descr = 0, None, None
        self.fh.write(b"\0" * self.HEADER)

    def _header(self) -> bytes:
        text = f"{{'descr': '{self.descr}', 'fortran_order': False, 'shape': ({self.rows}, {self.dim}), }}"
        text = text.ljust(self.HEADER - 10 - 1) + "\n"
        return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")

    def append(self, arr) -> None:
        if self.dim is None:
            self.dim, self.descr = arr.shape[1], arr.dtype.str
        self.fh.write(arr.tobytes())
        self.rows += arr.shape[0]
        self.fh.seek(0)
        self.fh.write(self._header())
        self.fh.seek(0, 2)

    def close(self) -> None:
        self.fh.close()


def worker_fs_dump(bundle_dir: str, tsv_dir: str, feat_dir: str) -> None:
    """dump_hubert_feature.py main(tsv_dir, split, ckpt, layer, nshard=1, rank=0, feat_dir, max_chunk=1600000)."""
    import torch

    from continue_pt.audio import read_audio
    bundle, teacher = _teacher(bundle_dir)
    max_chunk = 1_600_000
    # feature_utils.get_path_iterator (nshard 1, rank 0)
    with open(f"{tsv_dir}/{SPLIT}.tsv") as f:
        root = f.readline().rstrip()
        lines = [line.rstrip() for line in f]
    # feature_utils.dump_feature
    feat_path, leng_path = f"{feat_dir}/{SPLIT}_0_1.npy", f"{feat_dir}/{SPLIT}_0_1.len"
    os.makedirs(feat_dir, exist_ok=True)
    feat_f = _NpyAppend(feat_path)
    frames = 0
    with open(leng_path, "w") as leng_f:
        for line in lines:
            subpath, _nsample = line.split("\t")
            wav = read_audio(f"{root}/{subpath}", bundle.sample_rate)  # HubertFeatureReader.read_audio
            feat = torch.cat([teacher.features(wav[s:s + max_chunk])  # get_feats
                              for s in range(0, len(wav), max_chunk)], 0)
            feat_f.append(feat.cpu().numpy())
            leng_f.write(f"{len(feat)}\n")
            frames += len(feat)
    feat_f.close()
    _emit({"frames": frames})


def worker_fs_learn(feat_dir: str, km_path: str) -> None:
    """learn_kmeans.py learn_kmeans(feat_dir, split, nshard=1, km_path, n_clusters, seed=0, percent=-1, ...)."""
    import joblib
    import numpy as np
    from sklearn.cluster import MiniBatchKMeans

    np.random.seed(0)
    # load_feature -> load_feature_shard with percent < 0: np.load(feat_path, mmap_mode="r"), then concatenate
    feat = np.concatenate([np.load(f"{feat_dir}/{SPLIT}_0_1.npy", mmap_mode="r")], axis=0)
    km_model = MiniBatchKMeans(n_clusters=K, init="k-means++", max_iter=100, batch_size=10000, verbose=1,
                               compute_labels=False, tol=0.0, max_no_improvement=100, init_size=None,
                               n_init=N_INIT, reassignment_ratio=0.0)
    km_model.fit(feat)
    joblib.dump(km_model, km_path)
    inertia = -km_model.score(feat) / len(feat)
    _emit({"frames": len(feat), "train_inertia": float(inertia), "n_steps": int(km_model.n_steps_)})


def worker_fs_label(feat_dir: str, km_path: str, lab_dir: str) -> None:
    """dump_km_label.py dump_label(feat_dir, split, km_path, nshard=1, rank=0, lab_dir) (ApplyKmeans, numpy)."""
    import joblib
    import numpy as np

    km_model = joblib.load(km_path)
    C_np = km_model.cluster_centers_.transpose()
    Cnorm_np = (C_np ** 2).sum(0, keepdims=True)
    with open(f"{feat_dir}/{SPLIT}_0_1.len") as f:
        lengs = [int(line.rstrip()) for line in f]
        offsets = [0] + np.cumsum(lengs[:-1]).tolist()
    feat = np.load(f"{feat_dir}/{SPLIT}_0_1.npy", mmap_mode="r")
    assert feat.shape[0] == offsets[-1] + lengs[-1]
    os.makedirs(lab_dir, exist_ok=True)
    frames = 0
    with open(f"{lab_dir}/{SPLIT}_0_1.km", "w") as f:
        for offset, leng in zip(offsets, lengs):
            x = feat[offset:offset + leng]
            dist = (x ** 2).sum(1, keepdims=True) - 2 * np.matmul(x, C_np) + Cnorm_np
            lab = np.argmin(dist, axis=1).tolist()
            f.write(" ".join(map(str, lab)) + "\n")
            frames += len(lab)
    _emit({"frames": frames})


def worker_ours_fit(bundle_dir: str, audio: str, km_path: str) -> None:
    from bundles.kmeans import save_kmeans
    from bundles.loading import load_bundle
    from continue_pt.kmeans_fit import fit_kmeans

    result = fit_kmeans(load_bundle(bundle_dir), LAYER, audio, K, seed=0, device="cpu")
    save_kmeans(result.kmeans, km_path)
    _emit({"frames": result.frames_seen, "train_inertia": result.inertia, "reservoir": result.reservoir_frames,
           "peak_buffer_frames": result.peak_buffer_frames, "skipped": len(result.files_skipped)})


def worker_ours_label(bundle_dir: str, km_path: str, audio: str, lab_dir: str) -> None:
    from bundles.kmeans import load_kmeans
    from bundles.loading import load_bundle
    from continue_pt.label_dump import dump_labels

    result = dump_labels(load_bundle(bundle_dir), load_kmeans(km_path), audio, lab_dir, SPLIT)
    _emit({"frames": result.frames, "files": result.files_labelled})


WORKERS = {"fs_dump": worker_fs_dump, "fs_learn": worker_fs_learn, "fs_label": worker_fs_label,
           "ours_fit": worker_ours_fit, "ours_label": worker_ours_label}


# ----------------------------------------------------------------------------------------------- setup


def _prepare(work: Path, scales: list[int]) -> tuple[Path, dict[int, Path], Path]:
    """(bundle dir, audio dir per scale, held-out audio dir)."""
    import soundfile

    from continue_pt.demo import CHECKPOINT, demo_audio
    from converters.convert import convert_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    bundle_dir = work / "bundle"
    if not (bundle_dir / "config.json").is_file():
        convert_checkpoint(CHECKPOINT, bundle_dir, overwrite=True)
    pool = work / "audio_pool"
    pool.mkdir(exist_ok=True)
    n_max = BASE_FILES * max(scales)
    for i in range(n_max):
        p = pool / f"utt{i:04d}.wav"
        if not p.is_file():
            soundfile.write(p, demo_audio(FILE_SECONDS, seed=1000 + i)[0].numpy(), RATE)
    dirs = {}
    for s in scales:
        d = work / f"audio_{s}x"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        for i in range(BASE_FILES * s):
            src, dst = pool / f"utt{i:04d}.wav", d / f"utt{i:04d}.wav"
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        dirs[s] = d
    held = work / "heldout"
    held.mkdir(exist_ok=True)
    for i in range(HELDOUT_FILES):
        p = held / f"held{i:02d}.wav"
        if not p.is_file():
            soundfile.write(p, demo_audio(FILE_SECONDS, seed=900000 + i)[0].numpy(), RATE)
    return bundle_dir, dirs, held


def _heldout_features(bundle_dir: Path, held: Path):
    import torch

    from continue_pt.audio import read_audio
    _, teacher = _teacher(str(bundle_dir))
    return torch.cat([teacher.features(read_audio(p, RATE))
                      for p in sorted(held.glob("*.wav"))])


def _write_tsv(audio: Path, tsv_dir: Path) -> None:
    """The manifest fairseq's recipe starts from (``examples/wav2vec/wav2vec_manifest.py`` format); not timed."""
    import soundfile

    tsv_dir.mkdir(parents=True, exist_ok=True)
    lines = [str(audio.resolve())]
    for p in sorted(audio.glob("*.wav")):
        lines.append(f"{p.name}\t{soundfile.info(p).frames}")
    (tsv_dir / f"{SPLIT}.tsv").write_text("\n".join(lines) + "\n")


def _du(path: Path) -> tuple[int, list[str]]:
    """(bytes of every regular file under ``path``, their relative names)."""
    if not path.exists():
        return 0, []
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files), [str(p.relative_to(path)) for p in files]


def _stage(mode: str, args: list[str], tmpdir: Path) -> tuple[C.Run, dict[str, Any]]:
    tmpdir.mkdir(parents=True, exist_ok=True)
    cmd = [C.PY, "-W", "ignore", str(Path(__file__).resolve()), "--worker", mode, *args]
    run = C.measure(cmd, env={"TMPDIR": str(tmpdir), "PYTHONWARNINGS": "ignore"})
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return run, json.loads(line[len("RESULT "):])


def _run_pipeline(name: str, scale: int, rep: int, base: Path, bundle_dir: Path, audio: Path) -> dict[str, Any]:
    out = base / f"{name}_{scale}x_r{rep}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tmp = out / "TMPDIR"
    stages: list[tuple[str, C.Run, dict[str, Any]]] = []
    disk: dict[str, Any] = {}
    if name == "fairseq":
        tsv_dir, feat_dir, km, lab = out / "manifest", out / "feat", out / "km.bin", out / "lab"
        _write_tsv(audio, tsv_dir)
        C.sync()
        r, res = _stage("fs_dump", [str(bundle_dir), str(tsv_dir), str(feat_dir)], tmp)
        stages.append(("dump_hubert_feature", r, res))
        disk["feature_bytes"] = _du(feat_dir)[0]
        C.sync()
        r, res = _stage("fs_learn", [str(feat_dir), str(km)], tmp)
        stages.append(("learn_kmeans", r, res))
        C.sync()
        r, res = _stage("fs_label", [str(feat_dir), str(km), str(lab)], tmp)
        stages.append(("dump_km_label", r, res))
        disk["feature_bytes_end"] = _du(feat_dir)[0]
        disk["km_bytes"] = km.stat().st_size
        disk["label_bytes"] = _du(lab)[0]
        disk["files"] = _du(out)[1]
        import joblib

        centers = joblib.load(km).cluster_centers_
    else:
        km, lab = out / "km.safetensors", out / "labels"
        C.sync()
        r, res = _stage("ours_fit", [str(bundle_dir), str(audio), str(km)], tmp)
        stages.append(("fit_kmeans", r, res))
        after_fit = _du(out)
        C.sync()
        r, res = _stage("ours_label", [str(bundle_dir), str(km), str(audio), str(lab)], tmp)
        stages.append(("dump_labels", r, res))
        total, files = _du(out)
        expected = {"km.safetensors", f"labels/{SPLIT}.tsv", f"labels/{SPLIT}.km", "labels/dict.km.txt"}
        other = [f for f in files if f not in expected]
        disk["feature_bytes"] = sum((out / f).stat().st_size for f in other)
        disk["feature_bytes_after_fit"] = after_fit[0] - km.stat().st_size
        disk["km_bytes"] = km.stat().st_size
        disk["label_bytes"] = _du(lab)[0]
        disk["files"] = files
        disk["other_files"] = other
        from bundles.kmeans import load_kmeans

        centers = load_kmeans(km).centroids.numpy()
    disk["tmpdir_bytes"] = _du(tmp)[0]
    return {"name": name, "scale": scale, "rep": rep, "stages": stages, "disk": disk, "centers": centers,
            "wall": sum(r.wall_s for _, r, _ in stages),
            "rss_mb": max(r.peak_rss_kb for _, r, _ in stages) / 1024,
            "wchar": sum(res.get("wchar", 0) for _, _, res in stages),
            "frames_labelled": stages[-1][2]["frames"], "train_inertia": next(
                res["train_inertia"] for _, _, res in stages if "train_inertia" in res)}


# ----------------------------------------------------------------------------------------------- main


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n else "0 B"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(C.REPO))
        import warnings

        warnings.filterwarnings("ignore")
        WORKERS[sys.argv[2]](*sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each pipeline at each scale (medians)")
    ap.add_argument("--scales", default="1,4,16", help="corpus sizes in units of 2 min (12 x 10 s files)")
    ap.add_argument("--keep", action="store_true", help="keep bench/_work/kmeans")
    args = ap.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    command = shlex.join([".venv/bin/python", "bench/bench_kmeans.py", *sys.argv[1:]])
    work = C.WORK / "kmeans"
    started = time.perf_counter()
    try:
        run(args, scales, command, work)
    finally:
        C.remove_work(work, args.keep)
    C.log(f"total {time.perf_counter() - started:.0f} s")


def run(args: argparse.Namespace, scales: list[int], command: str, work: Path) -> None:
    sys.path.insert(0, str(C.REPO))
    import warnings

    warnings.filterwarnings("ignore")
    info = C.machine_info()
    import numpy as np
    import sklearn
    import torch

    from bundles.kmeans import KMeansModel
    from continue_pt.kmeans_fit import inertia_of

    t0 = time.perf_counter()
    bundle_dir, audio_dirs, held = _prepare(work, scales)
    held_feats = _heldout_features(bundle_dir, held)
    C.log(f"prepared bundle + audio ({', '.join(f'{s}x' for s in scales)}) + held-out "
          f"{tuple(held_feats.shape)} in {time.perf_counter() - t0:.1f} s")

    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    loads = []
    for rep in range(1, args.repeats + 1):
        for s in scales:
            for name in ("fairseq", "ours") if (rep + s) % 2 else ("ours", "fairseq"):
                loads.append(f"{os.getloadavg()[0]:.2f}")
                r = _run_pipeline(name, s, rep, work / "runs", bundle_dir, audio_dirs[s])
                r["heldout"] = inertia_of(KMeansModel(torch.from_numpy(np.asarray(r["centers"], dtype=np.float32)),
                                                      LAYER), held_feats)
                results.setdefault((name, s), []).append(r)
                C.log(f"  {s:>2}x {name:<7} rep {rep}: {r['wall']:.2f} s "
                      f"({', '.join(f'{st} {ru.wall_s:.2f}' for st, ru, _ in r['stages'])}), "
                      f"peak RSS {r['rss_mb']:.0f} MB, features on disk {_mb(r['disk']['feature_bytes'])}, "
                      f"held-out inertia {r['heldout']:.4f}")
                shutil.rmtree(work / "runs", ignore_errors=True)

    def med(name: str, s: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, s)])

    minutes = {s: BASE_FILES * s * FILE_SECONDS / 60 for s in scales}
    rows = []
    for s in scales:
        for name in ("fairseq", "ours"):
            rs = results[(name, s)]
            r0 = rs[0]
            stage_txt = "; ".join(
                f"{st} " + "/".join(f"{x['stages'][i][1].wall_s:.2f}" for x in rs) + " s, "
                + "/".join(f"{x['stages'][i][1].peak_rss_kb / 1024:.0f}" for x in rs) + " MB"
                for i, (st, _, _) in enumerate(r0["stages"]))
            rows.append([f"{s}x ({minutes[s]:g} min, {r0['frames_labelled']} frames)",
                         "fairseq simple_kmeans" if name == "fairseq" else "ours (fit_kmeans + dump_labels)",
                         f"{med(name, s, 'wall'):.2f}", ", ".join(f"{x['wall']:.2f}" for x in rs),
                         f"{med(name, s, 'rss_mb'):.0f}", _mb(statistics.median(x['disk']['feature_bytes'] for x in rs)),
                         _mb(statistics.median(x['wchar'] for x in rs)),
                         f"{med(name, s, 'heldout'):.4f}", f"{med(name, s, 'train_inertia'):.4f}", stage_txt])
    tbl = C.table(["corpus", "pipeline", "wall s (median)", "runs (s)", "peak RSS MB", "feature bytes on disk",
                   "write() bytes (wchar)", "held-out inertia", "own reported inertia", "stages: wall s, peak RSS"],
                  rows)
    ratio_rows = []
    for s in scales:
        ratio_rows.append([f"{s}x", f"{med('ours', s, 'wall') / med('fairseq', s, 'wall'):.2f}×",
                           f"{med('ours', s, 'rss_mb') / med('fairseq', s, 'rss_mb'):.2f}×",
                           f"{med('ours', s, 'heldout') / med('fairseq', s, 'heldout'):.3f}"])
    ratios = C.table(["corpus", "ours / fairseq wall", "ours / fairseq peak RSS", "ours / fairseq held-out inertia"],
                     ratio_rows)
    lo, hi = min(scales), max(scales)
    growth = {n: med(n, hi, "rss_mb") - med(n, lo, "rss_mb") for n in ("ours", "fairseq")}
    feat_hi = statistics.median(x["disk"]["feature_bytes"] for x in results[("fairseq", hi)])
    ours_disk = [x["disk"] for s in scales for x in results[("ours", s)]]
    ours_zero = all(d["feature_bytes"] == 0 and d["tmpdir_bytes"] == 0 and d["feature_bytes_after_fit"] == 0
                    for d in ours_disk)
    frames_ok = all(results[("ours", s)][0]["frames_labelled"] == results[("fairseq", s)][0]["frames_labelled"]
                    for s in scales)
    flat = abs(growth["ours"]) <= 0.1 * med("ours", lo, "rss_mb")
    summary = [
        f"- Peak RSS from {lo}x to {hi}x: ours {med('ours', lo, 'rss_mb'):.0f} -> {med('ours', hi, 'rss_mb'):.0f} MB "
        f"({growth['ours']:+.0f} MB; {'flat' if flat else '**not flat**'}), fairseq "
        f"{med('fairseq', lo, 'rss_mb'):.0f} -> {med('fairseq', hi, 'rss_mb'):.0f} MB ({growth['fairseq']:+.0f} MB; "
        f"the {hi}x feature matrix is {feat_hi / 2**20:.1f} MiB). With this tiny 64-d teacher the features are "
        f"small next to the ~{med('ours', lo, 'rss_mb'):.0f} MB of a Python + torch process; a BASE teacher "
        "(768-d) multiplies fairseq's growth by 12 per frame (960 h of layer 9: ~531 GB on disk, the estimate in "
        "`continue_pt/kmeans_fit.py`). fairseq's in-RAM stage, `learn_kmeans`, alone: "
        + " -> ".join(f"{statistics.median(x['stages'][1][1].peak_rss_kb for x in results[('fairseq', s)]) / 1024:.0f}"
                      for s in scales) + " MB over " + " / ".join(f"{s}x" for s in scales) + "; ours' largest stage: "
        + " -> ".join(f"{med('ours', s, 'rss_mb'):.0f}" for s in scales) + " MB.",
        f"- Features written to disk: ours **{'0 bytes' if ours_zero else 'NOT 0 bytes'}** at every scale (output "
        "directory holds only km.safetensors + train.tsv/.km + dict.km.txt; its TMPDIR stayed empty); fairseq "
        + ", ".join(f"{s}x {_mb(results[('fairseq', s)][0]['disk']['feature_bytes'])}" for s in scales)
        + " (`.npy` + `.len`, never deleted by the recipe).",
        f"- Both pipelines labelled the same number of frames at every scale: {'yes' if frames_ok else '**no**'}.",
        "- Held-out inertia: the same 6 x 10 s of unseen `demo_audio` (seeds 900000+), "
        f"{held_feats.shape[0]} frames, nearest-centroid mean squared distance (lower is better).",
        "- 'own reported inertia': ours = on its reservoir sample (what `fit_kmeans` reports); fairseq = "
        "`-km.score(feat)/len(feat)` on all training features (what `learn_kmeans.py` logs).",
    ]
    body = [
        "## bench_kmeans: k-means fit + label dump, fairseq `simple_kmeans` vs ours (streaming, nothing on disk)",
        "",
        *C.machine_lines(info, command),
        f"- scikit-learn {sklearn.__version__}; torch / OpenMP threads: the defaults ({info['torch_threads']}).",
        f"- Teacher (both pipelines): the tiny demo checkpoint `continue_pt/demo_assets/tiny_hubert.pt` converted with "
        f"`convert_checkpoint` (2 layers, 64-d), layer {LAYER}; K = {K}. fairseq's feature dump uses **our** teacher "
        "forward (`continue_pt.teacher.Teacher.features` on `read_audio`), so only the k-means pipeline differs.",
        f"- Audio: `continue_pt.demo.demo_audio` in {FILE_SECONDS:g} s 16 kHz wav files (seeds 1000+i): "
        + ", ".join(f"{s}x = {BASE_FILES * s} files = {minutes[s]:g} min" for s in scales)
        + "; page cache warm (just written).",
        "- fairseq (each step a fresh process, as the recipe's three scripts): `dump_hubert_feature.py` "
        "(nshard 1, max_chunk 1,600,000; features appended to `train_0_1.npy` as `NpyAppendArray` does + `.len`) → "
        "`learn_kmeans.py` (percent -1 = all features, fairseq's default; `MiniBatchKMeans(n_clusters=50, "
        "init=\"k-means++\", max_iter=100, batch_size=10000, tol=0.0, max_no_improvement=100, "
        f"n_init={N_INIT}, reassignment_ratio=0.0, init_size=None, compute_labels=False, verbose=1)` + "
        "`joblib.dump` + its final `score`) → `dump_km_label.py` (mmap read-back, `ApplyKmeans` numpy path). "
        f"**n_init = {N_INIT} instead of fairseq's 20** (time budget). The `.tsv` manifest is written before "
        "and not timed. Reproduced in this script's worker modes (fairseq's examples are not importable).",
        "- Ours (each step a fresh process): `fit_kmeans(teacher, 2, audio_dir, 50, seed=0)` (defaults: reservoir "
        "10,000 frames, 60 s mini-batches; two teacher passes) + `save_kmeans` → `dump_labels` (third teacher pass).",
        "- Wall = sum of the stages' process wall times (interpreter + imports included); peak RSS = max over the "
        f"stages. {args.repeats} run(s) per pipeline and scale, order alternating; load (1 min) before each run: "
        f"{', '.join(loads)}.",
        "",
        tbl,
        "",
        ratios,
        "",
        *summary,
    ]
    C.publish(SECTION, body)


if __name__ == "__main__":
    main()
