"""Hidden width h -> h' (docs/growth_math.md, section 5).

Writers of the residual stream (embeddings, linear_proj, linear_fc2 and their
biases) get new rows (embeddings: columns); readers (linear_qkv, linear_fc1,
the untied output layer) read it through a norm and get free new columns.

Padding (``zero`` for RMSNorm, ``mean`` for LayerNorm; ``auto`` picks it):
every new residual coordinate is 0 (RMSNorm) or the mean of the old ones
(LayerNorm: each new writer row is the mean of the old rows, so the invariant
holds after every write). The norms then see mean square / variance times
h/h', which eps' = eps * h/h' and old gains times sqrt(h/h') undo exactly; new
gain entries are free, new norm-bias entries zero, so the norms' new outputs
are 0 and the readers' new columns are free. Zero padding is refused for
LayerNorm (the mean moves) and mean padding for RMSNorm (the mean square moves).
Mean-padded entries are not copies of one old entry: the index map marks them
new (Kind.MEAN), so their optimizer moments start at zero.

qk_layernorm: megatron-core's qk norms share ``layernorm_epsilon``, so they get
eps * c too (c = h/h'). Their inputs (each head's Q and K, k dims unchanged) are
multiplied by sqrt(c) to match: the old Q and K rows of linear_qkv and their
biases are scaled by it, and a norm of sqrt(c)*x with eps*c equals the old norm
of x with eps, exactly.

``replicate`` (h' = m h): x' = [x, ..., x]. Writers' rows, norm gains and biases
are copied, readers' columns copied and divided by m, eps unchanged. With tied
embeddings the embedding is a writer (copied) and, as output layer, a reader:
the final norm's gain and bias are divided by m instead. Gradient factors for
the optimizer state: see :mod:`mgrow.ops.index_map`.
"""

from __future__ import annotations

import math

import torch

from mgrow.core.model_config import ModelConfig
from mgrow.core.plan import hidden_target
from mgrow.ops.common import (
    AxisBuilder,
    AxisRule,
    FreeValues,
    GrowthResult,
    SuffixRules,
    apply_step,
)
from mgrow.ops.index_map import Kind

OP = "hidden"
WRITERS = {  # name suffix -> the hidden axis
    "embedding.word_embeddings.weight": 1,
    "embedding.position_embeddings.weight": 1,
    "self_attention.linear_proj.weight": 0,
    "self_attention.linear_proj.bias": 0,
    "mlp.linear_fc2.weight": 0,
    "mlp.linear_fc2.bias": 0,
}
READERS = ("self_attention.linear_qkv.weight", "mlp.linear_fc1.weight", "output_layer.weight")  # hidden = columns
NORMS = ("input_layernorm", "pre_mlp_layernorm", "final_layernorm")




def grow_hidden(
    state: dict[str, torch.Tensor], cfg: ModelConfig, hidden_size: int, method: str = "auto", *, rng: FreeValues
) -> GrowthResult:
    return apply_step(step(cfg, hidden_size, method), state, rng, OP)


def step(cfg: ModelConfig, hidden_size: int, method: str = "auto") -> SuffixRules:
    grown = hidden_target(cfg, hidden_size, method)
    if method == "replicate":
        return _replicate_rules(cfg, grown)
    return _pad_rules(cfg, grown, Kind.MEAN if cfg.normalization == "LayerNorm" else Kind.ZERO)


def _pad(state, cfg: ModelConfig, grown: ModelConfig, padding: Kind, rng: FreeValues) -> GrowthResult:
    """Pad the residual with ``padding`` (Kind.ZERO or Kind.MEAN); tests break the rule through this."""
    return apply_step(_pad_rules(cfg, grown, padding), state, rng, OP)


def _pad_rules(cfg: ModelConfig, grown: ModelConfig, padding: Kind) -> SuffixRules:
    """Pad the residual with ``padding`` (Kind.ZERO or Kind.MEAN) into ``grown``'s width and epsilon."""
    h, h2 = cfg.hidden_size, grown.hidden_size
    added = h2 - h
    shrink = math.sqrt(h / h2)
    writer = AxisBuilder().old(range(h)).new(added, padding).build(mean_block=h2 if padding == Kind.MEAN else None)
    reader = AxisBuilder().old(range(h)).new(added, Kind.FREE).build()
    gain = AxisBuilder().old(range(h), shrink).new(added, Kind.FREE).build()
    bias = AxisBuilder().old(range(h)).new(added, Kind.ZERO).build()

    rules = {suffix: {axis: writer} for suffix, axis in WRITERS.items()}
    rules.update({suffix: {1: reader} for suffix in READERS})
    for norm in NORMS:
        rules[f"{norm}.weight"] = {0: gain}
        rules[f"{norm}.bias"] = {0: bias}
    if cfg.qk_layernorm:
        qk_rows = _scale_query_key_rows(cfg, shrink)
        rules["self_attention.linear_qkv.weight"] = {0: qk_rows, 1: reader}
        rules["self_attention.linear_qkv.bias"] = {0: qk_rows}
    return SuffixRules(cfg, grown, rules)


def _replicate_rules(cfg: ModelConfig, grown: ModelConfig) -> SuffixRules:
    h, m = cfg.hidden_size, grown.hidden_size // cfg.hidden_size

    def copies(scale: float, grad_scale: float) -> AxisRule:
        return AxisBuilder().old(list(range(h)) * m, scale, grad_scale).build()

    writer, reader = copies(1.0, 1.0 / m), copies(1.0 / m, 1.0)
    rules = {suffix: {axis: writer} for suffix, axis in WRITERS.items()}
    rules.update({suffix: {1: reader} for suffix in READERS})
    for norm in NORMS:
        divided = norm == "final_layernorm" and cfg.share_embeddings_and_output_weights
        rule = copies(1.0 / m, 1.0) if divided else writer
        rules[f"{norm}.weight"] = rules[f"{norm}.bias"] = {0: rule}
    return SuffixRules(cfg, grown, rules)


def _scale_query_key_rows(cfg: ModelConfig, factor: float) -> AxisRule:
    k, rows = cfg.kv_channels, AxisBuilder()
    for group in range(cfg.num_query_groups):
        start = group * (cfg.heads_per_group + 2) * k
        rows.old(range(start, start + (cfg.heads_per_group + 1) * k), factor)  # its Q heads and K
        rows.old(range(start + (cfg.heads_per_group + 1) * k, start + (cfg.heads_per_group + 2) * k))  # V
    return rows.build()
