"""Download one file over HTTP(S) into a cache: resumable, verified, never half-written.

Why a small loop of our own on top of urllib3 rather than a downloader library: pooch (the best-kept one for
"fetch a file into a cache and check its hash") streams into a temporary file that it deletes on any failure and
never sends a ``Range`` request, so an interrupted multi-gigabyte checkpoint starts again from zero; requests adds
nothing here that urllib3 (which it is built on) lacks. urllib3 gives connection pooling, retries with back-off on
connection errors and 5xx answers, timeouts and content-length enforcement; what is ours is the resume logic:

- the file grows in ``FILE.part``; a re-run (or a retry after a dropped connection) asks for ``Range: bytes=N-``
  and appends on ``206 Partial Content`` whose ``Content-Range`` starts at N; a server that ignores the range
  (``200``) or answers for another start restarts the file cleanly; ``416`` (our part is no prefix of the file any
  more) restarts it too;
- the sha256 is computed while the bytes arrive (the part already on disk is hashed first when resuming);
- only a complete, verified file is renamed to ``FILE``: its size must be the announced one, and its sha256 the
  pinned one (``--sha256``, or one the source publishes) or, unpinned, the one recorded at an earlier download;
  a mismatch deletes the file and its record and says so;
- :mod:`converters.integrity` records size and sha256 in ``FILE.integrity.json`` and checks every later use;
- a second process fetching the same file (every rank of a job) waits on a lock (``.FILE.lock``, POSIX ``flock``)
  and then finds the file complete.

Errors (refused connection, DNS, timeouts, 404, 500, a wrong checksum) are :class:`DownloadError`: one message
that names the URL or the file, what happened and what to do.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from bundles.atomic import disk_full

from .errors import ConversionError
from .integrity import (Mismatch, check_against_record, read_record, remove_with_record, sha256_of_file, sidecar_of,
                        verify_digest, write_record)

CACHE_ENV = "CONTINUE_PT_CACHE"
PART_SUFFIX = ".part"
_CHUNK = 1 << 20
_TIMEOUT_S = 30.0
_RESUMES_WITHOUT_PROGRESS = 3
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class DownloadError(ConversionError):
    """A download failed or gave another file than expected. ``where`` is the URL (or the file) it concerns.

    A :class:`~bundles.errors.FileProblem` whose message keeps the URL as written (a ``Path`` would fold its
    ``//``)."""

    def __init__(self, where: str | Path, problems: str | list[str], hint: str = ""):
        super().__init__(where, problems, hint)
        self.where = str(where)
        body = self.problems[0] if len(self.problems) == 1 else "\n  - " + "\n  - ".join(self.problems)
        message = f"{self.where}: {body}"
        if hint:
            message += f"\n  {hint}" if len(self.problems) > 1 else f". {hint}"
        self.args = (message,)


def default_cache_dir(environ: dict[str, str] | os._Environ = os.environ) -> Path:
    """``$CONTINUE_PT_CACHE``, else ``$XDG_CACHE_HOME/continue-pt``, else ``~/.cache/continue-pt``."""
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV]).expanduser()
    if environ.get("XDG_CACHE_HOME"):
        return Path(environ["XDG_CACHE_HOME"]).expanduser() / "continue-pt"
    return Path.home() / ".cache" / "continue-pt"


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def file_name_of_url(url: str) -> str:
    """The last path component of ``url`` (percent-decoded), or a :class:`DownloadError` when it has none."""
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise DownloadError(url, "names no file (its path does not end in a file name)",
                            hint="Give the URL of the checkpoint file itself")
    return name


def cache_path_for_url(url: str, cache_dir: Path) -> Path:
    """Where the cache keeps the file of a plain URL: ``CACHE/urls/HOST/PATH`` (one place per URL)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").replace(":", "_")
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if not host or any(s in (".", "..") or "\\" in s for s in segments):
        raise DownloadError(url, "is not a URL this can cache (no host, or '.'/'..' in its path)",
                            hint="Give the file's plain http(s) URL")
    file_name_of_url(url)
    port = f"_{parts.port}" if parts.port else ""
    return cache_dir / "urls" / f"{host}{port}" / Path(*segments)


@dataclass(frozen=True)
class DownloadOptions:
    """How :func:`fetch` talks to the server. ``progress``: a tqdm bar on stderr (None: only on a terminal)."""

    timeout_s: float = _TIMEOUT_S
    retries: int = 3
    """urllib3's retries of a refused/failed connection or a 5xx answer, with back-off."""
    resumes_without_progress: int = _RESUMES_WITHOUT_PROGRESS
    """How often a dropped transfer is resumed (Range) in a row without a byte gained before giving up."""
    progress: bool | None = None


