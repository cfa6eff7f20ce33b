"""``continue-pt inspect``: what a checkpoint, a bundle or a k-means file holds, as plain facts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bundles.encoder_only import NO_HEAD, has_pretrain_head, ways_on, what_it_is
from bundles.loading import load_bundle

from .convert import plan_conversion, read_kmeans_file
from .errors import ConversionError
from .fairseq_checkpoint import read_fairseq_checkpoint
from .s3prl_import import read_s3prl_checkpoint
from .source_format import source_format


def _heads(family: str, kind: str, names: set[str]) -> list[str]:
    if kind != "pretrain":
        return ["ctc output layer"] if any(n.startswith("aux.") for n in names) else []
    wanted = {
        "hubert": {"final_proj": "logit_generator.final_proj.weight",
                   "label embeddings": "logit_generator.label_embeddings",
                   "mask embedding": "mask_generator.mask_embedding"},
        "wav2vec2": {"quantizer": "quantizer.codevectors", "project_q": "project_q.weight",
                     "final_proj": "final_proj.weight", "mask embedding": "mask_embedding"},
        "data2vec2": {"decoder": "decoder.blocks.0.conv.weight", "EMA teacher": "teacher.layers.0.norm1.weight"},
    }[family]
    return [head for head, key in wanted.items() if key in names]


def _summary(config: Any, names: set[str], num_params: int) -> dict[str, Any]:
    enc = config.encoder_args
    facts = {
        "family": config.family,
        "kind": config.kind,
        "layers": enc["encoder_num_layers"],
        "width": enc["encoder_embed_dim"],
        "parameters": num_params,
        "heads": _heads(config.family, config.kind, names),
        "normalize_waveform": config.normalize_waveform,
        "extractor_mode": enc["extractor_mode"],
        "layer_norm_first": enc["encoder_layer_norm_first"],
        "conv_bias": enc["extractor_conv_bias"],
        "sample_rate": config.sample_rate,
        "num_updates": config.num_updates if config.num_updates is not None or "num_updates_unknown" not in
        config.provenance else f"unknown: {config.provenance['num_updates_unknown']}",
    }
    if config.label_dictionary and "num_clusters" in config.label_dictionary:  # CTC bundles keep ctc_symbols there
        facts["num_clusters"] = config.label_dictionary["num_clusters"]
    if config.kind == "ctc":
        facts["vocabulary"] = enc.get("aux_num_out")
    facts["pretrain_head"] = has_pretrain_head(config.kind)
    if not facts["pretrain_head"]:  # say it, and the ways on, where the user looks first
        facts["continue_pretraining"] = f"{NO_HEAD}: {what_it_is(config.kind)}. {ways_on(config.family)}"
    return facts


def describe(path: str | Path) -> dict[str, Any]:
    """Facts about ``path``: a bundle directory, a transformers directory, a fairseq checkpoint, or a k-means file."""
    path = Path(path)
    if path.is_dir():
        from .hf_import import describe_hf_directory, is_hf_directory

        if is_hf_directory(path):  # written by `continue-pt export --to hf`
            return describe_hf_directory(path)
        bundle = load_bundle(path)
        state = bundle.state_dict()
        facts = {"what": "bundle", **_summary(bundle.config, set(state), sum(t.numel() for t in state.values()))}
        facts["source"] = bundle.config.provenance.get("source_file")
        if bundle.has_kmeans:
            km = bundle.get_kmeans()
            facts["kmeans"] = {"num_clusters": km.num_clusters, "dim": km.dim, "layer": km.layer}
        return facts
    if not path.exists():
        raise ConversionError(path, "no such file or directory", hint="Check the path")
    if path.suffix == ".km" and _looks_like_text(path):
        return describe_label_file(path)
    if path.suffix in (".bin", ".km", ".joblib") or path.name.endswith("kmeans.safetensors") or \
            path.suffix == ".safetensors":
        km = read_kmeans_file(path)
        return {"what": "k-means", "num_clusters": km.num_clusters, "dim": km.dim, "layer": km.layer,
                **{k: v for k, v in km.metadata.items() if k not in ("format", "format_version")}}
    fmt = source_format(path)  # from the content, as `convert` dispatches
    if fmt == "torchaudio":
        return describe_torchaudio_file(path)
    with (read_s3prl_checkpoint if fmt == "s3prl" else read_fairseq_checkpoint)(path) as ckpt:
        plan = plan_conversion(ckpt)
        names = {t.name for t in plan.model_tensors}
        params = sum(math.prod(t.shape) for t in plan.model_tensors)
        what = "s3prl converted fairseq checkpoint" if fmt == "s3prl" else f"fairseq checkpoint ({ckpt.era} era)"
        facts = {"what": what, **_summary(plan.config, names, params)}
        dropped = plan.key_map_result.dropped if plan.key_map_result else {}
        if dropped:
            facts["dropped"] = dropped
        if ckpt.task_state_key:
            facts["task_dictionaries"] = f"task_state[{ckpt.task_state_key!r}]: " + ", ".join(
                f"{len(d.symbols)} symbols" for d in ckpt.dictionaries)
        if ckpt.exported_by:
            facts["exported_by"] = ckpt.exported_by
        return facts


def describe_torchaudio_file(path: Path) -> dict[str, Any]:
    """Facts about a torchaudio ``.pth`` state dict; a BASE file, which cannot tell its family, is described too."""
    from .torchaudio_import import FAMILY_FLAG, open_torchaudio_file, plan_torchaudio

    with open_torchaudio_file(path) as file:
        try:
            plan, family = plan_torchaudio(path, file), None
        except ConversionError as exc:
            if FAMILY_FLAG not in exc.hint:
                raise
            plan, family = plan_torchaudio(path, file, "hubert"), f"hubert or wav2vec2 (convert with {FAMILY_FLAG})"
    names = {t.name for t in plan.model_tensors}
    facts = {"what": "torchaudio state dict", **_summary(plan.config, names,
                                                          sum(math.prod(t.shape) for t in plan.model_tensors))}
    if family is not None:
        facts["family"] = family
        facts["continue_pretraining"] = f"{NO_HEAD}: {what_it_is(plan.config.kind)}"
    facts["architecture"] = plan.config.provenance["architecture"]
    facts["catalogue_cards"] = plan.config.provenance["catalogue_cards"]
    return facts


def _looks_like_text(path: Path) -> bool:
    """A fairseq label file is text; a joblib/safetensors k-means someone named ``.km`` is binary."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    return not head or all(32 <= b < 127 or b in b"\t\r\n" for b in head)


