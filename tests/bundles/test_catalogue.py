"""The catalogue of published models: consistent data, lookups, and the README table generated from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from urllib.parse import urlparse

import pytest

from bundles.catalogue import (
    CATALOGUE,
    FAMILIES,
    KINDS,
    ModelCard,
    catalogue_markdown_table,
    find_card_by_file_name,
    find_card_by_sha256,
    get_card,
)

CARDS = list(CATALOGUE.values())
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_names_and_file_names_are_unique():
    assert len({c.name for c in CARDS}) == len(CARDS)
    assert len({c.file_name for c in CARDS}) == len(CARDS)
    assert all(name == card.name for name, card in CATALOGUE.items())


@pytest.mark.parametrize("card", CARDS, ids=lambda c: c.name)
def test_card_is_well_formed(card: ModelCard):
    url = urlparse(card.url)
    assert url.scheme == "https" and url.netloc
    assert url.path.rsplit("/", 1)[-1] == card.file_name
    assert card.family in FAMILIES
    assert card.kind in KINDS
    assert (card.family == "kmeans") == (card.kind == "kmeans")
    assert card.sample_rate == 16000
    assert "https://arxiv.org/abs/" in card.paper
    assert card.license and card.training_data and card.targets and card.size
    assert card.sha256 is None or (len(card.sha256) == 64 and int(card.sha256, 16) >= 0)
    if card.fine_tuned_from is None:
        assert card.kind != "ctc" and card.fine_tuning_data is None
    else:
        parent = CATALOGUE[card.fine_tuned_from]
        assert card.kind == "ctc" and parent.kind == "pretrained" and card.fine_tuning_data
        assert (parent.family, parent.size, parent.normalize_waveform) == (
            card.family, card.size, card.normalize_waveform,
        )
    if card.kind == "kmeans":
        assert card.layer is not None and card.layer >= 1
        assert card.num_clusters is not None and card.num_clusters >= 2
        assert CATALOGUE[card.features_from].family == "hubert"
    else:
        assert card.layer is None and card.num_clusters is None and card.features_from is None


def test_required_cards_are_present():
    required = {
        "hubert_base_ls960", "hubert_large_ll60k", "hubert_xlarge_ll60k",
        "hubert_large_ll60k_ft_ls960", "hubert_xlarge_ll60k_ft_ls960",
        "wav2vec2_base_ls960", "wav2vec2_base_ls960_ft_10m", "wav2vec2_base_ls960_ft_100h",
        "wav2vec2_base_ls960_ft_960h", "wav2vec2_large_ls960", "wav2vec2_large_ls960_ft_960h",
        "wav2vec2_large_lv60k", "wav2vec2_large_lv60k_ft_960h", "wav2vec2_xlsr53",
        "wav2vec2_xls_r_300m", "wav2vec2_xls_r_1b", "wav2vec2_xls_r_2b", "hubert_base_ls960_L9_km500",
    }
    assert required <= set(CATALOGUE)


@pytest.mark.parametrize(
    ("name", "normalize"),
    [
        ("hubert_base_ls960", False),
        ("hubert_large_ll60k", True),
        ("hubert_xlarge_ll60k", True),
        ("hubert_large_ll60k_ft_ls960", True),
        ("hubert_xlarge_ll60k_ft_ls960", True),
        ("wav2vec2_base_ls960", False),
        ("wav2vec2_large_ls960", False),
        ("wav2vec2_large_lv60k", True),
        ("wav2vec2_xlsr53", True),
        ("wav2vec2_xls_r_300m", True),
        ("wav2vec2_xls_r_1b", True),
        ("wav2vec2_xls_r_2b", True),
    ],
)
def test_normalize_waveform(name, normalize):
    assert get_card(name).normalize_waveform is normalize


def test_hubert_targets():
    base = get_card("hubert_base_ls960")
    assert "layer-6 km500" in base.targets and base.targets_published is False
    for name in ("hubert_large_ll60k", "hubert_xlarge_ll60k"):
        card = get_card(name)
        assert "lyr9.km500" in card.targets and card.targets_published is None


def test_published_kmeans():
    km = find_card_by_file_name("hubert_base_ls960_L9_km500.bin")
    assert km is not None
    assert (km.family, km.kind, km.layer, km.num_clusters, km.features_from) == (
        "kmeans", "kmeans", 9, 500, "hubert_base_ls960",
    )
    assert km.url == "https://dl.fbaipublicfiles.com/hubert/hubert_base_ls960_L9_km500.bin"
    assert "layer-6" in km.notes and "new label set" in km.notes


@pytest.mark.parametrize(
    ("file_name", "name"),
    [
        ("hubert_base_ls960.pt", "hubert_base_ls960"),
        ("hubert_xtralarge_ll60k.pt", "hubert_xlarge_ll60k"),
        ("wav2vec_small.pt", "wav2vec2_base_ls960"),
        ("wav2vec_vox_new.pt", "wav2vec2_large_lv60k"),
        ("xlsr_53_56k.pt", "wav2vec2_xlsr53"),
        ("/data/ckpt/xlsr2_300m.pt", "wav2vec2_xls_r_300m"),
    ],
)
def test_find_card_by_file_name(file_name, name):
    assert find_card_by_file_name(file_name) is CATALOGUE[name]


def test_find_card_by_file_name_unknown():
    assert find_card_by_file_name("checkpoint_best.pt") is None


def test_find_card_by_sha256():
    assert find_card_by_sha256("0" * 64) is None
    documented = [c for c in CARDS if c.sha256]
    for card in documented:
        assert find_card_by_sha256(card.sha256.upper()) is card


def test_get_card_unknown_lists_names():
    with pytest.raises(KeyError) as info:
        get_card("nope")
    message = str(info.value)
    assert message.startswith("no published model is named 'nope'; known names: ")
    for name in CATALOGUE:
        assert name in message


def test_cards_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_card("hubert_base_ls960").normalize_waveform = True  # type: ignore[misc]


def test_bad_card_is_refused():
    card = get_card("hubert_base_ls960")
    with pytest.raises(ValueError, match="family 'bert' is not one of"):
        dataclasses.replace(card, family="bert")
    with pytest.raises(ValueError, match="does not end in file_name"):
        dataclasses.replace(card, file_name="other.pt")


def test_markdown_table_has_one_row_per_card():
    lines = catalogue_markdown_table().splitlines()
    assert lines[0] == "| name | family | kind | size | data | normalise? | targets | license |"
    rows = lines[2:]
    assert len(rows) == len(CATALOGUE)
    for row, card in zip(rows, CARDS):
        assert row.startswith(f"| `{card.name}` | {card.family} | {card.kind} | {card.size} |")
        assert row.count(" | ") == 7


def test_readme_table_matches_catalogue():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- catalogue-table -->\n", "<!-- /catalogue-table -->"
    table = readme[readme.index(start) + len(start): readme.index(end)]
    assert table == catalogue_markdown_table(), (
        "the README's catalogue table is stale: replace it with the output of "
        "python -c 'from bundles.catalogue import catalogue_markdown_table as t; print(t(), end=\"\")'"
    )