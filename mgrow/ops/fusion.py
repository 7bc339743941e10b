"""Deep Fusion (Mazzawi et al. 2024) on full megatron-core GPT state dicts: two models of one config -> one wider model.

Notation of docs/growth_math.md: A and B have hidden h, E query heads in G groups
of head dim k, MLP width p, N layers, vocab V. The fused model F has hidden
2h, 2E heads in 2G groups of the same head dim k, MLP width 2p, N layers.
Its residual stream is the concatenation x_F = [x_A; x_B]:

* writers (word and learned position embeddings, ``linear_proj``, ``linear_fc2``):
  embeddings [V, 2h] = [E_A | E_B]; ``linear_proj`` = blockdiag(P_A, P_B),
  ``linear_fc2`` = blockdiag(W2_A, W2_B); their biases [b_A; b_B];
* readers (``linear_qkv``, ``linear_fc1``): blockdiag, so A's heads and MLP units
  read only x_A's coordinates. QKV is interleaved by query group, so F's
  2G groups are A's G groups followed by B's: rows [rows_A; rows_B]. A gated
  fc1 is [gate; up]: each half is blockdiag on its own,
  [gate_A 0; 0 gate_B; up_A 0; 0 up_B];
* norms over the residual (input, pre-MLP, final): gains and biases [g_A; g_B];
* output layer [V, 2h] = [W_A / 2 | W_B / 2]: logits (z_A + z_B) / 2, the
  ensemble average. With tied embeddings the embedding must stay [E_A | E_B]
  (it is a writer), so the final norm's gain and bias are halved instead:
  its output is [n_A; n_B] / 2 and [E_A | E_B] times it is (z_A + z_B) / 2;
* qk norms act per head over k and are one [k] tensor shared by every head of a
  layer: F takes the mean of A's and B's (the only approximation besides the
  residual norms; none when A = B);
* head dim, softmax scale (1/sqrt(k), or the config's explicit
  ``softmax_scale``), RoPE dims, layer numbers and norm epsilon are unchanged.

Why F(A, A) = A exactly. With x_F = [x; x], a norm over 2h sees
mean([x; x]) = mean(x), and the population variance (and mean square) of
[x; x] equals that of x, so LayerNorm / RMSNorm give [n(x); n(x)] with the
*same* epsilon (unlike mean padding, which changes the variance by h/h' and
needs eps' = eps h/h'). Each head of copy A reads copy A's n(x) through the
same Q, K, V rows as A's head, with the same k and scale, so it outputs the
same o; blockdiag(P, P) [o; o] = [P o; P o] writes each copy exactly what A
writes, and the same holds for the MLP. No halving of W_O / fc2 is needed:
a duplicated head writes only into its own copy of the residual. (The dense
replication of docs/growth_math.md, section 5, makes every head read both copies and
halves the readers instead; block-diagonal weights keep A and B apart, which
is what makes F(A, B) an ensemble.) The output layer [W/2 | W/2] [n; n] = W n.

Why F(A, B) is only approximate. The norms are one norm over 2h: for LayerNorm
mean_F = (mu_A + mu_B) / 2 and var_F = (var_A + var_B) / 2 + ((mu_A - mu_B) / 2)^2,
so block A is normalised by F's statistics instead of A's own; the error
grows with how differently A and B scale their residual streams. The
fusion job measures and reports max |z_F - (z_A + z_B) / 2|.

Adam moments follow the weights (:func:`fuse_moment`): copied into their block,
zero off the diagonal blocks, and m / v times 2 / 4 where the weight was
halved; qk-norm moments are averaged like the gains.
"""

from __future__ import annotations

import torch

from mgrow.core.model_config import ModelConfig
from mgrow.core.plan import fused_config
from mgrow.ops.index_map import gradient_factor, moment_factor

_RESIDUAL_NORMS = ("input_layernorm.", "pre_mlp_layernorm.", "final_layernorm.")


def fuse_tensor(name: str, a: torch.Tensor, b: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """F's full tensor ``name`` (a global megatron name) from A's and B's (``cfg``: A's = B's config)."""
    return _structure(name, a, b, cfg) * _scale(name, cfg)


def fuse_moment(name: str, a: torch.Tensor, b: torch.Tensor, cfg: ModelConfig, power: int) -> torch.Tensor:
    """F's Adam moment (``power`` 1: exp_avg, 2: exp_avg_sq) of ``name``: the weight's structure, with the
    growth operators' moment rule for a weight scaled by c (:func:`mgrow.ops.index_map.gradient_factor`)."""
    return _structure(name, a, b, cfg) * moment_factor(gradient_factor(_scale(name, cfg)), power)


def _scale(name: str, cfg: ModelConfig) -> float:
    """1/2 where F averages the two models' logits, else 1."""
    if name == "output_layer.weight":
        return 0.5
    if name.startswith("decoder.final_layernorm.") and cfg.share_embeddings_and_output_weights:
        return 0.5
    return 1.0


def _structure(name: str, a: torch.Tensor, b: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    if name in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight", "output_layer.weight"):
        return torch.cat([a, b], dim=1)
    if ".q_layernorm." in name or ".k_layernorm." in name:
        return (a + b) / 2
    if any(norm in name for norm in _RESIDUAL_NORMS):
        return torch.cat([a, b])
    if name.endswith(("linear_proj.bias", "linear_fc2.bias", "linear_qkv.bias")):
        return torch.cat([a, b])
    if name.endswith("linear_fc1.bias"):
        if cfg.gated_linear_unit:
            (gate_a, up_a), (gate_b, up_b) = a.chunk(2), b.chunk(2)
            return torch.cat([gate_a, gate_b, up_a, up_b])
        return torch.cat([a, b])
    if name.endswith("linear_fc1.weight") and cfg.gated_linear_unit:
        (gate_a, up_a), (gate_b, up_b) = a.chunk(2), b.chunk(2)
        return torch.cat([torch.block_diag(gate_a, gate_b), torch.block_diag(up_a, up_b)])
    if name.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")):
        return torch.block_diag(a, b)
    raise KeyError(f"no fusion rule for parameter {name!r}")


def fuse_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], cfg: ModelConfig):
    """(F's full state dict, F's config) from A's and B's full state dicts of one ``cfg``."""
    fused = fused_config(cfg, cfg)
    if a.keys() != b.keys():
        raise ValueError("the two state dicts hold different parameters")
    return {name: fuse_tensor(name, a[name], b[name], cfg) for name in a}, fused
