"""Head dim k -> k' for Q, K and V together (docs/growth_math.md, sections 3 and 4).

Megatron ties the query, key and value widths to one ``kv_channels``. Every
head's k rows of linear_qkv get k' - k new rows after them:

- V: new rows free; linear_proj gets zero columns for them, per head.
- Q: new rows free. K: new rows zero, and the old K rows (and K bias) are
  multiplied by sqrt(k'/k), undoing the softmax scale 1/sqrt(k) -> 1/sqrt(k').
  With an explicit ``softmax_scale`` the scale does not change: no rescale.
- RoPE rotates the first ``rotary_dim`` dims of each head and passes the rest
  through (megatron-core ``_apply_rotary_pos_emb_bshd``). The new dims come
  after the old k, so they are never rotated; ``rotary_percent`` shrinks so the
  rotary dim stays the same.

qk_layernorm (norms over each head's k dims). A literal reading gives both qk norms
eps' = eps * k/k'; megatron-core builds them with the config's one
``layernorm_epsilon``, shared with the hidden norms, which must keep theirs.
So eps stays, and instead the old Q and K rows (and biases) are multiplied by
s = sqrt(k'/k) and their new rows are padded by the norm's rule (zero for
RMSNorm, the head's mean for LayerNorm). The padded head's mean square
(variance) over k' dims is then exactly the old one over k dims, the norm
divides by the old sqrt(var + eps), and its old output dims are s times the old
ones. The q-norm gain times 1/s undoes that for Q; for K it is exactly the
softmax-scale rescale, so the k-norm gain stays and an old k-norm bias is
multiplied by s (with an explicit ``softmax_scale``: gain times 1/s, bias kept). New
gain entries are free, new q-norm bias entries free (they meet zero K dims),
new k-norm bias entries zero.
"""

from __future__ import annotations

import math

import torch

from mgrow.core.model_config import ModelConfig
from mgrow.core.plan import head_dim_target
from mgrow.ops.common import (
    AxisBuilder,
    FreeValues,
    GrowthResult,
    SuffixRules,
    apply_step,
)
from mgrow.ops.index_map import Kind

OP = "head_dim"




def grow_head_dim(
    state: dict[str, torch.Tensor], cfg: ModelConfig, kv_channels: int, *, rng: FreeValues
) -> GrowthResult:
    return apply_step(step(cfg, kv_channels), state, rng, OP)


def step(cfg: ModelConfig, kv_channels: int) -> SuffixRules:
    grown = head_dim_target(cfg, kv_channels)
    k, k2 = cfg.kv_channels, grown.kv_channels
    added = k2 - k
    s = math.sqrt(k2 / k)
    k_rescale = s if cfg.softmax_scale is None else 1.0

    if cfg.qk_layernorm:
        pad = Kind.MEAN if cfg.normalization == "LayerNorm" else Kind.ZERO
        q_rows, k_rows = (s, pad), (s, pad)
    else:
        q_rows, k_rows = (1.0, Kind.FREE), (k_rescale, Kind.ZERO)
    v_rows = (1.0, Kind.FREE)

    qkv = AxisBuilder()
    head_rows = [q_rows] * cfg.heads_per_group + [k_rows, v_rows]
    for index, (scale, new_kind) in enumerate(head_rows * cfg.num_query_groups):
        qkv.old(range(index * k, (index + 1) * k), scale).new(added, new_kind)
    qkv_rows = qkv.build(mean_block=k2 if Kind.MEAN in (q_rows[1], k_rows[1]) else None)

    proj = AxisBuilder()
    for head in range(cfg.num_attention_heads):
        proj.old(range(head * k, (head + 1) * k)).new(added, Kind.ZERO)

    rules = {
        "self_attention.linear_qkv.weight": {0: qkv_rows},
        "self_attention.linear_qkv.bias": {0: qkv_rows},
        "self_attention.linear_proj.weight": {1: proj.build()},
    }
    if cfg.qk_layernorm:
        def norm(scale: float, new_kind: Kind):
            return {0: AxisBuilder().old(range(k), scale).new(added, new_kind).build()}

        rules.update({
            "self_attention.q_layernorm.weight": norm(1.0 / s, Kind.FREE),
            "self_attention.q_layernorm.bias": norm(1.0, Kind.FREE),
            "self_attention.k_layernorm.weight": norm(k_rescale / s, Kind.FREE),
            "self_attention.k_layernorm.bias": norm(k_rescale, Kind.ZERO),
        })
    return SuffixRules(cfg, grown, rules)
