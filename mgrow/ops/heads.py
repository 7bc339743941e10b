"""Add attention heads E -> E', query groups G -> G' (docs/growth_math.md, section 2).

linear_qkv rows are interleaved by query group: per group [its n = E/G query
heads, K, V], k rows each. Old group g keeps its n heads and gets n' - n free
query heads after them (E'/G' = n' >= n); groups G..G'-1 are wholly new, with
free Q, K and V. linear_proj ([h, E*k]) gets zero columns for every new head, so
new heads add nothing until trained.

Without ``num_query_groups`` an MHA model stays MHA (G' = E') and a GQA model
keeps its groups (G' = G: query heads are added per group).
"""

from __future__ import annotations

from typing import Optional

import torch

from mgrow.core.model_config import ModelConfig
from mgrow.core.plan import heads_target
from mgrow.ops.common import (
    AxisBuilder,
    FreeValues,
    GrowthResult,
    SuffixRules,
    apply_step,
)
from mgrow.ops.index_map import Kind

OP = "heads"




def grow_heads(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    num_attention_heads: int,
    num_query_groups: Optional[int] = None,
    *,
    rng: FreeValues,
) -> GrowthResult:
    return apply_step(step(cfg, num_attention_heads, num_query_groups), state, rng, OP)


def step(cfg: ModelConfig, num_attention_heads: int, num_query_groups: Optional[int] = None) -> SuffixRules:
    grown = heads_target(cfg, num_attention_heads, num_query_groups)
    k = cfg.kv_channels
    G, n = cfg.num_query_groups, cfg.heads_per_group
    G2, n2 = grown.num_query_groups, grown.heads_per_group

    qkv, proj = AxisBuilder(), AxisBuilder()
    for g in range(G):
        block = g * (n + 2) * k
        qkv.old(range(block, block + n * k)).new((n2 - n) * k, Kind.FREE)  # its query heads, then new ones
        qkv.old(range(block + n * k, block + (n + 2) * k))  # K, V
        proj.old(range(g * n * k, (g + 1) * n * k)).new((n2 - n) * k, Kind.ZERO)
    qkv.new((G2 - G) * (n2 + 2) * k, Kind.FREE)
    proj.new((G2 - G) * n2 * k, Kind.ZERO)

    qkv_rows = qkv.build()
    rules = {
        "self_attention.linear_qkv.weight": {0: qkv_rows},
        "self_attention.linear_qkv.bias": {0: qkv_rows},
        "self_attention.linear_proj.weight": {1: proj.build()},
    }
    return SuffixRules(cfg, grown, rules)
