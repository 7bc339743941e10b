"""Free entries are drawn from the plan's init: non-zero, the requested std, deterministic from the seed."""

import torch

from mgrow.core.model_config import ModelConfig
from mgrow.ops import Kind
from mgrow.ops.common import FreeValues
from mgrow.core.parameters import is_norm_gain
from mgrow.ops.plan import apply_plan
from mgrow.testing.harness import random_state

CFG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, kv_channels=8, ffn_hidden_size=16,
                  vocab_size=32, max_sequence_length=8)
PLAN = {"ops": [{"mlp": {"ffn_hidden_size": 400}}, {"hidden": {"hidden_size": 256}}], "init": {"std": 0.05, "seed": 7}}


def free_values(result) -> tuple[torch.Tensor, torch.Tensor]:
    """(free entries of norm gains, all other free entries)."""
    gains, others = [], []
    for name, tensor in result.state.items():
        values = tensor[result.maps[name].mask(Kind.FREE)]
        (gains if is_norm_gain(name) else others).append(values)
    return torch.cat(gains), torch.cat(others)


def test_free_entries_have_the_requested_std_and_are_non_zero(single_rank):
    result = apply_plan(random_state(CFG, 0, single_rank), CFG, PLAN)
    gains, others = free_values(result)
    assert others.numel() > 20000 and gains.numel() > 1000
    assert torch.count_nonzero(others) == others.numel()
    assert abs(float(others.std()) - 0.05) <= 0.1 * 0.05
    assert abs(float(others.mean())) <= 0.05 * 0.05
    # norm gains start like a fresh norm's: 1 + N(0, std)
    assert abs(float(gains.std()) - 0.05) <= 0.1 * 0.05
    assert abs(float(gains.mean()) - 1.0) <= 0.1 * 0.05


def test_init_std_defaults_to_the_models_init_method_std(single_rank):
    cfg = CFG.replace(init_method_std=0.03)
    result = apply_plan(random_state(cfg, 0, single_rank), cfg, {"ops": PLAN["ops"]})
    _, others = free_values(result)
    assert abs(float(others.std()) - 0.03) <= 0.1 * 0.03


def test_free_entries_are_deterministic_from_the_seed_and_independent_of_dict_order(single_rank):
    state = random_state(CFG, 0, single_rank)
    first = apply_plan(state, CFG, PLAN)
    again = apply_plan(dict(reversed(list(state.items()))), CFG, PLAN)
    other_seed = apply_plan(state, CFG, {**PLAN, "init": {"std": 0.05, "seed": 8}})
    differing = 0
    for name, tensor in first.state.items():
        assert torch.equal(tensor, again.state[name]), name
        free = first.maps[name].mask(Kind.FREE)
        assert torch.equal(tensor[~free], other_seed.state[name][~free]), name
        differing += int((tensor[free] != other_seed.state[name][free]).sum())
    assert differing == sum(int(m.mask(Kind.FREE).sum()) for m in first.maps.values())


def test_a_shard_draws_exactly_the_full_draws_values_at_its_indices():
    values = FreeValues(std=0.02, seed=3, stream=1)
    full = values.draw("decoder.layers.0.mlp.linear_fc1.weight", (96, 40))
    rows = torch.tensor([95, 0, 17, 18, 50])  # any order, as a shard-local permutation gives
    assert torch.equal(values.draw("decoder.layers.0.mlp.linear_fc1.weight", (96, 40), (0, rows)), full[rows])
    columns = torch.tensor([39, 2, 3])
    assert torch.equal(values.draw("decoder.layers.0.mlp.linear_fc1.weight", (96, 40), (1, columns)),
                       full[:, columns])
    flat = torch.tensor([3, 3839, 41])
    assert torch.equal(values.draw_at("decoder.layers.0.mlp.linear_fc1.weight", flat), full.reshape(-1)[flat])


def test_counter_draws_are_standard_normal_and_independent_across_names_and_streams():
    values = FreeValues(std=1.0, seed=0)
    x = values.draw("a.weight", (1000, 1000)).double().flatten()
    # N(0, 1) over 1e6 draws: mean within 5 standard errors, std and the 4th moment (3) within 1 %
    assert abs(float(x.mean())) < 5e-3
    assert abs(float(x.std()) - 1.0) < 1e-2
    assert abs(float((x**4).mean()) - 3.0) < 3e-2
    assert abs(float((x[:-1] * x[1:]).mean())) < 5e-3  # neighbours uncorrelated
    for other in (values.draw("b.weight", (1000, 1000)), values.for_stream(1).draw("a.weight", (1000, 1000)),
                  FreeValues(std=1.0, seed=1).draw("a.weight", (1000, 1000))):
        assert abs(float((x * other.double().flatten()).mean())) < 5e-3
