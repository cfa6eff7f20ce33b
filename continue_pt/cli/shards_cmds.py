"""Sharded corpora: ``shards write`` (a directory or manifest -> tar shards + ``shards.json``), ``shards index``
(existing WebDataset tar shards -> their ``shards.json``) and ``shards verify`` (a set against its index)."""

from __future__ import annotations

from pathlib import Path

import click

from bundles.errors import FileProblem


@click.group()
def shards() -> None:
    """Tar shards of audio (WebDataset layout) that `pretrain --train-data` reads locally or over http(s)."""


@shards.command("write")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="New (or empty) directory for the shards and their index shards.json.")
@click.option("--shard-size", default="1GB", show_default=True,
              help="Largest shard: 1GB, 500MB, 2GiB or bytes (an utterance larger than it gets a shard of its own).")
@click.option("--format", "fmt", type=click.Choice(["original", "flac", "wav"]), default="original",
              show_default=True,
              help="How each utterance is stored: its file's bytes as they are, or re-encoded (flac: 16/24-bit PCM "
                   "losslessly, anything else kept as it is; wav: the source's PCM or float subtype).")
def shards_write(source: Path, out_dir: Path, shard_size: str, fmt: str) -> None:
    """Write the audio of SOURCE (a directory, searched recursively, or a fairseq .tsv manifest) as tar shards,
    in the corpus' sorted order; the index shards.json is written last."""
    from continue_pt.shard_format import parse_size
    from continue_pt.shard_write import write_shards

    try:
        size = parse_size(shard_size)
    except ValueError as error:
        raise FileProblem(out_dir, f"--shard-size: {error}") from None
    report = write_shards(source, out_dir, size, fmt)
    from continue_pt.corpus import not_audio_note

    for path, reason in report.skipped:
        if not reason.startswith("not audio:"):
            click.echo(f"skipped {path}: {reason}", err=True)
    note = not_audio_note(report.skipped)
    if note:
        click.echo(f"{source}: {note}", err=True)
    click.echo(report.summary())


@shards.command("index")
@click.argument("source")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Directory for shards.json when the tars' own is read-only (default: beside the tars). The index "
                   "then names each shard by its path from there.")
@click.option("--base-url", default=None,
              help="Where the tars are served (http(s)://HOST/PATH/): the index names each shard by URL, so "
                   "training reads them over http wherever shards.json is.")
def shards_index(source: str, out_dir: Path | None, base_url: str | None) -> None:
    """Index existing WebDataset tar shards (SOURCE: a directory of .tar files, or a brace pattern such as
    'train-{000000..000099}.tar') so that `pretrain --train-data` reads them: writes shards.json with each
    utterance's byte range and length, read from the tar and audio headers (the audio is not copied)."""
    from continue_pt.shard_index import index_shards

    report = index_shards(source, out_dir, base_url)
    for note in report.notes():
        click.echo(f"{source}: {note}", err=True)
    click.echo(report.summary())


@shards.command("verify")
@click.argument("source")
@click.option("--decode", is_flag=True,
              help="Also decode every utterance (as training does) and compare its length with the index's.")
def shards_verify(source: str, decode: bool) -> None:
    """Check a shard set (SOURCE: its directory or base URL) against its shards.json: every shard there with its
    size and the sha256 `shards write` recorded; with --decode every utterance too. Every problem is reported
    together; exit status 1 if there is any."""
    from continue_pt.shard_verify import verify_shards

    click.echo(verify_shards(source, decode=decode).summary())
