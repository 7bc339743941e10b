"""The global parameters of a GPT as megatron-core names them, and their full (unsharded) shapes.

*Global* names: ``decoder.layers.{i}`` uses the 0-based layer index across all
pipeline stages (megatron's own module names count from 0 on every stage). The
tied output layer is the word embedding: there is no ``output_layer.weight``.
How each tensor is split over TP ranks and PP stages is in
:mod:`mgrow.parallel.layout`.
"""

from __future__ import annotations

import re
from typing import Optional

from mgrow.core.model_config import ModelConfig

LAYER = r"decoder\.layers\.\d+\."
# A dense MLP, or one expert of an MoE layer (expert parallel 1: local expert j is global expert j).
MLP = r"mlp\.(experts\.local_experts\.\d+\.)?"
_LAYER_INDEX = re.compile(r"^decoder\.layers\.(\d+)\.")


def layer_index(name: str) -> Optional[int]:
    match = _LAYER_INDEX.match(name)
    return int(match.group(1)) if match else None


def renumber(name: str, new_index: int) -> str:
    return _LAYER_INDEX.sub(f"decoder.layers.{new_index}.", name, count=1)


def is_norm_gain(name: str) -> bool:
    return name.endswith("layernorm.weight")


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every global parameter of a GPTModel built from ``cfg`` and its full (unsharded) shape, in this order:
    embeddings, each layer's tensors, final norm, output layer (tests/test_layouts.py checks it against a
    built model)."""
    h, V, k, p = cfg.hidden_size, cfg.vocab_size, cfg.kv_channels, cfg.ffn_hidden_size
    E, G = cfg.num_attention_heads, cfg.num_query_groups
    norm = ("weight", "bias") if cfg.normalization == "LayerNorm" else ("weight",)
    linear = ("weight", "bias") if cfg.add_bias_linear else ("weight",)
    fc1_rows = 2 * p if cfg.gated_linear_unit else p
    per_layer: dict[str, tuple[int, ...]] = {f"input_layernorm.{n}": (h,) for n in norm}
    qkv = ("weight", "bias") if cfg.add_bias_linear or cfg.add_qkv_bias else ("weight",)
    for part, rows, cols in (("linear_qkv", (E + 2 * G) * k, h), ("linear_proj", h, E * k)):
        for n in (qkv if part == "linear_qkv" else linear):
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
