"""Plan files: schema, validation before anything changes, and errors that name the op and field."""

from pathlib import Path

import pytest
import torch

from mgrow.core.errors import ConfigError
from mgrow.core.model_config import ModelConfig
from mgrow.ops import FreeValues, grow_heads, grow_hidden, grow_layers
from mgrow.core.plan import InitSpec, load_plan
from mgrow.ops.plan import apply_plan

REPO = Path(__file__).resolve().parents[1]
LN = ModelConfig(num_layers=3, hidden_size=24, num_attention_heads=4, num_query_groups=2, kv_channels=8,
                 ffn_hidden_size=32, vocab_size=32, max_sequence_length=8)
RMS = LN.replace(normalization="RMSNorm")
MHA = LN.replace(num_query_groups=4)


def refused(plan: dict, cfg: ModelConfig = LN) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_plan(plan).validate(cfg)
    return caught.value


@pytest.mark.parametrize("op, field, rule", [
    ({"mlp": {"ffn_hidden_size": 16}}, "ops[1].mlp.ffn_hidden_size", "cannot shrink"),
    ({"heads": {"num_attention_heads": 2}}, "ops[1].heads.num_attention_heads", "cannot be removed"),
    ({"heads": {"num_attention_heads": 8, "num_query_groups": 1}}, "ops[1].heads.num_query_groups",
     "cannot be removed"),
    ({"heads": {"num_attention_heads": 9, "num_query_groups": 2}}, "ops[1].heads.num_query_groups", "divisible"),
    ({"heads": {"num_attention_heads": 7}}, "ops[1].heads.num_attention_heads", "divisible"),
    ({"heads": {"num_attention_heads": 6, "num_query_groups": 6}}, "ops[1].heads.num_query_groups", "per group"),
    ({"head_dim": {"kv_channels": 4}}, "ops[1].head_dim.kv_channels", "cannot shrink"),
    ({"head_dim": {"kv_channels": 9.5}}, "ops[1].head_dim.kv_channels", "integer"),
    ({"hidden": {"hidden_size": 16}}, "ops[1].hidden.hidden_size", "cannot shrink"),
    ({"hidden": {"hidden_size": 40, "method": "replicate"}}, "ops[1].hidden.hidden_size", "integer multiple"),
    ({"hidden": {"hidden_size": 48, "method": "zero"}}, "ops[1].hidden.method", "LayerNorm"),
    ({"hidden": {"hidden_size": 48, "method": "copy"}}, "ops[1].hidden.method", "auto | zero | mean | replicate"),
    ({"layers": {"insert_before": [1, 5]}}, "ops[1].layers.insert_before", "entry 1 (5)"),
    ({"layers": {"insert_before": [-1]}}, "ops[1].layers.insert_before", "0..4"),
    ({"layers": {"insert_before": [1], "num_layers": 4}}, "ops[1].layers.num_layers", "must be >= 5"),
    ({"layers": {}}, "ops[1].layers.insert_before", "insert_before"),
])
def test_impossible_targets_name_the_op_and_field(op, field, rule):
    # ops[0] adds a layer, so ops[1] is checked against the grown model (4 layers)
    error = refused({"ops": [{"layers": {"num_layers": 4}}, op]})
    assert error.field == field
    assert rule in error.rule


def test_mean_padding_is_refused_for_rmsnorm():
    error = refused({"ops": [{"hidden": {"hidden_size": 48, "method": "mean"}}]}, RMS)
    assert error.field == "ops[0].hidden.method" and "RMSNorm" in error.rule


@pytest.mark.parametrize("plan, field, rule", [
    ({"ops": [{"widen": {"hidden_size": 32}}]}, "ops[0].widen", "unknown operator"),
    ({"ops": [{"mlp": {"ffn_hidden_size": 64, "ffn": 1}}]}, "ops[0].mlp.ffn", "unknown key"),
    ({"ops": [{"mlp": {}}]}, "ops[0].mlp.ffn_hidden_size", "required"),
    ({"ops": [{"mlp": {"ffn_hidden_size": 64}, "heads": {"num_attention_heads": 8}}]}, "ops[0]", "one operator"),
    ({"ops": []}, "ops", "non-empty"),
    ({"ops": [{"mlp": {"ffn_hidden_size": 64}}], "seed": 3}, "seed", "unknown plan key"),
    ({"ops": [{"mlp": {"ffn_hidden_size": 64}}], "init": {"sd": 0.1}}, "init.sd", "unknown key"),
    ({"ops": [{"mlp": {"ffn_hidden_size": 64}}], "init": {"std": -1}}, "init.std", "> 0"),
    ({"ops": [{"mlp": {"ffn_hidden_size": 64}}], "init": {"seed": "x"}}, "init.seed", "integer"),
])
def test_schema_errors_name_the_field(plan, field, rule):
    with pytest.raises(ConfigError) as caught:
        load_plan(plan)
    assert caught.value.field == field
    assert rule in caught.value.rule


