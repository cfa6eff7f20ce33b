"""Write a bundle directory atomically: everything goes to a temporary sibling, renamed into place at the end.

A failure at any point (a bad tensor, a full disk, Ctrl-C) leaves no partial output directory behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .atomic import dir_mode, disk_full, human_bytes
from .config import CONFIG_FILE, FAIRSEQ_EXTRAS_FILE, KMEANS_FILE, MODEL_FILE, BundleConfig
from .errors import BundleError, DiskFull
from .kmeans import KMeansModel, save_kmeans
from .safetensors_stream import PendingTensor, safetensors_file_size, write_safetensors_streaming


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
    os.chmod(tmp, dir_mode())  # mkdtemp makes it private; the bundle should get the usual permissions
    writing = out_dir
    needed: dict[str, int] = {}  # bytes of each file, for the message of a full disk
    try:
        model = list(model_tensors)
        extras = list(fairseq_extras)
        config.files = {"model": MODEL_FILE,
                        "kmeans": KMEANS_FILE if kmeans is not None else None,
                        "fairseq_extras": FAIRSEQ_EXTRAS_FILE if extras else None}
        meta = {"format": config.format, "format_version": str(config.format_version), "family": config.family}
        needed[MODEL_FILE] = safetensors_file_size(model, meta)
        if extras:
            needed[FAIRSEQ_EXTRAS_FILE] = safetensors_file_size(extras, meta)
        writing = out_dir / MODEL_FILE
        write_safetensors_streaming(tmp / MODEL_FILE, model, meta, on_tensor=on_tensor)
        if extras:
            writing = out_dir / FAIRSEQ_EXTRAS_FILE
            write_safetensors_streaming(tmp / FAIRSEQ_EXTRAS_FILE, extras, meta, on_tensor=on_tensor)
        if kmeans is not None:
            writing = out_dir / KMEANS_FILE
            save_kmeans(kmeans, tmp / KMEANS_FILE)
        if before_config is not None:  # e.g. a checksum computed while the tensors were written
            before_config(config)
        writing = out_dir / CONFIG_FILE
        text = config.to_json()
        needed[CONFIG_FILE] = len(text.encode("utf-8"))
        (tmp / CONFIG_FILE).write_text(text, encoding="utf-8")
        writing = out_dir
        swap_into_place(tmp, out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, DiskFull):  # from save_kmeans: name the bundle's file, not the temporary one
            exc = exc.__cause__ or exc
        if kmeans is not None:
            needed[KMEANS_FILE] = kmeans.centroids.numel() * 4 + 1024  # + the header, about
        full = disk_full(writing, exc, needed.get(writing.name, sum(needed.values())))
        if full is not None:
            problem = f"{full.problems[0]}; the whole bundle needs {human_bytes(sum(needed.values()))}"
            raise DiskFull(full.path, problem, hint=full.hint) from exc
        raise
    return out_dir


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished directory ``tmp`` to ``out_dir``; an existing ``out_dir`` is replaced only once ``tmp`` is
    in place (and restored if that rename fails)."""
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
