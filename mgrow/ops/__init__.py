"""Reference growth operators on full (unsharded) megatron-core GPT state dicts.

Each operator module has ``step(cfg, target...) -> OpStep`` (validates the
target, builds the per-axis rules; ``source``/``grow`` then make one grown
tensor at a time) and the whole-state form ``grow_X(state, cfg, target..., *,
rng) -> GrowthResult(state, cfg, maps)``. Neither changes its inputs, and
neither knows anything of TP/PP or optimizers.
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
