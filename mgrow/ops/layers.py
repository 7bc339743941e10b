"""Add layers N -> N' (GROWTH_MATH.md section 6).

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

from typing import Optional, Sequence

import torch

from mgrow.errors import ConfigError
from mgrow.layouts.megatron import layer_index, renumber
from mgrow.model_config import ModelConfig
from mgrow.ops.common import FreeValues, GrowthResult, check_state, replace_config, require_int
from mgrow.ops.index_map import Kind, TensorMap

OP = "layers"
ZERO_IN_NEW_LAYER = (
    "self_attention.linear_proj.weight",
    "self_attention.linear_proj.bias",
    "mlp.linear_fc2.weight",
    "mlp.linear_fc2.bias",
)


def grown_config(cfg: ModelConfig, insert_before: Sequence[int] = (), num_layers: Optional[int] = None) -> ModelConfig:
    return replace_config(cfg, OP, "num_layers", num_layers=len(layer_order(cfg, insert_before, num_layers)))


def layer_order(cfg: ModelConfig, insert_before: Sequence[int] = (), num_layers: Optional[int] = None) -> list:
    """For each layer of the grown model, the old layer index it is, or None for a new layer."""
    N = cfg.num_layers
    if isinstance(insert_before, (str, bytes)) or not isinstance(insert_before, Sequence):
        raise ConfigError(f"{OP}.insert_before", f"must be a list of layer indices, got {insert_before!r}")
    for position, index in enumerate(insert_before):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= N:
            raise ConfigError(
                f"{OP}.insert_before",
                f"entry {position} ({index!r}) must be a layer index in 0..{N} (the model has {N} layers; {N} appends)",
            )
    if num_layers is None and not insert_before:
        raise ConfigError(f"{OP}.insert_before", "give insert_before (a non-empty list) or num_layers")
    inserted = N + len(insert_before)
    if num_layers is None:
        total = inserted
    else:
        total = require_int(OP, "num_layers", num_layers, inserted, f"{N} layers plus {len(insert_before)} inserted")
    order: list = []
    for old in range(N + 1):
        order.extend([None] * list(insert_before).count(old))
        if old < N:
            order.append(old)
    return order + [None] * (total - inserted)


def grow_layers(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    insert_before: Sequence[int] = (),
    num_layers: Optional[int] = None,
    *,
    rng: FreeValues,
) -> GrowthResult:
    order = layer_order(cfg, insert_before, num_layers)
    grown = grown_config(cfg, insert_before, num_layers)
    check_state(state, cfg, OP)
    template = {name.split(".", 3)[3]: t.shape for name, t in state.items() if layer_index(name) == 0}

    new_state: dict[str, torch.Tensor] = {}
    maps: dict[str, TensorMap] = {}
    for name, tensor in state.items():  # embeddings first; layers and the rest are added below
        if name.startswith("embedding."):
            new_state[name], maps[name] = tensor.clone(), TensorMap.identity(name, tuple(tensor.shape))
    for new_index, old_index in enumerate(order):
        for suffix, shape in template.items():
            name = f"decoder.layers.{new_index}.{suffix}"
            if old_index is None:
                kind = Kind.ZERO if suffix in ZERO_IN_NEW_LAYER else Kind.FREE
                maps[name] = TensorMap.new_tensor(tuple(shape), kind)
                new_state[name] = rng.draw(name, tuple(shape)) if kind == Kind.FREE else torch.zeros(shape)
            else:
                old_name = renumber(name, old_index)
                new_state[name] = state[old_name].clone()
                maps[name] = TensorMap.identity(old_name, tuple(shape))
    for name, tensor in state.items():
        if layer_index(name) is None and not name.startswith("embedding."):
            new_state[name], maps[name] = tensor.clone(), TensorMap.identity(name, tuple(tensor.shape))
    return GrowthResult(new_state, grown, maps)
