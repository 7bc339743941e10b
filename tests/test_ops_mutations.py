"""The preservation check catches wrong rules: each test breaks one rule on purpose.

Every test first shows the correct operator passes (logit diff <= 1e-5) and then
that the broken variant moves the logits by far more (>= 1e-3).
"""

import pytest
import torch

from conftest import one_rank
from mgrow.core.model_config import ModelConfig
from mgrow.ops import AxisMap, FreeValues, Kind, TensorMap, carry, grow_head_dim, grow_heads, grow_hidden
from mgrow.ops import grow_layers, grow_mlp
from mgrow.core.plan import hidden_target
from mgrow.ops import hidden as hidden_op
from mgrow.testing.harness import random_state, random_tokens, reference_logits as logits

TOL, BROKEN = 1e-5, 1e-3
RNG = FreeValues(std=0.02, seed=11)
BASE = dict(num_layers=2, hidden_size=24, num_attention_heads=4, num_query_groups=2, kv_channels=8,
            ffn_hidden_size=32, vocab_size=48, max_sequence_length=8, layernorm_epsilon=0.05)


def setup(**model):
    cfg = ModelConfig(**{**BASE, **model})
    state = random_state(cfg, 2, one_rank())
    tokens = random_tokens(cfg, 2, batch=2, seq=8)
    return cfg, state, tokens, logits(cfg, state, tokens, one_rank())


def diff(cfg, state, tokens, before) -> float:
    return float((logits(cfg, state, tokens, one_rank()) - before).abs().max())


def unscaled(result, old_state, suffixes) -> dict:
    """The grown state with the old entries of the named tensors copied without their scale."""
    state = dict(result.state)
    for name, tmap in result.maps.items():
        if name.endswith(suffixes):
            plain = TensorMap(tmap.old_name, tuple(AxisMap(a.src, torch.ones_like(a.scale), a.grad_scale)
                                                  for a in tmap.axes), tmap.kind)
            kept = ~tmap.new_mask()
            state[name] = result.state[name].clone()
            state[name][kept] = carry(plain, old_state[tmap.old_name])[kept]
    return state


def test_skipping_the_k_rescale_is_caught(single_rank):
    cfg, state, tokens, before = setup()
    result = grow_head_dim(state, cfg, 16, rng=RNG)
    assert diff(result.cfg, result.state, tokens, before) <= TOL
    broken = unscaled(result, state, ("linear_qkv.weight", "linear_qkv.bias"))
    assert diff(result.cfg, broken, tokens, before) >= BROKEN


def test_zero_padding_a_layernorm_model_is_caught(single_rank):
    cfg, state, tokens, before = setup(normalization="LayerNorm")
    grown_cfg = hidden_target(cfg, 40, "mean")
    right = hidden_op._pad(state, cfg, grown_cfg, Kind.MEAN, RNG)
    assert diff(right.cfg, right.state, tokens, before) <= TOL
    wrong = hidden_op._pad(state, cfg, grown_cfg, Kind.ZERO, RNG)
    assert diff(wrong.cfg, wrong.state, tokens, before) >= BROKEN


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_skipping_the_epsilon_rescale_is_caught(single_rank, normalization):
    cfg, state, tokens, before = setup(normalization=normalization)
    result = grow_hidden(state, cfg, 40, rng=RNG)
    assert diff(result.cfg, result.state, tokens, before) <= TOL
    same_eps = result.cfg.replace(layernorm_epsilon=cfg.layernorm_epsilon)
    assert diff(same_eps, result.state, tokens, before) >= BROKEN


def test_skipping_the_norm_gain_rescale_is_caught(single_rank):
    cfg, state, tokens, before = setup(normalization="RMSNorm")
    result = grow_hidden(state, cfg, 40, rng=RNG)
    broken = unscaled(result, state, ("layernorm.weight",))
    assert diff(result.cfg, broken, tokens, before) >= BROKEN


