"""``continue-pt demo``: the main job end to end on the shipped tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from bundles.errors import FileProblem


@click.command()
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True,
              help="Where the demo writes its bundle and outputs.")
def demo(output_dir: Path) -> None:
    """Run the main job end to end on the built-in tiny checkpoint (no download needed)."""
    from continue_pt.demo import run_demo

    if output_dir.exists() and not output_dir.is_dir():
        raise FileProblem(output_dir, "is a file, not a directory", hint="Pass --output-dir a directory (created if "
                                                                         "missing)")
    run_demo(output_dir, echo=click.echo)
