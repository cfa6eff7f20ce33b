"""``continue-pt pretrain``: its flags (defaults read from :class:`PretrainOptions`), the YAML file merged under
them, every check before torch is imported, and the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bundles.errors import FileProblem
from continue_pt.options import ACCELERATORS, option_default


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
    click.option("--train-data", help="Directory of audio files (wav/flac/ogg), a fairseq manifest (.tsv) or a shard "
                 "set from `continue-pt shards write` (its directory or http(s) base URL)."),
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
    click.option("--ema-decay",
                 help="data2vec 2.0: restart the EMA teacher's decay anneal, START:END:STEPS from this run's first "
                      "step (e.g. 0.999:0.9999:20000), or one constant decay (default: the checkpoint's schedule "
                      "continued from its num_updates)."),
    click.option("--clone-batch", type=click.IntRange(min=1),
                 help="data2vec 2.0: masked copies of each utterance per step (default: the checkpoint's, 8)."),
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
                 "e.g. ddp when none can be; fsdp: sharded over the devices, one unit per transformer layer, "
                 "sharded checkpoints, for models that do not fit one GPU)."),
    click.option("--activation-checkpointing", is_flag=True, default=None,
                 help="Recompute each transformer layer's activations in the backward instead of keeping them: "
                      "less memory for a third more compute, same loss and gradients (any strategy)."),
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


@click.command()
@_with_pretrain_flags
@click.pass_context
def pretrain(ctx: click.Context, config_file: Path | None, **flags: Any) -> None:
    """Continue pre-training a HuBERT, wav2vec 2.0 or data2vec 2.0 bundle on your audio; export it as a bundle.

    The objective follows the bundle: HuBERT's masked prediction of k-means targets, wav2vec 2.0's
    contrastive task with its own quantizer (the Gumbel temperature continues from the bundle's num_updates),
    or data2vec 2.0's regression of its EMA teacher (the teacher's decay schedule continues likewise).

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
