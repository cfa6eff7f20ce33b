"""Running out of memory in training is a setting to change, not a crash: one error that says which.

A micro-batch too large for the device is the usual cause: ``--max-batch-seconds`` (per device) bounds it, and
data2vec 2.0's ``clone_batch`` copies make its activations several times HuBERT's per audio-second (bench/RESULTS.md,
``bench_memory``). The error names the step, the setting, a lower value with the ``--accumulate`` that keeps the
audio per optimizer step, the memory savers not in use, and the resume command when a checkpoint exists (a resume
takes new batching settings and says that the batch order differs).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bundles.errors import FileProblem


class OutOfMemory(FileProblem):
    """Training ran out of GPU or CPU memory; ``path`` is the run's output directory."""


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA allocation failure (``torch.OutOfMemoryError``) or the CPU allocator's (a ``RuntimeError``)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def out_of_memory_error(error: BaseException, out: Path, step: int, max_batch_seconds: float, accumulate: int,
                        *, activation_checkpointing: bool, precision: str, resume_command: str | None) -> OutOfMemory:
    """The error to raise for ``error`` at optimizer step ``step``; ``resume_command``: the command that resumes
    from the run's last checkpoint (None: no checkpoint yet)."""
    device = "GPU" if isinstance(error, torch.OutOfMemoryError) else "CPU"
    lower = max(max_batch_seconds / 2, 1.0)
    more = accumulate * max(round(max_batch_seconds / lower), 1)
    problem = (f"ran out of {device} memory at optimizer step {step} with micro-batches of up to "
               f"{max_batch_seconds:g} audio-seconds per device (--max-batch-seconds)")
    savers = []
    if not activation_checkpointing:
        savers.append("--activation-checkpointing (recomputes each layer in the backward)")
    if device == "GPU" and precision in ("32", "32-true"):
        savers.append("--precision bf16-mixed")
    hint = (f"Lower --max-batch-seconds (e.g. --max-batch-seconds {lower:g} --accumulate {more}, the same audio per "
            "optimizer step)" + (f", or add {' or '.join(savers)}" if savers else ""))
    if resume_command:
        hint += f". To continue from the last checkpoint: {resume_command} --max-batch-seconds {lower:g} " \
                f"--accumulate {more}"
    return OutOfMemory(out, problem, hint)
