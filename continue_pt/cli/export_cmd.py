"""After a run: ``export`` (a training checkpoint or a bundle to a bundle, fairseq or Hugging Face) and ``plot``."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import click

from bundles.errors import FileProblem
from continue_pt.sharded_files import is_sharded_checkpoint


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="What to create (atomically): a bundle directory (--to bundle), a .pt file (--to fairseq), a "
                   "transformers model directory (--to hf).")
@click.option("--to", "target", type=click.Choice(["bundle", "fairseq", "hf"]), default="bundle", show_default=True,
              help="bundle: a training .ckpt -> bundle; fairseq: a bundle or a training .ckpt -> a fairseq "
                   "checkpoint that fairseq's checkpoint_utils loads; hf: -> a Hugging Face model directory.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def export(checkpoint: Path, out_dir: Path, target: str, overwrite: bool) -> None:
    """Turn a training CHECKPOINT (.ckpt) into a bundle that load_bundle loads, or a bundle / .ckpt into a fairseq
    checkpoint (--to fairseq) or a Hugging Face model (--to hf)."""
    if target == "bundle":
        from continue_pt.export import export_checkpoint

        click.echo(f"wrote {export_checkpoint(checkpoint, out_dir, overwrite=overwrite)}")
        return
    if (checkpoint.is_file() or is_sharded_checkpoint(checkpoint)) and out_dir.exists() and not overwrite:
        # before a .ckpt is turned into a bundle
        raise FileProblem(out_dir, "already exists", hint="Choose another output or pass --overwrite")
    with _as_bundle(checkpoint, out_dir.parent) as bundle_dir:
        if target == "fairseq":
            from converters.fairseq_export import export_fairseq

            written = _export_fairseq_with_progress(export_fairseq, bundle_dir, out_dir, overwrite)
        else:
            from converters.hf_export import export_bytes, export_hf
            from tqdm import tqdm

            with tqdm(total=export_bytes(bundle_dir), unit="B", unit_scale=True, desc=f"writing {out_dir.name}",
                      disable=None, leave=False) as bar:
                written = export_hf(bundle_dir, out_dir, overwrite=overwrite, on_tensor=lambda t: bar.update(t.nbytes))
    click.echo(f"wrote {written}")


def _as_bundle(src: Path, scratch_dir: Path) -> Any:
    """A bundle directory as it is; a training .ckpt through a temporary bundle. Only the latter imports the training
    code (Lightning: seconds of start-up an export of a bundle does not need)."""
    if not src.is_file() and not is_sharded_checkpoint(src):  # a sharded checkpoint is a directory too
        return contextlib.nullcontext(src)
    from continue_pt.export import bundle_of

    return bundle_of(src, scratch_dir)


_PROGRESS_FROM_BYTES = 256 << 20  # a progress bar only for files that take a while to write


def _export_fairseq_with_progress(export_fairseq: Any, src: Path, out: Path, overwrite: bool) -> Path:
    """``export_fairseq`` with a progress bar (on stderr) once the file is large enough to wait for."""
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and total >= _PROGRESS_FROM_BYTES:
            bar = click.progressbar(length=total, label=f"writing {out.name}", file=sys.stderr)
            bar.__enter__()
        if bar is not None:
            bar.update(min(done, total) - bar.pos)

    try:
        return export_fairseq(src, out, overwrite=overwrite, on_progress=progress)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def plot(run_dir: Path) -> None:
    """Write curves.png and summary.json for a training run (its --output-dir)."""
    from continue_pt.curves import write_curves

    png, summary = write_curves(run_dir)
    click.echo(f"curves: {png}\nsummary: {summary}")
