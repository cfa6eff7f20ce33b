"""The ``continue-pt`` command line: thin commands over library functions, one error boundary.

Every command calls one library function. Errors the library reports to users (:class:`FileProblem` and its
subclasses) become one clean message and exit status 1 in one place, :meth:`_Cli.invoke`. The CLI is the
composition root: it imports ``converters`` lazily, so the training library never depends on it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from bundles.errors import FileProblem
from continue_pt.options import ACCELERATORS, option_default


class _Cli(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            warnings.showwarning = _options_warnings_as_lines(warnings.showwarning)
            try:
                return super().invoke(ctx)
            except FileProblem as exc:
                raise click.ClickException(str(exc)) from None
            except OSError as exc:  # the last net: a file the library did not expect to be unusable
                if exc.errno == errno.EPIPE:  # `continue-pt catalogue | head`: click ends quietly
                    raise
                where = f"{exc.filename}: " if exc.filename else ""
                raise click.ClickException(f"{where}{exc.strerror or exc}. Check the path and its permissions") \
                    from None


def _options_warnings_as_lines(show_others: Any) -> Any:
    """Our warnings about the options are messages to the user: one `Warning:` line each, once (the options are
    checked again where training starts); every other warning is shown as before."""
    from continue_pt.options import PretrainOptionsWarning

    shown: set[str] = set()

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if not issubclass(category, PretrainOptionsWarning):
            show_others(message, category, *args, **kwargs)
        elif str(message) not in shown:
            shown.add(str(message))
            click.echo(f"Warning: {message}", err=True)

    return show


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


@cli.command()
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


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of aligned text.")
def inspect(path: Path, as_json: bool) -> None:
    """Describe PATH: a fairseq checkpoint, a bundle directory, a k-means file or a training checkpoint (.ckpt)."""
    from converters.describe import describe
    from converters.errors import ConversionError

    if path.suffix == ".ckpt" and path.is_file():
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


@cli.command()
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


# -- continued pre-training ----------------------------------------------------------------------------------

def _default(name: str) -> str:
    """How ``--help`` shows a default: read from :class:`PretrainOptions` (their one source), never repeated."""
    value = option_default(name)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def _shown(text: str, default: str) -> str:
    return f"{text}  [default: {default}]"


_PRETRAIN_FLAGS = [
    click.option("--config", "config_file", type=click.Path(path_type=Path),
                 help="YAML file whose keys are this command's options (dashes or underscores); flags override it."),
    click.option("--init-from", help="Bundle to start from: weights only, fresh optimiser. Exclusive with --resume."),
    click.option("--resume", help="Training checkpoint (OUTPUT/checkpoints/last.ckpt) to continue with its full state."),
    click.option("--train-data", help="Directory of audio files (wav/flac/ogg) or a fairseq manifest (.tsv)."),
    click.option("--val-data", help="Held-out audio (default: --val-fraction of --train-data, chosen by file name)."),
    click.option("--val-fraction", type=float,
                 help=_shown("Without --val-data: the share of --train-data files held out for validation.",
                             f"{_default('val_fraction')}, i.e. {100 * option_default('val_fraction'):g} %")),
    click.option("--output-dir", help="Receives metrics.csv, checkpoints/, bundle/, curves.png and summary.json."),
    click.option("--max-steps", type=int, help=_shown("Optimizer steps to train.", _default("max_steps"))),
    click.option("--teacher", help="Bundle whose layer features give the targets (default: the starting bundle)."),
    click.option("--kmeans", help="k-means for the targets: km.safetensors or fairseq/sklearn joblib .bin."),
    click.option("--kmeans-layer", type=click.IntRange(min=1), help="Layer (1-based) a joblib .bin k-means clusters."),
    click.option("--labels", help="Offline targets: fairseq .km label file (one line per manifest entry)."),
    click.option("--label-dict", help="fairseq dict.km.txt for --labels."),
    click.option("--val-labels", help="With --labels and --val-data: the fairseq .km label file for --val-data."),
    click.option("--reinit-label-head", is_flag=True, default=None,
                 help="Re-initialise the label embeddings and final_proj (needed when the targets are a new label set)."),
    click.option("--head-only-steps", type=int,
                 help=_shown("With --reinit-label-head: train only the new head first.", _default("head_only_steps"))),
    click.option("--lr", type=float,
                 help=_shown("Peak learning rate (lower than from-scratch recipes: continuing needs a gentle start).",
                             _default("lr"))),
    click.option("--warmup-steps", type=int,
                 help=_shown("Linear warm-up steps (keep them well below --max-steps).", _default("warmup_steps"))),
    click.option("--max-batch-seconds", type=float,
                 help=_shown("Audio seconds per micro-batch (per device).", _default("max_batch_seconds"))),
    click.option("--max-sample-size", type=int,
                 help=_shown("Longer files are cropped to a random window of this many samples (fairseq's "
                             "max_sample_size).", _default("max_sample_size"))),
    click.option("--min-seconds", type=float,
                 help=_shown("Shorter files are skipped (and named).", f"{_default('min_seconds')} s")),
    click.option("--accumulate", type=int,
                 help=_shown("Micro-batches accumulated per optimizer step.", _default("accumulate"))),
    click.option("--precision", help=_shown("bf16-mixed, 32-true, 16-mixed (warns: fp16 goes NaN), bf16-true, 64-true.",
                                            "bf16-mixed on a GPU, 32-true on a CPU")),
    click.option("--devices", help=_shown("Devices (Lightning syntax: a count such as 4, -1 or auto for all, GPU ids "
                                          "such as 0,1).", _default("devices"))),
    click.option("--accelerator", type=click.Choice(ACCELERATORS),
                 help=_shown("Lightning accelerator (cpu: train on the CPU even where a GPU is).",
                             _default("accelerator"))),
    click.option("--num-nodes", type=int,
                 help=_shown("Machines the run spans, each with --devices devices; launched by srun (SLURM), "
                             "torchrun or MASTER_ADDR/MASTER_PORT/NODE_RANK on each node (see the README).",
                             _default("num_nodes"))),
    click.option("--loss-norm", type=click.Choice(["fairseq", "torchaudio", "per-term"]),
                 help=_shown("Loss normalisation (fairseq: sum / total sample size over the step).",
                             _default("loss_norm"))),
    click.option("--unmasked-weight", type=float,
                 help="Weight of the unmasked frames' loss (fairseq pred_nomask_weight; the checkpoint's, 0, by default)."),
    click.option("--feature-penalty-weight", type=float, help="Weight of the feature penalty (default: the checkpoint's, 10)."),
    click.option("--diversity-weight", type=float,
                 help="wav2vec 2.0: weight of the codebook diversity loss (default: the checkpoint's, 0.1)."),
    click.option("--num-negatives", type=click.IntRange(min=1),
                 help="wav2vec 2.0: distractors per masked frame (default: the checkpoint's, 100)."),
    click.option("--seed", type=int, help=_shown("Seed of data order, crops and masks.", _default("seed"))),
    click.option("--num-workers", type=int,
                 help=_shown("Data loader worker processes per device.", "auto: the CPUs per device, at most 4")),
    click.option("--log-every", type=int,
                 help=_shown("Log metrics every N optimizer steps (the first and last step always).",
                             "auto: min(50, max(1, max-steps // 50)), every step of a run up to 100 steps")),
    click.option("--checkpoint-every", type=int,
                 help=_shown("Write OUTPUT/checkpoints/step-step=N.ckpt every N steps (last.ckpt is always the final "
                             "state).", _default("checkpoint_every"))),
    click.option("--overwrite", is_flag=True, default=None, help="Replace an existing OUTPUT/bundle."),
    click.option("--max-bad-steps", type=int,
                 help=_shown("Stop after this many consecutive steps with a non-finite loss or gradient (each is "
                             "skipped: no update).", _default("max_bad_steps"))),
    click.option("--strategy", help="Lightning strategy (default auto: DDP on several devices, with "
                 "find_unused_parameters when layer drop or a frozen extractor leaves parameters unused; "
                 "e.g. ddp when none can be)."),
]


def _with_pretrain_flags(func):
    for option in reversed(_PRETRAIN_FLAGS):
        func = option(func)
    return func


def _given_options(ctx: click.Context, config_file: Path | None, flags: dict[str, Any]) -> dict[str, Any]:
    """The YAML file's options (keys with dashes or underscores), overridden by the flags given."""
    import yaml

    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FileProblem(config_file, f"not a readable YAML file ({first})", hint="Fix or remove --config") \
                from None
        if not isinstance(loaded, dict):
            raise FileProblem(config_file, "does not hold a mapping of options", hint="Write `option: value` lines")
        values = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    for name, value in flags.items():
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT and value is not None:
            values[name] = value
    return values


