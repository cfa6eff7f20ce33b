"""HuBERT's targets: ``kmeans fit``, ``kmeans check`` and ``labels dump``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from bundles.errors import FileProblem


@click.group()
def kmeans() -> None:
    """Tools for the k-means models that define HuBERT's targets."""


@kmeans.command("check")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path),
              help="HuBERT pre-training bundle whose label head is tested.")
@click.option("--kmeans", "kmeans_path", type=click.Path(path_type=Path),
              help="k-means to test (km.safetensors or a fairseq .bin); default: the bundle's own (the one it "
                   "was trained with), else the teacher's.")
@click.option("--kmeans-layer", type=click.IntRange(min=1), help="Teacher layer it clusters (1-based); needed for a .bin.")
@click.option("--teacher", "teacher_dir", type=click.Path(path_type=Path),
              help="Bundle whose features the k-means labels (default: --bundle).")
@click.option("--audio", required=True,
              help="Held-out audio: a directory, a fairseq .tsv manifest, a shard set (its directory or base URL) "
                   "or one file.")
@click.option("--max-files", type=click.IntRange(min=1), help="Use at most N files (seeded subset).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the masks and of the relabelling control (random permutations of the cluster ids).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def kmeans_check(bundle_dir: Path, kmeans_path: Path | None, kmeans_layer: int | None, teacher_dir: Path | None,
                 audio: str, max_files: int | None, seed: int, as_json: bool) -> None:
    """Measure whether a k-means gives the targets BUNDLE was trained on: masked-prediction accuracy against
    chance, the marginal baseline and 1000 relabellings (cluster ids randomly permuted), cluster usage, and a
    verdict. Exit status 0 whatever the verdict."""
    from bundles import load_bundle
    from continue_pt.export import training_teacher
    from continue_pt.kmeans_check import check_kmeans
    from converters.convert import read_kmeans_file

    bundle = load_bundle(bundle_dir)
    teacher = load_bundle(teacher_dir) if teacher_dir else None
    trained_with = training_teacher(bundle.config)
    if teacher is None and trained_with is not None:
        click.echo(f"note: {bundle_dir} was continued on targets from the features of {trained_with}; its own "
                   f"features have moved since, so they give other ids: to test those targets pass --teacher "
                   f"{trained_with}", err=True)
    km = read_kmeans_file(kmeans_path, kmeans_layer) if kmeans_path else None
    if km is not None and km.layer is None:
        raise FileProblem(kmeans_path, "a joblib k-means does not record which layer it clusters",
                          hint="Pass --kmeans-layer L (1-based, fairseq numbering; 9 for hubert_base_ls960_L9_km500.bin)")
    try:
        report = check_kmeans(bundle, km, audio, teacher=teacher, max_files=max_files, seed=seed)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.summary_lines():
            click.echo(line)


def _auto_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


@kmeans.command("fit")
@click.option("--teacher", "teacher_dir", required=True, type=click.Path(path_type=Path),
              help="Bundle whose layer-L features are clustered.")
@click.option("--layer", required=True, type=click.IntRange(min=1), help="Teacher layer (1-based, fairseq numbering).")
@click.option("--audio", required=True,
              help="A directory of audio files, a fairseq .tsv manifest or a shard set (its directory or base URL).")
@click.option("-k", "num_clusters", required=True, type=click.IntRange(min=2), help="Number of clusters.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="k-means file to write (km.safetensors).")
@click.option("--max-hours", type=click.FloatRange(min=0, min_open=True), help="Use at most this much audio.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling and the seeding.")
@click.option("--batch-seconds", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Audio per mini-batch update (60 s = 3,000 frames at 50 Hz).")
@click.option("--device", help="Where the teacher and the k-means run (default: cuda if available, else cpu).")
def kmeans_fit(teacher_dir: Path, layer: int, audio: str, num_clusters: int, output: Path, max_hours: float | None,
               seed: int, batch_seconds: float, device: str | None) -> None:
    """Fit a k-means on a teacher's layer-L features over your audio, streaming (two passes; no feature is
    written to disk), and write it as km.safetensors."""
    from bundles import load_bundle
    from bundles.kmeans import save_kmeans
    from continue_pt.kmeans_fit import fit_kmeans

    from continue_pt.progress import PhaseProgress

    teacher = load_bundle(teacher_dir)
    progress = PhaseProgress(lambda line, nl: click.echo(line, nl=nl, err=True), sys.stderr.isatty())

    try:
        result = fit_kmeans(teacher, layer, audio, num_clusters, max_hours=max_hours, seed=seed,
                            batch_seconds=batch_seconds, device=_auto_device(device), progress=progress)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    progress.finish()
    save_kmeans(result.kmeans, output)
    for path, reason in result.files_skipped[:20]:
        click.echo(f"skipped {path}: {reason}", err=True)
    if len(result.files_skipped) > 20:
        click.echo(f"... and {len(result.files_skipped) - 20} more skipped", err=True)
    click.echo(f"wrote {output}: K={num_clusters}, layer {layer}, {result.hours_seen:.3f} h "
               f"({result.frames_seen} frames), inertia {result.inertia:.4g}, {len(result.files_skipped)} files skipped")


@click.group()
def labels() -> None:
    """fairseq label files for HuBERT pre-training."""


@labels.command("dump")
@click.option("--teacher", "teacher_dir", required=True, type=click.Path(path_type=Path),
              help="Bundle whose layer-L features the k-means labels.")
@click.option("--layer", type=click.IntRange(min=1),
              help="Teacher layer (1-based); must agree with the k-means file's; needed for a .bin.")
@click.option("--kmeans", "kmeans_path", type=click.Path(path_type=Path),
              help="km.safetensors or a fairseq/sklearn .bin; default: the teacher bundle's own k-means.")
@click.option("--audio", required=True,  # a string: a shard set's URL is refused by name, not folded by Path
              help="A directory of audio files or a fairseq .tsv manifest.")
@click.option("-o", "--output-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for {split}.tsv, {split}.km and dict.km.txt.")
@click.option("--split", default="train", show_default=True, help="Name of the split (file names).")
@click.option("--device", help="Where the teacher runs (default: cuda if available, else cpu).")
def labels_dump(teacher_dir: Path, layer: int | None, kmeans_path: Path | None, audio: str, output_dir: Path,
                split: str, device: str | None) -> None:
    """Label every file with the teacher to layer L + nearest centroid and write fairseq's {split}.tsv,
    {split}.km and dict.km.txt (what HubertPretrainingTask reads; also `pretrain --labels`)."""
    from bundles import load_bundle
    from continue_pt.label_dump import dump_labels
    from converters.convert import read_kmeans_file

    teacher = load_bundle(teacher_dir)
    # keeps the layer a km.safetensors records; dump_labels checks --layer. None: the teacher's own k-means
    km = read_kmeans_file(kmeans_path) if kmeans_path is not None else None
    if km is not None and km.layer is None and layer is None:
        raise FileProblem(kmeans_path, "a joblib k-means does not record which layer it clusters",
                          hint="Pass --layer L (1-based, fairseq numbering; 9 for hubert_base_ls960_L9_km500.bin)")
    try:
        result = dump_labels(teacher, km, audio, output_dir, split=split, layer=layer, device=_auto_device(device))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    for path, reason in result.files_skipped[:20]:
        click.echo(f"skipped {path}: {reason}", err=True)
    click.echo(f"wrote {result.tsv}, {result.km}, {result.dict}: {result.files_labelled} files, {result.frames} "
               f"frames, {sum(1 for n in result.counts if n)}/{len(result.counts)} clusters used, "
               f"{len(result.files_skipped)} files skipped")