def describe_label_file(path: Path) -> dict[str, Any]:
    """Facts about a fairseq frame-label file (``train.km``: one line of space-separated labels per manifest line,
    as ``dump_km_label.py`` and ``continue-pt labels dump`` write it), which is not a k-means model."""
    lines = frames = 0
    symbols: set[str] = set()
    shortest = longest = None
    try:
        with open(path, encoding="utf-8") as stream:
            for line in stream:
                tokens = line.split()
                lines += 1
                frames += len(tokens)
                symbols.update(tokens)
                shortest = len(tokens) if shortest is None else min(shortest, len(tokens))
                longest = len(tokens) if longest is None else max(longest, len(tokens))
    except (OSError, UnicodeDecodeError) as error:
        raise ConversionError(path, f"cannot be read as a fairseq label file ({error})",
                              hint="A .km file holds one line of space-separated cluster ids per manifest line") \
            from None
    ids = sorted(int(s) for s in symbols if s.isdigit())
    return {"what": "fairseq frame labels (one line per manifest line; not a k-means model)",
            "lines": lines, "frames": frames, "frames_per_line": [shortest, longest],
            "distinct_labels": len(symbols), "label_range": [ids[0], ids[-1]] if ids else None,
            "non_numeric_labels": sorted(s for s in symbols if not s.isdigit())[:10],
            "use": "continue-pt pretrain --labels FILE --label-dict dict.km.txt (with --train-data the manifest "
                   "the labels were written for)"}
