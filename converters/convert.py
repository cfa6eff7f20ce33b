"""fairseq checkpoint (+ optional k-means) -> bundle directory, streaming one tensor at a time."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bundles.config import BundleConfig
from bundles.hashing import file_sha256
from bundles.errors import BundleError
from bundles.factory import build_encoder, build_pretrain_model
from bundles.kmeans import KMeansModel, load_kmeans
from bundles.safetensors_stream import PendingTensor
from bundles.writing import write_bundle

from .errors import ConversionError
from .fairseq_checkpoint import FairseqCheckpoint, read_fairseq_checkpoint
from .families import detect_family
from .families.base import ConversionPlan
from .joblib_kmeans import read_joblib_kmeans

_UNKNOWN_MODEL_HINT = ("This kit converts fairseq HuBERT and wav2vec 2.0 / XLS-R checkpoints (pre-trained or CTC "
                       "fine-tuned), and data2vec 2.0 audio ones")


def plan_conversion(ckpt: FairseqCheckpoint) -> ConversionPlan:
    """Everything the bundle will hold, checked against the torchaudio model it must load into.
    Every problem found is reported in one :class:`ConversionError`."""
    found = detect_family(ckpt)
    if found is None:
        name = ckpt.cfg.get("model", {}).get("_name")
        raise ConversionError(ckpt.path, f"unknown architecture {name!r}", hint=_UNKNOWN_MODEL_HINT)
    family, kind = found
    problems: list[str] = []
    plan = family.plan(ckpt, kind, problems)
    if plan is not None and not problems:
        problems.extend(_target_mismatches(plan))
    if problems or plan is None:
        raise ConversionError(ckpt.path, problems or ["it could not be converted"],
                              hint=f"(family {family.NAME}, {kind})")
    return plan


def _target_mismatches(plan: ConversionPlan) -> list[str]:
    """Compare the planned tensors with the target model's state dict (built on the meta device)."""
    config = plan.config
    try:
        model = build_pretrain_model(config) if config.kind == "pretrain" else build_encoder(config)
    except (TypeError, ValueError, RuntimeError) as exc:
        return [f"the configuration does not describe a buildable torchaudio model ({exc})"]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    planned = {t.name: t.shape for t in plan.model_tensors}
    problems = []
    missing = sorted(set(expected) - set(planned))
    extra = sorted(set(planned) - set(expected))
    if missing:
        problems.append(f"the checkpoint lacks tensors the model needs: {missing[:8]}")
    if extra:
        problems.append(f"tensors with no place in the model: {extra[:8]}")
    for name in sorted(set(expected) & set(planned)):
        if expected[name] != planned[name]:
            problems.append(f"{name} has shape {list(planned[name])}, the configuration implies {list(expected[name])}")
    return problems


def read_kmeans_file(path: str | Path, layer: int | None = None) -> KMeansModel:
    """A k-means model from a ``km.safetensors`` of this kit or a fairseq/sklearn joblib ``.bin`` (read safely)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(path, "no such k-means file", hint="Check the path")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
        try:
            km = load_kmeans(path)
        except BundleError as exc:
            raise ConversionError(path, exc.problems, hint=exc.hint) from None
    else:
        km = read_joblib_kmeans(path)
    if layer is not None:
        km = KMeansModel(centroids=km.centroids, layer=int(layer), metadata=km.metadata)
    return km


def _check_kmeans(km: KMeansModel, config: BundleConfig, path: Path) -> None:
    problems = []
    num_layers = config.encoder_args["encoder_num_layers"]
    if km.layer is None:
        problems.append("the layer it clusters is not known (a joblib file does not record it)")
    elif not 1 <= km.layer <= num_layers:
        problems.append(f"layer {km.layer} is outside the model's 1..{num_layers}")
    if km.dim != config.encoder_args["encoder_embed_dim"]:
        problems.append(f"its centroids have {km.dim} dimensions, the model's layers {config.encoder_args['encoder_embed_dim']}")
    if problems:
        raise ConversionError(path, problems, hint="Pass --kmeans-layer L (1-based, fairseq numbering; 9 for "
                              "hubert_base_ls960_L9_km500.bin) with a k-means fitted on this model's features")


def _sha256_in_background(path: Path) -> tuple[threading.Thread, dict[str, str]]:
    # hashlib releases the GIL on large updates, so hashing overlaps the conversion's own reads and writes.
    out: dict[str, str] = {}

    def run() -> None:
        out["sha256"] = file_sha256(path)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@contextmanager
def planned_source(src: Path, family: str | None = None) -> Iterator[ConversionPlan]:
    """The plan of ``src`` by what the file holds (see :mod:`converters.source_format`): a torchaudio state dict
    (``family`` says HuBERT or wav2vec 2.0 where its shapes cannot), an s3prl converted checkpoint or a fairseq
    checkpoint. The file stays open while the plan's tensors are read."""
    from .s3prl_import import read_s3prl_checkpoint, s3prl_provenance
    from .source_format import source_format
    from .torchaudio_import import open_torchaudio_file, plan_torchaudio

    fmt = source_format(src)
    if fmt == "torchaudio":
        with open_torchaudio_file(src) as file:
            plan = plan_torchaudio(src, file, family)
            problems = _target_mismatches(plan)  # its keys are torchaudio's own: checked against the model directly
            if problems:
                raise ConversionError(src, problems, hint="Is it a complete torchaudio Wav2Vec2Model state dict?")
            yield plan
        return
    with (read_s3prl_checkpoint if fmt == "s3prl" else read_fairseq_checkpoint)(src) as ckpt:
        plan = plan_conversion(ckpt)
        if family is not None and family != plan.config.family:
            raise ConversionError(src, f"is a {plan.config.family} checkpoint, but --family {family} was given",
                                  hint="Its configuration names the family: leave --family out")
        if fmt == "s3prl":
            plan.config.provenance.update(s3prl_provenance(plan.config.family))
        yield plan


