"""Frozen parameters: tagged parameters go into optimizer param groups whose learning rate is pinned to 0.

Frozen parameters keep ``requires_grad=True``: megatron's DDP sizes its grad
buffers (and the DistributedOptimizer its shards) from the parameters that
require grads when it is built, and DeepSpeed flattens the same set, so
flipping the flag later would leave buffers and partitions describing another
model. Instead every transferred parameter sits in optimizer parameter groups
of its own whose learning rate is pinned to 0 by megatron's
``OptimizerParamScheduler`` (group keys ``max_lr = min_lr = 0``). AdamW with
lr 0 leaves the weight bit for bit (the decoupled decay multiplies by 1 - 0,
the update by 0), on the plain, distributed and ZeRO paths alike. The
gradients still flow and Adam's moments keep tracking them, so the first
steps after the unfreeze use warm moments. Unfreezing sets the groups'
``max_lr``/``min_lr`` to the run's: from then on they follow the schedule.

The group key ``mgrow_transferred`` is saved with the optimizer's param groups,
so a checkpoint remembers whether the run had unfrozen.
"""

from __future__ import annotations

from mgrow.engine.model import global_names

ATTR = "mgrow_transferred"  # set on each transferred parameter; also the param-group key
_FROZEN = {"max_lr": 0.0, "min_lr": 0.0, ATTR: True}


def mark(model, names) -> int:
    """Tag the parameters with these global names (before the engine is built); returns how many."""
    wanted, count = set(names), 0
    for _, name, param in global_names(model):
        if name in wanted:
            setattr(param, ATTR, True)
            count += 1
    return count


def megatron_overrides(optimizer_config) -> dict:
    """``config_overrides`` for megatron's ``get_megatron_optimizer``: its standard ones (no weight decay on
    biases and 1-D tensors) plus a frozen group for every tagged parameter."""
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey

    overrides = dict(get_standard_config_overrides(optimizer_config))
    overrides[ParamKey(attr=ATTR)] = dict(_FROZEN)
    return overrides


def split_groups(groups: list[dict]) -> list[dict]:
    """torch param groups (DeepSpeed path) with the tagged parameters moved into frozen copies of their group."""
    out = []
    for group in groups:
        kept = [p for p in group["params"] if not getattr(p, ATTR, False)]
        frozen = [p for p in group["params"] if getattr(p, ATTR, False)]
        out.append({**group, "params": kept})
        if frozen:
            out.append({**group, **_FROZEN, "params": frozen})
    return [group for group in out if group["params"]]


def _groups(engine) -> list[dict]:
    return [group for group in engine.optimizer.param_groups if group.get(ATTR)]


def is_frozen(engine) -> bool:
    return any(group["max_lr"] == 0.0 for group in _groups(engine))


def unfreeze(engine, lr: float, min_lr: float) -> None:
    """The transferred parameters follow the run's LR schedule from the next step on."""
    for group in _groups(engine):
        group["max_lr"], group["min_lr"] = lr, min_lr
    engine.scheduler.step(increment=0)


