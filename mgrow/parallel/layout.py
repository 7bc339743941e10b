"""How megatron-core 0.16 (local spec) splits each global GPT tensor over TP ranks and PP stages.

One row per parameter-name pattern: the tensor-parallel partition dim and
stride, as megatron's ``_initialize_affine_weight_cpu`` splits a full master
weight (docs/library_facts.md, "Tensor parallel"). Names are the *global* names of
:mod:`mgrow.core.parameters`; :func:`stages_of` says which pipeline stages hold
a tensor. Growth operators never read this table; the shard movers, the
initialisers and the checkpoint formats do.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

import torch

from mgrow.core.model_config import ModelConfig, padded_vocab_size
from mgrow.core.parameters import LAYER, MLP, layer_index


@dataclass(frozen=True)
class TensorLayout:
    pattern: str
    partition_dim: Optional[int]  # None: replicated on every TP rank
    stride: int = 1  # 2 for the gated fc1: each rank holds [gate_r; up_r]
    role: str = ""  # what the tensor is, for humans and error messages
    vocab_parallel: bool = False  # rows are the vocabulary, padded as Megatron-LM pads it
    # (vocab_size, make_vocab_size_divisible_by) of a vocab-parallel tensor of one model (set by layout_of):
    # full tensors have vocab_size rows; the shards split them padded with zero rows (padded_vocab_size)
    vocab: Optional[tuple[int, int]] = None


TABLE = (
    TensorLayout(r"embedding\.word_embeddings\.weight", 0, role="vocab-parallel embedding [V, h]",
                 vocab_parallel=True),
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
    TensorLayout(r"output_layer\.weight", 0, role="vocab-parallel output layer [V, h]", vocab_parallel=True),
)
_COMPILED = tuple((re.compile(row.pattern + "$"), row) for row in TABLE)
_GATED_FC1 = re.compile(LAYER + MLP + r"linear_fc1\.(weight|bias)$")


def layout_of(name: str, cfg: ModelConfig) -> TensorLayout:
    """The layout of global parameter ``name`` of model ``cfg``."""
    for regex, row in _COMPILED:
        if regex.match(name):
            if cfg.gated_linear_unit and _GATED_FC1.match(name):
                return dataclasses.replace(row, stride=2)
            if row.vocab_parallel:
                return dataclasses.replace(row, vocab=(cfg.vocab_size, cfg.make_vocab_size_divisible_by))
            return row
    raise KeyError(f"no megatron layout for parameter {name!r}")


def tp_chunks(full: torch.Tensor, layout: TensorLayout, tp: int) -> list[torch.Tensor]:
    """The TP shards of a full tensor, rank by rank (megatron's CPU init split; a vocabulary padded first)."""
    if layout.partition_dim is None:
        return [full] * tp
    if layout.vocab is not None:
        vocab, divisible_by = layout.vocab
        if full.shape[0] != vocab:
            raise ValueError(f"{layout.role}: {full.shape[0]} rows, the vocabulary has {vocab}")
        padding = padded_vocab_size(vocab, divisible_by, tp) - vocab
        full = torch.cat([full, full.new_zeros((padding, *full.shape[1:]))]) if padding else full
    pieces = torch.chunk(full, tp * layout.stride, dim=layout.partition_dim)
    return [torch.cat(pieces[r :: tp], dim=layout.partition_dim) for r in range(tp)]


def shard_indices(length: int, layout: TensorLayout, rank: int, tp: int) -> torch.Tensor:
    """TP rank ``rank``'s indices of a full axis of ``length`` along the partition dim, as :func:`tp_chunks`
    splits it (int64 on the CPU; -1 for a padded vocabulary's padding rows)."""
    index = torch.arange(length, dtype=torch.int64, device="cpu")
    if layout.vocab is not None:
        vocab, divisible_by = layout.vocab
        index = torch.cat([index, torch.full((padded_vocab_size(vocab, divisible_by, tp) - length,), -1, device="cpu")])
    pieces = torch.chunk(index, tp * layout.stride)
    return torch.cat(pieces[rank :: tp])


def tp_shard(full: torch.Tensor, layout: TensorLayout, rank: int, tp: int) -> torch.Tensor:
    return tp_chunks(full, layout, tp)[rank].contiguous()


def tp_merge(shards: list[torch.Tensor], layout: TensorLayout) -> torch.Tensor:
    """Inverse of :func:`tp_chunks` (a vocabulary's padding rows dropped)."""
    if layout.partition_dim is None:
        return shards[0]
    dim, stride = layout.partition_dim, layout.stride
    per_rank = [torch.chunk(s, stride, dim=dim) for s in shards]
    full = torch.cat([per_rank[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)
    return full if layout.vocab is None else full[: layout.vocab[0]]


def full_shape(local_shape, layout: TensorLayout, tp: int) -> tuple[int, ...]:
    """The full (global, unpadded) shape of a TP shard of ``local_shape``."""
    shape = list(local_shape)
    if layout.partition_dim is not None:
        shape[layout.partition_dim] *= tp
    if layout.vocab is not None:
        shape[0] = layout.vocab[0]
    return tuple(shape)


def real_vocab_rows(layout: TensorLayout, tp_rank: int, tp: int) -> int:
    """How many rows of TP rank ``tp_rank``'s shard of a vocab-parallel tensor are real vocabulary (the
    padding is at the end, so they come first)."""
    vocab, divisible_by = layout.vocab
    per_rank = padded_vocab_size(vocab, divisible_by, tp) // tp
    return max(0, min(per_rank, vocab - tp_rank * per_rank))


def stages_of(name: str, cfg: ModelConfig, pp: int) -> tuple[int, ...]:
    """The pipeline stages holding global parameter ``name``: a layer's stage follows the model's split
    (:meth:`ModelConfig.stage_split`, even or uneven).

    With tied embeddings and pp > 1 the last stage keeps its own copy of the word
    embedding as its output layer (megatron-core ``LanguageModule``).
    """
    index = layer_index(name)
    if index is not None:
        return (cfg.stage_split(pp).stage_of(index),)
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
