"""How megatron-core 0.16 (local spec) stores each logical GPT tensor in TP/PP shards.

One row per parameter-name pattern: the tensor-parallel partition dim and
stride, as megatron's ``_initialize_affine_weight_cpu`` splits a full master
weight (LIBRARY_FACTS.md A1). Names here are *global* names: ``decoder.layers.{i}``
uses the 0-based layer index across all pipeline stages. :func:`parameter_shapes`
names every global tensor of a model and its full shape; :func:`stages_of` says
which pipeline stages hold it. Growth operators read only the names and shapes;
the shard movers and weight initialisers read the partitioning too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from mgrow.model_config import ModelConfig


@dataclass(frozen=True)
class TensorLayout:
    pattern: str
    partition_dim: Optional[int]  # None: replicated on every TP rank
    stride: int = 1  # 2 for the gated fc1: each rank holds [gate_r; up_r]
    role: str = ""  # what the tensor is, for humans and error messages


LAYER = r"decoder\.layers\.\d+\."
# A dense MLP, or one expert of an MoE layer (expert parallel 1: local expert j is global expert j).
MLP = r"mlp\.(experts\.local_experts\.\d+\.)?"
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
    TensorLayout(LAYER + MLP + r"linear_fc1\.weight", 0, role="MLP (or expert) in [p or 2p (gate; up), h]"),
    TensorLayout(LAYER + MLP + r"linear_fc1\.bias", 0, role="MLP (or expert) in bias"),
    TensorLayout(LAYER + MLP + r"linear_fc2\.weight", 1, role="MLP (or expert) out [h, p]"),
    TensorLayout(LAYER + MLP + r"linear_fc2\.bias", None, role="MLP (or expert) out bias [h]"),
    TensorLayout(LAYER + r"mlp\.router\.(weight|bias)", None, role="MoE router [E, h] (fp32), bias [E]"),
    TensorLayout(r"decoder\.final_layernorm\.(weight|bias)", None, role="final norm [h]"),
    TensorLayout(r"output_layer\.weight", 0, role="vocab-parallel output layer [V, h]"),
)
_COMPILED = tuple((re.compile(row.pattern + "$"), row) for row in TABLE)
_GATED_FC1 = re.compile(LAYER + MLP + r"linear_fc1\.(weight|bias)$")
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


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every global parameter of a GPTModel built from ``cfg`` and its full (unsharded) shape.

    The tied output layer is the word embedding (no ``output_layer.weight``);
    tests/test_layouts.py checks this against a built model.
    """
    h, V, k, p = cfg.hidden_size, cfg.vocab_size, cfg.kv_channels, cfg.ffn_hidden_size
    E, G = cfg.num_attention_heads, cfg.num_query_groups
    norm = ("weight", "bias") if cfg.normalization == "LayerNorm" else ("weight",)
    linear = ("weight", "bias") if cfg.add_bias_linear else ("weight",)
    fc1_rows = 2 * p if cfg.gated_linear_unit else p
    per_layer: dict[str, tuple[int, ...]] = {f"input_layernorm.{n}": (h,) for n in norm}
    for part, rows, cols in (("linear_qkv", (E + 2 * G) * k, h), ("linear_proj", h, E * k)):
        for n in linear:
            bias_rows = rows if part == "linear_qkv" else h
            per_layer[f"self_attention.{part}.{n}"] = (rows, cols) if n == "weight" else (bias_rows,)
    if cfg.qk_layernorm:
        for which in ("q", "k"):
            per_layer.update({f"self_attention.{which}_layernorm.{n}": (k,) for n in norm})
    per_layer.update({f"pre_mlp_layernorm.{n}": (h,) for n in norm})
    experts = [f"mlp.experts.local_experts.{j}." for j in range(cfg.num_moe_experts)] if cfg.is_moe else ["mlp."]
    for prefix in experts:
        for part, rows, cols in (("linear_fc1", fc1_rows, h), ("linear_fc2", h, p)):
            for n in linear:
                per_layer[f"{prefix}{part}.{n}"] = (rows, cols) if n == "weight" else (rows,)
    if cfg.is_moe:
        per_layer.update({f"mlp.router.{n}": (cfg.num_moe_experts, h) if n == "weight" else (cfg.num_moe_experts,)
                          for n in linear})

    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (V, h)}
    if cfg.position_embedding_type == "learned_absolute":
        shapes["embedding.position_embeddings.weight"] = (cfg.max_sequence_length, h)
    for index in range(cfg.num_layers):
        shapes.update({f"decoder.layers.{index}.{suffix}": shape for suffix, shape in per_layer.items()})
    shapes.update({f"decoder.final_layernorm.{n}": (h,) for n in norm})
    if not cfg.share_embeddings_and_output_weights:
        shapes["output_layer.weight"] = (V, h)
    return shapes


