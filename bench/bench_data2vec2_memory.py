"""Benchmark: data2vec 2.0's training memory per audio-second, and the largest micro-batch on an 80 GB GPU.

    .venv/bin/python bench/bench_data2vec2_memory.py [--no-publish] [--keep] [--smoke]

data2vec 2.0 trains its student on ``clone_batch`` (8) masked copies of every utterance, so its activations per
audio-second are several times HuBERT's (``bench_memory``), and its attention matrices (the kept frames of each copy,
squared) make them grow with the crop length. For the random-weight BASE and LARGE of the stored configs (built with
fairseq's code, converted), one training forward of the LightningModule's path (``Data2Vec2ContinuedPretraining
._forward``: teacher, student on the copies, decoder, loss) runs on one crop of each length under bf16 autocast (what
``--precision bf16-mixed`` trains with), and every tensor autograd saves for the backward is counted once by its
storage (``saved_tensors_hooks``; weights excluded). That is what the backward keeps alive at its peak; the
transient buffers of a single operation are not in it.

States: fp32 student + decoder with their gradients and AdamW's two moments (16 bytes per parameter) plus the fp32
teacher (4 bytes). Largest micro-batch: (usable memory - states) / (saved bytes per audio-second at that crop
length), for ``USABLE_GIB`` of an 80 GB GPU. ``--smoke``: the tiny demo checkpoint, short crops, nothing published.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

SECTION = "bench_data2vec2_memory"
USABLE_GIB = 77.0
"""Usable memory of an 80 GB GPU (about 79.6 GiB) less the CUDA context and the allocator's slack, as bench_memory."""
HUBERT_BASE_GIB_PER_S = 0.034
"""HuBERT BASE's saved activations per audio-second under bf16 (bench_memory's table), for comparison."""
DEFAULT_BATCH_S = 87.5
"""``--max-batch-seconds``' default (continue_pt/options.py)."""
CROPS = {"BASE": (4.0, 15.625, 20.0), "LARGE": (4.0, 10.0)}
"""Crop lengths (s) measured per size: 15.625 s is the HuBERT recipes' crop, 20 s data2vec 2.0 BASE's
(max_sample_size 320,000); LARGE stops at 10 s to stay within this machine's memory."""
SMOKE_CROPS = (1.0, 2.0)
GIB = 2**30


def _module(bundle: Path) -> Any:
    from continue_pt.data2vec2.module import Data2Vec2ContinuedPretraining
    from continue_pt.module_options import ModuleOptions

    return Data2Vec2ContinuedPretraining(ModuleOptions(bundle=str(bundle))).train()


def build(name: str, work: Path) -> Any:
    """A random-weight fairseq data2vec 2.0 of the stored config ``name``, saved and converted: its module."""
    from converters.convert import convert_checkpoint
    from tests.data2vec2_reference import build_data2vec2_model, save_data2vec2_checkpoint

    ref = build_data2vec2_model(name, seed=0)
    save_data2vec2_checkpoint(ref, work / f"{name}.pt", num_updates=1000)
    del ref
    return _module(convert_checkpoint(work / f"{name}.pt", work / name, overwrite=True))


def smoke_module(work: Path) -> Any:
    """The tiny demo data2vec 2.0 checkpoint's module."""
    from continue_pt.demo import DATA2VEC2_CHECKPOINT
    from converters.convert import convert_checkpoint

    return _module(convert_checkpoint(DATA2VEC2_CHECKPOINT, work / "tiny", overwrite=True))


def saved_bytes(module: Any, seconds: float) -> int:
    """Bytes autograd keeps for the backward of one training forward of one crop of ``seconds``, bf16 autocast."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    samples = int(16000 * seconds)
    waveforms = torch.randn(1, samples, generator=torch.Generator().manual_seed(1))
    batch = {"waveforms": waveforms, "lengths": torch.tensor([samples]), "indices": torch.tensor([0])}
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module._forward(batch)
    del out
    return sum(seen.values())


def state_bytes(module: Any) -> tuple[int, int, int]:
    """(student + decoder parameters, teacher parameters, state bytes: 16 per trained + 4 per teacher parameter)."""
    teacher = sum(p.numel() for p in module.student.teacher.parameters())
    trained = sum(p.numel() for p in module.optimized_parameters())
    return trained, teacher, 16 * trained + 4 * teacher


def rows_for(label: str, module: Any, crops: tuple[float, ...]) -> list[list[str]]:
    trained, teacher, states = state_bytes(module)
    rows = []
    for seconds in crops:
        rate = saved_bytes(module, seconds) / seconds
        C.log(f"{label} {seconds:g} s: {rate / GIB:.3f} GiB per audio-second")
        fits = max(USABLE_GIB * GIB - states, 0) / rate
        rows.append([label, f"{trained / 1e6:,.1f}M + {teacher / 1e6:,.1f}M", f"{states / GIB:.1f}", f"{seconds:g}",
                     f"{rate / GIB:.3f}", f"{fits:,.0f}"])
        measured[(label, seconds)] = (rate, states)
    return rows


measured: dict[tuple[str, float], tuple[float, int]] = {}
"""(model, crop s) -> (saved bytes per audio-second, state bytes), filled by :func:`rows_for`."""


def default_batch_note() -> str:
    """What the default micro-batch needs for BASE at the 15.625 s crop, from the measurements."""
    rate, states = measured[("data2vec 2.0 BASE", 15.625)]
    need = (DEFAULT_BATCH_S * rate + states) / GIB
    return (f"The rate grows with the crop: the student's attention keeps each copy's kept-frame matrix (quadratic in "
            f"the crop) for the backward. At 15.625 s crops BASE keeps {rate / GIB:.3f} GiB per audio-second, "
            f"{rate / GIB / HUBERT_BASE_GIB_PER_S:.1f}x HuBERT BASE's {HUBERT_BASE_GIB_PER_S} (bench_memory): the "
            f"default `--max-batch-seconds` {DEFAULT_BATCH_S:g} needs about {need:.0f} GiB with the states. Out of "
            "memory ends in one `Error:` line that names the setting to lower (`continue_pt/out_of_memory.py`).")


def run(args: argparse.Namespace, command: str) -> None:
    import torch

    torch.set_num_threads(2)
    info = C.machine_info()
    work = C.WORK / "data2vec2_memory"
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        rows = rows_for("tiny demo", smoke_module(work), SMOKE_CROPS)
    else:
        rows = []
        for label, name in (("data2vec 2.0 BASE", "data2vec2_base_libri"), ("data2vec 2.0 LARGE", "data2vec2_large_vox")):
            module = build(name, work)
            rows += rows_for(label, module, CROPS[label.split()[-1]])
            del module
    body = [f"## {SECTION}: data2vec 2.0 training memory per audio-second; the largest micro-batch on an 80 GB GPU", "",
            *C.machine_lines(info, command),
            "- Random-weight models of the stored configs (fairseq's code, converted); one crop per measurement; "
            "bf16 autocast on the CPU; tensors saved for the backward counted once by storage (weights excluded).",
            "", C.table(["model", "trained + teacher params", "states GiB", "crop s", "saved GiB / audio-s",
                         f"max s per micro-batch ({USABLE_GIB:g} GiB)"], rows),
            *([] if args.smoke else ["", default_batch_note()])]
    C.publish_or_print(SECTION, body, not (args.no_publish or args.smoke))


def main() -> None:
    C.script_main(run, __file__, __doc__, lambda parser: parser.add_argument(
        "--smoke", action="store_true", help="the tiny demo checkpoint, short crops, no publishing"))


if __name__ == "__main__":
    main()
