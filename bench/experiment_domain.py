"""Experiment: does continued pre-training on a new domain raise masked-prediction accuracy on held-out audio
of that domain?

    .venv/bin/python bench/experiment_domain.py [--steps-a 300] [--steps-b 300] [--keep]

No real speech can be downloaded here, so both "domains" are generated, and the model is the tiny fairseq HuBERT
of the demo (2 layers, width 64, K=20 targets from its own layer 1 + the shipped k-means, the frozen teacher):

1. pre-train on domain A (harmonic tones with a drifting pitch: ``continue_pt.demo.demo_audio``) -> bundle A;
2. measure masked accuracy of bundle A on held-out A and held-out B (B: noise bursts through moving resonances
   plus chirps, a different spectral world);
3. continue bundle A on domain B -> bundle A+B; measure again on held-out A and B.

Every number is a Lightning ``Trainer.validate`` of the same module code the training uses (same targets, masks
seeded per batch). Writes the ``experiment_domain`` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, machine_lines, table, write_section  # noqa: E402

from continue_pt.data import AudioDataModule  # noqa: E402
from continue_pt.demo import CHECKPOINT, KMEANS, KMEANS_LAYER, demo_audio  # noqa: E402
from continue_pt.hubert.module import HubertContinuedPretraining  # noqa: E402
from continue_pt.module_options import ModuleOptions  # noqa: E402
from continue_pt.hubert.options import HubertOptions  # noqa: E402
from continue_pt.pretrain import PretrainOptions, run_pretraining  # noqa: E402
from converters.convert import convert_checkpoint  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work" / "experiment_domain"
SECONDS = 3.0


def domain_b_audio(seconds: float, seed: int) -> torch.Tensor:
    """Noise bursts through slowly moving resonances plus exponential chirps: nothing like domain A's harmonics."""
    g = torch.Generator().manual_seed(seed)
    n = int(16000 * seconds)
    t = torch.arange(n) / 16000
    noise = torch.randn(n, generator=g)
    centre = 800 + 600 * torch.sin(2 * torch.pi * 0.3 * t + float(torch.rand(1, generator=g)) * 6)
    resonance = torch.sin(2 * torch.pi * torch.cumsum(centre, 0) / 16000)
    bursts = (torch.sin(2 * torch.pi * 3 * t) > 0.3).float()
    chirp = torch.sin(2 * torch.pi * 200 * (torch.exp(t * 1.5) - 1) / 1.5)
    return (0.6 * noise * resonance * bursts + 0.4 * chirp).unsqueeze(0)


def write_corpus(directory: Path, make, count: int, seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        sf.write(directory / f"u{i:03d}.wav", make(SECONDS, seed + i)[0].numpy(), 16000)
    return directory


def masked_accuracy(bundle: Path, teacher: Path, audio: Path) -> tuple[float, float]:
    """(masked accuracy, loss) of ``bundle`` on ``audio`` with targets from ``teacher`` (Trainer.validate)."""
    module = HubertContinuedPretraining(ModuleOptions(bundle=str(bundle), seed=123, hubert=HubertOptions(teacher=str(teacher))))
    data = AudioDataModule(str(audio), str(audio), sample_rate=16000, normalize=module.data_normalizes,
                           max_batch_seconds=4 * SECONDS, min_seconds=1.0, num_workers=0, seed=123)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    return float(metrics["val/accuracy_masked"]), float(metrics["val/loss"])


def train(bundle: Path, teacher_kmeans: Path, audio: Path, out: Path, steps: int) -> Path:
    options = PretrainOptions(init_from=str(bundle), train_data=str(audio), output_dir=str(out), max_steps=steps,
                              warmup_steps=max(steps // 10, 1), lr=5e-4, max_batch_seconds=4 * SECONDS,
                              min_seconds=1.0, num_workers=0, checkpoint_every=steps, log_every=10,
                              progress_bar=False, overwrite=True, seed=0, kmeans=str(teacher_kmeans))
    return run_pretraining(options).bundle_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-a", type=int, default=300)
    parser.add_argument("--steps-b", type=int, default=300)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    command = "python bench/experiment_domain.py " + " ".join(sys.argv[1:])
    torch.set_num_threads(2)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    start = time.time()
    original = convert_checkpoint(CHECKPOINT, WORK / "original", kmeans=KMEANS, kmeans_layer=KMEANS_LAYER)
    kmeans = original / "kmeans.safetensors"
    a_train = write_corpus(WORK / "a_train", demo_audio, 40, seed=10_000)
    a_test = write_corpus(WORK / "a_test", demo_audio, 8, seed=20_000)
    b_train = write_corpus(WORK / "b_train", domain_b_audio, 40, seed=30_000)
    b_test = write_corpus(WORK / "b_test", domain_b_audio, 8, seed=40_000)

    bundle_a = train(original, kmeans, a_train, WORK / "run_a", args.steps_a)
    bundle_ab = train(bundle_a, kmeans, b_train, WORK / "run_ab", args.steps_b)
    rows, results = [], {}
    for name, bundle in (("original (random init)", original), ("A: pre-trained on domain A", bundle_a),
                         ("A+B: A continued on domain B", bundle_ab)):
        acc_a, loss_a = masked_accuracy(bundle, original, a_test)
        acc_b, loss_b = masked_accuracy(bundle, original, b_test)
        results[name] = (acc_a, acc_b)
        rows.append([name, f"{acc_a:.3f}", f"{loss_a:.3f}", f"{acc_b:.3f}", f"{loss_b:.3f}"])
    elapsed = time.time() - start
    gain = results["A+B: A continued on domain B"][1] - results["A: pre-trained on domain A"][1]
    body = "\n".join([
        "## experiment_domain: continued pre-training on a new domain, masked accuracy on held-out audio",
        "",
        *machine_lines(machine_info(), command),
        f"- Model: the demo's tiny fairseq HuBERT (2 layers, width 64, random init), converted; targets: its own "
        f"layer-{KMEANS_LAYER} features + the shipped K=20 k-means, from the frozen original (the same teacher "
        "throughout). Chance accuracy is 1/20 = 0.05.",
        f"- Data (generated; no speech can be downloaded here): domain A = harmonic tones with drifting pitch, "
        f"domain B = noise bursts through moving resonances + chirps; 40 training and 8 held-out files of "
        f"{SECONDS:.0f} s per domain.",
        f"- Training: `continue-pt pretrain` code path (`run_pretraining`), lr 5e-4, 10 % warm-up, "
        f"{4 * SECONDS:.0f} s of audio per batch; A: {args.steps_a} steps from the original, then A+B: "
        f"{args.steps_b} steps from bundle A on domain B. Evaluation: `Trainer.validate`, masks seeded.",
        f"- Total wall time {elapsed:.0f} s on the CPU.",
        "",
        table(["model", "masked acc, held-out A", "loss A", "masked acc, held-out B", "loss B"], rows),
        "",
        f"Continuing on domain B changed masked accuracy on held-out B by {gain:+.3f} "
        f"({results['A: pre-trained on domain A'][1]:.3f} → {results['A+B: A continued on domain B'][1]:.3f}); "
        f"on held-out A it went {results['A: pre-trained on domain A'][0]:.3f} → "
        f"{results['A+B: A continued on domain B'][0]:.3f}.",
    ])
    write_section("experiment_domain", body)
    print(body)
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
