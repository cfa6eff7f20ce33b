"""data2vec 2.0's EMA teacher: the annealed decay and the update after each optimizer step, as fairseq's
``Data2VecMultiModel.set_num_updates`` and ``EMAModule.step`` do them.

fairseq calls ``set_num_updates(n)`` after the n-th optimizer step: it sets the decay for update n (annealed
linearly from ``ema_decay`` to ``ema_end_decay`` over ``ema_anneal_end_step`` updates; unchanged when the two are
equal) and, if that decay is below 1, moves every teacher tensor towards the student's (``ema_encoder_only=False``:
the positional encoder, the prenet, the blocks and the ALiBi scales; the conv front end and the decoder have no
teacher copy). A decay of 1 (LARGE's end of schedule) leaves the teacher frozen.
"""

from __future__ import annotations

import torch
from torch import nn


def annealed_rate(start: float, end: float, step: int, total_steps: int) -> float:
    """fairseq's ``get_annealed_rate``: linear from ``start`` (step 0) to ``end`` (``total_steps`` and after)."""
    if step >= total_steps:
        return end
    r = end - start
    pct_remaining = 1 - step / total_steps
    return end - r * pct_remaining


def ema_decay_at(num_updates: int, ema_decay: float, ema_end_decay: float, ema_anneal_end_step: int) -> float:
    """The teacher's decay for update ``num_updates`` (the decay the update after that optimizer step uses)."""
    if ema_decay == ema_end_decay:
        return ema_decay
    if num_updates >= ema_anneal_end_step:
        return ema_end_decay
    return annealed_rate(ema_decay, ema_end_decay, num_updates, ema_anneal_end_step)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> bool:
    """teacher <- decay * teacher + (1 - decay) * student, tensor by tensor (same names, in float32 when the teacher
    is), with fairseq's arithmetic (``mul_(1 - lr)``, ``add_(alpha=lr)``, ``lr = 1 - decay``); a student tensor
    that takes no gradient is copied. Returns False (and changes nothing) when ``decay >= 1``."""
    if decay >= 1:
        return False
    students = {_unwrapped(name): p for name, p in student.named_parameters()}
    teachers = dict(teacher.named_parameters())
    if students.keys() != teachers.keys():
        missing = sorted(set(teachers) ^ set(students))[:5]
        raise ValueError(f"teacher and student tensors differ: {missing}")
    lr = 1 - decay
    for name, target in teachers.items():
        source = students[name].detach().to(dtype=target.dtype)
        if not students[name].requires_grad:
            target.copy_(source)
        else:
            target.mul_(1 - lr)
            target.add_(source, alpha=lr)
    return True


_CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."


def _unwrapped(name: str) -> str:
    """A student parameter's name as the teacher has it: without the segment ``--activation-checkpointing``'s
    wrapper inserts (torch's ``CheckpointWrapper`` keeps the state-dict names, not the parameter names)."""
    return name.replace(_CHECKPOINT_WRAPPER, "")
