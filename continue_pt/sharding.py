"""Models larger than one GPU's memory: Lightning's FSDP strategy with one wrap unit per transformer layer, sharded
checkpoints, and activation checkpointing of each transformer layer (under FSDP and under DDP / one device).

Why Lightning's ``FSDPStrategy`` (FSDP1) and not ``ModelParallelStrategy`` (FSDP2): the objectives call the
student's pieces one by one (feature extractor, masking, encoder layers, heads; ``continue_pt.hubert.objective``),
not its ``forward``. ``FSDPStrategy`` wraps the whole LightningModule and runs ``training_step`` inside the root's
forward (Lightning's forward redirection), so every parameter outside the per-layer units is gathered for the whole
step; under ``ModelParallelStrategy`` ``training_step`` runs outside any forward and those parameters would stay
sharded ``DTensor``s.

What :class:`LayerShardedFSDP` adds to ``FSDPStrategy``:

* one FSDP unit per trainable torchaudio ``EncoderLayer`` (the student's; the teacher's are not wrapped);
* layer drop: the same layers skipped by every process (:func:`same_layers_dropped_everywhere`), else their
  per-layer all-gathers stop pairing up;
* activation checkpointing (``--activation-checkpointing``): each trainable layer inside its FSDP unit
  (:func:`checkpoint_layers`, what Lightning's ``activation_checkpointing_policy`` does, but not the teacher's
  layers, which run without a graph);
* the frozen teacher (every child module without a trainable parameter) is FSDP's ``ignored_modules``: each
  process keeps it whole on its device and it runs exactly as under DDP, never gathered, sharded or updated; it
  stays out of the checkpoints, as the modules leave it out of ``.ckpt`` files;
* CPU processes (gloo): FSDP1 runs there when given the CPU as its device, which Lightning's ``"fsdp"`` name
  refuses; that is how the tests check FSDP against DDP on a machine without GPU;
* gradient clipping by norm (``--gradient-clip-val``, on by default): Lightning's ``FSDPPrecision`` refuses it;
  :class:`ShardedPrecision` clips with FSDP's own ``clip_grad_norm_`` (the norm over every shard, equal to
  ``torch.nn.utils.clip_grad_norm_`` of the whole model);
* ``state_dict_type="sharded"``: each process writes its shard (``torch.distributed.checkpoint``) into a checkpoint
  *directory*, swapped into place once complete; :func:`read_sharded_checkpoint` reads one back offline, without a
  process group, and without unpickling anything but the index's own classes.
"""

from __future__ import annotations

import functools
import pickle
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torchaudio.models.wav2vec2.components import EncoderLayer, Transformer

from bundles.data2vec2.model import Block as Data2Vec2Block
from continue_pt.sharded_files import SHARDED_META_FILE

FSDP_STRATEGY = "fsdp"
"""The ``--strategy`` value that selects :class:`LayerShardedFSDP`."""


TRANSFORMER_LAYER_TYPES: tuple[type[nn.Module], ...] = (EncoderLayer, Data2Vec2Block)
"""The transformer layers of the families' students: torchaudio's (HuBERT, wav2vec 2.0) and data2vec 2.0's."""


def trainable_encoder_layer(module: nn.Module) -> bool:
    """A transformer layer with something to train: the student's (the frozen teacher's are not)."""
    return isinstance(module, TRANSFORMER_LAYER_TYPES) and any(p.requires_grad for p in module.parameters())


def frozen_children(module: nn.Module) -> list[nn.Module]:
    """Direct children of ``module`` with parameters, none of them trainable (HuBERT's teacher)."""
    frozen = []
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            frozen.append(child)
    return frozen


