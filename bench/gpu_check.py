"""GPU check of issue 15's fixes, run for real on a CUDA machine; without a GPU it says so and exits 0.

    .venv/bin/python bench/gpu_check.py [--steps 30] [--no-publish] [--cpu-dry-run]

``--cpu-dry-run`` runs every part on the CPU (2 CPU processes for DDP, no sync counting, no BASE-sized table, nothing
published): a check of the script itself on a machine without a GPU.

Parts (each prints its result; together they replace the ``gpu_check`` section of ``bench/RESULTS.md``):

1. **DDP with layer drop** (needs 2 GPUs, else it says so and skips): ``run_pretraining`` on 2 GPUs of the tiny
   shipped HuBERT with ``encoder_layer_drop`` 0.5 (``strategy="auto"``, so the fix picks
   ``find_unused_parameters=True``): it must finish and leave both ranks with equal weights. Then the cost of
   ``find_unused_parameters``: the same run without layer drop, median step time with it on and off.
2. **Online targets under bf16 vs ``labels dump``**: the tiny HuBERT's ``OnlineTargets`` on 8 crops inside
   ``torch.autocast("cuda", torch.bfloat16)`` must equal ``dump_labels(device="cuda")`` of the same crops as files;
   then ``bench_teacher_precision.teacher_label_agreement("cuda")`` (frames that change cluster with a bf16 / TF32
   teacher, and the teacher's time in each precision: the cost of running it in fp32).
3. **Host syncs per step**: a single-GPU Lightning run (bf16-mixed) of the tiny HuBERT with online targets; on the
   timed steps ``torch.cuda.set_sync_debug_mode("warn")`` counts every synchronising call (``.item()``,
   ``bool()``, ``.tolist()``, blocking copies), and a ``torch.profiler`` trace of a few steps counts the
   ``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` / ``aten::_local_scalar_dense`` events.
4. **Step time, before/after in one run**: the same run with the teacher given ``lengths`` on every batch (what
   it did before item 5: an additive ``[B, 1, T, T]`` mask, no flash attention) against ``None`` (now).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SECTION = "gpu_check"
_DEVICE = "cuda"  # "cpu" with --cpu-dry-run
SKIP_MESSAGE = "gpu_check: no CUDA device here: skipped (run it on a machine with a CUDA GPU; 2 GPUs for DDP)"

_DDP_SCRIPT = '''
import json, statistics, sys, time
import lightning.pytorch as pl
import torch

sys.path.insert(0, sys.argv[1])
from continue_pt.pretrain import PretrainOptions, run_pretraining


class Record(pl.Callback):
    def __init__(self):
        self.times, self.started = [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.started)

    def on_train_end(self, trainer, module):
        state = {k: v.detach().float().cpu() for k, v in module.student.state_dict().items()}
        torch.save({"state": state, "times": self.times, "strategy": type(trainer.strategy).__name__,
                    "find_unused": getattr(trainer.strategy, "_ddp_kwargs", {}).get("find_unused_parameters")},
                   f"{sys.argv[3]}/rank{trainer.global_rank}.pt")


run_pretraining(PretrainOptions(**json.loads(sys.argv[2])), callbacks=[Record()])
'''


def _accelerator() -> str:
    return "gpu" if _DEVICE == "cuda" else "cpu"


def _synchronize() -> None:
    import torch

    if _DEVICE == "cuda":
        torch.cuda.synchronize()


def _tiny_bundle(work: Path, name: str, layer_drop: float = 0.0) -> Path:
    from continue_pt.demo import CHECKPOINT, KMEANS, KMEANS_LAYER
    from converters.convert import convert_checkpoint

    out = work / name
    convert_checkpoint(CHECKPOINT, out, kmeans=KMEANS, kmeans_layer=KMEANS_LAYER, overwrite=True)
    config = json.loads((out / "config.json").read_text())
    config["encoder_args"]["encoder_layer_drop"] = layer_drop
    (out / "config.json").write_text(json.dumps(config))
    return out


def _audio(work: Path, files: int = 32, seconds: float = 4.0) -> Path:
    import soundfile as sf

    from continue_pt.demo import demo_audio

    out = work / "audio"
    out.mkdir(exist_ok=True)
    for i in range(files):
        sf.write(out / f"utt{i}.wav", demo_audio(seconds, seed=i)[0].numpy(), 16000, subtype="FLOAT")
    return out


def _ddp_run(work: Path, bundle: Path, audio: Path, tag: str, steps: int, **overrides) -> list[dict]:
    script = work / "ddp_run.py"
    script.write_text(_DDP_SCRIPT)
    out = work / f"ddp_{tag}"
    out.mkdir()
    options = dict(train_data=str(audio), output_dir=str(work / f"run_{tag}"), init_from=str(bundle),
                   max_steps=steps, warmup_steps=1, max_batch_seconds=16.0, min_seconds=1.0, num_workers=2,
                   accelerator=_accelerator(), devices=2, checkpoint_every=10_000, log_every=10,
                   progress_bar=False, overwrite=True, **overrides)
    proc = subprocess.run([sys.executable, str(script), str(C.REPO), json.dumps(options), str(out)], cwd=work,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"DDP run {tag} failed:\n{proc.stderr[-3000:]}")
    import torch

    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def check_ddp(work: Path, audio: Path, steps: int) -> list[str]:
    import torch

    if _DEVICE == "cuda" and torch.cuda.device_count() < 2:
        return [f"- 1. DDP with layer drop: **skipped**: it needs 2 GPUs, this machine has "
                f"{torch.cuda.device_count()}."]
    ranks = _ddp_run(work, _tiny_bundle(work, "tiny_ld", 0.5), audio, "layerdrop", steps)
    equal = all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])
    lines = [f"- 1. DDP with layer drop 0.5 on 2 GPUs, strategy auto -> find_unused_parameters="
             f"{ranks[0]['find_unused']}: finished {steps} steps; weights equal on both ranks: **{equal}**."]
    plain = _tiny_bundle(work, "tiny_plain", 0.0)
    medians = {}
    for tag, strategy in (("find_unused_true", "ddp_find_unused_parameters_true"), ("find_unused_false", "ddp")):
        times = _ddp_run(work, plain, audio, tag, steps, strategy=strategy)[0]["times"][5:]
        medians[tag] = statistics.median(times)
    lines.append(f"- 1b. Cost of find_unused_parameters (no layer drop, 2 GPUs, median s/step after 5): on "
                 f"{medians['find_unused_true']:.4f}, off {medians['find_unused_false']:.4f} "
                 f"({medians['find_unused_true'] / medians['find_unused_false']:.2f}x).")
    return lines


def check_targets(work: Path) -> list[str]:
    import soundfile as sf
    import torch

    from bench_teacher_precision import rows_table, teacher_label_agreement
    from bundles import load_bundle
    from continue_pt.audio import read_audio
    from continue_pt.demo import demo_audio
    from continue_pt.label_dump import dump_labels
    from continue_pt.teacher import OnlineTargets

    bundle = load_bundle(_tiny_bundle(work, "tiny_targets"))
    crops = work / "crops"
    crops.mkdir()
    for i in range(8):
        sf.write(crops / f"crop{i}.wav", demo_audio(4.0, seed=200 + i)[0].numpy(), 16000, subtype="FLOAT")
    dumped = dump_labels(bundle, bundle.get_kmeans(), crops, work / "labels", device=_DEVICE)
    names = [line.split("\t")[0] for line in dumped.tsv.read_text().splitlines()[1:]]
    offline = torch.tensor([[int(v) for v in line.split()] for line in dumped.km.read_text().splitlines()])
    waveforms = torch.stack([read_audio(crops / n, 16000) for n in names]).to(_DEVICE)
    targets = OnlineTargets.from_bundle(bundle).to(_DEVICE)
    with torch.autocast(_DEVICE, dtype=torch.bfloat16):
        online = targets(waveforms, torch.full((len(names),), waveforms.shape[1])).cpu()
    differ = int((online != offline).sum())
    return [f"- 2. Online targets inside bf16 autocast on the GPU vs `labels dump` (device cuda) of the same 8 crops: "
            f"{differ} of {offline.numel()} frames differ (**{'equal' if differ == 0 else 'NOT equal'}**).",
            "", rows_table(teacher_label_agreement("cuda")) if _DEVICE == "cuda" else "(BASE table: GPU only)", ""]


def _single_gpu_run(work: Path, audio: Path, steps: int, before: bool) -> dict:
    """Median step time and host syncs per step of a 1-GPU bf16-mixed run (tiny HuBERT, online targets).
    ``before``: as before items 4 and 5, the teacher gets lengths on every batch and Lightning's default
    ``transfer_batch_to_device`` moves the lengths to the GPU too (the rest of item 4 stays)."""
    import lightning.pytorch as pl
    import torch

    import continue_pt.teacher as targets_module
    from continue_pt.pretrain import PretrainOptions, run_pretraining

    class Measure(pl.Callback):
        def __init__(self):
            self.times, self.syncs, self.started, self.caught = [], [], 0.0, None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            _synchronize()
            if batch_idx >= 5 and _DEVICE == "cuda":  # after warm-up
                self.caught = warnings.catch_warnings(record=True)
                self.records = self.caught.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if self.caught is not None:
                torch.cuda.set_sync_debug_mode("default")
                self.caught.__exit__(None, None, None)
                self.syncs.append(sum("synchroniz" in str(r.message).lower() for r in self.records))
                self.caught = None
            _synchronize()
            self.times.append(time.perf_counter() - self.started)

    from continue_pt.hubert.module import HubertContinuedPretraining

    saved = targets_module.padded, HubertContinuedPretraining.transfer_batch_to_device
    if before:
        targets_module.padded = lambda lengths, num_samples: lengths is not None
        HubertContinuedPretraining.transfer_batch_to_device = pl.LightningModule.transfer_batch_to_device
    try:
        measure = Measure()
        run_pretraining(PretrainOptions(
            train_data=str(audio), output_dir=str(work / f"single_{before}"),
            init_from=str(_tiny_bundle(work, "tiny_single")), max_steps=steps, warmup_steps=1,
            max_batch_seconds=16.0, min_seconds=1.0, num_workers=2, accelerator=_accelerator(), devices=1,
            checkpoint_every=10_000, log_every=10, progress_bar=False, overwrite=True), callbacks=[measure])
    finally:
        targets_module.padded, HubertContinuedPretraining.transfer_batch_to_device = saved
    return {"s": statistics.median(measure.times[5:]), "syncs": measure.syncs}


def _profile_syncs(work: Path, audio: Path) -> dict[str, float]:
    import lightning.pytorch as pl
    import torch
    from torch.profiler import ProfilerActivity, profile

    from continue_pt.pretrain import PretrainOptions, run_pretraining

    class Profile(pl.Callback):
        def __init__(self):
            self.prof, self.steps = None, 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 5:
                self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if _DEVICE == "cuda"
                                                                          else []))
                self.prof.__enter__()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if self.prof is not None:
                self.steps += 1
                if self.steps == 5:
                    self.prof.__exit__(None, None, None)
                    self.events = self.prof.key_averages()
                    self.prof = None

    prof = Profile()
    run_pretraining(PretrainOptions(
        train_data=str(audio), output_dir=str(work / "profiled"), init_from=str(_tiny_bundle(work, "tiny_prof")),
        max_steps=12, warmup_steps=1, max_batch_seconds=16.0, min_seconds=1.0, num_workers=2,
        accelerator=_accelerator(),
        devices=1, checkpoint_every=10_000, log_every=10, progress_bar=False, overwrite=True), callbacks=[prof])
    names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")
    return {n: sum(e.count for e in prof.events if e.key == n) / prof.steps for n in names}


def check_steps(work: Path, audio: Path, steps: int) -> list[str]:
    before = _single_gpu_run(work, audio, steps, before=True)
    after = _single_gpu_run(work, audio, steps, before=False)
    profiled = _profile_syncs(work, audio)

    def summary(syncs: list[int]) -> str:
        return (f"median {statistics.median(syncs) if syncs else float('nan'):.0f} (min {min(syncs, default=0)}, "
                f"max {max(syncs, default=0)})")

    return [f"- 3. Host syncs per optimizer step (1 GPU, bf16-mixed, `torch.cuda.set_sync_debug_mode`, steps 5+, "
            f"Lightning's own included): now {summary(after['syncs'])}; with the lengths moved to the GPU and given "
            f"to the teacher (before) {summary(before['syncs'])}. Profiler, per step over 5 steps: "
            + ", ".join(f"{k} {v:.1f}" for k, v in profiled.items())
            + " (`_local_scalar_dense` counts reads of CPU tensors too: layer drop draws, Lightning's bookkeeping).",
            f"- 4. Median step time before (as in 3) {before['s']:.4f} s, now {after['s']:.4f} s: "
            f"{before['s'] / after['s']:.2f}x."]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of each timed run (>= 10)")
    ap.add_argument("--no-publish", dest="publish", action="store_false")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run every part on the CPU (checks the script)")
    args = ap.parse_args()
    import torch

    global _DEVICE
    if args.cpu_dry_run:
        _DEVICE, args.publish = "cpu", False
    elif not torch.cuda.is_available():
        print(SKIP_MESSAGE)
        return 0
    command = shlex.join([".venv/bin/python", "bench/gpu_check.py", *sys.argv[1:]])
    info = C.machine_info()
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none (dry run)"
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        audio = _audio(work)
        lines = []
        for part in (lambda: check_ddp(work, audio, max(args.steps, 10)), lambda: check_targets(work),
                     lambda: check_steps(work, audio, max(args.steps, 10))):
            try:
                lines += part()
            except Exception as exc:  # one part failing must not hide the others' results
                lines.append(f"- FAILED: {type(exc).__name__}: {str(exc)[-1500:]}")
            print("\n".join(lines[-3:]), flush=True)
    body = [f"## {SECTION}: issue 15's GPU path checked on CUDA", "",
            f"- Date: {info['date']}; GPUs: {gpus}; torch {info['torch']}, torchaudio {info['torchaudio']}",
            f"- Command: `{command}` (from the repository root); model: the tiny shipped HuBERT (see the script)",
            "", *lines]
    if args.publish:
        C.publish(SECTION, body)
    else:
        print("\n".join(body))
    return 1 if any(line.startswith("- FAILED") or "NOT equal" in line or "**False**" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
