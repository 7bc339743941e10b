"""Cross-architecture transfer (XATL, Choi 2024): which tensors of a trained GPT fill which of another GPT.

Pure functions on full (unsharded) tensors and ModelConfigs; no framework, no
process group. A *component* is a set of tensors two architectures share:

* ``embeddings``: word (and learned position) embeddings;
* ``norms``: every LayerNorm/RMSNorm gain and bias (pre-attention, pre-MLP,
  qk-norm, final);
* ``mlp``: the MLP's fc1/fc2. Into an MoE target every expert gets a copy of
  the dense MLP (upcycling); the router keeps its random initialisation;
* ``output_layer``: the output projection;
* ``attention``: the QKV projection. Query heads are copied; when the target
  has fewer query groups (GQA), each of its K and V heads is the mean of the
  source's K (V) heads it replaces. Not exact: measure the logit deviation;
* ``attention_output``: ``linear_proj`` (W_O), copied (head order is kept).

With every component transferred, an MoE target with normalised top-k
routing (``ModelConfig.normalised_routing``) computes the source's function:
sum_k p_k MLP(x) = MLP(x) when the p_k sum to 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from mgrow.core.errors import ConfigError
from mgrow.core.model_config import ModelConfig

if TYPE_CHECKING:  # the config parser imports this module before torch is loaded
    import torch

COMPONENTS = ("embeddings", "norms", "mlp", "output_layer", "attention", "attention_output")
DEFAULT_COMPONENTS = ("embeddings", "norms", "mlp", "output_layer")

_LAYER = r"decoder\.layers\.(\d+)\."
_PATTERNS = {
    "embeddings": re.compile(r"embedding\.(word|position)_embeddings\.weight$"),
    "norms": re.compile(r"(" + _LAYER + r"(input_layernorm|pre_mlp_layernorm|self_attention\.[qk]_layernorm)"
                        r"|decoder\.final_layernorm)\.(weight|bias)$"),
    "mlp": re.compile(_LAYER + r"mlp\.(experts\.local_experts\.\d+\.)?(linear_fc[12]\.(weight|bias))$"),
    "output_layer": re.compile(r"output_layer\.weight$"),
    "attention": re.compile(_LAYER + r"self_attention\.linear_qkv\.(weight|bias)$"),
    "attention_output": re.compile(_LAYER + r"self_attention\.linear_proj\.(weight|bias)$"),
}


@dataclass(frozen=True)
class Rule:
    """Target tensor = ``op`` applied to source tensor ``source``."""

    component: str
    source: str
    op: str  # "copy" | "pool_kv"


def rule_for(target_name: str, components: tuple[str, ...], source: ModelConfig,
             target: ModelConfig) -> Optional[Rule]:
    """How target tensor ``target_name`` is filled, or None: it keeps its own initialisation."""
    for component in components:
        match = _PATTERNS[component].match(target_name)
        if match is None:
            continue
        if component == "mlp":  # every expert of layer i reads layer i's dense MLP
            return Rule(component, f"decoder.layers.{match.group(1)}.mlp.{match.group(3)}", "copy")
        if component == "attention" and target.num_query_groups != source.num_query_groups:
            return Rule(component, target_name, "pool_kv")
        return Rule(component, target_name, "copy")
    return None


def apply_rule(rule: Rule, full_source: torch.Tensor, source: ModelConfig, target: ModelConfig) -> torch.Tensor:
    """The full target tensor made from the full source tensor ``full_source``."""
    if rule.op == "copy":
        return full_source.clone()
    return pool_kv(full_source, source.num_query_groups, target.num_query_groups, source.heads_per_group,
                   source.kv_channels)


def pool_kv(qkv: torch.Tensor, groups: int, new_groups: int, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """megatron's interleaved QKV rows ``[G, (r Q heads, K, V), k, ...]`` with ``new_groups`` groups:

    target group g takes the query heads of source groups g*m .. g*m+m-1 (m = G / new_groups) in order,
    and K, V = the mean of those groups' K, V heads. Works for the weight [rows, h] and the bias [rows].
    """
    import torch

    merge = groups // new_groups
    rest = qkv.shape[1:]
    blocks = qkv.reshape(groups, heads_per_group + 2, head_dim, *rest)
    queries = blocks[:, :heads_per_group].reshape(new_groups, merge * heads_per_group, head_dim, *rest)
    keys = blocks[:, heads_per_group].reshape(new_groups, merge, head_dim, *rest).mean(dim=1, keepdim=True)
    values = blocks[:, heads_per_group + 1].reshape(new_groups, merge, head_dim, *rest).mean(dim=1, keepdim=True)
    return torch.cat([queries, keys, values], dim=1).reshape(-1, *rest)


# ---------------------------------------------------------------------------- compatibility


def _same(field: str, source: ModelConfig, target: ModelConfig, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(source, key) != getattr(target, key):
            raise ConfigError(field, f"the checkpoint's model has {key} = {getattr(source, key)!r}, "
                                     f"the model being trained {getattr(target, key)!r}: they must agree")


_NEEDS: dict[str, Callable[[str, ModelConfig, ModelConfig], None]] = {
    "embeddings": lambda f, s, t: _same(f, s, t, ("hidden_size", "vocab_size", "position_embedding_type",
                                                  "max_sequence_length", "share_embeddings_and_output_weights")),
    "norms": lambda f, s, t: _same(f, s, t, ("num_layers", "hidden_size", "normalization", "qk_layernorm",
                                             "kv_channels")),
    "mlp": lambda f, s, t: _same(f, s, t, ("num_layers", "hidden_size", "ffn_hidden_size", "gated_linear_unit",
                                           "add_bias_linear")),
    "output_layer": lambda f, s, t: _same(f, s, t, ("hidden_size", "vocab_size",
                                                    "share_embeddings_and_output_weights")),
    "attention": lambda f, s, t: _same(f, s, t, ("num_layers", "hidden_size", "num_attention_heads", "kv_channels",
                                                 "add_bias_linear")),
    "attention_output": lambda f, s, t: _same(f, s, t, ("num_layers", "hidden_size", "num_attention_heads",
                                                        "kv_channels", "add_bias_linear")),
}


def check_transfer(source: ModelConfig, target: ModelConfig, components: tuple[str, ...],
                   field: str = "transfer.components") -> None:
    """Refuse components the two models cannot share (ConfigError naming ``field[i]``)."""
    if source.is_moe:
        raise ConfigError("transfer.from", f"the checkpoint holds an MoE model ({source.num_moe_experts} experts); "
                                           "transfer reads a dense GPT")
    for index, component in enumerate(components):
        _NEEDS[component](f"{field}[{index}]", source, target)
        if component == "attention" and source.num_query_groups % target.num_query_groups:
            raise ConfigError(f"{field}[{index}]", f"the model's num_query_groups ({target.num_query_groups}) must "
                                                   f"divide the checkpoint's ({source.num_query_groups}): each "
                                                   "K/V head is the mean of whole source groups")