def _checked_structure(ctx: click.Context, config_file: Path | None,
                       flags: dict[str, Any]) -> tuple[Any, int | None]:
    """PretrainOptions and the joblib k-means layer, after every check that needs neither torch nor a file read;
    every problem found is reported at once (in well under a second: nothing heavy is imported)."""
    from dataclasses import fields

    from continue_pt.options import PretrainOptions, PretrainOptionsError, coerce_options, unknown_option_problem

    values = _given_options(ctx, config_file, flags)
    known = {f.name for f in fields(PretrainOptions)}
    problems = [unknown_option_problem(name, known | {"kmeans_layer"}) for name in sorted(set(values) - known)
                if name != "kmeans_layer"]
    kmeans_layer = values.pop("kmeans_layer", None)
    if isinstance(kmeans_layer, str) and kmeans_layer.strip().isdigit():
        kmeans_layer = int(kmeans_layer)
    if kmeans_layer is not None and (isinstance(kmeans_layer, bool) or not isinstance(kmeans_layer, int)
                                     or kmeans_layer < 1):
        problems.append(f"kmeans_layer needs an integer >= 1 (the layer, 1-based, the k-means clusters), "
                        f"got {kmeans_layer!r}")
        kmeans_layer = None
    values, type_problems = coerce_options({k: v for k, v in values.items() if k in known})
    problems += type_problems
    for name in ("train_data", "output_dir"):
        if not values.get(name):
            problems.append(f"--{name.replace('_', '-')} is required")
    if values.get("kmeans") and kmeans_layer is None and not str(values["kmeans"]).endswith(".safetensors"):
        problems.append("a joblib k-means needs --kmeans-layer (the layer, 1-based, whose features it clusters)")
    if kmeans_layer is not None and not values.get("kmeans"):
        problems.append("--kmeans-layer was given without --kmeans (a k-means .bin whose layer it names)")
    options = PretrainOptions(**{"train_data": "", "output_dir": "", **values})
    problems += options.structural_problems()
    if problems:
        raise PretrainOptionsError(config_file or "continue-pt pretrain", problems, hint="Nothing was started")
    return options, kmeans_layer


