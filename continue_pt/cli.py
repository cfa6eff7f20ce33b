"""The ``continue-pt`` command line: thin commands over library functions, one error boundary.

Every command calls one library function. Errors the library reports to users (:class:`FileProblem` and its
subclasses) become one clean message and exit status 1 in one place, :meth:`_Cli.invoke`. The CLI is the
composition root: it imports ``converters`` lazily, so the training library never depends on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from bundles.errors import FileProblem


class _Cli(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FileProblem as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="continue-pt")
def cli() -> None:
    """Continue the pre-training of published HuBERT / wav2vec 2.0 checkpoints on your own audio.

    Start with `continue-pt convert` to turn a fairseq checkpoint into a bundle.
    """


def _print_facts(facts: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(facts, indent=2, default=str))
        return
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if isinstance(value, (list, dict)):
            value = json.dumps(value) if value else "none"
        click.echo(f"{key:<{width}}  {value}")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to create (written atomically: it appears only when complete).")
@click.option("--kmeans", type=click.Path(path_type=Path),
              help="k-means to attach: fairseq/sklearn joblib .bin (read without running it) or km.safetensors.")
@click.option("--kmeans-layer", type=click.IntRange(min=1),
              help="Transformer layer (1-based, fairseq numbering) whose output the k-means clusters.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def convert(src: Path, out_dir: Path, kmeans: Path | None, kmeans_layer: int | None, overwrite: bool) -> None:
    """Convert a fairseq HuBERT / wav2vec 2.0 checkpoint SRC (.pt) into a bundle.

    Pre-trained checkpoints keep their pre-training heads; fine-tuned (CTC) ones their output layer.
    """
    from tqdm import tqdm

    from converters.convert import convert_checkpoint

    with tqdm(total=src.stat().st_size if src.is_file() else 0, unit="B", unit_scale=True, desc="converting",
              disable=None, leave=False) as bar:
        out = convert_checkpoint(src, out_dir, kmeans=kmeans, kmeans_layer=kmeans_layer, overwrite=overwrite,
                                 on_tensor=lambda t: bar.update(t.nbytes))
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of aligned text.")
def inspect(path: Path, as_json: bool) -> None:
    """Describe PATH: a fairseq checkpoint, a bundle directory or a k-means file."""
    from converters.describe import describe

    _print_facts(describe(path), as_json)


@cli.command()
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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def catalogue(as_json: bool) -> None:
    """List the published checkpoints this kit knows, with source URL, license and target provenance."""
    from dataclasses import asdict

    from bundles.catalogue import CATALOGUE

    if as_json:
        click.echo(json.dumps([asdict(card) for card in CATALOGUE.values()], indent=2))
        return
    rows = [(c.name, c.family, c.kind, c.size, c.url) for c in CATALOGUE.values()]
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(f"{str(v):<{w}}" for v, w in zip(row, widths)) + "  " + row[4])


@cli.command()
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True,
              help="Where the demo writes its bundle and outputs.")
def demo(output_dir: Path) -> None:
    """Run the main job end to end on the built-in tiny checkpoint (no download needed)."""
    from continue_pt.demo import run_demo

    run_demo(output_dir, echo=click.echo)


def main() -> None:
    cli(prog_name="continue-pt")


if __name__ == "__main__":
    sys.exit(main())
