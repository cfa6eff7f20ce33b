"""What ``continue-pt convert SRC`` / ``download SRC`` accept, turned into local files.

SRC is, in this order: an existing file or directory (used as it is); ``hf://org/repo[@rev]`` (the Hugging Face
hub, :mod:`converters.hub`); an ``http(s)://`` URL of a checkpoint (:mod:`converters.download`); the name of a
catalogue card (:mod:`bundles.catalogue`), whose file is downloaded with the k-means card that belongs to it, if
any (a k-means card's ``features_from`` names the model whose features it clusters). Anything else is refused with
the closest card names.

Catalogue files are cached as ``CACHE/catalogue/FILE_NAME`` (file names are unique in the catalogue), so a file
fetched from a mirror (``--mirror`` / ``$CONTINUE_PT_MIRROR``: a base URL serving the catalogue's file names) and
one fetched from its official URL are the same cache entry; other URLs as ``CACHE/urls/HOST/PATH``.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

from bundles.catalogue import CATALOGUE, ModelCard

from .download import (DownloadError, DownloadOptions, cache_path_for_url, default_cache_dir, fetch, file_name_of_url,
                       is_url)
from .hub import fetch_hf, is_hf_id

MIRROR_ENV = "CONTINUE_PT_MIRROR"


@dataclass(frozen=True)
class FetchSettings:
    """Where downloads go and how they are checked. ``cache_dir`` None: :func:`default_cache_dir`; ``mirror`` None:
    ``$CONTINUE_PT_MIRROR`` or each card's official URL; ``sha256`` pins the (single) checkpoint file;
    ``out_dir``: put the files there instead of the cache."""

    cache_dir: Path | None = None
    mirror: str | None = None
    sha256: str | None = None
    out_dir: Path | None = None
    with_kmeans: bool = True
    """Also fetch the k-means card that belongs to a model card (off when the user brings their own)."""
    options: DownloadOptions = field(default_factory=DownloadOptions)

    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()

    def mirror_base(self) -> str | None:
        base = self.mirror if self.mirror is not None else os.environ.get(MIRROR_ENV) or None
        return base.rstrip("/") if base else None


@dataclass(frozen=True)
class Source:
    """Local files to convert: the checkpoint (a file or a transformers directory) and, from a card, its k-means."""

    checkpoint: Path
    kmeans: Path | None = None
    kmeans_layer: int | None = None
    card: ModelCard | None = None
    kmeans_card: ModelCard | None = None

    def paths(self) -> list[Path]:
        return [self.checkpoint] + ([self.kmeans] if self.kmeans is not None else [])

    def kmeans_caveat(self) -> str | None:
        """What a user must know when the card's k-means did not make the model's own targets."""
        if self.kmeans_card is None or self.card is None or self.card.targets_published is not False:
            return None
        return (f"{self.card.name} was trained on other targets ({self.card.targets}); {self.kmeans_card.name} is "
                f"a new label set for it: continue with `continue-pt pretrain --reinit-label-head`")


def looks_like_path(src: str) -> bool:
    """Catalogue names have neither a directory part nor a suffix; a missing ``model.pt`` is a missing file."""
    return not is_hf_id(src) and not is_url(src) and ("/" in src or os.sep in src or "." in src)


def resolve_source(src: str, settings: FetchSettings = FetchSettings()) -> Source:
    """SRC as local files, downloading what is not local (see the module docstring). A path (existing or not:
    the converter names a missing one) is used as it is."""
    if Path(src).exists() or looks_like_path(src):
        if settings.sha256 is not None:
            raise DownloadError(src, "is a local path; --sha256 pins a download",
                                hint="Drop --sha256, or name the catalogue entry or URL to download")
        return Source(Path(src))
    card = CATALOGUE.get(src)
    if card is not None and card.family == "kmeans":
        raise DownloadError(src, "is a k-means, not a model to convert",
                            hint=f"Convert its model (`continue-pt convert {card.features_from} -o DIR` attaches it), "
                                 f"or fetch the file with `continue-pt download {src}`")
    return fetch_source(src, settings)


def fetch_source(name: str, settings: FetchSettings = FetchSettings()) -> Source:
    """Download NAME: a catalogue card (with its k-means), an ``hf://`` id or a URL."""
    if is_hf_id(name):
        return Source(_fetch_hub(name, settings))
    if is_url(name):
        dest = (settings.out_dir / file_name_of_url(name) if settings.out_dir is not None
                else cache_path_for_url(name, settings.cache()))
        return Source(fetch(name, dest, sha256=settings.sha256, options=settings.options))
    card = CATALOGUE.get(name)
    if card is None and looks_like_path(name):
        raise DownloadError(name, "is a path, and only remote files are downloaded",
                            hint="Give a catalogue name, an hf://ORG/REPO id or an http(s) URL; convert a local "
                                 "file directly with `continue-pt convert PATH -o DIR`")
    if card is None:
        raise unknown_name_error(name)
    return _fetch_card(card, settings)


def _fetch_hub(name: str, settings: FetchSettings) -> Path:
    if settings.sha256 is not None:
        raise DownloadError(name, "--sha256 does not apply to a Hugging Face id",
                            hint="The hub publishes every file's checksum and each one is verified; drop --sha256")
    if settings.out_dir is not None:
        raise DownloadError(name, "a Hugging Face id is kept in the hub cache, not in -o DIR",
                            hint="Drop -o (the snapshot directory is printed), or set HF_HUB_CACHE to move the cache")
    return fetch_hf(name, verified_dir=settings.cache())


def _fetch_card(card: ModelCard, settings: FetchSettings) -> Source:
    pinned = settings.sha256 or card.sha256
    checkpoint = _fetch_card_file(card, settings, pinned)
    if card.family == "kmeans":
        return Source(checkpoint, card=card)
    km_card = kmeans_card_for(card) if settings.with_kmeans else None
    if km_card is None:
        return Source(checkpoint, card=card)
    km = _fetch_card_file(km_card, settings, km_card.sha256)
    return Source(checkpoint, kmeans=km, kmeans_layer=km_card.layer, card=card, kmeans_card=km_card)


def _fetch_card_file(card: ModelCard, settings: FetchSettings, pinned: str | None) -> Path:
    base = settings.mirror_base()
    url = f"{base}/{card.file_name}" if base else card.url
    folder = settings.out_dir if settings.out_dir is not None else settings.cache() / "catalogue"
    return fetch(url, folder / card.file_name, sha256=pinned.lower() if pinned else None, options=settings.options)


def kmeans_card_for(card: ModelCard) -> ModelCard | None:
    """The published k-means fitted on ``card``'s own features, if any."""
    return next((c for c in CATALOGUE.values() if c.family == "kmeans" and c.features_from == card.name), None)


def unknown_name_error(name: str) -> DownloadError:
    close = difflib.get_close_matches(name, list(CATALOGUE), n=4, cutoff=0.5)
    listed = ", ".join(close) if close else ", ".join(CATALOGUE)
    return DownloadError(name, "is neither a catalogue name, an hf://ORG/REPO id, an http(s) URL nor an existing "
                               "file or directory",
                         hint=f"{'Closest catalogue names' if close else 'Catalogue names'}: {listed} "
                              "(`continue-pt catalogue` lists them all)")
