"""A Lightning checkpoint of :class:`~continue_pt.hubert.module.HubertContinuedPretraining` or
:class:`~continue_pt.wav2vec2.module.Wav2Vec2ContinuedPretraining` -> a bundle.

The checkpoint holds everything needed (the student's weights, HuBERT's extra label rows, the bundle config it
started from, the steps trained, HuBERT's k-means of the targets), so nothing else is read. It is read with
``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bundles.config import BundleConfig
from bundles.errors import BundleError
from bundles.kmeans import KMeansModel
from bundles.safetensors_stream import PendingTensor
from bundles.writing import write_bundle
from continue_pt.families import FAMILIES
from continue_pt.module_base import CHECKPOINT_FORMAT, CHECKPOINT_KEY
from continue_pt.resume_notes import SEGMENTS_KEY
from continue_pt.sharded_files import is_sharded_checkpoint
from continue_pt.sharding import read_sharded_checkpoint

STUDENT_PREFIX = "student."
EXTRA_ROWS_KEY = "extra_label_embeddings"
_NOT_OURS_HINT = "Pass a .ckpt written by `continue-pt pretrain` (output_dir/checkpoints/*.ckpt)"


def read_training_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, read with ``weights_only=True``; BundleError if it is not one of ours."""
    path = Path(ckpt_path)
    if is_sharded_checkpoint(path):  # written by --strategy fsdp: a directory of shards
        return _checked(path, read_sharded_checkpoint(path))
    if path.is_dir() and (path / "config.json").is_file():
        raise BundleError(path, "is a bundle directory, not a training checkpoint: it is already what export "
                                "writes (load it with load_bundle)", hint=_NOT_OURS_HINT)
    if not path.is_file():
        raise BundleError(path, "no such checkpoint file" if not path.exists() else "is not a file",
                          hint=_NOT_OURS_HINT)
    if _is_safetensors(path):
        raise BundleError(path, "is a safetensors file (a bundle's weights or a k-means), not a training "
                                "checkpoint: the bundle it belongs to is already loadable", hint=_NOT_OURS_HINT)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  junk bytes make torch's (weights-only) unpickler fail in any way
        raise BundleError(path, f"is not a readable Lightning checkpoint ({_load_failure(exc)})",
                          hint=_NOT_OURS_HINT) from None
    return _checked(path, checkpoint)


def _checked(path: Path, checkpoint: Any) -> dict[str, Any]:
    extra = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(extra, dict) or extra.get("format") != CHECKPOINT_FORMAT or "state_dict" not in checkpoint:
        raise BundleError(path, "is not a continue-pt training checkpoint (it has no continue-pt section)",
                          hint=_NOT_OURS_HINT)
    return checkpoint


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with the 8-byte length of a JSON header."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _load_failure(exc: BaseException) -> str:
    """Why torch could not read the file, without torch's advice to turn its weights-only loading off (that would
    run whatever code the file carries; a checkpoint of ours never needs it)."""
    text = str(exc).strip()
    pickled = re.search(r"GLOBAL ([\w.]+)", text)
    if pickled:
        fairseq = " (a fairseq checkpoint: `continue-pt convert` turns it into a bundle)" \
            if pickled.group(1).startswith("fairseq.") else ""
        return f"it holds a pickled {pickled.group(1)}, which a continue-pt checkpoint never does{fairseq}"
    if "weights_only" in text:
        return "it holds objects a safe (weights-only) load refuses, which a continue-pt checkpoint never does"
    return text.splitlines()[0] if text else type(exc).__name__