def _checked_options(ctx: click.Context, config_file: Path | None, flags: dict[str, Any]) -> tuple[Any, Any]:
    """PretrainOptions after every check, and the joblib k-means read from ``--kmeans`` (None for a
    km.safetensors, which the options name directly). Nothing is written yet."""
    from continue_pt.options import PretrainOptionsError

    options, kmeans_layer = _checked_structure(ctx, config_file, flags)
    km, name, problems = None, None, []
    if kmeans_layer is not None:
        from converters.convert import read_kmeans_file

        name = f"the k-means {options.kmeans} (--kmeans-layer {kmeans_layer})"
        try:
            km = read_kmeans_file(options.kmeans, kmeans_layer)
            km.metadata.setdefault("source_file", Path(options.kmeans).name)
        except FileProblem as exc:
            problems.append(str(exc))
    try:
        options.validate(kmeans=km, kmeans_name=name)
    except PretrainOptionsError as exc:
        problems += exc.problems
    if problems:
        raise PretrainOptionsError(options.output_dir, problems, hint="Nothing was started")
    return options, km


def _kmeans_as_safetensors(km: Any, source: Path, output_dir: Path) -> Path:
    """Keep the k-means read from a joblib file with the run, as OUTPUT/targets/NAME.L{layer}.safetensors."""
    from bundles.kmeans import save_kmeans

    target = output_dir / "targets" / f"{source.stem}.L{km.layer}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    save_kmeans(km, target)
    return target


@cli.command()
@_with_pretrain_flags
@click.pass_context
def pretrain(ctx: click.Context, config_file: Path | None, **flags: Any) -> None:
    """Continue pre-training a HuBERT or wav2vec 2.0 bundle on your own audio; export the result as a bundle.

    The objective follows the bundle: HuBERT's masked prediction of k-means targets, or wav2vec 2.0's
    contrastive task with its own quantizer (the Gumbel temperature continues from the bundle's num_updates).

    \b
    continue-pt pretrain --init-from hubert_base/ --train-data my_audio/ --output-dir run1/ --max-steps 20000
    continue-pt pretrain --init-from wav2vec2_base/ --train-data my_audio/ --output-dir run2/ --max-steps 20000
    continue-pt pretrain --resume run1/checkpoints/last.ckpt --train-data my_audio/ --output-dir run1/ --max-steps 40000
    """
    from continue_pt.run_output import removed_on_early_failure

    options, joblib_kmeans = _checked_options(ctx, config_file, flags)  # before torch/Lightning are imported
    from continue_pt.interruption import RunInterrupted

    try:
        with removed_on_early_failure(options.output_dir):  # also the k-means written into OUTPUT/targets
            if joblib_kmeans is not None:
                options.kmeans = str(_kmeans_as_safetensors(joblib_kmeans, Path(options.kmeans),
                                                            Path(options.output_dir)))
            from continue_pt.curves import write_curves
            from continue_pt.pretrain import run_pretraining

            result = run_pretraining(options)
    except RunInterrupted as stopped:  # Ctrl-C / SIGTERM: a resumable checkpoint was saved at a step boundary
        if stopped.is_global_zero:
            click.echo(str(stopped), err=True)
        ctx.exit(stopped.exit_code)
    if not result.is_global_zero:  # the other DDP processes: rank 0 reports
        return
    try:
        png, summary = write_curves(result.output_dir)
        curves = f"curves: {png}\nsummary: {summary}"
    except FileProblem:  # the run itself succeeded; it only logged nothing
        curves = (f"curves: none (no step was logged: {options.max_steps} steps, "
                  f"log_every {options.resolved_log_every()})")
    click.echo(f"bundle: {result.bundle_dir}\ncheckpoints: {result.checkpoint_dir}\n{curves}")


