"""Measurement: how many frames get another cluster when the online-target teacher (and the k-means) run in bf16
autocast instead of fp32 (issue 15, item 2). ``labels dump`` and ``kmeans fit`` work in fp32, so every such frame
is a target that disagrees with the offline labels of the same audio.

    .venv/bin/python bench/bench_teacher_precision.py [--device cpu|cuda] [--no-publish]

Models: (1) the tiny shipped HuBERT (2 layers, 64-d) with its shipped k-means (layer 1, K = 20); (2) a BASE-sized
HuBERT with **random weights** (``torchaudio.models.hubert_base()``, seed 0, 12 layers, 768-d, cut at layer 9)
with a K = 500 k-means fitted here on its layer-9 features (10 Lloyd iterations from 500 random frames of 16 x 4 s
of ``continue_pt.demo.demo_audio``). Labelled audio: 8 other utterances x 4 s (199 frames each). No published
weights can be downloaded on the benchmark machine: random features are not a trained model's, so the figure for
a real BASE teacher can differ; the mechanism (bf16's 8-bit mantissa moving frames across cluster boundaries) is
the same.

Compared, all on the same waveforms: fp32 teacher + fp32 k-means (what ``labels dump`` computes; the reference),
bf16-autocast teacher + fp32 k-means (the fp32 k-means of the fix with a bf16 teacher), bf16-autocast teacher +
bf16 k-means (what training computed before the fix), and on CUDA the fp32 teacher with TF32 matmuls.
Writes the section ``bench_teacher_precision`` of ``bench/RESULTS.md`` unless ``--no-publish``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SECTION = "bench_teacher_precision"


def _fit_kmeans(features, k: int, iterations: int = 10, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = features.reshape(-1, features.shape[-1]).float()
    centroids = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iterations):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).clamp(min=1)[:, None]
        centroids = torch.where(counts > 0, sums / counts, centroids)
    return centroids


def _bf16_kmeans(features, centroids):
    """The k-means as training computed it before the fix: its product cast to bf16 by autocast."""
    import torch

    x = features.reshape(-1, features.shape[-1]).float()
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        distances = torch.addmm((centroids * centroids).sum(1), x, centroids.T, beta=1.0, alpha=-2.0)
    return distances.argmin(dim=1).reshape(features.shape[:-1])


def teacher_label_agreement(device: str = "cpu") -> list[dict]:
    """One row per (model, variant): frames, frames whose label differs from the fp32 reference, teacher time."""
    import torch
    import torchaudio

    from bundles.kmeans import KMeansModel
    from bundles.loading import load_bundle
    from continue_pt.demo import CHECKPOINT, KMEANS, KMEANS_LAYER, demo_audio
    from converters.convert import convert_checkpoint

    rows: list[dict] = []
    torch.manual_seed(0)
    work = C.WORK / "teacher_precision"
    if not (work / "tiny" / "config.json").is_file():
        convert_checkpoint(CHECKPOINT, work / "tiny", kmeans=KMEANS, kmeans_layer=KMEANS_LAYER, overwrite=True)
    tiny = load_bundle(work / "tiny")
    base = torchaudio.models.hubert_base().eval()
    fit_audio = torch.cat([demo_audio(4.0, seed=100 + i) for i in range(16)]).to(device)
    audio = torch.cat([demo_audio(4.0, seed=200 + i) for i in range(8)]).to(device)
    models = [("tiny HuBERT (2 x 64-d), shipped k-means L1 K=20", tiny.get_model().eval(), tiny.get_kmeans()),
              ("BASE-sized HuBERT, random weights (12 x 768-d), L9 K=500", base, None)]
    for name, teacher, kmeans in models:
        teacher = teacher.to(device)
        layer = kmeans.layer if kmeans is not None else 9
        with torch.inference_mode():
            if kmeans is None:
                feats = torch.cat([teacher.extract_features(w[None], num_layers=layer)[0][-1] for w in fit_audio])
                kmeans = KMeansModel(_fit_kmeans(feats, 500).cpu(), layer=layer)

            def features(autocast: bool, tf32: bool = False):
                saved = torch.get_float32_matmul_precision()
                torch.set_float32_matmul_precision("high" if tf32 else "highest")
                try:
                    C.sync() if device == "cpu" else torch.cuda.synchronize()
                    started = time.perf_counter()
                    with torch.autocast(device_type=audio.device.type, dtype=torch.bfloat16, enabled=autocast):
                        out = teacher.extract_features(audio, num_layers=layer)[0][-1]
                    if device != "cpu":
                        torch.cuda.synchronize()
                    return out, time.perf_counter() - started
                finally:
                    torch.set_float32_matmul_precision(saved)

            fp32, t_fp32 = features(False)
            reference = kmeans(fp32)
            bf16, t_bf16 = features(True)
            variants = [("fp32 teacher + fp32 k-means (labels dump; reference)", reference, t_fp32),
                        ("bf16 teacher + fp32 k-means", kmeans(bf16), t_bf16),
                        ("bf16 teacher + bf16 k-means (training before the fix)",
                         _bf16_kmeans(bf16, kmeans.centroids.to(device)), t_bf16)]
            if device != "cpu":
                tf32, t_tf32 = features(False, tf32=True)
                variants.append(("TF32 teacher + fp32 k-means", kmeans(tf32), t_tf32))
            for variant, labels, seconds in variants:
                rows.append({"model": name, "variant": variant, "frames": int(labels.numel()),
                             "differ": int((labels != reference).sum()), "teacher_s": seconds})
    return rows


def rows_table(rows: list[dict]) -> str:
    return C.table(["model", "teacher + k-means", "frames", "other cluster than fp32", "teacher s (1 run)"],
                   [[r["model"], r["variant"], str(r["frames"]), f"{r['differ']} ({r['differ'] / r['frames']:.2%})",
                     f"{r['teacher_s']:.3f}"] for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-publish", dest="publish", action="store_false")
    args = ap.parse_args()
    command = shlex.join([".venv/bin/python", "bench/bench_teacher_precision.py", *sys.argv[1:]])
    info = C.machine_info()
    rows = teacher_label_agreement(args.device)
    body = [f"## {SECTION}: online-target labels with a bf16 vs fp32 teacher (issue 15, item 2)", "",
            *C.machine_lines(info, command),
            f"- Device: {args.device}; bf16 = `torch.autocast(dtype=torch.bfloat16)` around the teacher, as "
            "Lightning's bf16-mixed runs it. Models, audio and k-means: see the script's docstring (the BASE-sized "
            "teacher has random weights).", "", rows_table(rows), "",
            "- Decision: `OnlineTargets` runs the teacher and the k-means with autocast disabled, in fp32, so online "
            "targets equal `labels dump`'s (tested: `tests/continue_pt/test_gpu_path_targets.py`). The teacher's "
            "share of a step is in bench_train_step (c)."]
    C.publish_or_print(SECTION, body, args.publish)


if __name__ == "__main__":
    main()
