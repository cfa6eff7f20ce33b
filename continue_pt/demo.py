"""`continue-pt demo`: the main job end to end on a tiny built-in checkpoint, with nothing to download.

The shipped checkpoints (``demo_assets/tiny_hubert.pt``, ``tiny_wav2vec2.pt``) were written by fairseq's own
HuBERT / wav2vec 2.0 classes and saved as fairseq's trainer saves checkpoints; the k-means
(``tiny_hubert_L1_km20.bin``) is a real scikit-learn MiniBatchKMeans written with joblib.
``tests/make_demo_assets.py`` regenerates them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from bundles.loading import load_bundle

ASSETS = Path(__file__).resolve().parent / "demo_assets"
CHECKPOINT = ASSETS / "tiny_hubert.pt"
KMEANS = ASSETS / "tiny_hubert_L1_km20.bin"
KMEANS_LAYER = 1
WAV2VEC2_CHECKPOINT = ASSETS / "tiny_wav2vec2.pt"
DATA2VEC2_CHECKPOINT = ASSETS / "tiny_data2vec2.pt"
DATA2VEC2_NUM_UPDATES = 400_000
DATA2VEC2_EMA_RESTART = "0.99:0.999:10"
"""The demo's restarted teacher anneal (the checkpoint's own schedule ended at 0.99999: nearly frozen)."""


def demo_audio(seconds: float, seed: int) -> torch.Tensor:
    """Harmonic tones with a drifting pitch plus noise (the same generator the assets were fitted on)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(16000 * seconds)) / 16000
    f0 = 120 + 80 * torch.sin(2 * torch.pi * 0.5 * t + torch.rand(1, generator=g) * 6)
    phase = 2 * torch.pi * torch.cumsum(f0, 0) / 16000
    wav = sum(torch.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * torch.sin(2 * torch.pi * 2 * t))
    return (wav + 0.05 * torch.randn(t.shape, generator=g)).unsqueeze(0)


def run_demo(output_dir: Path, echo: Callable[[str], None] = print) -> Path:
    """Convert the tiny checkpoint with its k-means, verify it, load it and label generated audio."""
    from converters.convert import convert_checkpoint
    from converters.describe import describe
    from converters.verify import verify_bundle

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    bundle_dir = output_dir / "tiny_hubert_bundle"
    shutil.rmtree(bundle_dir, ignore_errors=True)
    echo(f"1. convert {CHECKPOINT.name} + {KMEANS.name} (layer {KMEANS_LAYER}) -> {bundle_dir}")
    convert_checkpoint(CHECKPOINT, bundle_dir, kmeans=KMEANS, kmeans_layer=KMEANS_LAYER)
    echo("2. inspect: " + json.dumps({k: v for k, v in describe(bundle_dir).items() if k != "source"}))
    report = verify_bundle(bundle_dir, CHECKPOINT)
    echo(f"3. verify: {report.compared} tensors compared, {len(report.mismatches)} mismatches")
    if not report.ok:
        raise RuntimeError("verification failed: " + "; ".join(report.mismatches))
    bundle = load_bundle(bundle_dir)
    model, km = bundle.get_model(), bundle.get_kmeans()
    wav = demo_audio(2.0, seed=100)
    with torch.no_grad():
        layers, _ = model.extract_features(wav, num_layers=km.layer)
    labels = km(layers[-1][0])
    used = labels.unique().numel()
    echo(f"4. labelled {labels.numel()} frames of held-out audio with the bundle's k-means: "
         f"{used}/{km.num_clusters} clusters used; first frames {labels[:12].tolist()}")
    pretrain = bundle.get_pretrain_model().eval()
    echo(f"5. pre-training heads loaded: label embeddings {tuple(pretrain.logit_generator.label_embeddings.shape)}, "
         f"final_proj {tuple(pretrain.logit_generator.final_proj.weight.shape)}")
    run = continue_pretraining(bundle_dir, output_dir, echo)
    w2v_run = continue_wav2vec2(output_dir, echo)
    d2v_run = continue_data2vec2(output_dir, echo)
    echo(f"converted bundle: {bundle_dir}\ncontinued bundle: {run.bundle_dir}\n"
         f"curves: {run.output_dir / 'curves.png'}\nsummary: {run.output_dir / 'summary.json'}\n"
         f"continued wav2vec 2.0 bundle: {w2v_run.bundle_dir}\n"
         f"continued data2vec 2.0 bundle: {d2v_run.bundle_dir}")
    return run.bundle_dir


def write_demo_corpus(audio_dir: Path, num_files: int = 24, seconds: float = 3.0) -> Path:
    """Generated 16 kHz wav files standing in for the user's own audio."""
    import soundfile

    audio_dir.mkdir(parents=True, exist_ok=True)
    for i in range(num_files):
        soundfile.write(audio_dir / f"utt{i:03d}.wav", demo_audio(seconds, seed=1000 + i)[0].numpy(), 16000)
    return audio_dir