def test_a_bad_op_late_in_the_plan_is_refused_before_any_tensor_changes(monkeypatch):
    state = {"w": torch.ones(2)}  # never reached: validation comes first
    calls = []
    monkeypatch.setattr("mgrow.ops.plan.check_state", lambda *args: calls.append(args))
    plan = {"ops": [{"mlp": {"ffn_hidden_size": 64}}, {"hidden": {"hidden_size": 48}},
                    {"heads": {"num_attention_heads": 5}}]}
    with pytest.raises(ConfigError) as caught:
        apply_plan(state, LN, plan)
    assert caught.value.field == "ops[2].heads.num_attention_heads"
    assert calls == [] and torch.equal(state["w"], torch.ones(2))


def test_operators_called_directly_refuse_before_touching_the_state():
    state = {"w": torch.ones(2)}  # would fail the state check if validation came second
    rng = FreeValues(0.02, 0)
    with pytest.raises(ConfigError, match=r"heads\.num_attention_heads"):
        grow_heads(state, LN, 3, rng=rng)
    with pytest.raises(ConfigError, match=r"hidden\.hidden_size"):
        grow_hidden(state, LN, 36, "replicate", rng=rng)
    with pytest.raises(ConfigError, match=r"layers\.insert_before"):
        grow_layers(state, LN, [4], rng=rng)


def test_configs_follow_the_ops_in_order():
    plan = load_plan({"ops": [
        {"heads": {"num_attention_heads": 8}},  # GQA keeps its 2 groups
        {"heads": {"num_attention_heads": 12, "num_query_groups": 3}},
        {"head_dim": {"kv_channels": 12}},
        {"hidden": {"hidden_size": 48, "method": "replicate"}},
        {"hidden": {"hidden_size": 60}},
        {"layers": {"insert_before": [0, 3, 3], "num_layers": 8}},
    ]})
    configs = plan.validate(LN)
    assert (configs[0].num_attention_heads, configs[0].num_query_groups) == (8, 2)
    assert (configs[1].num_attention_heads, configs[1].num_query_groups) == (12, 3)
    assert configs[3].layernorm_epsilon == LN.layernorm_epsilon  # replicate keeps eps
    assert configs[4].layernorm_epsilon == pytest.approx(LN.layernorm_epsilon * 48 / 60, rel=1e-12)
    assert configs[5].num_layers == 8
    assert (load_plan({"ops": [{"heads": {"num_attention_heads": 8}}]}).validate(MHA)[0].num_query_groups) == 8


def test_rope_head_dim_growth_keeps_the_rotary_dim():
    from mgrow.core.plan import rotary_percent_for

    cfg = LN.replace(position_embedding_type="rope", kv_channels=12, rotary_percent=0.5)
    for k2 in range(12, 200):
        grown = load_plan({"ops": [{"head_dim": {"kv_channels": k2}}]}).validate(cfg)[0]
        assert int(k2 * grown.rotary_percent) == 6 == grown.rotary_dim  # megatron's int() and ModelConfig's round()
    assert int(49 * (1 / 49)) == 0  # the plain quotient loses the dim in int()
    assert int(49 * rotary_percent_for(1, 49)) == 1


def test_plan_files_load_and_round_trip():
    plan = load_plan(REPO / "configs" / "plans" / "all_ops.yaml")
    assert [op.name for op in plan.ops] == ["mlp", "heads", "head_dim", "hidden", "layers"]
    assert plan.init == InitSpec(std=0.02, seed=1234)
    assert load_plan(plan.to_dict()) == plan
    assert load_plan({"ops": [{"mlp": {"ffn_hidden_size": 64}}]}).init == InitSpec(std=None, seed=1234)


def test_one_tensor_at_a_time_equals_the_whole_state(single_rank):
    """grow_one (what the sharded mover runs per parameter) gives apply_plan's tensors and maps bit for bit."""
    from mgrow.core.parameters import parameter_shapes
    from mgrow.ops.plan import free_values, grow_one, original_source, steps as bind_steps
    from mgrow.testing.harness import random_state

    cfg = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=4, num_query_groups=2, kv_channels=4,
                      ffn_hidden_size=24, vocab_size=40, max_sequence_length=8, qk_layernorm=True)
    plan = load_plan({"ops": [{"layers": {"insert_before": [1]}}, {"mlp": {"ffn_hidden_size": 32}},
                              {"hidden": {"hidden_size": 24}}, {"heads": {"num_attention_heads": 6}},
                              {"head_dim": {"kv_channels": 6}}, {"layers": {"insert_before": [0], "num_layers": 5}}],
                      "init": {"std": 0.02, "seed": 9}})
    state = random_state(cfg, 3, single_rank)
    whole = apply_plan(state, cfg, plan)
    steps, values = bind_steps(plan, cfg), free_values(plan, cfg)
    assert list(parameter_shapes(whole.cfg)) == list(whole.state)
    new_layers = 0
    for name, expected in whole.state.items():
        source = original_source(steps, name)
        tensor, tmap = grow_one(steps, values, name, None if source is None else state[source])
        assert torch.equal(tensor, expected), name
        assert tmap.old_name == whole.maps[name].old_name == source, name
        assert torch.equal(tmap.kind, whole.maps[name].kind), name
        for mine, theirs in zip(tmap.axes, whole.maps[name].axes):
            assert torch.equal(mine.src, theirs.src) and torch.equal(mine.scale, theirs.scale), name
            assert torch.equal(mine.grad_scale, theirs.grad_scale), name
        new_layers += source is None
    assert new_layers > 0