def fetch(url: str, dest: str | Path, *, sha256: str | None = None,
          options: DownloadOptions = DownloadOptions()) -> Path:
    """``dest``, downloaded from ``url`` if it is not there yet (resuming ``dest.part``), and verified.

    ``sha256`` (lower-case hex) pins the content. A file already there is checked against its record (see
    :mod:`converters.integrity`); one without a record (put there by hand) is hashed, recorded and kept. Raises
    :class:`DownloadError` (a mismatch deletes what was downloaded).
    """
    dest = Path(dest)
    if dest.is_file():
        _check_existing(url, dest, sha256)
        return dest
    if dest.exists():
        raise DownloadError(dest, "exists and is not a file", hint="Remove it or download somewhere else")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest):  # another process (every rank of a job) may be fetching the same file: wait for it
        if dest.is_file():
            _check_existing(url, dest, sha256)
            return dest
        return _download_verified(url, dest, sha256, options)


@contextmanager
def _exclusive(dest: Path) -> Iterator[None]:
    """Hold the lock of ``dest`` (a hidden ``.NAME.lock`` beside it, kept: removing it would race)."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): one download at a time is then the user's business
        yield
        return
    with open(dest.with_name(f".{dest.name}.lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _download_verified(url: str, dest: Path, sha256: str | None, options: DownloadOptions) -> Path:
    earlier = read_record(dest)  # the file was deleted but its record kept: a new download must match it
    digest = _download(url, dest, options)
    part = _part_of(dest)
    mismatch = verify_digest(digest, dest, sha256, earlier)
    if mismatch is not None:
        part.unlink(missing_ok=True)
        sidecar_of(dest).unlink(missing_ok=True)
        raise _mismatch_error(dest, url, mismatch)
    write_record(dest, digest, url, "pinned" if sha256 is not None else "first download", content=part)
    os.replace(part, dest)
    return dest


def _part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + PART_SUFFIX)


def _check_existing(url: str, dest: Path, pinned: str | None) -> None:
    record = read_record(dest)
    if record is None:  # not downloaded by us (or the record was lost): never delete such a file
        digest = sha256_of_file(dest)
        if pinned is not None and digest != pinned:
            raise DownloadError(dest, f"is already there but its sha256 is {digest}, not the pinned {pinned}",
                                hint="It was not downloaded here, so it was left in place: remove it (a re-run then "
                                     "downloads it) or correct --sha256")
        write_record(dest, digest, url, "pinned" if pinned is not None else "found in place")
        return
    mismatch = check_against_record(dest, record, pinned)
    if mismatch is not None:
        remove_with_record(dest)
        raise _mismatch_error(dest, record.source, mismatch)


def _mismatch_error(dest: Path, url: str, mismatch: Mismatch) -> DownloadError:
    return DownloadError(dest, f"is not the file expected from {url}: expected {mismatch.expected}, got "
                               f"{mismatch.got}; the file was deleted",
                         hint="Run the command again to download it again (if the pinned --sha256 is wrong, "
                              "correct it)")


def _download(url: str, dest: Path, options: DownloadOptions) -> str:
    """Fill ``dest.part`` with the whole of ``url`` (resuming it); its sha256."""
    import urllib3
    from urllib3.util import Retry, Timeout

    # redirects (download hosts often send a CDN address) have their own budget, not the error retries'
    retry = Retry(total=None, connect=options.retries, read=options.retries, status=options.retries,
                  other=options.retries, redirect=10, backoff_factor=0.25, status_forcelist=(500, 502, 503, 504),
                  allowed_methods=frozenset({"GET"}), raise_on_status=False, respect_retry_after_header=False)
    http = urllib3.PoolManager(retries=retry, timeout=Timeout(connect=options.timeout_s, read=options.timeout_s))
    part = _part_of(dest)
    stalled = 0
    while True:
        have_before = part.stat().st_size if part.is_file() else 0
        try:
            return _transfer(http, url, part, options)
        except _Dropped as dropped:
            gained = (part.stat().st_size if part.is_file() else 0) > have_before
            stalled = 0 if gained else stalled + 1
            if stalled >= options.resumes_without_progress:
                have = part.stat().st_size if part.is_file() else 0
                raise DownloadError(url, f"the transfer broke off ({dropped.reason}) after {have} bytes",
                                    hint=f"Run the command again: it resumes from {part}") from None


class _Dropped(Exception):
    """The connection broke off mid-transfer: resume with a Range request."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _transfer(http, url: str, part: Path, options: DownloadOptions) -> str:
    from urllib3.exceptions import HTTPError as Urllib3Error
    from urllib3.exceptions import ProtocolError, ReadTimeoutError

    have = part.stat().st_size if part.is_file() else 0
    headers = {"Accept-Encoding": "identity"}  # the bytes of the file itself: ranges count those
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = http.request("GET", url, headers=headers, preload_content=False, decode_content=False)
    except Urllib3Error as exc:
        raise _network_error(url, exc) from None
    try:
        if response.status == 416 and have:
            if _unsatisfied_total(response) == have:  # the part is whole (stopped before its rename)
                return _hash_prefix(part, have).hexdigest()
            part.unlink()  # the part is no prefix of the file (longer: the file changed?): start again
            raise _Dropped("the server refused to resume; starting again")
        if response.status >= 400:
            raise DownloadError(url, f"the server answered {response.status} {response.reason or ''}".rstrip(),
                                hint=_status_hint(response.status))
        placed = _range_of(response, have)
        if placed is None:  # never append bytes that belong elsewhere: start the file again
            part.unlink(missing_ok=True)
            raise _Dropped("the server answered for another range; starting again")
        start, total = placed
        hasher = _hash_prefix(part, start)
        try:
            with open(part, "r+b" if start else "wb") as fh:
                fh.seek(start)
                fh.truncate()
                with _progress_bar(part, total, start, options.progress) as bar:
                    for chunk in response.stream(_CHUNK, decode_content=False):
                        fh.write(chunk)
                        hasher.update(chunk)
                        bar.update(len(chunk))
        except (ProtocolError, ReadTimeoutError) as exc:
            what = "timed out" if isinstance(exc, ReadTimeoutError) else "connection broken"
            raise _Dropped(what) from None
        except OSError as exc:
            full = disk_full(part, exc, (total - start) if total is not None else None)
            if full is not None:
                raise full from exc
            raise
        size = part.stat().st_size
        if total is not None and size != total:
            raise _Dropped(f"{size} of {total} bytes arrived")
        return hasher.hexdigest()
    finally:
        response.release_conn()


