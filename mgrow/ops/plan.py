"""A plan's operators bound to the models they meet, and run on full tensors: a whole state dict or one tensor.

The plan's schema and targets are :mod:`mgrow.core.plan`; this is the math that follows them.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from mgrow.core.model_config import ModelConfig
from mgrow.core.parameters import parameter_shapes
from mgrow.core.plan import Plan, load_plan
from mgrow.ops import head_dim, heads, hidden, layers, mlp
from mgrow.ops.common import FreeValues, GrowthResult, OpStep, Rows, apply_step, check_state
from mgrow.ops.index_map import TensorMap, compose, identity_maps

STEPS = {"mlp": mlp.step, "heads": heads.step, "head_dim": head_dim.step, "hidden": hidden.step,
         "layers": layers.step}


def steps(plan: Plan, cfg: ModelConfig) -> list[OpStep]:
    """The ops of ``plan`` bound to the models they meet, validated first (nothing is touched)."""
    plan.validate(cfg)
    out = []
    for op in plan.ops:
        out.append(STEPS[op.name](cfg, **op.args))
        cfg = out[-1].grown
    return out


def free_values(plan: Plan, cfg: ModelConfig) -> FreeValues:
    """The draws of ``plan``'s free entries (``init.std`` and ``init.seed``) on model ``cfg``."""
    return FreeValues(plan.init_std(cfg), plan.init.seed)


def apply_plan(
    state: dict[str, torch.Tensor], cfg: ModelConfig, plan: Union[Plan, dict, str, os.PathLike]
) -> GrowthResult:
    """Grow ``state`` (model ``cfg``) by every op of ``plan`` in order; ``maps`` lead from ``state`` to the result."""
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    bound = steps(plan, cfg)  # every target checked against the model it will meet, before any tensor is touched
    check_state(state, cfg, "plan")
    values = free_values(plan, cfg)
    result = GrowthResult(state, cfg, identity_maps(state))
    for index, (op, step) in enumerate(zip(plan.ops, bound)):
        grown = apply_step(step, result.state, values.for_stream(index), op.name)
        result = GrowthResult(grown.state, grown.cfg, compose(result.maps, grown.maps))
    return result


def original_source(bound: list[OpStep], name: str) -> Optional[str]:
    """The tensor of the model before ``bound`` steps that grown tensor ``name`` is made from (None: new)."""
    return source_chain(bound, name)[0]


def grow_one(
    bound: list[OpStep], values: FreeValues, name: str, original: Optional[torch.Tensor], device=None,
    rows: Optional[Rows] = None,
) -> tuple[torch.Tensor, TensorMap]:
    """Grown tensor ``name`` and its map from ``original`` (the tensor :func:`original_source` names).

    The same ops as :func:`apply_plan`, on one tensor. With ``rows`` the tensor
    is a shard: ``original`` holds old rows ``rows.held`` along ``rows.dim``, and
    the result is grown rows ``rows.wanted`` (the map in local positions), equal
    bit for bit to those rows of the full result; :class:`NotLocal` when they
    need old rows that are not held. Both come back on ``device`` (default:
    ``original``'s, or the CPU for a new tensor).
    """
    if device is None:
        device = original.device if original is not None else torch.device("cpu")
    chain = source_chain(bound, name)
    first = len(bound) - (len(chain) - 1)  # the step that creates the tensor, or 0
    wanted = _wanted_rows(bound, chain, first, rows)
    tensor, tmap = original, None
    if original is not None:
        tensor = original.to(device)
        if rows is not None:
            rows.positions(wanted[0])  # every old row the shard needs is held (else NotLocal)
        tmap = TensorMap.identity(chain[0], tuple(original.shape), device)
    held = None if rows is None else rows.held
    for index in range(first, len(bound)):
        step, target = bound[index], chain[index - first + 1]
        shape = parameter_shapes(step.grown)[target]
        step_rows = None if rows is None else Rows(rows.dim, held, wanted[index - first + 1])
        tensor, step_map = step.grow(target, tensor, shape, values.for_stream(index), step_rows)
        tensor, step_map = tensor.to(device), step_map.to(device)  # a new tensor is made on the CPU
        tmap = step_map if tmap is None else compose({chain[index - first]: tmap}, {target: step_map})[target]
        held = None if step_rows is None else step_rows.wanted
    return tensor, tmap


def source_chain(bound: list[OpStep], name: str) -> list[str]:
    """Grown tensor ``name``'s name before each step it passes, first step first (its creation: from None)."""
    chain = [name]
    for step in reversed(bound):
        chain.append(step.source(chain[-1]))
        if chain[-1] is None:
            break
    chain.reverse()
    return chain


def _wanted_rows(bound, chain, first, rows: Optional[Rows]) -> list:
    """Per stage of the chain (the original first), the rows the shard must hold there to give ``rows.wanted``."""
    if rows is None:
        return [None] * len(chain)
    wanted = [rows.wanted]
    for index in reversed(range(first, len(bound))):
        wanted.append(bound[index].rows_needed(chain[index - first + 1], rows.dim, wanted[-1]))
    wanted.reverse()
    return wanted
