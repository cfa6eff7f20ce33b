"""``hf://org/repo[@revision]``: a model on the Hugging Face hub, fetched with ``huggingface_hub`` into its cache.

huggingface_hub does the transfer (its cache layout ``models--org--repo/{blobs,snapshots,refs}``, resumable
downloads, ``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE``, tokens). Only what a conversion reads is fetched: ``config.json``,
``preprocessor_config.json`` (its ``do_normalize`` is the waveform normalisation), ``vocab.json`` (a CTC head's
letters), the weights and continue-pt's extras file: ``*.safetensors`` when the repository has them, else ``*.bin``
(never both: old repositories carry the same weights twice).

The hub publishes a checksum for every file, and it is verified here: a file's blob in the cache is named by its
ETag, which is the sha256 of the content for LFS files (the weights) and git's blob id (a sha1 of a header and the
content) for the small ones. huggingface_hub itself checks only the size. A blob that matches is remembered in
``<cache>/hub-verified/`` by size and mtime, so later uses do not hash gigabytes again; one that does not is
deleted (a re-run fetches it again) and reported.

huggingface_hub is an optional dependency (``pip install 'continue-pt[hub]'``): without it an ``hf://`` id gets an
error that says how to install it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from bundles.atomic import atomic_write

from .download import DownloadError
from .integrity import git_blob_sha1_of_file, sha256_of_file

HF_PREFIX = "hf://"
_REPO = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_METADATA = ["config.json", "preprocessor_config.json", "vocab.json"]
_VERIFIED = "hub-verified"
_TRUE = {"1", "on", "yes", "true"}


def is_hf_id(text: str) -> bool:
    return text.startswith(HF_PREFIX)


def parse_hf_id(text: str) -> tuple[str, str | None]:
    """``hf://org/repo@rev`` -> (``org/repo``, ``rev`` or None); :class:`DownloadError` when it is malformed."""
    match = _REPO.match(text[len(HF_PREFIX):]) if is_hf_id(text) else None
    if match is None or ".." in match.group("repo"):
        raise DownloadError(text, "is not a Hugging Face model id",
                            hint="Write hf://ORG/REPO or hf://ORG/REPO@REVISION (a branch, tag or commit)")
    return match.group("repo"), match.group("revision")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, not only when huggingface_hub was imported."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def fetch_hf(hf_id: str, *, verified_dir: Path, hub_cache: Path | None = None) -> Path:
    """The local snapshot directory of ``hf_id``, fetched (or, offline, found) in the hub cache and verified.

    ``verified_dir``: where verified blobs are remembered (continue-pt's cache). ``hub_cache``: the hub cache
    (default: huggingface_hub's, ``HF_HUB_CACHE``)."""
    repo_id, revision = parse_hf_id(hf_id)
    hub = _import_hub(hf_id)
    offline = hub_offline()
    try:
        patterns = _METADATA + (["*.safetensors", "*.bin"] if offline else _weight_patterns(hub, repo_id, revision))
        snapshot = Path(hub.snapshot_download(repo_id, revision=revision, cache_dir=hub_cache,
                                              allow_patterns=patterns, local_files_only=offline))
    except Exception as exc:
        if not _is_hub_error(exc):  # anything else is a bug of ours: let it show
            raise
        raise _hub_error(hf_id, exc, offline) from None
    verify_snapshot(hf_id, snapshot, verified_dir)
    return snapshot


def _import_hub(hf_id: str):
    try:
        import huggingface_hub
    except ImportError:
        raise DownloadError(hf_id, "needs the huggingface_hub package, which is not installed",
                            hint="Install it with `pip install 'continue-pt[hub]'` (or `pip install huggingface_hub`)"
                            ) from None
    return huggingface_hub


def _is_hub_error(exc: BaseException) -> bool:
    """What huggingface_hub raises about the repository or the network: its errors are OSError or ValueError
    subclasses, except the HTTP client's transport errors (httpx)."""
    return isinstance(exc, (OSError, ValueError)) or type(exc).__module__.split(".")[0] in (
        "httpx2", "httpx", "httpcore2", "httpcore", "requests")


def _weight_patterns(hub, repo_id: str, revision: str | None) -> list[str]:
    try:
        files = hub.HfApi().list_repo_files(repo_id, revision=revision)
    except Exception as exc:  # the hub is unreachable: snapshot_download falls back to the cache, with both
        if not _is_hub_error(exc):
            raise
        return ["*.safetensors", "*.bin"]
    return ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]


def _hub_error(hf_id: str, exc: BaseException, offline: bool) -> DownloadError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    name = type(exc).__name__
    if offline:
        hint = ("HF_HUB_OFFLINE is set, so only the hub cache was searched: fetch it once online, or point "
                "HF_HUB_CACHE at a cache that holds it")
    elif name in ("RepositoryNotFoundError", "GatedRepoError"):
        hint = "Check the id (ORG/REPO); a private or gated model needs `hf auth login` first"
    elif name == "RevisionNotFoundError":
        hint = "Check the revision after '@' (a branch, tag or commit of that repository)"
    else:
        hint = "Check the network connection and the id, then run again (huggingface_hub resumes partial files)"
    return DownloadError(hf_id, f"could not be fetched from the Hugging Face hub ({name}: {first})", hint=hint)


def verify_snapshot(hf_id: str, snapshot: Path, verified_dir: Path) -> None:
    """Check every file of ``snapshot`` against the checksum its blob name (the hub's ETag) publishes."""
    problems = []
    for link in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        blob = link.resolve()
        etag = blob.name
        if len(etag) == 64:
            algorithm, digest_of = "sha256", sha256_of_file
        elif len(etag) == 40:
            algorithm, digest_of = "git blob sha1", git_blob_sha1_of_file
        else:
            continue  # not a hub blob (a file copied in by hand): nothing published to check it against
        marker = verified_dir / _VERIFIED / f"{etag}.json"
        stat = blob.stat()
        if _marked(marker, stat):
            continue
        got = digest_of(blob)
        if got != etag:
            blob.unlink(missing_ok=True)
            link.unlink(missing_ok=True)
            problems.append(f"{link.relative_to(snapshot)}: expected {algorithm} {etag} (published by the hub), "
                            f"got {got}; the file was deleted")
            continue
        marker.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}) + "\n"
        atomic_write(marker, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    if problems:
        raise DownloadError(hf_id, problems, hint="Run the command again to fetch the deleted files again")


def _marked(marker: Path, stat: os.stat_result) -> bool:
    try:
        seen = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return seen == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
