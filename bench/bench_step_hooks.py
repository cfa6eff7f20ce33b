"""Time of the post-backward optimizer-step hook work on a HuBERT BASE-sized parameter set (torchaudio's
``hubert_pretrain_base``, 95M parameters in ~200 tensors): dividing every gradient by the sample size and the
global gradient norm, before (a Python loop of ``div_`` and Lightning's ``grad_norm``: one norm kernel and one
host read per tensor) and after (one ``_foreach_div_``, one ``_foreach_norm`` + stack, one host read).

    .venv/bin/python bench/bench_step_hooks.py [--device cpu|cuda] [--rounds 20] [--no-publish]

Writes the section ``bench_step_hooks`` of ``bench/RESULTS.md`` unless ``--no-publish``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from continue_pt.step_guard import divide_, fused_grad_norm, gradients  # noqa: E402

SECTION = "bench_step_hooks"


def before(module: torch.nn.Module, divisor: float) -> float:
    from lightning.pytorch.utilities import grad_norm

    for p in module.parameters():
        if p.grad is not None:
            p.grad.div_(divisor)
    return float(grad_norm(module, norm_type=2)["grad_2.0_norm_total"])


def after(module: torch.nn.Module, divisor: float) -> float:
    grads = gradients(module.parameters())
    norm = fused_grad_norm(grads)
    stats = torch.zeros(11, dtype=torch.float64, device=norm.device)  # the step's statistics, read together
    values = torch.cat([stats, norm.double().reshape(1)]).tolist()
    divide_(grads, divisor)
    return values[-1] / divisor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-publish", dest="publish", action="store_false")
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "bench/bench_step_hooks.py", *sys.argv[1:]])
    info = C.machine_info()
    lines: list[str] = []
    from torchaudio.models import hubert_pretrain_base

    torch.manual_seed(0)
    model = hubert_pretrain_base().to(args.device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    lines.append(f"- {sum(p.numel() for p in params) / 1e6:.1f}M parameters in {len(params)} tensors on "
                 f"{args.device}, {torch.get_num_threads()} threads")
    for name, fn in (("before", before), ("after", after)):  # what each launches: kernels and host reads
        with torch.profiler.profile() as prof:
            fn(model, 1.0000001)
        ops = [e.key for e in prof.key_averages() for _ in range(e.count)]
        reads = sum(op in ("aten::_local_scalar_dense", "aten::item") for op in ops)
        lines.append(f"- {name}: {len(ops)} aten ops, {reads} scalar host reads (.item(); 'after' reads once with "
                     f".tolist()), {ops.count('aten::div_')} div_, {ops.count('aten::_foreach_div_')} _foreach_div_")
    timings: dict[str, list[float]] = {"before": [], "after": []}
    norms = {}
    for _ in range(args.rounds):  # interleaved, so that drifts of the machine hit both alike
        for name, fn in (("before", before), ("after", after)):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            norms[name] = fn(model, 1.0000001)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            timings[name].append(time.perf_counter() - start)
    for name, values in timings.items():
        lines.append(f"- {name}: median {statistics.median(values) * 1e3:.1f} ms, min {min(values) * 1e3:.1f} ms "
                     f"over {args.rounds} interleaved rounds (grad norm {norms[name]:.6f})")
    lines.append(f"- speed-up (median): "
                 f"{statistics.median(timings['before']) / statistics.median(timings['after']):.2f}x")
    body = [f"## {SECTION}: the optimizer-step hook (gradient division + global norm), per-tensor vs fused", "",
            *C.machine_lines(info, command), *lines, "",
            "- What matters on a GPU is the host reads: 'before' waits for the device once per tensor (Lightning's "
            "grad_norm + a loop of div_), 'after' once per step. On a CPU the foreach kernels fall back to "
            "per-tensor loops, so the wall time there says little; the GPU figure comes from bench/gpu_check.py."]
    C.publish_or_print(SECTION, body, args.publish)


if __name__ == "__main__":
    main()