def checkpoint_layers(module: nn.Module) -> int:
    """Wrap each trainable transformer layer of ``module`` so that its activations are recomputed in the backward
    instead of kept (``torch.utils.checkpoint``, non-reentrant). The RNG state is saved and restored around the
    recomputation (torch's default), so dropout draws the same masks twice: loss and gradients are unchanged.
    Layer drop is drawn by the transformer outside the layers, once. The wrapper's state-dict hooks keep every
    parameter name as it was (checkpoints and export do not see it). Returns the number of layers wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    count = sum(1 for m in module.modules() if trainable_encoder_layer(m))
    apply_activation_checkpointing(
        module, check_fn=trainable_encoder_layer,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    return count


class ShardedPrecision(FSDPPrecision):
    """Lightning's ``FSDPPrecision`` that clips by norm with the FSDP root's ``clip_grad_norm_`` (set by
    :class:`LayerShardedFSDP` once it has wrapped the model), and whose ``bf16-mixed`` / ``16-mixed`` is DDP's:
    autocast over fp32 weights, gradients reduced in fp32.

    Lightning's own FSDP "mixed" gathers the weights in bf16 and *reduces the gradients in bf16*, and casts the
    inputs of the root's forward to bf16, which the frozen fp32 teacher (left out of FSDP) then refuses. Here FSDP
    shards and gathers fp32 (twice the bytes of a bf16 gather, one layer at a time) and the compute is autocast's,
    so a run's numbers do not depend on the strategy."""

    root: Any = None

    @property
    def mixed_precision_config(self) -> Any:
        if self.precision in ("bf16-mixed", "16-mixed"):
            return None
        return super().mixed_precision_config

    def clip_grad_by_norm(self, optimizer: Any, clip_val: int | float) -> None:
        if self.root is None:
            raise RuntimeError("ShardedPrecision clips only a model wrapped by LayerShardedFSDP")
        self.root.clip_grad_norm_(clip_val)


class LayerShardedFSDP(FSDPStrategy):
    """Lightning's FSDP with one unit per trainable transformer layer, the frozen teacher left whole, sharded
    checkpoints and, with ``activation_checkpointing``, each layer recomputed in the backward (see the module
    docstring)."""

    shards_gradients = True
    """Each process holds only its shard of every gradient (read by ``ContinuedPretrainingBase.read_step``)."""

    def __init__(self, activation_checkpointing: bool = False, **kwargs: Any):
        super().__init__(auto_wrap_policy=_layer_policy(), state_dict_type="sharded", **kwargs)
        self.checkpoint_activations = activation_checkpointing

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Lightning's sharded save into a temporary sibling directory, swapped in by renames once every process
        has written its shard: a crash, a full disk or a kill mid-save leave the previous checkpoint (``last.ckpt``
        included) whole, never a mix of old and new shards."""
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp")
        if self.global_rank == 0:
            _remove(tmp)
        self.barrier("sharded_checkpoint_start")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("sharded_checkpoint_written")
        if self.global_rank == 0:
            _swap_in(tmp, path)
        self.barrier("sharded_checkpoint_done")

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from lightning.pytorch.strategies.fsdp import _move_torchmetrics_to_device
        from torch.distributed.fsdp import FullyShardedDataParallel

        self.kwargs["ignored_modules"] = frozen_children(model)
        same_layers_dropped_everywhere(model)
        for child in self.kwargs["ignored_modules"]:
            _left_out_of_checkpoints(model, child)
            child.to(self.root_device)  # FSDP moves only what it manages (and Lightning leaves moving to FSDP)
        if self.root_device.type == "cpu":  # Lightning passes device_id None there, which FSDP refuses
            wrapped = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)
            _move_torchmetrics_to_device(wrapped, self.root_device)
        else:
            wrapped = super()._setup_model(model)
        if self.checkpoint_activations:  # inside each FSDP unit, as Lightning's own policy would place it
            rank_zero_info(f"activation checkpointing: {checkpoint_layers(wrapped)} transformer layers (FSDP units) "
                           "recompute their activations in the backward")
        if isinstance(self.precision_plugin, ShardedPrecision):
            self.precision_plugin.root = wrapped
        return wrapped


def same_layers_dropped_everywhere(model: nn.Module) -> int:
    """Layer drop under FSDP: every process must skip the same layers, or their collectives stop pairing up (one
    process gathers a layer's shards while another, having skipped it, gathers the next: a hang or wrong
    weights). torchaudio's ``Transformer`` draws each layer's fate from the global RNG, which continue-pt seeds
    per process (``micro_batch_key``); here the trainable transformers draw all their layers' fates at once on
    rank 0, which broadcasts them. Without layer drop nothing changes (no draw, no broadcast: the run equals
    DDP's); with it, the fates are rank 0's and the RNG is consumed in another order than under DDP. Returns the
    number of transformers changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, Transformer) and float(module.layer_drop) > 0 and any(
                p.requires_grad for p in module.parameters()):
            module.forward = types.MethodType(_forward_dropping_the_same_layers, module)
            changed += 1
    return changed


