"""The shard set: WebDataset-style tar shards of audio plus one index file, ``shards.json``.

Each shard is a plain POSIX tar in the WebDataset convention: per utterance a ``KEY.EXT`` audio member followed by a
``KEY.json`` member (``{"name", "frames", "sample_rate", "channels"}``), so ``webdataset``, Hugging Face
``datasets`` or ``tar`` read them as they are. ``shards.json`` (written last) lists the shards (file name, bytes,
sha256) and every utterance in order: its name in the source corpus, shard, byte offset and size of its audio
member, frames, sample rate and channels. Training plans its length-bucketed batches from the index alone and reads
each utterance by its byte range, from a local directory or an ``http(s)://`` base URL (HTTP ``Range`` requests).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundles.errors import FileProblem

INDEX_NAME = "shards.json"
INDEX_FORMAT = "continue-pt-shards"
INDEX_VERSION = 1
ITEM_COLUMNS = ("name", "shard", "offset", "size", "frames", "sample_rate", "channels")
"""The per-utterance columns of the index (one list each, in the corpus' order)."""
SHARD_FORMATS = ("original", "flac", "wav")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
MIN_SHARD_SIZE = 64 * 1024
"""A smaller shard size would only make a tar per utterance."""


class ShardError(FileProblem):
    """A shard set (its index, a shard, a remote server) cannot be used or written (URLs are named as given)."""


def is_url(source: str | Path) -> bool:
    return str(source).startswith(("http://", "https://"))


def is_shard_source(source: str | Path) -> bool:
    """A shard set: an ``http(s)://`` base URL (only shard sets are read remotely) or a directory holding
    ``shards.json``."""
    return is_url(source) or (Path(source).is_dir() and (Path(source) / INDEX_NAME).is_file())


SHARD_OPTIONS = ("train_data", "val_data")
"""The pretrain options that may name a shard set, and so a URL."""


def shard_option_problems(train_data: str | None, val_data: str | None, labels: str | None) -> list[str]:
    """What ``pretrain`` cannot do with shard sets: offline label files follow a manifest's lines, which a shard
    set does not have."""
    if labels is not None and train_data and is_shard_source(train_data):
        return [f"labels: offline frame labels are not read with the shard set {train_data}; train from shards "
                "with online targets (leave out --labels), or give the audio as a directory or manifest"]
    return []


def data_source(source: str | Path) -> str | Path:
    """``source`` as the data module keeps it: URLs as strings (a Path would fold ``//``), the rest as Paths."""
    return str(source) if is_url(source) else Path(source)


def member_url(base: str | Path, shard: str) -> str:
    """Where shard file ``shard`` of the set at ``base`` (a directory or a base URL) is. An index written by
    ``shards index --base-url`` names its shards by URL: those are where they are."""
    if is_url(shard):
        return shard
    if is_url(base):
        return str(base).rstrip("/") + "/" + shard
    return str(Path(base) / shard)


def parse_size(text: str) -> int:
    """Bytes from ``"1GB"`` (10^9), ``"500MB"``, ``"1.5GiB"`` (2^30 based), ``"4096"``; :class:`ValueError` for
    anything else."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 1GB, 500MB, 2GiB or a number of bytes")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    return int(number * _UNITS[unit])


@dataclass(frozen=True)
class ShardMember:
    """Where one utterance's audio bytes are: ``shard`` of the set at ``base``, ``size`` bytes from ``offset``."""

    base: str
    shard: str
    offset: int
    size: int

    @property
    def label(self) -> str:
        return f"{self.shard}:{self.offset}+{self.size}"


@dataclass
class ShardIndex:
    """The parsed ``shards.json``: ``shards`` (dicts with name, bytes, sha256, members) and the item columns."""

    shards: list[dict[str, Any]]
    items: dict[str, list[Any]]
    info: dict[str, Any]

    def __len__(self) -> int:
        return len(self.items["name"])

    def to_json(self) -> dict[str, Any]:
        return {"format": INDEX_FORMAT, "version": INDEX_VERSION, **self.info, "shards": self.shards,
                "items": self.items}


def parse_index(where: str | Path, raw: bytes) -> ShardIndex:
    """Check and parse the bytes of a ``shards.json``; every problem found is reported together."""
    hint = "Write the shard set with `continue-pt shards write SRC -o DIR` (its shards.json is written last)"
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardError(where, f"is not a JSON shard index ({error})", hint) from error
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        raise ShardError(where, f"is not a continue-pt shard index (no \"format\": \"{INDEX_FORMAT}\")", hint)
    if data.get("version") != INDEX_VERSION:
        raise ShardError(where, f"is a shard index of version {data.get('version')!r}; this continue-pt reads "
                                f"version {INDEX_VERSION}", "Rewrite the shards with this version")
    problems = []
    shards, items = data.get("shards"), data.get("items")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                               and isinstance(s.get("bytes"), int) for s in shards):
        problems.append("\"shards\" must list {\"name\", \"bytes\", ...} objects")
    if not isinstance(items, dict):
        problems.append("\"items\" must map the columns " + ", ".join(ITEM_COLUMNS) + " to lists")
    else:
        missing = [c for c in ITEM_COLUMNS if not isinstance(items.get(c), list)]
        if missing:
            problems.append("\"items\" lacks the column(s) " + ", ".join(missing))
        elif len({len(items[c]) for c in ITEM_COLUMNS}) != 1:
            problems.append("the item columns have different lengths: "
                            + ", ".join(f"{c} {len(items[c])}" for c in ITEM_COLUMNS))
        elif not problems and any(not 0 <= s < len(shards) for s in items["shard"]):
            problems.append("an item names a shard number the \"shards\" list does not have")
    if problems:
        raise ShardError(where, problems, hint)
    info = {k: v for k, v in data.items() if k not in ("format", "version", "shards", "items")}
    return ShardIndex(shards, {c: items[c] for c in ITEM_COLUMNS}, info)
