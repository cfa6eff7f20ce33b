"""Write a bundle directory atomically: everything goes to a temporary sibling, renamed into place at the end.

A failure at any point (a bad tensor, a full disk, Ctrl-C) leaves no partial output directory behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .config import CONFIG_FILE, FAIRSEQ_EXTRAS_FILE, KMEANS_FILE, MODEL_FILE, BundleConfig
from .errors import BundleError
from .kmeans import KMeansModel, save_kmeans
from .safetensors_stream import PendingTensor, write_safetensors_streaming


def write_bundle(
    out_dir: str | Path,
    config: BundleConfig,
    model_tensors: Iterable[PendingTensor],
    fairseq_extras: Iterable[PendingTensor] = (),
    kmeans: KMeansModel | None = None,
    overwrite: bool = False,
    on_tensor: Callable[[PendingTensor], None] | None = None,
    before_config: Callable[[BundleConfig], None] | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the optional files into ``out_dir``.

    ``config.json`` is written last, after ``before_config(config)``; the directory appears only when complete."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(out_dir, "already exists", hint="Choose another output directory or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the bundle should get the usual permissions
    try:
        extras = list(fairseq_extras)
        config.files = {"model": MODEL_FILE,
                        "kmeans": KMEANS_FILE if kmeans is not None else None,
                        "fairseq_extras": FAIRSEQ_EXTRAS_FILE if extras else None}
        meta = {"format": config.format, "format_version": str(config.format_version), "family": config.family}
        write_safetensors_streaming(tmp / MODEL_FILE, model_tensors, meta, on_tensor=on_tensor)
        if extras:
            write_safetensors_streaming(tmp / FAIRSEQ_EXTRAS_FILE, extras, meta, on_tensor=on_tensor)
        if kmeans is not None:
            save_kmeans(kmeans, tmp / KMEANS_FILE)
        if before_config is not None:  # e.g. a checksum computed while the tensors were written
            before_config(config)
        (tmp / CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
