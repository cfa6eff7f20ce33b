"""Lightning's ``Trainer`` built at one place, where its (and torch's) configuration refusals become option problems.

``pl.Trainer`` refuses combinations only it can judge (``devices=2`` on a machine with one GPU, a strategy the
accelerator lacks) with ``MisconfigurationException``, ``ValueError`` or ``RuntimeError`` and a traceback. Here they
become :class:`~continue_pt.options.PretrainOptionsError`: one message naming the options, before training starts.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import (
    ClusterEnvironment,
    LightningEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from lightning.fabric.utilities.exceptions import MisconfigurationException

from continue_pt.options import PretrainOptions, PretrainOptionsError
from continue_pt.sharding import other_fsdp_problem, sharded_precision_problem, sharded_strategy

_REFUSALS = (MisconfigurationException, ValueError, RuntimeError, TypeError)
_HARDWARE_OPTIONS = ("accelerator", "devices", "strategy", "precision")


def built_trainer(output_dir: str | Path, **trainer_args: Any) -> pl.Trainer:
    """``pl.Trainer(**trainer_args)``; a refused configuration raises :class:`PretrainOptionsError`."""
    try:
        return pl.Trainer(**_with_cluster_plugins(trainer_args))
    except _REFUSALS as exc:
        raise PretrainOptionsError(output_dir, _reworded(exc, trainer_args),
                                   hint="Nothing was started; check --devices, --precision and the accelerator "
                                        "against the machine") from None


def trainer_problems(options: PretrainOptions) -> list[str]:
    """What the Trainer would refuse in the hardware options, found by building one that runs nothing."""
    args = {"accelerator": options.accelerator, "devices": options.devices, "strategy": options.strategy,
            "precision": options.resolved_precision(), "num_nodes": options.num_nodes}
    other_fsdp = other_fsdp_problem(options.strategy)
    if other_fsdp:  # before Lightning, which would refuse it on the CPU for another reason
        return [other_fsdp]
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its "GPU available: ..." lines belong to the real run
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real Trainer says it again where it matters
            sharded = sharded_strategy(options.strategy, args["precision"], False)
            built = {**args, "strategy": sharded, "precision": None} if sharded is not None else args
            trainer = pl.Trainer(**_with_cluster_plugins(built),
                                 logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False)
    except _REFUSALS as exc:
        return [_reworded(exc, args)]
    finally:
        quiet.setLevel(level)
    precision = sharded_precision_problem(options.strategy, args["precision"],
                                          trainer.strategy.root_device.type == "cuda")
    return [*([precision] if precision else []), *launcher_problems(trainer, options.num_nodes, options.strategy)]


LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
"""What Lightning's own environment (no SLURM, no torchrun) needs on every node of a multi-node run."""


def launcher_problems(trainer: pl.Trainer, num_nodes: int, strategy: Any = "auto") -> list[str]:
    """Why a run over ``num_nodes`` machines cannot start here: a strategy that stays on one node, no launcher (the
    process would wait for the other nodes forever: Lightning's default environment assumes node 0 and a free
    port of its own), or a launcher that disagrees with the options, on any number of nodes (Lightning's own
    ``validate_settings``: SLURM's ``--nodes``/``--ntasks-per-node``, torchrun's world size; Lightning checks them
    only once training starts, with a traceback)."""
    if trainer.num_nodes != num_nodes:
        return [f"strategy {strategy!r} runs on a single node; num_nodes {num_nodes} needs a distributed strategy "
                "(auto or ddp)"]
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if num_nodes > 1 and isinstance(environment, LightningEnvironment):
        missing = [name for name in LAUNCHER_VARIABLES if not os.environ.get(name)]
        if missing:
            return [f"num_nodes {num_nodes} needs a launcher on every node, and none was found (no SLURM job step, "
                    f"no torchrun; {', '.join(missing)} not set): run the command under srun in an sbatch job "
                    f"with --nodes {num_nodes}, or with torchrun --nnodes {num_nodes} --node-rank R, or set "
                    f"MASTER_ADDR (node 0's address), MASTER_PORT and NODE_RANK (0..{num_nodes - 1}) on each node; "
                    "without them this process would wait for the other nodes forever"]
        node_rank = os.environ["NODE_RANK"].strip()
        if not node_rank.isdigit() or int(node_rank) >= num_nodes:
            return [f"NODE_RANK is {node_rank!r}; with num_nodes {num_nodes} each node needs its own NODE_RANK, "
                    f"0 to {num_nodes - 1} (0 on the node at MASTER_ADDR)"]
    if environment is not None:
        try:
            environment.validate_settings(num_devices=trainer.num_devices, num_nodes=num_nodes)
        except (ValueError, RuntimeError) as exc:
            return [f"the launcher ({type(environment).__name__}) disagrees with devices {trainer.num_devices} and "
                    f"num_nodes {num_nodes}: {str(exc).strip().splitlines()[0].rstrip('.')}"]
    return []


def _with_cluster_plugins(trainer_args: dict[str, Any]) -> dict[str, Any]:
    """Under SLURM (and not torchrun, which Lightning prefers), Lightning's own ``SLURMEnvironment`` without its
    auto-requeue: its SIGUSR1 handler saves ``hpc_ckpt_N.ckpt`` in the middle of an accumulated step and a
    requeued job would silently restore it, even with ``--init-from``. The kit's ``StopOnSignal`` handles SIGUSR1
    (and SIGTERM) instead: it stops at the next optimizer step with ``checkpoints/last.ckpt`` and the resume
    command; the sbatch script in the README requeues."""
    plugins = list(trainer_args.get("plugins") or [])
    if any(isinstance(p, ClusterEnvironment) for p in plugins):  # the caller chose one
        return trainer_args
    if TorchElasticEnvironment.detect() or not SLURMEnvironment.detect():
        return trainer_args
    return {**trainer_args, "plugins": [*plugins, SLURMEnvironment(auto_requeue=False)]}


def _reworded(exc: BaseException, args: dict[str, Any]) -> str:
    given = ", ".join(f"{name} {args[name]!r}" for name in _HARDWARE_OPTIONS if name in args)
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"Lightning cannot train with {given} on this machine: {reason}"