def _forward_dropping_the_same_layers(self: Any, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      position_bias: torch.Tensor | None = None) -> torch.Tensor:
    """torchaudio's ``Transformer.forward`` with the layers' fates drawn by :func:`kept_layers`."""
    x = self._preprocess(x)
    kept = kept_layers(len(self.layers), float(self.layer_drop) if self.training else 0.0, x.device)
    for layer, keep in zip(self.layers, kept):
        if keep:
            x, position_bias = layer(x, attention_mask, position_bias=position_bias)
    if not self.layer_norm_first:
        x = self.layer_norm(x)
    return x


def kept_layers(num_layers: int, layer_drop: float, device: torch.device) -> list[bool]:
    """Which of ``num_layers`` layers run (each dropped with probability ``layer_drop``, torchaudio's rule
    ``rand <= layer_drop``), the same in every process: rank 0's draw, broadcast."""
    if layer_drop <= 0:
        return [True] * num_layers
    draws = torch.rand(num_layers)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = draws.to(device)
        dist.broadcast(shared, src=0)
        draws = shared.cpu()
    return (draws > layer_drop).tolist()


def _left_out_of_checkpoints(parent: nn.Module, child: nn.Module) -> None:
    """The frozen ``child`` (HuBERT's teacher, rebuilt from its bundle) out of the sharded checkpoints, as the
    modules leave it out of the ``.ckpt`` files: left out of ``parent``'s state dict, and its own tensors taken
    when a checkpoint is loaded (Lightning loads the sharded checkpoint into what the state dict holds)."""
    name = next(n for n, c in parent.named_children() if c is child)

    def drop(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in [k for k in state if k.startswith(f"{prefix}{name}.")]:
            del state[key]

    def fill(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for key, value in module.state_dict().items():
            state.setdefault(prefix + key, value)

    parent.register_state_dict_post_hook(drop)
    child.register_load_state_dict_pre_hook(fill)


def _layer_policy() -> Any:
    from torch.distributed.fsdp.wrap import CustomPolicy

    return CustomPolicy(trainable_encoder_layer)


_AUTOCAST_ONLY_ON_CUDA = ("bf16-mixed", "16-mixed")


def other_fsdp_problem(strategy: str) -> str | None:
    """Lightning's other FSDP names (``fsdp_cpu_offload``, ...) would run its FSDP as it is: refused, with the fix."""
    from lightning.pytorch.strategies import StrategyRegistry

    if strategy == FSDP_STRATEGY or strategy not in StrategyRegistry:
        return None
    if not issubclass(StrategyRegistry[strategy]["strategy"], FSDPStrategy):
        return None
    return (f"strategy is {strategy!r}: Lightning's FSDP as it is would shard the frozen teacher and wrap no "
            "transformer layer; use --strategy fsdp (one unit per transformer layer, the teacher whole, sharded "
            "checkpoints)")


def sharded_precision_problem(strategy: str, precision: str, on_cuda: bool) -> str | None:
    """A mixed precision under ``--strategy fsdp`` on the CPU, where Lightning's FSDP does not autocast."""
    if strategy == FSDP_STRATEGY and not on_cuda and precision in _AUTOCAST_ONLY_ON_CUDA:
        return (f"precision {precision} with strategy fsdp needs CUDA GPUs (Lightning's FSDP autocasts only on "
                "CUDA: on the CPU it would silently train in 32-bit); on the CPU use --precision 32-true (the "
                "default there), or train on GPUs (--accelerator gpu)")
    return None


def sharded_strategy(strategy: str, precision: str, activation_checkpointing: bool) -> LayerShardedFSDP | None:
    """:class:`LayerShardedFSDP` with its :class:`ShardedPrecision` for ``--strategy fsdp``, else None."""
    if strategy != FSDP_STRATEGY:
        return None
    return LayerShardedFSDP(activation_checkpointing=activation_checkpointing,
                            precision_plugin=ShardedPrecision(precision))


# ------------------------------------------------------------------------------------------------ offline reading


_METADATA_CLASSES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)


class _MetadataUnpickler(pickle.Unpickler):
    """``torch.distributed.checkpoint``'s ``.metadata`` is a plain pickle of its own dataclasses (torch reads it
    with ``pickle.load``); this allows those classes, torch's sizes, dtypes and layouts and builtins' containers,
    and nothing else: a crafted file cannot run code."""

    _BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes", "bool", "slice"}

    def find_class(self, module_name: str, name: str) -> Any:
        if module_name in _METADATA_CLASSES:  # its dataclasses and enums; no function
            module = __import__(module_name, fromlist=[name])
            value = getattr(module, name)
            if isinstance(value, type):
                return value
        if module_name == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                                     (torch.dtype, torch.layout,
                                                                      torch.memory_format))):
            return getattr(torch, name)
        if module_name == "builtins" and name in self._BUILTINS:
            import builtins

            return getattr(builtins, name)
        if module_name == "collections" and name == "OrderedDict":
            from collections import OrderedDict

            return OrderedDict
        if module_name == "torch.serialization" and name == "_get_layout":  # a layout from its name
            from torch.serialization import _get_layout

            return _get_layout
        if module_name == "pathlib" and name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath",
                                                 "PureWindowsPath"):  # where it was written (storage_meta)
            import pathlib

            return getattr(pathlib, name)
        if module_name == "copyreg" and name == "_reconstructor":
            import copyreg

            return copyreg._reconstructor
        raise pickle.UnpicklingError(f"{module_name}.{name} is not allowed in a checkpoint's .metadata")


