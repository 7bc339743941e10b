"""Reference growth operators on full (unsharded) megatron-core GPT state dicts.

Each operator is a pure function ``grow_X(state, cfg, target..., *, rng) ->
GrowthResult(state, cfg, maps)``: it never changes its inputs, validates the
target before anything is built, and knows nothing of TP/PP or optimizers.
"""

from mgrow.ops.common import FreeValues, GrowthResult
from mgrow.ops.head_dim import grow_head_dim
from mgrow.ops.heads import grow_heads
from mgrow.ops.hidden import grow_hidden
from mgrow.ops.index_map import (
    AxisMap,
    Kind,
    TensorMap,
    apply_to_optimizer_state,
    carry,
    carry_moment,
    compose,
    identity_maps,
)
from mgrow.ops.layers import grow_layers
from mgrow.ops.mlp import grow_mlp

__all__ = [
    "AxisMap",
    "FreeValues",
    "GrowthResult",
    "Kind",
    "TensorMap",
    "apply_to_optimizer_state",
    "carry",
    "carry_moment",
    "compose",
    "grow_head_dim",
    "grow_heads",
    "grow_hidden",
    "grow_layers",
    "grow_mlp",
    "identity_maps",
]
