"""Before a HuBERT run starts: does the k-means that will label the targets fit the teacher it labels and the label
head it trains? (Its layer must be one of the teacher's, its width the teacher's, its K the head's.)

The same conditions are asserted again where the targets are built (:class:`continue_pt.teacher.OnlineTargets`);
here they become option problems, reported with every other one before anything starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bundles.errors import BundleError

if TYPE_CHECKING:
    from bundles.kmeans import KMeansModel
    from bundles.loading import Bundle
    from continue_pt.options import PretrainOptions


def online_target_problems(options: PretrainOptions, bundle: Bundle, kmeans: KMeansModel | None = None,
                           kmeans_name: str | None = None) -> list[str]:
    """Problems of the online targets of a run from the HuBERT pre-training ``bundle`` (``options.init_from``).

    The k-means is ``kmeans`` (read by the caller, named ``kmeans_name``), else ``options.kmeans``, else the
    teacher's own; the teacher is ``options.teacher``, else the starting bundle."""
    from bundles.kmeans import load_kmeans
    from bundles.loading import load_bundle

    teacher, teacher_name = bundle, options.init_from
    if options.teacher is not None:
        try:
            teacher, teacher_name = load_bundle(options.teacher), options.teacher
        except BundleError as exc:
            return [str(exc)]
    try:
        if kmeans is not None:
            name = kmeans_name or "the given k-means"
        elif options.kmeans is not None:
            kmeans, name = load_kmeans(options.kmeans), f"the k-means {options.kmeans}"
        elif teacher.has_kmeans:
            kmeans, name = teacher.get_kmeans(), f"the k-means of {teacher_name}"
        else:
            return [f"{teacher_name} holds no k-means: pass kmeans (a .safetensors k-means, or a fairseq .bin with "
                    "--kmeans-layer) or labels"]
    except BundleError as exc:
        return [str(exc)]
    return _layer_problems(kmeans, name, teacher, teacher_name) + _head_problems(options, bundle, kmeans, name)


def _layer_problems(kmeans: KMeansModel, name: str, teacher: Bundle, teacher_name: Any) -> list[str]:
    encoder = teacher.config.encoder_args
    layers, width = encoder["encoder_num_layers"], encoder["encoder_embed_dim"]
    problems = []
    if kmeans.layer is None:
        problems.append(f"{name} does not record which layer it clusters: pass --kmeans-layer L (1-based, "
                        f"1..{layers} for the teacher {teacher_name})")
    elif not 1 <= kmeans.layer <= layers:
        problems.append(f"{name} clusters layer {kmeans.layer}, outside the teacher {teacher_name}'s layers "
                        f"1..{layers}: pass --kmeans-layer with the layer the k-means was fitted on (1-based, "
                        "fairseq numbering), or the --teacher it was fitted on")
    if kmeans.dim != width:
        problems.append(f"{name} has {kmeans.dim}-dimensional centroids but the teacher {teacher_name}'s layers "
                        f"are {width} wide: it was fitted on another model; pass the --teacher it was fitted on")
    return problems


def _head_problems(options: PretrainOptions, bundle: Bundle, kmeans: KMeansModel, name: str) -> list[str]:
    k_head = (bundle.config.pretrain_args or {}).get("num_classes")
    if options.reinit_label_head or k_head is None or kmeans.num_clusters == k_head:
        return []
    return [f"{name} has {kmeans.num_clusters} clusters but the label head of {options.init_from} has {k_head}: "
            "these are different label sets; pass --reinit-label-head to train a new label head (with "
            "--head-only-steps N to warm it up first)"]
