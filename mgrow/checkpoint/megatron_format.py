"""Model and optimizer of the Megatron paths in megatron's ``dist_checkpointing`` format.

The model is megatron-core's own ``sharded_state_dict`` (global tensors, so
TP and PP reshard on load). The optimizer is megatron's own too: torch AdamW
under DDP saves its moments per parameter in model space
(``optim_state_to_sharding_state``); the DistributedOptimizer saves in the
``fully_reshardable`` format, gathered into model space on each DP group's
rank 0 (docs/library_facts.md, "Checkpoints with dist_checkpointing"), so TP, PP and DP all reshard.

Three megatron-core 0.16.1 bugs of the DistributedOptimizer with torch's
AdamW are worked around here (docs/library_facts.md, "Checkpoints with
dist_checkpointing"): a fresh optimizer cannot build its state dict before it has
state; the fully_reshardable load copies every Adam state key, ``step``
included, from a source that leaves ``step`` out; and ``load_state_dict`` gives
all parameters one shared ``step`` tensor, which AdamW's in-place increment
then advances once per parameter (the resumed run would bias-correct wrongly).
tests/test_checkpoint.py checks that bugs 1 and 3 are still there, and its
resume tests fail without any of the three work-arounds.
"""

from __future__ import annotations

import os
import queue
from typing import Optional

import torch

MODEL_DIR = "model"
FULLY_RESHARDABLE = "fully_reshardable"
# DistributedOptimizer formats that load on any TP/PP layout (the others only on the TP x PP that saved them)
RESHARDABLE = (FULLY_RESHARDABLE, "fully_sharded_model_space")


def distributed_optimizer(engine):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = engine.optimizer.chained_optimizers[0] if hasattr(engine.optimizer, "chained_optimizers") else engine.optimizer
    return inner if isinstance(inner, DistributedOptimizer) else None


def sharded_state(engine, is_loading: bool, sharding_type: str = FULLY_RESHARDABLE, optimizer: bool = True) -> dict:
    """``{"model": ..., "optimizer": ...}`` as megatron-core's own ``sharded_state_dict`` calls make them (the
    DistributedOptimizer's parameter state in ``sharding_type``; no optimizer entry with ``optimizer=False``)."""
    model = engine.ddp.module.sharded_state_dict()
    if not optimizer:
        return {"model": model}
    distributed = distributed_optimizer(engine)
    if is_loading and distributed is not None and not distributed.optimizer.state:
        distributed._init_optimizer_states_with_dummy_values()  # bug 1; every value is overwritten by the load
    kwargs = {"metadata": {"distrib_optim_sharding_type": sharding_type}} if distributed is not None else {}
    return {"model": model, "optimizer": engine.optimizer.sharded_state_dict(model, is_loading, **kwargs)}


def write(state: dict, directory: str, content_metadata: Optional[dict] = None) -> None:
    """Collective: ``dist_checkpointing.save`` of ``state`` into ``directory``, synchronously."""
    from megatron.core import dist_checkpointing

    _in_process_results_queue()
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(state, directory, content_metadata=content_metadata)


def save(engine, folder: str, optimizer: bool = True) -> None:
    """Collective: every rank writes its part of ``<folder>/model``."""
    write(sharded_state(engine, is_loading=False, optimizer=optimizer), os.path.join(folder, MODEL_DIR))


def _in_process_results_queue() -> None:
    """Keep dist_checkpointing's write results in this process.

    Its writer collects them in a queue served by a spawn-context Manager
    process (filesystem_async.py:51-56) that re-imports ``__main__`` and, when
    a rank is killed, lives on as an orphan (270 MB, and its parent's stdout and
    stderr, which keeps a launcher's pipes open). A synchronous save puts and
    reads the results in the saving process itself, so a plain queue serves.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def load(engine, folder: str, metadata: dict) -> None:
    """Collective: fill ``engine``'s model and optimizer from ``<folder>/model``, whatever layout saved it (the
    optimizer stays fresh where the checkpoint holds no optimizer state)."""
    load_from(engine, os.path.join(folder, MODEL_DIR), optimizer=metadata.get("optimizer_state", True))


def load_from(engine, directory: str, sharding_type: str = FULLY_RESHARDABLE, optimizer: bool = True,
              extra: Optional[dict] = None) -> dict:
    """Collective: fill ``engine``'s model (and optimizer) from the dist_checkpointing folder ``directory``,
    whose DistributedOptimizer state is in ``sharding_type``. ``extra``: more sharded entries to read (e.g.
    Megatron-LM's ``rng_state``); returns what was loaded for them."""
    from megatron.core import dist_checkpointing

    request = {**sharded_state(engine, True, sharding_type, optimizer), **(extra or {})}
    state = dist_checkpointing.load(request, directory)
    engine.ddp.module.load_state_dict(state["model"])
    if optimizer:
        _load_optimizer(engine, state["optimizer"])
    return {key: state[key] for key in (extra or {})}


def _load_optimizer(engine, optimizer: dict) -> None:
    distributed = distributed_optimizer(engine)
    if distributed is None:
        engine.optimizer.load_state_dict(optimizer)
        return
    param_state = optimizer.pop("param_state")
    loader = _PARAMETER_STATE_LOADERS[optimizer.pop("param_state_sharding_type")]
    distributed.load_state_dict(optimizer)  # param groups, and Adam's step from them
    inner = distributed.optimizer.state
    # Bug 2: the per-parameter copy writes every state key it finds, ``step`` included, from tensors that leave
    # it out (fully_reshardable) or hold the placeholder state's (dp_reshardable): the steps stay out of it.
    # (an optimizer that keeps its step in the param groups, FusedAdam, has none here)
    steps = {param: state.pop("step") for param, state in inner.items() if "step" in state}
    try:
        with torch.no_grad():  # (megatron's own call of the dp_zero loader runs without autograd too)
            getattr(distributed, loader)(param_state)
    finally:
        _own_steps(inner, steps)


_PARAMETER_STATE_LOADERS = {
    FULLY_RESHARDABLE: "load_parameter_state_from_fully_reshardable",
    "fully_sharded_model_space": "load_parameter_state_from_fs_model_space",
    "dp_reshardable": "load_parameter_state_from_dp_reshardable",
    "dp_zero_gather_scatter": "load_parameter_state_from_dp_zero",
}


def _own_steps(inner: dict, steps: dict) -> None:
    """Bug 3: load_state_dict gives every parameter the same ``step`` tensor, which torch's AdamW then increments
    once per parameter at each step; every parameter gets its own."""
    for param, step in steps.items():
        inner[param]["step"] = step.clone()
