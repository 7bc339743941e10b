"""Function preservation of the reference growth operators, through real megatron-core GPTModel forwards.

Random model shapes and random plans of 1-5 operators (hypothesis), plus one
fixed case per operator option so every option is covered on every run.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from conftest import one_rank
from mgrow.engine.model import build_gpt, gather_full_tensors
from mgrow.core.model_config import ModelConfig
from mgrow.ops import Kind, carry
from mgrow.core.plan import OPERATORS, load_plan
from mgrow.ops.plan import apply_plan
from mgrow.testing.harness import random_state, random_tokens, reference_logits as logits

TOL = 1e-5
REFILL_STD = 1.0  # 50x the plans' init std of 0.02


@st.composite
def model_configs(draw):
    groups, per_group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    normalization = draw(st.sampled_from(["LayerNorm", "RMSNorm"]))
    qk_layernorm = draw(st.booleans())
    # A LayerNorm over 2 dims outputs +-gain: so ill-conditioned that fp32 rounding alone moves the logits.
    kv_channels = draw(st.sampled_from([4, 6, 8] if qk_layernorm and normalization == "LayerNorm" else [2, 4, 6, 8]))
    rope = draw(st.booleans())
    half_rotary = rope and kv_channels % 4 == 0 and draw(st.booleans())
    return ModelConfig(
        num_layers=draw(st.integers(1, 3)),
        hidden_size=draw(st.integers(8, 48)),
        num_attention_heads=groups * per_group,
        num_query_groups=groups,
        kv_channels=kv_channels,
        ffn_hidden_size=draw(st.integers(4, 64)),
        vocab_size=draw(st.integers(32, 64)),
        max_sequence_length=8,
        normalization=normalization,
        layernorm_epsilon=draw(st.sampled_from([1e-5, 0.05])),  # a large eps makes a wrong eps rule visible
        activation=draw(st.sampled_from(["gelu", "swiglu"])),
        position_embedding_type="rope" if rope else "learned_absolute",
        rotary_percent=0.5 if half_rotary else 1.0,
        share_embeddings_and_output_weights=draw(st.booleans()),
        add_bias_linear=draw(st.booleans()),
        qk_layernorm=qk_layernorm,
        softmax_scale=draw(st.sampled_from([None, None, 0.3])),
        apply_query_key_layer_scaling=draw(st.booleans()),
    )


def _draw_op(draw, cfg: ModelConfig) -> dict:
    name = draw(st.sampled_from(sorted(OPERATORS)))
    if name == "mlp":
        return {"mlp": {"ffn_hidden_size": cfg.ffn_hidden_size + draw(st.integers(0, 24))}}
    if name == "heads":
        G, n = cfg.num_query_groups, cfg.heads_per_group
        G2 = G + draw(st.integers(0, 2))
        n2 = n + draw(st.integers(0 if G2 > G else 1, 1))
        args = {"num_attention_heads": G2 * n2}
        default_groups = G2 * n2 if G == cfg.num_attention_heads else G
        if G2 != default_groups or draw(st.booleans()):
            args["num_query_groups"] = G2
        return {"heads": args}
    if name == "head_dim":
        return {"head_dim": {"kv_channels": cfg.kv_channels + draw(st.integers(0, 5))}}
    if name == "hidden":
        h = cfg.hidden_size
        pad = "mean" if cfg.normalization == "LayerNorm" else "zero"
        method = draw(st.sampled_from(["auto", pad, "replicate"]))
        if method == "replicate":
            return {"hidden": {"hidden_size": h * draw(st.integers(1, 2 if h > 40 else 3)), "method": method}}
        return {"hidden": {"hidden_size": h + draw(st.integers(0, 20)), "method": method}}
    N = cfg.num_layers
    args = {"insert_before": draw(st.lists(st.integers(0, N), max_size=2))}
    if not args["insert_before"] or draw(st.booleans()):
        args["num_layers"] = N + len(args["insert_before"]) + draw(st.integers(0 if args["insert_before"] else 1, 1))
    return {"layers": args}


@st.composite
def grown_models(draw):
    """(model config, plan dict): 1-5 operators, each target drawn for the model as grown so far."""
    cfg = draw(model_configs())
    current, ops = cfg, []
    for _ in range(draw(st.integers(1, 5))):
        op = _draw_op(draw, current)
        ops.append(op)
        current = load_plan({"ops": [op]}).validate(current)[-1]
    return cfg, {"ops": ops, "init": {"std": 0.02, "seed": draw(st.integers(0, 2**16))}}


def check_growth(cfg: ModelConfig, plan: dict, seed: int = 0):
    """Every property a growth must have; returns the logit differences after growth and after the refill."""
    state = random_state(cfg, seed, one_rank())
    tokens = random_tokens(cfg, seed, batch=2, seq=8)
    before = logits(cfg, state, tokens, one_rank())
    result = apply_plan(state, cfg, plan)

    after = logits(result.cfg, result.state, tokens, one_rank())
    diff = float((after - before).abs().max())
    assert diff <= TOL, f"logits moved by {diff} (max |logit| {float(before.abs().max()):.3g})"

    built = gather_full_tensors(build_gpt(result.cfg, one_rank(), seed=1), result.cfg, one_rank())
    assert {n: tuple(t.shape) for n, t in built.items()} == {n: tuple(t.shape) for n, t in result.state.items()}

    for name, tmap in result.maps.items():
        grown = result.state[name]
        assert tmap.shape == tuple(grown.shape), name
        new = tmap.new_mask()
        assert torch.equal(new, tmap.kind != Kind.OLD), f"{name}: kinds disagree with the axis maps"
        if tmap.old_name is not None:
            expected = carry(tmap, state[tmap.old_name])
            torch.testing.assert_close(grown[~new], expected[~new], rtol=1e-6, atol=1e-7, msg=name)
        assert torch.count_nonzero(grown[tmap.mask(Kind.ZERO)]) == 0, f"{name}: a must-be-zero entry is not 0"

    generator = torch.Generator().manual_seed(seed + 7)
    refilled = {}
    for name, tensor in result.state.items():
        free = result.maps[name].mask(Kind.FREE)
        refilled[name] = tensor.clone()
        refilled[name][free] = torch.randn(int(free.sum()), generator=generator) * REFILL_STD
    refill_diff = float((logits(result.cfg, refilled, tokens, one_rank()) - before).abs().max())
    assert refill_diff <= TOL, f"refilling the free entries moved the logits by {refill_diff}"
    return diff, refill_diff


# derandomize: the suite tests the same 80 cases on every run. The fp32 noise floor of these random models
# (a function-preserving permutation of the hidden dims alone) is 2-4e-6, so a fresh random draw on every
# CI run would, rarely, land near the 1e-5 tolerance; thousands of random draws were run when this was written.
@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(grown_models())
def test_random_plans_preserve_logits(single_rank, case):
    cfg, plan = case
    note(f"model {cfg}\nplan {plan}")
    check_growth(cfg, plan)


BASE = dict(num_layers=2, hidden_size=24, num_attention_heads=4, kv_channels=8, ffn_hidden_size=32,
            vocab_size=48, max_sequence_length=8, layernorm_epsilon=0.05)
MODELS = {
    "ln-gelu-mha-learned-untied-bias": dict(),
    "rms-swiglu-gqa-rope-tied-nobias": dict(normalization="RMSNorm", activation="swiglu", num_query_groups=2,
                                            position_embedding_type="rope", share_embeddings_and_output_weights=True,
                                            add_bias_linear=False),
    "ln-qknorm-gqa-halfrope-tied": dict(qk_layernorm=True, num_query_groups=2, position_embedding_type="rope",
                                        rotary_percent=0.5, share_embeddings_and_output_weights=True),
    "rms-qknorm-mha-learned-layerscaling": dict(normalization="RMSNorm", qk_layernorm=True,
                                                apply_query_key_layer_scaling=True),
    "ln-swiglu-softmax-scale": dict(activation="swiglu", softmax_scale=0.3, qk_layernorm=True),
}
OPS = {  # model -> op
    "mlp": lambda cfg: {"mlp": {"ffn_hidden_size": 56}},
    "heads-per-group": lambda cfg: {"heads": {"num_attention_heads": 2 * cfg.num_attention_heads,
                                              "num_query_groups": cfg.num_query_groups}},
    "heads-new-groups": lambda cfg: {"heads": {"num_attention_heads": 3 * cfg.num_attention_heads,
                                               "num_query_groups": 3 * cfg.num_query_groups}},
    "head_dim": lambda cfg: {"head_dim": {"kv_channels": 12}},
    "hidden-auto": lambda cfg: {"hidden": {"hidden_size": 40}},
    "hidden-replicate": lambda cfg: {"hidden": {"hidden_size": 48, "method": "replicate"}},
    "layers": lambda cfg: {"layers": {"insert_before": [0, 2], "num_layers": 5}},
}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_each_operator_on_each_model_kind(single_rank, model, op):
    cfg = ModelConfig(**{**BASE, **MODELS[model]})
    check_growth(cfg, {"ops": [OPS[op](cfg)], "init": {"std": 0.02, "seed": 3}})
