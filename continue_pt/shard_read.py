"""Training from a shard set (``shard_format``): its index as a corpus scan, each utterance read by byte range.

``scan_shards`` turns ``shards.json`` into the same :class:`~continue_pt.corpus.ScanResult` a directory scan gives
(same names, order and lengths: a shard set written from a directory trains exactly like it), without reading any
audio. ``read_item`` / ``read_item_window`` read an utterance wherever it lives: a file, or ``size`` bytes at
``offset`` of a local shard (one seek) or of a remote one (one HTTP ``Range`` request, retried on a dropped
connection or a 5xx answer).
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from torch import Tensor

from continue_pt.audio import AudioError, read_audio, read_audio_window, resampled_length
from continue_pt.corpus import AudioItem, ScanResult, _length_check, capped, scan_audio
from continue_pt.shard_format import (INDEX_NAME, ShardError, ShardIndex, ShardMember, is_shard_source, is_url,
                                      member_url, parse_index)

HTTP_TIMEOUT_S = 60.0
HTTP_TRIES = 4
_REDIRECTS = (301, 302, 303, 307, 308)
_REMOTE_HINT = "Check the URL and that the server is up; it must answer HTTP Range requests (nginx, S3, GCS do)"


def load_index(source: str | Path) -> ShardIndex:
    """The checked index of the shard set at ``source`` (directory or base URL); local shards must all be there
    with their indexed sizes (every problem reported together)."""
    where = member_url(source, INDEX_NAME)
    if is_url(source):
        raw = _http_get(where)
    else:
        try:
            raw = Path(where).read_bytes()
        except OSError as error:
            raise ShardError(where, f"cannot be read ({error.strerror or error})",
                             "Give a directory written by `continue-pt shards write` or indexed by "
                             "`continue-pt shards index`") from error
    index = parse_index(where, raw)
    if not is_url(source):
        _check_local_shards(Path(source), index)
    return index


def _check_local_shards(base: Path, index: ShardIndex) -> None:
    problems = []
    for shard in index.shards:
        if is_url(shard["name"]):  # served elsewhere (`shards index --base-url`): checked as it is read
            continue
        path = base / shard["name"]
        if not path.is_file():
            problems.append(f"{shard['name']} is missing")
        elif path.stat().st_size != shard["bytes"]:
            problems.append(f"{shard['name']} has {path.stat().st_size} bytes, the index says {shard['bytes']} "
                            "(truncated or replaced)")
    if problems:
        raise ShardError(base, capped(problems), "Copy the shard set again, or rewrite it with "
                                                 "`continue-pt shards write`")


def scan_shards(source: str | Path, sample_rate: int, min_seconds: float = 2.0) -> ScanResult:
    """The usable utterances of the shard set at ``source``, as ``corpus.scan_audio`` lists a directory: in the
    index's order (the source's sorted order), lengths at ``sample_rate`` from the index, utterances shorter than
    ``min_seconds`` set aside with their reason."""
    return scan_index(load_index(source), source, sample_rate, min_seconds)


def scan_index(index: ShardIndex, source: str | Path, sample_rate: int, min_seconds: float = 2.0) -> ScanResult:
    """:func:`scan_shards` of an index already loaded from ``source``."""
    base = str(source)
    result = ScanResult([], [], source=Path(base) if not is_url(base) else None)
    columns = index.items
    for i, name in enumerate(columns["name"]):
        shard = index.shards[columns["shard"][i]]["name"]
        label = Path(shard) / name
        frames, rate = int(columns["frames"][i]), int(columns["sample_rate"][i])
        if frames == 0:
            result.skipped.append((label, "empty: 0 frames"))
            continue
        num_samples, reason = _length_check(resampled_length(frames, rate, sample_rate), min_seconds, sample_rate)
        if reason:
            result.skipped.append((label, reason))
            continue
        member = ShardMember(base, shard, int(columns["offset"][i]), int(columns["size"][i]))
        result.items.append(AudioItem(label, num_samples, name, file_frames=frames, file_rate=rate, member=member))
    return result


def scan_source(source: str | Path, sample_rate: int, min_seconds: float = 2.0) -> ScanResult:
    """Any audio source the commands take: a shard set (a directory with ``shards.json``, or its base URL) by
    :func:`scan_shards`, else a directory or a fairseq manifest by ``corpus.scan_audio``. Read its items with
    :func:`read_item`."""
    if is_shard_source(source):
        return scan_shards(source, sample_rate, min_seconds)
    return scan_audio(Path(source), sample_rate, min_seconds)


def read_item(item: AudioItem, sample_rate: int) -> Tensor:
    """``audio.read_audio`` of the item: its file, or its bytes in a shard."""
    if item.member is None:
        return read_audio(item.path, sample_rate)
    return read_audio(item.path, sample_rate, data=member_bytes(item.member, item.path))


def read_item_window(item: AudioItem, sample_rate: int, start: int, length: int) -> Tensor:
    """``audio.read_audio_window`` of the item: its file, or its bytes in a shard."""
    if item.member is None:
        return read_audio_window(item.path, sample_rate, start, length)
    return read_audio_window(item.path, sample_rate, start, length, data=member_bytes(item.member, item.path))


def member_bytes(member: ShardMember, name: str | Path) -> bytes:
    """The ``size`` bytes at ``offset`` of the member's shard; :class:`AudioError` naming ``name`` when they
    cannot be had."""
    where = member_url(member.base, member.shard)
    if is_url(where):
        try:
            return _http_range(where, member.offset, member.size)
        except ShardError as error:
            raise AudioError(name, f"cannot be fetched from {where} ({error.problems[0]})", _REMOTE_HINT) from error
    try:
        with open(where, "rb") as fh:
            fh.seek(member.offset)
            data = fh.read(member.size)
    except OSError as error:
        raise AudioError(name, f"cannot be read from {where} ({error.strerror or error})",
                         "The shard set changed since training started") from error
    if len(data) != member.size:
        raise AudioError(name, f"{where} ends before byte {member.offset + member.size} (truncated shard)",
                         "Copy the shard set again")
    return data


def _http_get(url: str) -> bytes:
    return _http(url, {}, expect_status=200)


def _http_range(url: str, offset: int, size: int) -> bytes:
    data = _http(url, {"Range": f"bytes={offset}-{offset + size - 1}"}, expect_status=206, keep_alive=True)
    if len(data) != size:
        raise ShardError(url, f"answered {len(data)} bytes for a range of {size}", _REMOTE_HINT)
    return data


_CONNECTIONS: dict[tuple[int, str, str, int | None], http.client.HTTPConnection] = {}
"""One kept-alive connection per process and server: a TLS handshake per utterance would cost more than the read.
Keyed by the process id too, so a data-loader worker never uses a connection it inherited from its parent."""


def _kept_alive_get(url: str, headers: dict[str, str]) -> tuple[int, bytes, str | None]:
    """``(status, body, location)`` of a GET over this process's connection to the server of ``url``."""
    parts = urllib.parse.urlsplit(url)
    key = (os.getpid(), parts.scheme, parts.hostname or "", parts.port)
    connection = _CONNECTIONS.get(key)
    if connection is None:
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = _CONNECTIONS[key] = kind(parts.hostname or "", parts.port, timeout=HTTP_TIMEOUT_S)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("GET", path or "/", headers=headers)
        response = connection.getresponse()
        return response.status, response.read(), response.getheader("Location")
    except BaseException:
        connection.close()  # reopened by the next request
        _CONNECTIONS.pop(key, None)
        raise