def student_tensors(checkpoint: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor | None]:
    """The student's state dict (names as ``get_pretrain_model()`` has them) and the extra label rows."""
    state = checkpoint["state_dict"]
    model = {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    return model, state.get(EXTRA_ROWS_KEY)


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, overwrite: bool = False,
                      train_data: str | None = None) -> Path:
    """Write the student of a training checkpoint as a bundle in ``out_dir``; returns ``out_dir``.

    ``num_updates`` becomes the starting bundle's plus the steps trained; ``provenance["training"]`` says what
    it was trained from, on what data, for how many steps, with which loss normalisation and when."""
    path = Path(ckpt_path)
    checkpoint = read_training_checkpoint(path)
    extra = checkpoint[CHECKPOINT_KEY]
    try:
        config = BundleConfig.from_dict(path, json.loads(extra["bundle_config"]))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise BundleError(path, f"its stored bundle config is unreadable ({exc})", hint=_NOT_OURS_HINT) from None
    model_state, extra_rows = student_tensors(checkpoint)
    if not model_state:
        raise BundleError(path, "holds no student weights", hint=_NOT_OURS_HINT)
    options = json.loads(extra.get("options", "{}"))
    steps = int(extra.get("steps", 0))
    if config.family not in FAMILIES:
        raise BundleError(path, f"was written for a {config.family!r} model, which this version cannot export",
                          hint=_NOT_OURS_HINT)

    family = FAMILIES[config.family]
    family.export_config(config, extra, model_state)  # HuBERT: the label set the head was trained on
    teacher, targets = family.describe_targets(options)
    # num_updates continues (for wav2vec 2.0 so does the Gumbel temperature, which follows it)
    start_updates = config.num_updates or 0
    config.num_updates = start_updates + steps
    history = list(config.provenance.get("training", [])) if isinstance(config.provenance.get("training"), list) \
        else ([config.provenance["training"]] if "training" in config.provenance else [])
    record = {
        "from_bundle": options.get("bundle"),
        "from_num_updates": start_updates,
        "checkpoint": path.name,
        "steps": steps,
        "data": train_data if train_data is not None else options.get("train_data")
        or (checkpoint.get("AudioDataModule") or {}).get("train_source"),
        # every attempt of a resumed run: its data and steps (the run may have changed --train-data on resume)
        "segments": _segments(checkpoint, steps, train_data),
        "targets": targets,
        "teacher": teacher,  # the bundle whose features the k-means labelled (the trained ones have moved)
        "label_head_reinitialised": bool(options.get("reinit_label_head")),
        "loss_normalization": extra.get("loss_norm"),
        "peak_lr": options.get("lr"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    config.provenance = {**config.provenance, "training": history + [record]}

    tensors = [PendingTensor(name, tuple(t.shape), t.dtype, (lambda t=t: t.contiguous()))
               for name, t in model_state.items()]
    extras = []
    if extra_rows is not None:
        extras.append(PendingTensor("label_embeddings_non_cluster", tuple(extra_rows.shape), extra_rows.dtype,
                                    lambda: extra_rows.contiguous()))
    kmeans = None
    stored = extra.get("kmeans")
    if isinstance(stored, dict) and isinstance(stored.get("centroids"), Tensor):
        kmeans = KMeansModel(stored["centroids"], stored.get("layer"), dict(stored.get("metadata") or {}))
    return write_bundle(out_dir, config, tensors, extras, kmeans=kmeans, overwrite=overwrite)


@contextmanager
def bundle_of(src: str | Path, scratch_dir: str | Path) -> Iterator[Path]:
    """``src`` itself when it is a bundle directory; for a training ``.ckpt``, a temporary bundle exported from it
    (in ``scratch_dir``, removed afterwards). This is how ``export --to fairseq/hf`` takes checkpoints: the
    converters read bundles only (they do not depend on the training package)."""
    src = Path(src)
    if not src.is_file() and not is_sharded_checkpoint(src):  # a bundle directory (a sharded checkpoint is one too)
        yield src
        return
    scratch_dir = Path(scratch_dir)
    work = Path(tempfile.mkdtemp(prefix=f".{src.stem}.", suffix=".bundle",
                                 dir=scratch_dir if scratch_dir.is_dir() else None))
    try:
        try:
            bundle_dir = export_checkpoint(src, work / "bundle")
        except BundleError as exc:  # about the temporary bundle: name the training checkpoint instead
            if str(exc.path).startswith(str(work)):
                raise BundleError(src, exc.problems, hint=exc.hint) from None
            raise
        yield bundle_dir
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _segments(checkpoint: dict[str, Any], steps: int, train_data: str | None) -> list[dict[str, Any]]:
    stored = checkpoint.get(SEGMENTS_KEY)
    if isinstance(stored, list) and stored:
        return [{"data": s.get("data"), "from_step": int(s.get("from_step", 0)), "to_step": int(s.get("to_step", 0)),
                 "steps": int(s.get("to_step", 0)) - int(s.get("from_step", 0))} for s in stored if isinstance(s, dict)]
    return [{"data": train_data, "from_step": 0, "to_step": steps, "steps": steps}]  # written before segments


def training_teacher(config: BundleConfig) -> str | None:
    """The teacher bundle whose features made the online targets of the last run that produced this bundle
    (None: not a continued bundle, offline labels, or wav2vec 2.0). The continued bundle's own features have
    moved in training: labelling with them gives other ids than the ones it was trained on."""
    training = config.provenance.get("training")
    record = training[-1] if isinstance(training, list) and training else None
    teacher = record.get("teacher") if isinstance(record, dict) else None
    return teacher if isinstance(teacher, str) else None
