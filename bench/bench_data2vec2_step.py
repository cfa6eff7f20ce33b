"""Benchmark: one data2vec 2.0 BASE training step (forward + backward + optimizer + EMA update), fairseq vs ours,
side by side in one process, on the CPU or a CUDA GPU.

    .venv/bin/python bench/bench_data2vec2_step.py [--steps 9] [--device cuda] [--bf16] [--keep] [--no-publish]

``--device cuda`` runs both on the GPU (each timed span ends with ``torch.cuda.synchronize()``); ``--bf16`` runs
both forwards under ``torch.autocast(bfloat16)``, as ``--precision bf16-mixed`` trains. Each device / precision
writes its own section of ``bench/RESULTS.md`` (the CPU float32 one is ``bench_data2vec2_step``).

A random-weight fairseq data2vec 2.0 BASE (the stored ``data2vec2_base_libri`` config: 12 blocks, 768 wide, ALiBi,
clone_batch 8, top-8 instance-normalised targets, conv decoder, dropout 0.1; layer drop set to 0 in both, see
``Steps``) is built with fairseq's own code (``tests/data2vec2_reference.py``, seed 0), saved as its trainer saves it and converted into a bundle.
``torch.set_num_threads(2)``, float32, the same batch for both: 2 utterances x 4 s of seeded noise, normalised as
the dataset does (199 frames each; 16 masked copies), ids 0 and 1, num_updates 1000.

* (a) fairseq: ``Data2VecMultiModel`` (train mode) ``forward(source, id=ids)`` (its own MaskSeed masks) + the summed
  loss's ``backward()`` + the gradients divided by the sample size (its trainer's ``multiply_grads``) + AdamW step +
  ``set_num_updates`` (the EMA teacher's update).
* (b) ours: ``Data2Vec2ContinuedPretraining._forward`` (the same seeded masks, the module's path) + ``backward()`` +
  the division + AdamW step (``optimized_parameters``: without the teacher) + ``ema_update``.

Both use ``torch.optim.AdamW`` (betas 0.9/0.98, eps 1e-6, weight decay 0.01; fairseq's trainer would use its own
Adam, which does the same arithmetic). ``torch.manual_seed(i)`` / ``np.random.seed(i)`` before round i for both.
One warm-up step each, then ``--steps`` rounds interleaved (a, b); medians. Equality of the loss and every gradient
is not re-checked here: ``tests/continue_pt/test_data2vec2_pretrain.py`` does it (without dropout).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

SECTION = "bench_data2vec2_step"
NAME = "data2vec2_base_libri"
SEED, NUM_THREADS, BATCH, SECONDS, UPDATES = 0, 2, 2, 4.0, 1000
TARGET_RATIO = 0.8


def _optimizer(params: list[Any]) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)


class Steps:
    def __init__(self, work: Path, device: str = "cpu", bf16: bool = False):
        import torch

        from bundles.loading import load_bundle
        from continue_pt.data2vec2.module import Data2Vec2ContinuedPretraining
        from continue_pt.module_options import ModuleOptions
        from converters.convert import convert_checkpoint
        from tests.data2vec2_reference import (build_data2vec2_model, load_data2vec2_config, prepare,
                                               save_data2vec2_checkpoint)

        self.torch, self.device, self.bf16 = torch, torch.device(device), bf16
        t0 = time.perf_counter()
        stored = load_data2vec2_config(NAME)
        # Layer drop off in both: the two draw it from the RNG in different orders, so with it on a round could
        # time 11 blocks against 12 (seen: fairseq dropped one where ours kept all).
        stored["model"]["layerdrop"] = 0.0
        stored["model"]["modalities"]["audio"]["prenet_layerdrop"] = 0.0
        ref = build_data2vec2_model(NAME, seed=SEED, stored=stored)
        ckpt = work / "base.pt"
        save_data2vec2_checkpoint(ref, ckpt, num_updates=UPDATES)
        bundle_dir = convert_checkpoint(ckpt, work / "bundle", overwrite=True)
        C.log(f"built, saved and converted BASE in {time.perf_counter() - t0:.1f} s")
        g = torch.Generator().manual_seed(SEED)
        wav = torch.randn(BATCH, int(SECONDS * 16000), generator=g)
        self.source = prepare(wav, None)[0].to(self.device)
        self.ids = torch.arange(BATCH)
        # fairseq's EMA teacher is no submodule: its forward moves it to the input's device on the first call
        self.fs = ref.model.to(self.device).train()
        self.fs_opt = _optimizer([p for p in self.fs.parameters() if p.requires_grad])
        self.module = Data2Vec2ContinuedPretraining(ModuleOptions(bundle=str(bundle_dir))).to(self.device).train()
        self.our_opt = _optimizer(self.module.optimized_parameters())
        self.batch = {"waveforms": self.source, "lengths": torch.full((BATCH,), self.source.shape[1]),
                      "indices": self.ids}
        self.bundle = load_bundle(bundle_dir)

    def _clock(self) -> float:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def _precision(self) -> Any:
        import contextlib

        if not self.bf16:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)

    def _seed(self, i: int) -> None:
        import numpy as np

        self.torch.manual_seed(i)
        np.random.seed(i)

    def fairseq(self, i: int) -> dict[str, Any]:
        from continue_pt.step_guard import divide_, gradients

        self.fs_opt.zero_grad(set_to_none=True)
        self._seed(i)
        self.fs.num_updates = UPDATES
        t0 = self._clock()
        with self._precision():
            result = self.fs(source=self.source, padding_mask=None, id=self.ids)
            loss = sum(v.float().sum() for v in result["losses"].values())
        t1 = self._clock()
        loss.backward()
        t2 = self._clock()
        divide_(gradients(self.fs.parameters()), float(result["sample_size"]))
        self.fs_opt.step()
        self.fs.set_num_updates(UPDATES + 1)
        t3 = self._clock()
        return {"s": t3 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2}

    def ours(self, i: int) -> dict[str, Any]:
        from continue_pt.data2vec2.ema import ema_update
        from continue_pt.step_guard import divide_, gradients

        self.our_opt.zero_grad(set_to_none=True)
        self._seed(i)
        m = self.module
        t0 = self._clock()
        with self._precision():
            out = m._forward(self.batch)
        t1 = self._clock()
        out.loss.backward()
        t2 = self._clock()
        divide_(gradients(m.parameters()), float(out.sample_size))
        self.our_opt.step()
        ema_update(m.student.teacher, m.student.student.encoder, m.decay_after_update(1))
        t3 = self._clock()
        return {"s": t3 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2}


def run(args: argparse.Namespace, command: str) -> None:
    import torch

    torch.set_num_threads(NUM_THREADS)
    info = C.machine_info()
    work = C.WORK / "data2vec2_step"
    work.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    section = SECTION + ("" if args.device == "cpu" else "_cuda") + ("_bf16" if args.bf16 else "")
    precision = "bf16 autocast (as --precision bf16-mixed)" if args.bf16 else "float32"
    where = (f"CPU, torch threads {NUM_THREADS}" if args.device == "cpu"
             else f"GPU {torch.cuda.get_device_name(args.device)}")
    steps = Steps(work, args.device, args.bf16)
    runs, loads = C.interleaved_rounds({"a": steps.fairseq, "b": steps.ours}, args.steps)
    med = {k: {part: statistics.median(r[part] for r in v) for part in ("s", "fwd", "bwd", "opt")}
           for k, v in runs.items()}
    pairs = statistics.median(b["s"] / a["s"] for a, b in zip(runs["a"], runs["b"]))
    ratio = med["b"]["s"] / med["a"]["s"]
    # fairseq's step varies more with the load than ours (its copies and conv backward are memory-bound): the
    # fastest rounds show the ratio where neither is disturbed
    fastest = min(r["s"] for r in runs["b"]) / min(r["s"] for r in runs["a"])
    rows = [[label, f"{med[k]['s']:.3f}", ", ".join(f"{r['s']:.3f}" for r in runs[k]), f"{med[k]['fwd']:.3f}",
             f"{med[k]['bwd']:.3f}", f"{med[k]['opt']:.3f}"]
            for k, label in (("a", "(a) fairseq `Data2VecMultiModel` + backward + AdamW + `set_num_updates`"),
                             ("b", "(b) ours: module `_forward` + backward + AdamW + `ema_update`"))]
    # judged on the same-round pairs: on the shared 2-core machine one loaded round can triple a step's time, and a
    # ratio of medians then measures the load, not the code (a first run showed 0.39x with same-round pairs at 1.04x)
    verdict = "**meets**" if pairs <= TARGET_RATIO else "**misses**"
    body = [f"## {section}: one data2vec 2.0 BASE training step, fairseq vs ours ({where}, {precision})", "",
            *C.machine_lines(info, command, None if args.device == "cpu" else torch.cuda.get_device_name(args.device)),
            f"- {where}; {precision}; one process. Model: random-weight BASE from the stored "
            f"`{NAME}` config (12 blocks, 768-d, clone_batch 8, top-8 targets, dropout 0.1; layer drop 0 in both, "
            "as the two draw it in different orders), built "
            "with fairseq's code, converted to a bundle. Batch: 2 x 4 s seeded noise, normalised, ids 0/1, "
            f"num_updates {UPDATES}; both draw the same MaskSeed masks (16 copies x 199 frames). Train mode with the "
            "config's dropout; seeds set per round. 1 warm-up each, then rounds interleaved; medians.",
            "", C.table(["measurement", "s / step (median)", "runs (s)", "forward", "backward", "opt + EMA"], rows),
            "", C.table(["ratio", "value", "target", "verdict"],
                        [["median of same-round (b_i / a_i) step time", f"{pairs:.2f}×", f"≤ {TARGET_RATIO}×",
                          verdict],
                         ["(b) / (a) of the median step times", f"{ratio:.2f}×", "(context; load-sensitive)", ""],
                         ["(b) / (a) of the fastest rounds", f"{fastest:.2f}×", "(context: the least-loaded rounds)",
                          ""],
                         ["(b) / (a) forward", f"{med['b']['fwd'] / med['a']['fwd']:.2f}×", "(context)", ""],
                         ["(b) / (a) backward", f"{med['b']['bwd'] / med['a']['bwd']:.2f}×", "(context)", ""]]),
            "", f"- 1-minute load average before each round: {', '.join(loads)}.",
            "- Both steps run the same work: the conv front end once, the teacher's 12 blocks on the 2 utterances, "
            "the student's 12 blocks on the kept frames of the 16 copies, the decoder, the backward of all of it, "
            "AdamW over the student and decoder and the EMA over the teacher. What ours does differently is layout, "
            "not arithmetic: the conv front end is time-major, each conv one matrix product over unfolded windows, "
            "and the positional encoder's and decoder's grouped convs run channels-last, so no tensor is transposed "
            "around a layer norm (fairseq's `[B, C, T]` convs copy the features on each side of every norm, and the "
            "convs' backward over those transposed gradients was the largest single cost of its step); the "
            "student's attention, whose ALiBi bias needs its gradient, adds the bias and the scale inside one "
            "batched product (`baddbmm`) instead of torch's fallback path. Loss and gradients stay equal to "
            "fairseq's (the parity tests). The machine is shared: single rounds vary by 10-20 %, hence many rounds "
            "and same-round pairs."]
    if args.no_publish:  # (_common.publish_or_print's parameter shadows _common.publish)
        print("\n".join(body))
    else:
        C.publish(section, body)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--bf16", action="store_true", help="both forwards under bf16 autocast")


def main() -> None:
    C.script_main(run, __file__, __doc__, _arguments)


if __name__ == "__main__":
    main()