def _is_hf_directory(src: Path) -> bool:
    from .hf_import import is_hf_directory

    return is_hf_directory(src)


def convert_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    *,
    kmeans: str | Path | None = None,
    kmeans_layer: int | None = None,
    overwrite: bool = False,
    on_tensor: Callable[[PendingTensor], None] | None = None,
    family: str | None = None,
    num_updates: int | None = None,
) -> Path:
    """Convert the fairseq checkpoint ``src`` into a bundle at ``out_dir`` (written atomically). ``src`` may also be
    a transformers HuBERT / wav2vec 2.0 directory (see :mod:`converters.hf_import`), an s3prl converted checkpoint
    or a torchaudio ``.pth`` state dict (``family``: ``"hubert"`` / ``"wav2vec2"`` where the file cannot tell; see
    :mod:`converters.torchaudio_import`). ``num_updates`` says how many updates a transformers model was trained for
    (transformers does not record it; a fairseq checkpoint does).

    ``kmeans`` (joblib ``.bin`` or ``km.safetensors``) is attached as the bundle's k-means; ``kmeans_layer``
    (1-based) says which layer's output it clusters. Raises :class:`ConversionError` naming what is wrong.
    """
    src = Path(src)
    if src.is_dir() and _is_hf_directory(src):  # a transformers directory (any, or written by export --to hf)
        from .hf_import import import_hf

        if kmeans is not None or kmeans_layer is not None:
            raise ConversionError(src, "--kmeans / --kmeans-layer were given for a transformers directory",
                                  hint="Its k-means (if any) travels in its continue_pt_extras.safetensors; attach "
                                       "another one to the bundle this writes with `continue-pt convert`'s .pt path")
        if family is not None:
            raise ConversionError(src, "--family was given for a transformers directory",
                                  hint="Its config.json says which model it is; leave the option out")
        return import_hf(src, out_dir, overwrite=overwrite, on_tensor=on_tensor, num_updates=num_updates)
    if num_updates is not None:
        raise ConversionError(src, "--num-updates is for transformers directories",
                              hint="A fairseq checkpoint records its own num_updates; leave the option out")
    km = read_kmeans_file(kmeans, kmeans_layer) if kmeans is not None else None
    if km is None and kmeans_layer is not None:
        raise ConversionError(src, "--kmeans-layer was given without --kmeans", hint="Pass the k-means file too")
    with planned_source(src, family) as plan:
        if km is not None:
            _check_kmeans(km, plan.config, Path(kmeans))
            km.metadata.setdefault("source_file", Path(kmeans).name)
        hasher, digest = _sha256_in_background(src)

        def finish_config(config: BundleConfig) -> None:
            hasher.join()
            config.provenance["sha256"] = digest.get("sha256")
            if km is not None:
                config.provenance["kmeans"] = {"layer": km.layer, "num_clusters": km.num_clusters, **km.metadata}

        try:
            return write_bundle(out_dir, plan.config, plan.model_tensors, plan.fairseq_extras, kmeans=km,
                                overwrite=overwrite, on_tensor=on_tensor, before_config=finish_config)
        except BundleError as exc:
            raise ConversionError(exc.path, exc.problems, hint=exc.hint) from None
        except ValueError as exc:  # the source's tensor data is damaged (found while streaming it)
            raise ConversionError(src, str(exc), hint="Is the checkpoint complete? Download it again") from None
        except OSError as exc:
            raise ConversionError(out_dir, f"could not be written ({exc.strerror or exc})",
                                  hint="Check free disk space and permissions") from None
