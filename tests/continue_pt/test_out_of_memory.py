"""Out of memory in training: one `Error:` line naming the setting to lower and how to resume, no traceback."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from continue_pt.cli import cli
from continue_pt.hubert.module import HubertContinuedPretraining
from continue_pt.out_of_memory import is_out_of_memory


def _fail_from_step(monkeypatch, step: int, error: Exception) -> None:
    original = HubertContinuedPretraining.training_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step >= step:
            raise error
        return original(self, batch, batch_idx)

    monkeypatch.setattr(HubertContinuedPretraining, "training_step", training_step)


def _pretrain(bundle_dir, audio_dir, out, *extra: str):
    return CliRunner().invoke(cli, ["pretrain", "--init-from", str(bundle_dir), "--train-data", str(audio_dir),
                                    "--output-dir", str(out), "--max-steps", "4", "--checkpoint-every", "2",
                                    "--max-batch-seconds", "6", "--accelerator", "cpu", "--min-seconds", "1",
                                    *extra])


def test_gpu_out_of_memory_names_the_batch_setting_and_the_resume(bundle_dir, audio_dir, tmp_path, monkeypatch):
    _fail_from_step(monkeypatch, 2, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    out = tmp_path / "run"
    result = _pretrain(bundle_dir, audio_dir, out)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    error = result.output[result.output.index("Error: "):]
    assert error.startswith(f"Error: {out}: ran out of GPU memory at optimizer step 2 with micro-batches of up to 6 "
                            "audio-seconds per device (--max-batch-seconds)")
    assert "--max-batch-seconds 3 --accumulate 2, the same audio per optimizer step" in error
    assert "--activation-checkpointing" in error
    last = out / "checkpoints" / "last.ckpt"
    assert last.exists() and f"continue-pt pretrain --resume {last} --config {out / 'resume.yaml'} " \
                              "--max-batch-seconds 3 --accumulate 2" in error


def test_out_of_memory_before_any_checkpoint_has_no_resume_and_leaves_nothing(bundle_dir, audio_dir, tmp_path,
                                                                              monkeypatch):
    _fail_from_step(monkeypatch, 0, RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                                                 "can't allocate memory: you tried to allocate 99 bytes"))
    out = tmp_path / "run"
    result = _pretrain(bundle_dir, audio_dir, out, "--activation-checkpointing")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "ran out of CPU memory at optimizer step 0" in result.output
    assert "--activation-checkpointing" not in result.output.split("Error: ")[1]  # already on: not suggested
    assert "To continue from the last checkpoint" not in result.output and not out.exists()


@pytest.mark.parametrize("error, expected", [
    (torch.OutOfMemoryError("CUDA out of memory"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("can't allocate memory"), False),
])
def test_only_allocation_failures_count(error, expected):
    assert is_out_of_memory(error) is expected
