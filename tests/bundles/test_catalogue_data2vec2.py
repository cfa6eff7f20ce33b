"""The data2vec 2.0 cards: the four published audio files, with their configs' provenance."""

from __future__ import annotations

import pytest

from bundles.catalogue import CATALOGUE, find_card_by_file_name, get_card

D2V2 = {
    "data2vec2_base_libri": ("base_libri.pt", "BASE", None),
    "data2vec2_base_libri_ft_960h": ("base_libri_960h.pt", "BASE", "data2vec2_base_libri"),
    "data2vec2_large_vox": ("large_vox.pt", "LARGE", None),
    "data2vec2_large_vox_ft_960h": ("large_vox_960h.pt", "LARGE", "data2vec2_large_vox"),
}


@pytest.mark.parametrize("name", list(D2V2))
def test_data2vec2_cards(name):
    file_name, size, parent = D2V2[name]
    card = get_card(name)
    assert card.family == "data2vec2" and card.size == size and card.fine_tuned_from == parent
    assert card.url == f"https://dl.fbaipublicfiles.com/fairseq/data2vec2/{file_name}"
    assert find_card_by_file_name(file_name) is card
    assert card.normalize_waveform is True and card.sha256 is None  # no published checksum
    assert "arxiv.org/abs/2212.07525" in card.paper
    if parent is None:
        assert card.kind == "pretrained" and card.targets_published is True and "EMA teacher" in card.targets
        config = "base_audio_only_task.yaml" if size == "BASE" else "large_audio_only_task.yaml"
        assert config in card.notes
    else:
        assert card.kind == "ctc" and "EMA teacher" in card.notes and parent in card.notes


def test_published_schedules_end_with_the_teacher_nearly_frozen_or_frozen():
    assert "0.99999" in get_card("data2vec2_base_libri").notes
    assert "annealed to 1.0" in get_card("data2vec2_large_vox").notes
    assert sum(card.family == "data2vec2" for card in CATALOGUE.values()) == 4
