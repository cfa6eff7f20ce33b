"""From published checkpoints to bundles: ``convert``, ``inspect``, ``verify``, ``download``, ``catalogue``.

The converters are imported inside each command: the CLI is their composition root, and the training library never
depends on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from bundles.errors import FileProblem


def _print_facts(facts: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(facts, indent=2, default=str))
        return
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if isinstance(value, (list, dict)):
            value = json.dumps(value) if value else "none"
        click.echo(f"{key:<{width}}  {value}")


def _download_flags(func):
    """Where ``convert`` / ``download`` put what they fetch and how it is checked (see converters.sources)."""
    func = click.option("--sha256", metavar="HEX", help="Pin the checksum of the downloaded checkpoint file.")(func)
    func = click.option("--mirror", metavar="URL", help="Base URL serving the catalogue's files by name, instead "
                                                       "of their official URLs (default: $CONTINUE_PT_MIRROR).")(func)
    return click.option("--cache-dir", type=click.Path(path_type=Path),
                        help="Download cache (default: $CONTINUE_PT_CACHE, else $XDG_CACHE_HOME/continue-pt, else "
                             "~/.cache/continue-pt).")(func)


def _fetch_settings(cache_dir: Path | None, mirror: str | None, sha256: str | None, out_dir: Path | None = None,
                    with_kmeans: bool = True):
    from converters.download import DownloadError
    from converters.integrity import normalised_sha256
    from converters.sources import FetchSettings

    try:
        pinned = normalised_sha256(sha256)
    except ValueError as exc:
        raise DownloadError("--sha256", str(exc), hint="Give the 64 hexadecimal digits of the file's sha256") from None
    return FetchSettings(cache_dir=cache_dir, mirror=mirror, sha256=pinned, out_dir=out_dir, with_kmeans=with_kmeans)


@click.command()
@click.argument("src")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to create (written atomically: it appears only when complete).")
@click.option("--kmeans", type=click.Path(path_type=Path),
              help="k-means to attach: fairseq/sklearn joblib .bin (read without running it) or km.safetensors.")
@click.option("--kmeans-layer", type=click.IntRange(min=1),
              help="Transformer layer (1-based, fairseq numbering) whose output the k-means clusters.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--family", type=click.Choice(["hubert", "wav2vec2"]),
              help="For a torchaudio .pth whose shapes cannot tell (BASE): which model it is.")
@click.option("--num-updates", type=click.IntRange(min=0),
              help="transformers directories: the updates the model was pre-trained for (not recorded by "
                   "transformers; wav2vec 2.0's Gumbel temperature continues from it).")
@_download_flags
def convert(src: str, out_dir: Path, kmeans: Path | None, kmeans_layer: int | None, overwrite: bool,
            family: str | None, num_updates: int | None, cache_dir: Path | None, mirror: str | None,
            sha256: str | None) -> None:
    """Convert a HuBERT / wav2vec 2.0 checkpoint SRC into a bundle.

    SRC: a fairseq .pt file, an s3prl converted checkpoint, a torchaudio .pth state dict, a transformers directory,
    hf://ORG/REPO[@REV], an http(s) URL or a `continue-pt catalogue` name (downloaded into the cache first, with the
    card's k-means if it has one). Pre-trained checkpoints keep their pre-training heads; fine-tuned (CTC) ones their
    output layer; torchaudio .pth state dicts become encoder-only bundles.
    """
    from tqdm import tqdm

    from converters.convert import convert_checkpoint
    from converters.errors import ConversionError
    from converters.sources import resolve_source

    if out_dir.exists() and not overwrite:  # before a download of gigabytes, not after
        raise FileProblem(out_dir, "already exists", hint="Choose another output directory or pass --overwrite")
    own_kmeans = kmeans is not None or kmeans_layer is not None
    source = resolve_source(src, _fetch_settings(cache_dir, mirror, sha256, with_kmeans=not own_kmeans))
    src = source.checkpoint
    if source.kmeans is not None:
        kmeans, kmeans_layer = source.kmeans, source.kmeans_layer
        click.echo(f"k-means: {source.kmeans_card.name} (layer {kmeans_layer}), {kmeans}", err=True)
        if source.kmeans_caveat():
            click.echo(f"Note: {source.kmeans_caveat()}", err=True)
    try:
        with tqdm(total=src.stat().st_size if src.is_file() else 0, unit="B", unit_scale=True, desc="converting",
                  disable=None, leave=False) as bar:
            out = convert_checkpoint(src, out_dir, kmeans=kmeans, kmeans_layer=kmeans_layer, overwrite=overwrite,
                                     on_tensor=lambda t: bar.update(t.nbytes), family=family,
                                     num_updates=num_updates)
    except ConversionError:
        from continue_pt.checkpoint_facts import is_training_checkpoint

        if is_training_checkpoint(src):
            raise ConversionError(src, "is a training checkpoint of `continue-pt pretrain`, not a fairseq checkpoint",
                                  hint=f"Turn it into a bundle with `continue-pt export {src} -o {out_dir}`") from None
        raise
    click.echo(f"wrote {out}")


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of aligned text.")
def inspect(path: Path, as_json: bool) -> None:
    """Describe PATH: a fairseq checkpoint, a bundle directory, a k-means file or a training checkpoint (.ckpt)."""
    from converters.describe import describe
    from converters.errors import ConversionError

    from continue_pt.sharded_files import is_sharded_checkpoint

    if path.suffix == ".ckpt" and path.is_file() or is_sharded_checkpoint(path):  # a directory under --strategy fsdp
        from continue_pt.checkpoint_facts import describe_training_checkpoint

        _print_facts(describe_training_checkpoint(path), as_json)
        return
    try:
        facts = describe(path)
    except ConversionError:
        from continue_pt.checkpoint_facts import describe_training_checkpoint, is_training_checkpoint

        if not is_training_checkpoint(path):  # a renamed training checkpoint is described; anything else refused
            raise
        facts = describe_training_checkpoint(path)
    _print_facts(facts, as_json)


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--against", "source", required=True, type=click.Path(path_type=Path),
              help="The fairseq checkpoint the bundle was converted from.")
def verify(bundle: Path, source: Path) -> None:
    """Re-read BUNDLE and its source checkpoint and compare every tensor; exit 1 on any difference."""
    from converters.verify import verify_bundle

    report = verify_bundle(bundle, source)
    for line in report.mismatches:
        click.echo(f"mismatch: {line}", err=True)
    if not report.ok:
        raise click.ClickException(f"{bundle}: {len(report.mismatches)} of {report.compared} tensors differ "
                                   f"from {source}")
    click.echo(f"ok: {report.compared} tensors equal")


@click.command()
@click.argument("name")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path),
              help="Put the files in this directory instead of the cache.")
@_download_flags
def download(name: str, out_dir: Path | None, cache_dir: Path | None, mirror: str | None, sha256: str | None) -> None:
    """Download NAME (a `continue-pt catalogue` name, with its k-means if it has one; hf://ORG/REPO[@REV]; an
    http(s) URL) into the cache, resuming an interrupted download, and print the local paths."""
    from converters.sources import fetch_source

    for path in fetch_source(name, _fetch_settings(cache_dir, mirror, sha256, out_dir)).paths():
        click.echo(str(path))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def catalogue(as_json: bool) -> None:
    """List the published checkpoints this kit knows, with source URL, license and target provenance.

    `continue-pt download NAME` fetches one; `continue-pt convert NAME -o DIR` fetches and converts it."""
    from dataclasses import asdict

    from bundles.catalogue import CATALOGUE

    if as_json:
        click.echo(json.dumps([asdict(card) for card in CATALOGUE.values()], indent=2))
        return
    rows = [(c.name, c.family, c.kind, c.size, c.url) for c in CATALOGUE.values()]
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(f"{str(v):<{w}}" for v, w in zip(row, widths)) + "  " + row[4])