@cli.command()
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
    if checkpoint.is_file() and out_dir.exists() and not overwrite:  # before a .ckpt is turned into a bundle
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
    if not src.is_file():
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


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def plot(run_dir: Path) -> None:
    """Write curves.png and summary.json for a training run (its --output-dir)."""
    from continue_pt.curves import write_curves

    png, summary = write_curves(run_dir)
    click.echo(f"curves: {png}\nsummary: {summary}")


# -- k-means tools -------------------------------------------------------------------------------------------

@cli.group()
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
@click.option("--audio", required=True, type=click.Path(path_type=Path),
              help="Held-out audio: a directory, a fairseq .tsv manifest or one file.")
@click.option("--max-files", type=click.IntRange(min=1), help="Use at most N files (seeded subset).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the masks and of the relabelling control (random permutations of the cluster ids).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def kmeans_check(bundle_dir: Path, kmeans_path: Path | None, kmeans_layer: int | None, teacher_dir: Path | None,
                 audio: Path, max_files: int | None, seed: int, as_json: bool) -> None:
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
@click.option("--audio", required=True, type=click.Path(path_type=Path),
              help="A directory of audio files or a fairseq .tsv manifest.")
@click.option("-k", "num_clusters", required=True, type=click.IntRange(min=2), help="Number of clusters.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="k-means file to write (km.safetensors).")
@click.option("--max-hours", type=click.FloatRange(min=0, min_open=True), help="Use at most this much audio.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling and the seeding.")
@click.option("--batch-seconds", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Audio per mini-batch update (60 s = 3,000 frames at 50 Hz).")
@click.option("--device", help="Where the teacher and the k-means run (default: cuda if available, else cpu).")
def kmeans_fit(teacher_dir: Path, layer: int, audio: Path, num_clusters: int, output: Path, max_hours: float | None,
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


@cli.group()
def labels() -> None:
    """fairseq label files for HuBERT pre-training."""


@labels.command("dump")
@click.option("--teacher", "teacher_dir", required=True, type=click.Path(path_type=Path),
              help="Bundle whose layer-L features the k-means labels.")
@click.option("--layer", type=click.IntRange(min=1),
              help="Teacher layer (1-based); must agree with the k-means file's; needed for a .bin.")
@click.option("--kmeans", "kmeans_path", type=click.Path(path_type=Path),
              help="km.safetensors or a fairseq/sklearn .bin; default: the teacher bundle's own k-means.")
@click.option("--audio", required=True, type=click.Path(path_type=Path),
              help="A directory of audio files or a fairseq .tsv manifest.")
@click.option("-o", "--output-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for {split}.tsv, {split}.km and dict.km.txt.")
@click.option("--split", default="train", show_default=True, help="Name of the split (file names).")
@click.option("--device", help="Where the teacher runs (default: cuda if available, else cpu).")
def labels_dump(teacher_dir: Path, layer: int | None, kmeans_path: Path | None, audio: Path, output_dir: Path,
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


@cli.command()
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True,
              help="Where the demo writes its bundle and outputs.")
def demo(output_dir: Path) -> None:
    """Run the main job end to end on the built-in tiny checkpoint (no download needed)."""
    from continue_pt.demo import run_demo

    if output_dir.exists() and not output_dir.is_dir():
        raise FileProblem(output_dir, "is a file, not a directory", hint="Pass --output-dir a directory (created if "
                                                                         "missing)")
    run_demo(output_dir, echo=click.echo)


def main() -> None:
    cli(prog_name="continue-pt")


if __name__ == "__main__":
    sys.exit(main())
