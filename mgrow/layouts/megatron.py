"""How megatron-core 0.16 (local spec) stores each logical GPT tensor in TP/PP shards.

One row per parameter-name pattern: the tensor-parallel partition dim and
stride, as megatron's ``_initialize_affine_weight_cpu`` splits a full master
weight (LIBRARY_FACTS.md A1). Names here are *global* names: ``decoder.layers.{i}``
uses the 0-based layer index across all pipeline stages. Growth operators never
read this table; the shard movers and weight initialisers do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class TensorLayout:
    pattern: str
    partition_dim: Optional[int]  # None: replicated on every TP rank
    stride: int = 1  # 2 for the gated fc1: each rank holds [gate_r; up_r]
    role: str = ""  # what the tensor is, for humans and error messages


LAYER = r"decoder\.layers\.\d+\."
TABLE = (
    TensorLayout(r"embedding\.word_embeddings\.weight", 0, role="vocab-parallel embedding [V, h]"),
    TensorLayout(r"embedding\.position_embeddings\.weight", None, role="learned positions [S, h]"),
    TensorLayout(LAYER + r"input_layernorm\.(weight|bias)", None, role="pre-attention norm [h]"),
    TensorLayout(LAYER + r"self_attention\.linear_qkv\.weight", 0,
                 role="QKV interleaved by query group [G*(E/G+2)*k, h]"),
    TensorLayout(LAYER + r"self_attention\.linear_qkv\.bias", 0, role="QKV bias [G*(E/G+2)*k]"),
    TensorLayout(LAYER + r"self_attention\.(q|k)_layernorm\.(weight|bias)", None, role="qk norm [k]"),
    TensorLayout(LAYER + r"self_attention\.linear_proj\.weight", 1, role="attention output [h, E*k]"),
    TensorLayout(LAYER + r"self_attention\.linear_proj\.bias", None, role="attention output bias [h]"),
    TensorLayout(LAYER + r"pre_mlp_layernorm\.(weight|bias)", None, role="pre-MLP norm [h]"),
    TensorLayout(LAYER + r"mlp\.linear_fc1\.weight", 0, role="MLP in [p or 2p (gate; up), h]"),
    TensorLayout(LAYER + r"mlp\.linear_fc1\.bias", 0, role="MLP in bias"),
    TensorLayout(LAYER + r"mlp\.linear_fc2\.weight", 1, role="MLP out [h, p]"),
    TensorLayout(LAYER + r"mlp\.linear_fc2\.bias", None, role="MLP out bias [h]"),
    TensorLayout(r"decoder\.final_layernorm\.(weight|bias)", None, role="final norm [h]"),
    TensorLayout(r"output_layer\.weight", 0, role="vocab-parallel output layer [V, h]"),
)
_COMPILED = tuple((re.compile(row.pattern + "$"), row) for row in TABLE)
_GATED_FC1 = re.compile(LAYER + r"mlp\.linear_fc1\.(weight|bias)$")
_LAYER_INDEX = re.compile(r"^decoder\.layers\.(\d+)\.")


def layout_of(name: str, gated_linear_unit: bool = False) -> TensorLayout:
    for regex, row in _COMPILED:
        if regex.match(name):
            if gated_linear_unit and _GATED_FC1.match(name):
                return TensorLayout(row.pattern, row.partition_dim, 2, row.role)
            return row
    raise KeyError(f"no megatron layout for parameter {name!r}")


def layer_index(name: str) -> Optional[int]:
    match = _LAYER_INDEX.match(name)
    return int(match.group(1)) if match else None


def renumber(name: str, new_index: int) -> str:
    return _LAYER_INDEX.sub(f"decoder.layers.{new_index}.", name, count=1)


def tp_chunks(full: torch.Tensor, layout: TensorLayout, tp: int) -> list[torch.Tensor]:
    """The TP shards of a full tensor, rank by rank (megatron's CPU init split)."""
    if layout.partition_dim is None:
        return [full] * tp
    pieces = torch.chunk(full, tp * layout.stride, dim=layout.partition_dim)
    return [torch.cat(pieces[r :: tp], dim=layout.partition_dim) for r in range(tp)]


def tp_shard(full: torch.Tensor, layout: TensorLayout, rank: int, tp: int) -> torch.Tensor:
    return tp_chunks(full, layout, tp)[rank].contiguous()


def tp_merge(shards: list[torch.Tensor], layout: TensorLayout) -> torch.Tensor:
    """Inverse of :func:`tp_chunks`."""
    if layout.partition_dim is None:
        return shards[0]
    dim, stride = layout.partition_dim, layout.stride
    per_rank = [torch.chunk(s, stride, dim=dim) for s in shards]
    return torch.cat([per_rank[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)