def _http(url: str, headers: dict[str, str], expect_status: int, keep_alive: bool = False) -> bytes:
    """GET ``url`` (``keep_alive``: over this process's open connection; a redirect is followed by urllib);
    connection errors and 5xx answers are retried a few times (a busy server, a dropped connection), anything else
    is one :class:`ShardError` naming the URL."""
    last = ""
    for attempt in range(HTTP_TRIES):
        if attempt > 1:  # the first retry at once: a kept-alive connection the server had closed meanwhile
            time.sleep(0.25 * 2 ** attempt)
        try:
            if keep_alive:
                status, body, location = _kept_alive_get(url, headers)
                if status in _REDIRECTS and location:
                    return _http(urllib.parse.urljoin(url, location), headers, expect_status)
                if status >= 400:
                    raise urllib.error.HTTPError(url, status, http.client.responses.get(status, ""), None, None)
            else:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                            timeout=HTTP_TIMEOUT_S) as r:
                    status, body = r.status, r.read()
            if status != expect_status:
                raise ShardError(url, f"answered HTTP {status} where {expect_status} was expected"
                                 + (" (the server ignores Range requests)" if expect_status == 206 else ""),
                                 _REMOTE_HINT)
            return body
        except urllib.error.HTTPError as error:
            if error.code < 500:
                missing = " (no shard set there?)" if error.code == 404 else ""
                raise ShardError(url, f"answered HTTP {error.code} {error.reason}{missing}", _REMOTE_HINT) from None
            last = f"HTTP {error.code} {error.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:  # refused, timeout, reset
            last = str(getattr(error, "reason", error))
    raise ShardError(url, f"cannot be fetched after {HTTP_TRIES} tries ({last})", _REMOTE_HINT)