def _safe_reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(Path(self.path) / ".metadata", "rb") as fh:
                metadata = _MetadataUnpickler(fh).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def read_sharded_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a sharded checkpoint directory, whole, on the CPU, in this one process (no process
    group). The shards' tensors are read with torch's weights-only loader, the index with an allow-list unpickler."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = _safe_reader(Path(path))
    reader.read_metadata()  # here, so that a refused or damaged index says why (torch's loader hides it)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=reader,
                     planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    model = state.get("model")
    if not isinstance(model, dict):
        raise ValueError("the checkpoint holds no model state")
    return model


def read_sharded_checkpoint(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint directory as the dict a ``.ckpt`` file holds: ``meta.pt`` (weights-only) with the whole
    model state as its ``state_dict`` (the optimizer shards are not read). A :class:`~bundles.errors.BundleError`
    names the directory when either part is unreadable."""
    from bundles.errors import BundleError

    path = Path(path)
    hint = "Pass a checkpoint directory written by `continue-pt pretrain --strategy fsdp` (OUTPUT/checkpoints/)"
    try:
        checkpoint = torch.load(path / SHARDED_META_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  a damaged file fails torch's weights-only loader in any way
        raise BundleError(path / SHARDED_META_FILE, f"is not readable ({_first_line(exc)})", hint=hint) from None
    if not isinstance(checkpoint, dict):
        raise BundleError(path / SHARDED_META_FILE, "does not hold a checkpoint dict", hint=hint)
    checkpoint["state_dict"] = _ShardedModelState(path, hint)
    return checkpoint


class _ShardedModelState(Mapping):
    """The model state of a sharded checkpoint, read on first use: a resume reads the checkpoint's options and
    steps in every process, and only export needs the weights (a whole XLS-R 2B is 8 GB in fp32)."""

    def __init__(self, path: Path, hint: str):
        self.path, self.hint = path, hint
        self._state: dict[str, torch.Tensor] | None = None

    def _loaded(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            from bundles.errors import BundleError

            from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

            try:
                self._state = read_sharded_model_state(self.path)
            except (Exception, CheckpointException) as exc:  # noqa: BLE001  missing/damaged shards, refused .metadata
                raise BundleError(self.path, f"its model shards are not readable ({_first_line(exc)})",
                                  hint=self.hint) from None
        return self._state

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._loaded()[key]

    def __iter__(self):
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def replace_directory(source: Path, target: Path) -> None:
    """``target`` becomes a copy of the directory ``source`` (hard links where the file system allows), swapped in
    by renames: a reader sees the old or the new checkpoint, never a mix."""
    import os
    import shutil

    tmp = target.with_name(f".{target.name}.tmp")
    _remove(tmp)

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, tmp, copy_function=link_or_copy)
    _swap_in(tmp, target)


def _swap_in(complete: Path, target: Path) -> None:
    """Put the complete directory ``complete`` at ``target`` (a directory or a file of an earlier run) by renames;
    the old one is removed only once the new one is in place."""
    import os

    old = target.with_name(f".{target.name}.old")
    _remove(old)
    if target.exists() or target.is_symlink():
        os.replace(target, old)
    os.replace(complete, target)
    _remove(old)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
