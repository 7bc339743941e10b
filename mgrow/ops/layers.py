"""Add layers N -> N' (docs/growth_math.md, section 6).

A new layer's weights are free except linear_proj and linear_fc2 (weights and
biases), which are zero: both of its blocks then add nothing to the residual
(pre-norm), so the layer is the identity. ``insert_before`` lists 0-based
indices of the current layers (N means after the last; repeats insert several
layers there); ``num_layers`` is the total afterwards, and layers beyond the
inserted ones are appended at the end. Layers after an insert point are
renumbered. With ``apply_query_key_layer_scaling`` megatron divides the softmax
scale by the layer number and multiplies the scores back by it in fp32, so a
renumbered layer computes the same scores up to rounding: nothing to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mgrow.core.model_config import ModelConfig
from mgrow.core.parameters import layer_index, renumber
from mgrow.core.plan import layer_order, layers_target
from mgrow.ops.common import FreeValues, GrowthResult, OpStep, apply_step, grow_tensor
from mgrow.ops.index_map import Kind, TensorMap

OP = "layers"
ZERO_IN_NEW_LAYER = (
    "self_attention.linear_proj.weight",
    "self_attention.linear_proj.bias",
    "mlp.linear_fc2.weight",
    "mlp.linear_fc2.bias",
)






def grow_layers(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    insert_before: Sequence[int] = (),
    num_layers: Optional[int] = None,
    *,
    rng: FreeValues,
    **stage_split,
) -> GrowthResult:
    return apply_step(step(cfg, insert_before, num_layers, **stage_split), state, rng, OP)


def step(cfg: ModelConfig, insert_before: Sequence[int] = (), num_layers: Optional[int] = None,
         **stage_split) -> "LayerInsert":
    """``stage_split``: the grown model's first/last pipeline stage sizes (:func:`mgrow.core.plan.layers_target`)."""
    return LayerInsert(cfg, layers_target(cfg, insert_before, num_layers, **stage_split),
                       tuple(layer_order(cfg, insert_before, num_layers)))


@dataclass(frozen=True)
class LayerInsert(OpStep):
    cfg: ModelConfig
    grown: ModelConfig
    order: tuple  # per grown layer: its old index, or None for a new layer

    def source(self, name: str) -> Optional[str]:
        index = layer_index(name)
        if index is None:
            return name
        old = self.order[index]
        return None if old is None else renumber(name, old)

    def grow(self, name, old, shape, values, rows=None):
        if old is not None:
            if rows is not None:
                return grow_tensor(name, old, {}, values, rows, shape, old_name=self.source(name))
            return old.clone(), TensorMap.identity(self.source(name), tuple(old.shape), old.device)
        # a new tensor starts on the CPU, where its free values are drawn; grow_one moves it to the weights'
        kind = Kind.ZERO if name.split(".", 3)[3] in ZERO_IN_NEW_LAYER else Kind.FREE
        local = list(shape)
        if rows is not None:
            local[rows.dim] = len(rows.wanted)
        drawn = kind == Kind.FREE
        tensor = values.draw(name, shape, None if rows is None else (rows.dim, rows.wanted)) if drawn else \
            torch.zeros(local, device="cpu")
        return tensor, TensorMap.new_tensor(tuple(local), kind, device="cpu")
