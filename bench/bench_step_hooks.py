"""Time of the post-backward optimizer-step hook work on a HuBERT BASE-sized parameter set (torchaudio's
``hubert_pretrain_base``, 95M parameters in ~200 tensors): dividing every gradient by the sample size and the
global gradient norm, before (a Python loop of ``div_`` and Lightning's ``grad_norm``: one norm kernel and one
host read per tensor) and after (one ``_foreach_div_``, one ``_foreach_norm`` + stack, one host read).

    python bench/bench_step_hooks.py [--device cpu|cuda] [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from continue_pt.step_guard import divide_, fused_grad_norm, gradients  # noqa: E402


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
    args = parser.parse_args()
    from torchaudio.models import hubert_pretrain_base

    torch.manual_seed(0)
    model = hubert_pretrain_base().to(args.device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    print(f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters in {len(params)} tensors on {args.device}, "
          f"{torch.get_num_threads()} threads")
    for name, fn in (("before", before), ("after", after)):  # what each launches: kernels and host reads
        with torch.profiler.profile() as prof:
            fn(model, 1.0000001)
        ops = [e.key for e in prof.key_averages() for _ in range(e.count)]
        reads = sum(op in ("aten::_local_scalar_dense", "aten::item") for op in ops)
        print(f"{name:>6}: {len(ops)} aten ops, {reads} scalar host reads (.item(); 'after' reads once with .tolist()), "
              f"{ops.count('aten::div_')} div_, {ops.count('aten::_foreach_div_')} _foreach_div_")
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
        print(f"{name:>6}: median {statistics.median(values) * 1e3:.1f} ms, min {min(values) * 1e3:.1f} ms "
              f"over {args.rounds} rounds (grad norm {norms[name]:.6f})")
    print(f"speed-up (median): {statistics.median(timings['before']) / statistics.median(timings['after']):.2f}x")


if __name__ == "__main__":
    main()
