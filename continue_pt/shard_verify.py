"""``shards verify``: is a shard set (after a copy, a download, months on a shared disk) still what its index says?

Training checks only that every local shard is there with its indexed size: hashing terabytes at every start would
cost more than the run's first hour. This check does the rest, once, when asked: each shard's sha256 against the
one ``shards write`` / ``shards index`` recorded (an index without one is checked for sizes only), and with ``decode``
every utterance decoded as training decodes it, its length compared with the index's. Local or remote (a remote
shard is hashed through Range requests of ``HASH_CHUNK`` bytes, so memory stays bounded). Every problem is reported
together.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from continue_pt.audio import AudioError, read_audio
from continue_pt.corpus import capped
from continue_pt.shard_format import ShardError, ShardIndex, is_url, member_url
from continue_pt.shard_read import _http_range, load_index, member_bytes, scan_index
from continue_pt.shard_write import file_sha256

HASH_CHUNK = 16 * 2**20
"""Bytes requested at a time while hashing a remote shard."""


@dataclass
class VerifyReport:
    source: str
    shards: int = 0
    bytes: int = 0
    hashed: int = 0
    decoded: int = 0
    utterances: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        unhashed = self.shards - self.hashed
        parts = [f"{self.source}: {self.shards} shards ({self.bytes / 1e9:.2f} GB), {self.utterances} utterances",
                 f"sha256 matches the index for {self.hashed}"
                 + (f" ({unhashed} without a recorded sha256: sizes checked only)" if unhashed else ""),
                 f"{self.decoded} utterances decoded to their indexed length" if self.decoded else
                 "not decoded (--decode decodes every utterance)"]
        return "; ".join(parts)


def verify_shards(source: str | Path, *, decode: bool = False,
                  progress: Callable[[str], None] | None = None) -> VerifyReport:
    """Check the shard set at ``source`` (directory or base URL) against its index; raises one
    :class:`~continue_pt.shard_format.ShardError` listing every problem, else returns what was checked."""
    base = str(source)
    index = load_index(source)  # local shards present with their sizes, or every problem at once
    report = VerifyReport(base, shards=len(index.shards), bytes=sum(s["bytes"] for s in index.shards),
                          utterances=len(index))
    for shard in index.shards:
        expected = shard.get("sha256")
        if not expected:
            continue
        where = member_url(base, shard["name"])
        try:
            digest = _sha256(where, int(shard["bytes"]))
        except (OSError, ShardError) as error:
            report.problems.append(f"{shard['name']} cannot be read ({error})")
            continue
        report.hashed += 1
        if digest != expected:
            report.problems.append(f"{shard['name']}: sha256 {digest[:16]}..., the index says {expected[:16]}... "
                                   "(changed since it was written, or damaged in the copy)")
        if progress:
            progress(f"hashed {shard['name']}")
    if decode:
        _decode_all(base, index, report)
    if report.problems:
        raise ShardError(base, capped(report.problems), "Copy the shard set again, or rewrite it with "
                                                        "`continue-pt shards write`")
    return report


def _sha256(where: str, size: int) -> str:
    if not is_url(where):
        return file_sha256(where)
    digest = hashlib.sha256()
    for offset in range(0, size, HASH_CHUNK):
        digest.update(_http_range(where, offset, min(HASH_CHUNK, size - offset)))
    return digest.hexdigest()


def _decode_all(base: str, index: ShardIndex, report: VerifyReport) -> None:
    """Each utterance decoded at its own rate (no resampling), mixed to one channel as training reads it: its
    length must be the index's ``frames`` (utterances indexed with 0 frames, which training sets aside, are not
    decoded)."""
    for item in scan_index(index, base, sample_rate=16000, min_seconds=0).items:  # (16 kHz: num_samples, unused)
        frames, rate = int(item.file_frames), int(item.file_rate)
        try:
            wav = read_audio(item.path, rate, data=member_bytes(item.member, item.path))
        except (AudioError, ShardError) as error:
            report.problems.append(f"{item.path} does not decode: {error.problems[0] if error.problems else error}")
            continue
        if len(wav) != frames:
            report.problems.append(f"{item.path} decodes to {len(wav)} samples, the index says {frames}")
            continue
        report.decoded += 1