def _range_of(response, have: int) -> tuple[int, int | None] | None:
    """Where the body starts in the file and the file's full size (None: not announced); None for a partial
    answer that does not start where our part ends."""
    if response.status == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
        if match and int(match.group(1)) == have:
            return have, None if match.group(3) == "*" else int(match.group(3))
        return None
    length = response.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None  # a 200 is the whole file: restart


def _unsatisfied_total(response) -> int | None:
    """The file size a 416 answer announces (``Content-Range: bytes */SIZE``), if any."""
    match = re.match(r"^bytes \*/(\d+)$", response.headers.get("Content-Range", "").strip())
    return int(match.group(1)) if match else None


def _hash_prefix(part: Path, start: int) -> "hashlib._Hash":
    hasher = hashlib.sha256()
    if start:
        with open(part, "rb") as fh:
            remaining = start
            while remaining and (chunk := fh.read(min(_CHUNK, remaining))):
                hasher.update(chunk)
                remaining -= len(chunk)
    return hasher


def _progress_bar(part: Path, total: int | None, start: int, progress: bool | None):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                desc=part.name[: -len(PART_SUFFIX)], disable=None if progress is None else not progress, leave=False)


def _status_hint(status: int) -> str:
    if status == 404:
        return "Check the URL (or the mirror given with --mirror / CONTINUE_PT_MIRROR): no file is there"
    if status in (401, 403):
        return "The server refuses access to this file; check the URL"
    if status >= 500:
        return "The server has a problem; try again later"
    return "Check the URL"


def _network_error(url: str, exc: Exception) -> DownloadError:
    from urllib3.exceptions import (ConnectTimeoutError, LocationValueError, MaxRetryError, NameResolutionError,
                                    NewConnectionError, ReadTimeoutError, SSLError)

    reason = exc.reason if isinstance(exc, MaxRetryError) and exc.reason is not None else exc
    if isinstance(reason, NameResolutionError):
        what = "its host name could not be resolved (DNS)"
    elif isinstance(reason, NewConnectionError):
        what = "the connection was refused or could not be made"
    elif isinstance(reason, (ConnectTimeoutError, ReadTimeoutError)):
        what = "the server did not answer in time"
    elif isinstance(reason, SSLError):
        what = "the TLS (https) connection failed"
    elif isinstance(exc, LocationValueError):
        return DownloadError(url, "is not a valid URL", hint="Give an http(s) URL of the file")
    else:
        what = f"the download failed ({type(reason).__name__})"
    return DownloadError(url, f"could not be downloaded: {what}",
                         hint="Check the URL and the network connection, then run again (a partial download resumes)")