def test_hidden_growth_without_the_qk_norm_compensation_is_caught(single_rank):
    """eps * h/h' reaches the qk norms too; the Q and K rows' sqrt(h/h') is what keeps them exact."""
    cfg, state, tokens, before = setup(qk_layernorm=True)
    result = grow_hidden(state, cfg, 40, rng=RNG)
    assert diff(result.cfg, result.state, tokens, before) <= TOL
    broken = unscaled(result, state, ("linear_qkv.weight", "linear_qkv.bias"))
    assert diff(result.cfg, broken, tokens, before) >= BROKEN


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_the_literal_qk_norm_eps_rule_would_break_the_hidden_norms(single_rank, normalization):
    """The literal eps' = eps*k/k' for the qk norms, in megatron's one shared epsilon, is not exact;
    keeping eps and scaling the Q and K rows by sqrt(k'/k) is."""
    cfg, state, tokens, before = setup(qk_layernorm=True, normalization=normalization)
    result = grow_head_dim(state, cfg, 16, rng=RNG)
    assert diff(result.cfg, result.state, tokens, before) <= TOL
    literal = unscaled(result, state, ("linear_qkv.weight", "linear_qkv.bias"))
    literal_cfg = result.cfg.replace(layernorm_epsilon=cfg.layernorm_epsilon * 8 / 16)
    assert diff(literal_cfg, literal, tokens, before) >= BROKEN


def test_rotating_the_new_head_dims_is_caught(single_rank):
    cfg, state, tokens, before = setup(position_embedding_type="rope")
    result = grow_head_dim(state, cfg, 16, rng=RNG)
    assert diff(result.cfg, result.state, tokens, before) <= TOL
    rotate_all = result.cfg.replace(rotary_percent=1.0)
    assert diff(rotate_all, result.state, tokens, before) >= BROKEN


def test_replicating_without_dividing_the_tied_final_norm_is_caught(single_rank):
    cfg, state, tokens, before = setup(share_embeddings_and_output_weights=True)
    result = grow_hidden(state, cfg, 48, "replicate", rng=RNG)
    assert diff(result.cfg, result.state, tokens, before) <= TOL
    broken = unscaled(result, state, ("final_layernorm.weight", "final_layernorm.bias"))
    assert diff(result.cfg, broken, tokens, before) >= BROKEN


ZERO_RULES = {
    "mlp fc2 columns": ({}, lambda s, c: grow_mlp(s, c, 48, rng=RNG)),
    "new heads' linear_proj columns": ({}, lambda s, c: grow_heads(s, c, 8, rng=RNG)),
    "new K rows": ({}, lambda s, c: grow_head_dim(s, c, 12, rng=RNG)),
    "new LayerNorm bias entries": ({"add_bias_linear": False}, lambda s, c: grow_hidden(s, c, 40, rng=RNG)),
    "RMSNorm writers' new rows": ({"normalization": "RMSNorm"}, lambda s, c: grow_hidden(s, c, 40, rng=RNG)),
    "new layer's linear_proj and fc2": ({}, lambda s, c: grow_layers(s, c, [1], rng=RNG)),
}


@pytest.mark.parametrize("rule", sorted(ZERO_RULES))
def test_leaving_a_must_be_zero_block_random_is_caught(single_rank, rule):
    model, grow = ZERO_RULES[rule]
    cfg, state, tokens, before = setup(**model)
    result = grow(state, cfg)
    assert diff(result.cfg, result.state, tokens, before) <= TOL
    generator = torch.Generator().manual_seed(0)
    broken, zeros = {}, 0
    for name, tensor in result.state.items():
        zero = result.maps[name].mask(Kind.ZERO)
        broken[name] = tensor.clone()
        broken[name][zero] = 0.2 * torch.randn(int(zero.sum()), generator=generator)
        zeros += int(zero.sum())
    assert zeros > 0
    assert diff(result.cfg, broken, tokens, before) >= BROKEN