def continue_pretraining(bundle_dir: Path, output_dir: Path, echo: Callable[[str], None] = print):
    """A few dozen steps of continued pre-training with online targets, export, reload, curves."""
    audio_dir = write_demo_corpus(output_dir / "audio")
    options = _demo_options(bundle_dir, audio_dir, output_dir / "run", max_steps=30)
    echo(f"6. continue pre-training for {options.max_steps} steps on {audio_dir} (online targets: teacher layer "
         f"{KMEANS_LAYER} + the bundle's k-means)")
    run = _train_and_report(options, {"train/loss": "loss", "train/accuracy_masked": "masked accuracy"}, echo)
    continued = load_bundle(run.bundle_dir)
    with torch.no_grad():
        continued.get_model()(demo_audio(1.0, seed=7))
    echo(f"7. exported bundle loads (num_updates {continued.num_updates}); get_model() runs")
    return run


def continue_wav2vec2(output_dir: Path, echo: Callable[[str], None] = print):
    """The same job for wav2vec 2.0: convert the tiny checkpoint (quantizer and all), continue its contrastive
    pre-training on the same audio (the Gumbel temperature picks up at the checkpoint's num_updates), export."""
    from converters.convert import convert_checkpoint

    bundle_dir = output_dir / "tiny_wav2vec2_bundle"
    shutil.rmtree(bundle_dir, ignore_errors=True)
    convert_checkpoint(WAV2VEC2_CHECKPOINT, bundle_dir)
    bundle = load_bundle(bundle_dir)
    quantizer = bundle.get_pretrain_model().quantizer
    echo(f"8. convert {WAV2VEC2_CHECKPOINT.name} -> {bundle_dir}: quantizer {quantizer.groups} x {quantizer.num_vars} "
         f"codewords, num_updates {bundle.num_updates} (Gumbel temperature {quantizer.temperature:.4f})")
    options = _demo_options(bundle_dir, output_dir / "audio", output_dir / "run_wav2vec2", max_steps=20)
    echo(f"9. continue wav2vec 2.0 pre-training for {options.max_steps} steps (contrastive task, its own quantizer)")
    run = _train_and_report(options, {"train/loss": "loss", "train/accuracy": "accuracy",
                                      "train/code_perplexity": "code_perplexity"}, echo)
    continued = load_bundle(run.bundle_dir)
    echo(f"10. exported bundle loads (num_updates {continued.num_updates}, Gumbel temperature "
         f"{continued.get_pretrain_model().quantizer.temperature:.4f})")
    return run


def continue_data2vec2(output_dir: Path, echo: Callable[[str], None] = print):
    """The same job for data2vec 2.0: convert the tiny checkpoint (student, decoder, EMA teacher), continue its
    pre-training with a restarted teacher anneal (its own schedule ended nearly frozen), export with the trained
    teacher."""
    from converters.convert import convert_checkpoint

    bundle_dir = output_dir / "tiny_data2vec2_bundle"
    shutil.rmtree(bundle_dir, ignore_errors=True)
    convert_checkpoint(DATA2VEC2_CHECKPOINT, bundle_dir)
    bundle = load_bundle(bundle_dir)
    objective = bundle.config.objective or {}
    echo(f"11. convert {DATA2VEC2_CHECKPOINT.name} -> {bundle_dir}: student, decoder and EMA teacher, num_updates "
         f"{bundle.num_updates} (its teacher schedule {objective.get('ema_decay')} -> {objective.get('ema_end_decay')}"
         f" ended at {objective.get('ema_end_decay')}: nearly frozen)")
    options = _demo_options(bundle_dir, output_dir / "audio", output_dir / "run_data2vec2", max_steps=10)
    options.ema_decay = DATA2VEC2_EMA_RESTART
    echo(f"12. continue data2vec 2.0 pre-training for {options.max_steps} steps (EMA-teacher targets, "
         f"{objective.get('clone_batch')} masked copies per utterance; --ema-decay {DATA2VEC2_EMA_RESTART} restarts "
         "the teacher's anneal)")
    start_teacher = bundle.state_dict()
    run = _train_and_report(options, {"train/loss": "loss", "train/ema_decay": "ema_decay",
                                      "train/target_var": "target_var", "train/pred_var": "pred_var"}, echo)
    continued = load_bundle(run.bundle_dir)
    after = continued.state_dict()
    moved = sum(not torch.equal(after[k], start_teacher[k]) for k in after if k.startswith("teacher."))
    echo(f"13. exported bundle loads (num_updates {continued.num_updates}); {moved} teacher tensors moved by the EMA")
    return run


def _demo_options(bundle_dir: Path, audio_dir: Path, run_dir: Path, max_steps: int):
    """The demo's short CPU run: a high lr, 5 warm-up steps, every step logged, a checkpoint every 10."""
    from continue_pt.pretrain import PretrainOptions

    return PretrainOptions(init_from=str(bundle_dir), train_data=str(audio_dir), output_dir=str(run_dir),
                           max_steps=max_steps, warmup_steps=5, lr=5e-4, max_batch_seconds=12.0, num_workers=0,
                           checkpoint_every=10, log_every=1, progress_bar=False, overwrite=True, seed=0)


def _train_and_report(options, columns: dict[str, str], echo: Callable[[str], None]):
    """Run, write the curves, and echo the first -> last value of each metric in ``columns`` (column: label)."""
    from continue_pt.curves import write_curves
    from continue_pt.pretrain import run_pretraining

    run = run_pretraining(options)
    _, summary = write_curves(run.output_dir)
    metrics = json.loads(summary.read_text())["metrics"]
    for column, label in columns.items():
        if column in metrics:
            echo(f"   {label} {metrics[column]['first']:.3f} -> {metrics[column]['last']:.3f}")
    return run
