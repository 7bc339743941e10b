import pytest

from mgrow.core.errors import ConfigError
from mgrow.core.model_config import ModelConfig

BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=256, max_sequence_length=32)


def test_defaults_follow_megatron():
    cfg = ModelConfig(**BASE)
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.ffn_hidden_size) == (4, 8, 128)
    assert cfg.gated_linear_unit is False
    assert ModelConfig(**BASE, activation="swiglu").gated_linear_unit is True


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"num_attention_heads": 4, "num_query_groups": 3}, "model.num_query_groups"),
        ({"hidden_size": 30}, "model.kv_channels"),
        ({"normalization": "BatchNorm"}, "model.normalization"),
        ({"activation": "swiglu", "gated_linear_unit": False}, "model.gated_linear_unit"),
        ({"num_layers": 0}, "model.num_layers"),
        ({"position_embedding_type": "rope", "rotary_percent": 0.3}, "model.rotary_percent"),
    ],
)
def test_bad_model_values_name_the_field(changes, field):
    with pytest.raises(ConfigError) as error:
        ModelConfig(**{**BASE, **changes})
    assert error.value.field == field


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="model.hidden: unknown model key"):
        ModelConfig.from_dict({**BASE, "hidden": 3})


@pytest.mark.parametrize(
    "tp, pp, field",
    [(3, 1, "model.num_attention_heads"), (1, 3, "model.num_layers")],
)
def test_layout_rules(tp, pp, field):
    with pytest.raises(ConfigError) as error:
        ModelConfig(**BASE).check_layout(tp, pp)
    assert error.value.field == field
    with pytest.raises(ConfigError, match="num_query_groups"):
        ModelConfig(**{**BASE, "num_attention_heads": 12, "num_query_groups": 6, "kv_channels": 8}).check_layout(4, 1)


@pytest.mark.parametrize("options", [{}, {"activation": "swiglu", "normalization": "RMSNorm", "num_query_groups": 2,
                                       "qk_layernorm": True, "add_bias_linear": False,
                                       "share_embeddings_and_output_weights": True, "position_embedding_type": "rope"}])
def test_parameter_count_matches_megatron(single_rank, options):
    from mgrow.engine.model import build_gpt

    cfg = ModelConfig(**BASE, **options)
    model = build_gpt(cfg, single_rank)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