def stages_of(name: str, cfg: ModelConfig, pp: int) -> tuple[int, ...]:
    """The pipeline stages holding global parameter ``name`` (layers split evenly, megatron's default).

    With tied embeddings and pp > 1 the last stage keeps its own copy of the word
    embedding as its output layer (megatron-core ``LanguageModule``).
    """
    index = layer_index(name)
    if index is not None:
        return (index // (cfg.num_layers // pp),)
    if name == "embedding.word_embeddings.weight" and cfg.share_embeddings_and_output_weights and pp > 1:
        return (0, pp - 1)
    if name.startswith("embedding."):
        return (0,)
    return (pp - 1,)


def tp_unit(name: str, cfg: ModelConfig) -> int:
    """Entries along the TP partition dim that must stay together on one rank: a query group of QKV
    rows ([its heads' Q, K, V] x head dim), its heads' columns of linear_proj; single rows elsewhere."""
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return (cfg.heads_per_group + 2) * cfg.kv_channels
    if name.endswith("linear_proj.weight"):
        return cfg.heads_per_group * cfg.kv_channels
    return 1


def shard_local_order(
    src: torch.Tensor, old_len: int, layout: TensorLayout, tp: int, unit: int
) -> Optional[torch.Tensor]:
    """The order of a grown TP-partitioned axis that keeps every old unit on the rank that held it.

    ``src`` is the axis map of the grown axis in reference order (old index or
    -1). Units (``unit`` consecutive entries) made from old entries go to the
    rank that held those entries, in their order; new units are dealt out
    evenly after them. Taking the grown tensor in this order and splitting it as
    megatron does leaves each rank's old units where they were, so per-rank
    partial sums keep their order (and fp32 results their bits). Index metadata: on the CPU. None when
    the old layout cannot be kept (a unit spread over ranks, e.g. fewer query
    groups than TP ranks): the grown tensor is then split in reference order.
    """
    blocks = layout.stride
    new_block, old_block = len(src) // blocks, old_len // blocks
    if new_block % unit or new_block % (unit * tp) or old_block % tp:
        return None
    per_rank_units, old_chunk = new_block // (unit * tp), old_block // tp
    order = []
    for block in range(blocks):
        local = src[block * new_block : (block + 1) * new_block].view(-1, unit)  # one row per unit
        is_old = local >= 0
        owner = (local - block * old_block).div(old_chunk, rounding_mode="floor")
        highest = torch.where(is_old, owner, -1).max(dim=1).values  # the TP rank that held the unit's old entries
        lowest = torch.where(is_old, owner, tp).min(dim=1).values
        has_old = is_old.any(dim=1)
        if bool((has_old & (highest != lowest)).any()):
            return None  # a unit whose old entries were on several ranks
        ranks = [torch.nonzero(has_old & (highest == rank)).flatten().tolist() for rank in range(tp)]
        new_units = torch.nonzero(~has_old).flatten().tolist()
        for rank in range(tp):
            take = per_rank_units - len(ranks[rank])
            if take < 0 or take > len(new_units):
                return None
            ranks[rank] += new_units[:take]
            new_units = new_units[take:]
        units = torch.tensor([u for rank in ranks for u in rank], dtype=torch.int64, device="cpu")
        order.append(block * new_block + (units[:, None] * unit + torch.arange(unit, device="cpu")).flatten())
    return torch.cat(order)
