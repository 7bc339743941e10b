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

MODEL_DIR = "model"
_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _distributed(engine):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = engine.optimizer.chained_optimizers[0] if hasattr(engine.optimizer, "chained_optimizers") else engine.optimizer
    return inner if isinstance(inner, DistributedOptimizer) else None


def _sharded_state_dict(engine, is_loading: bool) -> dict:
    model = engine.ddp.module.sharded_state_dict()
    distributed = _distributed(engine)
    if is_loading and distributed is not None and not distributed.optimizer.state:
        distributed._init_optimizer_states_with_dummy_values()  # bug 1; every value is overwritten by the load
    kwargs = {"metadata": _METADATA} if distributed is not None else {}
    optimizer = engine.optimizer.sharded_state_dict(model, is_loading, **kwargs)
    return {"model": model, "optimizer": optimizer}


def save(engine, folder: str) -> None:
    """Collective: every rank writes its part of ``<folder>/model``."""
    from megatron.core import dist_checkpointing

    _in_process_results_queue()
    directory = os.path.join(folder, MODEL_DIR)
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(engine, is_loading=False), directory)


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
    """Collective: fill ``engine``'s model and optimizer from ``<folder>/model``, whatever layout saved it."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_sharded_state_dict(engine, is_loading=True), os.path.join(folder, MODEL_DIR))
    engine.ddp.module.load_state_dict(state["model"])
    distributed = _distributed(engine)
    if distributed is None:
        engine.optimizer.load_state_dict(state["optimizer"])
        return
    optimizer = state["optimizer"]
    param_state = optimizer.pop("param_state")
    optimizer.pop("param_state_sharding_type")
    distributed.load_state_dict(optimizer)  # param groups, and Adam's step from them
    # Bug 2: the per-parameter copy expects every state key, but the loaded tensors leave out ``step``.
    inner = distributed.optimizer.state
    # (an optimizer that keeps its step in the param groups, FusedAdam, has none here)
    steps = {param: state.pop("step") for param, state in inner.items() if "step" in state}
    try:
        distributed.load_parameter_state_from_fully_reshardable(param_state)
    finally:
        # Bug 3: load_state_dict gives every parameter the same ``step`` tensor, which torch's AdamW then
        # increments once per parameter at each step; every parameter gets its own.
        for param, step in steps.items():
            inner[param]["step"] = step.clone()
