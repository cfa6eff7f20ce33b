"""Audio and a short training run for the positive ``kmeans check`` test (tests/continue_pt/test_kmeans_check.py).

The tiny demo model is a random-init HuBERT, and its k-means labels frame by frame: on ``demo_audio`` (tones whose
pitch and loudness drift continuously) consecutive frames get different cluster ids ~85 % of the time, so the id of a
masked frame cannot be read off the visible frames around it (the majority id of the visible context is right ~9 % of
the time, chance 5 %). Real HuBERT targets are phone-like: one id over several frames. :func:`phone_audio` gives the
tiny model such targets from the same generator: each "phone" is one 20 ms (one frame hop) piece of ``demo_audio``
repeated for ``segment`` seconds, so every frame of it sees the same waveform and gets the same id (ids change at
~10 % of frames, and the majority id of the visible context is right ~78 % of the time).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import soundfile as sf
import torch

from continue_pt.demo import demo_audio

SAMPLE_RATE = 16000
HOP = 320  # the tiny model's conv stride: 20 ms per frame


def phone_audio(seconds: float, seed: int, segment: float = 0.5) -> torch.Tensor:
    """``[1, samples]``: consecutive ``segment``-second stretches, each one frame hop of ``demo_audio`` repeated."""
    g = torch.Generator().manual_seed(seed)
    source = demo_audio(2.0, seed=seed)[0]
    n = int(SAMPLE_RATE * segment)
    pieces = []
    for _ in range(max(1, round(seconds / segment))):
        start = int(torch.randint(0, source.numel() - HOP, (1,), generator=g))
        pieces.append(source[start:start + HOP].repeat(n // HOP + 1)[:n])
    return torch.cat(pieces).unsqueeze(0)


def write_phone_corpus(directory: Path, num_files: int, seconds: float, first_seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(num_files):
        sf.write(directory / f"p{first_seed + i:05d}.wav", phone_audio(seconds, seed=first_seed + i)[0].numpy(),
                 SAMPLE_RATE)
    return directory


@contextmanager
def one_thread():
    """Train with one intra-op thread: on a small shared CPU two threads contend with other processes (the
    training below took ~4x longer with two threads while another test run used the other core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# training run: ~20 s on 2 CPU cores (~30 s while another test run shares them)
TRAIN_FILES = 64
TRAIN_SECONDS = 3.0
TRAIN_STEPS = 300
TRAIN_LR = 4e-3


def train_on_own_kmeans(bundle_dir: Path, root: Path) -> Path:
    """Continue pre-training the tiny bundle with ``continue-pt pretrain``'s own path (online targets: the frozen
    starting bundle as teacher, its k-means) on phone-like audio; returns the exported bundle's directory.

    The conv feature extractor stays frozen (random in the tiny model, and the teacher's is the same one): ~20 % less
    step time; the transformer and the label head learn the ids. lr 3e-3..4e-3 and 250-300 steps all reach a
    masked accuracy of ~0.35-0.39 against a "matches" bar of ~0.18-0.21 (training seeds 0-2 too); lr 1e-2
    collapses the predictions onto few ids."""
    from continue_pt.pretrain import PretrainOptions, run_pretraining

    audio = write_phone_corpus(root / "train_audio", TRAIN_FILES, TRAIN_SECONDS, first_seed=2000)
    options = PretrainOptions(
        train_data=str(audio), output_dir=str(root / "run"), init_from=str(bundle_dir), max_steps=TRAIN_STEPS,
        lr=TRAIN_LR, warmup_steps=TRAIN_STEPS // 10, max_batch_seconds=2 * TRAIN_SECONDS, min_seconds=1.0,
        freeze_feature_extractor_steps=TRAIN_STEPS, num_workers=0, checkpoint_every=TRAIN_STEPS,
        log_every=TRAIN_STEPS // 10, progress_bar=False, seed=0)
    with one_thread():
        return run_pretraining(options).bundle_dir
