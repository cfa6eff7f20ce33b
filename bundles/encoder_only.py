"""Bundles without a pre-training head, and what continuing pre-training from one needs.

Two kinds of bundle hold no pre-training head: ``ctc`` (a fine-tuned fairseq checkpoint: fairseq's fine-tuning
removes the heads; a torchaudio ASR ``.pth``) and ``encoder`` (a torchaudio ``.pth`` state dict: torchaudio ships the
encoder only). Every command that meets one says so with the same words (``inspect``, ``pretrain``,
``Bundle.get_pretrain_model``).

Standard library only: the option checks use it before torch is imported.
"""

from __future__ import annotations

PRETRAIN_KIND = "pretrain"
NO_HEAD = "no pre-training head"


def has_pretrain_head(kind: str) -> bool:
    return kind == PRETRAIN_KIND


def what_it_is(kind: str) -> str:
    """Why a bundle of ``kind`` has no pre-training head."""
    if kind == "ctc":
        return ("a fine-tuned (CTC) model: fine-tuning removed the pre-training heads (the pre-trained checkpoint it "
                "was fine-tuned from, e.g. hubert_large_ll60k for hubert_large_ll60k_ft_ls960, has them)")
    return ("an encoder alone (torchaudio's .pth files and transformers' HubertModel / Wav2Vec2Model hold no "
            "pre-training heads)")


_OWN_WAYS_ON = {
    "data2vec2": ("data2vec 2.0 learns from its EMA teacher and decoder, which this bundle lacks: convert the "
                  "pre-trained checkpoint it was fine-tuned from (base_libri.pt, large_vox.pt: `continue-pt convert "
                  "data2vec2_base_libri`)"),
}


def ways_on(family: str, bundle: str = "BUNDLE") -> str:
    """What continuing pre-training from an encoder-only ``family`` bundle needs."""
    if family in _OWN_WAYS_ON:
        return _OWN_WAYS_ON[family]
    if family == "hubert":
        return ("To continue HuBERT pre-training, start a new label head on k-means targets: add --reinit-label-head "
                f"with --kmeans KM (fit one on this model's features with `continue-pt kmeans fit --teacher {bundle} "
                "--layer L --audio DIR -k 500 -o km.safetensors`, or pass a published k-means .bin with "
                "--kmeans-layer)")
    return ("wav2vec 2.0 learns from its own quantizer, which this bundle lacks: convert a source that has it (the "
            "fairseq pre-training .pt, a Hugging Face Wav2Vec2ForPreTraining directory or an s3prl converted "
            "checkpoint) with `continue-pt convert` and continue from that bundle")


def no_head_problem(bundle: str, family: str, kind: str) -> str:
    """The one message for starting pre-training from a bundle without a head (without the ways on)."""
    return f"{bundle} is {what_it_is(kind)}; it has {NO_HEAD}"
