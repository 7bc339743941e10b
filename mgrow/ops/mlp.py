"""MLP width p -> p' (docs/growth_math.md, section 1).

fc1 ([p, h], gated [2p, h] = [gate; up]) gets free new rows, inserted into
each half; its bias free new entries. fc2 ([h, p]) gets zero new columns, so
the new units add nothing to the output. fc2's bias is unchanged.
"""

from __future__ import annotations

import torch

from mgrow.core.model_config import ModelConfig
from mgrow.core.plan import mlp_target
from mgrow.ops.common import (
    AxisBuilder,
    FreeValues,
    GrowthResult,
    SuffixRules,
    apply_step,
)
from mgrow.ops.index_map import Kind

OP = "mlp"




def grow_mlp(
    state: dict[str, torch.Tensor], cfg: ModelConfig, ffn_hidden_size: int, *, rng: FreeValues
) -> GrowthResult:
    return apply_step(step(cfg, ffn_hidden_size), state, rng, OP)


def step(cfg: ModelConfig, ffn_hidden_size: int) -> SuffixRules:
    grown = mlp_target(cfg, ffn_hidden_size)
    p, added = cfg.ffn_hidden_size, grown.ffn_hidden_size - cfg.ffn_hidden_size
    halves = 2 if cfg.gated_linear_unit else 1
    fc1 = AxisBuilder()
    for half in range(halves):  # gated: [gate; up], each half gets its new units
        fc1.old(range(half * p, (half + 1) * p)).new(added, Kind.FREE)
    fc1_rows = fc1.build()
    fc2_columns = AxisBuilder().old(range(p)).new(added, Kind.ZERO).build()
    rules = {
        "mlp.linear_fc1.weight": {0: fc1_rows},
        "mlp.linear_fc1.bias": {0: fc1_rows},
        "mlp.linear_fc2.weight": {1: fc2_columns},
    }
    return SuffixRules(cfg, grown, rules)
