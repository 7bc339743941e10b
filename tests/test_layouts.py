import math

import pytest
import torch

from mgrow.core import parameters
from mgrow.parallel import layout as table
from mgrow.core.model_config import ModelConfig


@pytest.mark.parametrize("gated", [False, True])
def test_table_agrees_with_megatron_partition_attributes(single_rank, gated):
    from mgrow.engine.model import build_gpt, global_names

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=64,
                      max_sequence_length=16, activation="swiglu" if gated else "gelu", qk_layernorm=True)
    model = build_gpt(cfg, single_rank)
    for local, name, param in global_names(model):
        row = table.layout_of(name, cfg)
        if getattr(param, "tensor_model_parallel", False):
            assert (param.partition_dim, param.partition_stride) == (row.partition_dim, row.stride), name
        else:
            assert row.partition_dim is None, name


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dim, stride", [(0, 1), (1, 1), (0, 2), (None, 1)])
def test_shard_and_merge_round_trip(tp, dim, stride):
    full = torch.randn(16, 8)
    layout = table.TensorLayout("x", dim, stride)
    shards = table.tp_chunks(full, layout, tp)
    assert torch.equal(table.tp_merge(shards, layout), full)
    if dim == 0 and stride == 2 and tp == 2:  # gated fc1: rank r holds [gate_r; up_r]
        assert torch.equal(shards[1], torch.cat([full[4:8], full[12:16]]))


def test_unknown_parameter_is_an_error():
    with pytest.raises(KeyError, match="no megatron layout"):
        table.layout_of("decoder.layers.0.mlp.experts.weight", ModelConfig(2, 32, 4, 64, 16))


LAYOUT_MODELS = [
    dict(),
    dict(normalization="RMSNorm", activation="swiglu", position_embedding_type="rope", add_bias_linear=False,
         share_embeddings_and_output_weights=True),
    dict(qk_layernorm=True, num_query_groups=2, kv_channels=6),
    dict(qk_layernorm=True, normalization="RMSNorm", activation="swiglu"),
    dict(num_moe_experts=3, moe_router_topk=2),  # MoE: experts with biases, a router with a bias
    dict(num_moe_experts=2, moe_router_topk=2, normalization="RMSNorm", activation="swiglu", add_bias_linear=False),
]


@pytest.mark.parametrize("model", LAYOUT_MODELS, ids=range(len(LAYOUT_MODELS)))
def test_parameter_shapes_match_a_built_model(single_rank, model):
    from mgrow.engine.model import build_gpt, gather_full_tensors

    cfg = ModelConfig(**{**dict(num_layers=3, hidden_size=24, num_attention_heads=4, vocab_size=40,
                                max_sequence_length=8, ffn_hidden_size=20), **model})
    built = {name: tuple(t.shape) for name, t in gather_full_tensors(build_gpt(cfg, single_rank), cfg, single_rank).items()}
    assert parameters.parameter_shapes(cfg) == built
    assert sum(math.prod(s) for s in built.values()) == cfg.num_parameters()


def test_stages_of_follows_megatrons_even_split():
    cfg = ModelConfig(num_layers=4, hidden_size=8, num_attention_heads=2, vocab_size=16, max_sequence_length=4,
                      share_embeddings_and_output_weights=True)
    assert [table.stages_of(f"decoder.layers.{i}.mlp.linear_fc1.weight", cfg, 2) for i in range(4)] == [
        (0,), (0,), (1,), (1,)]
    assert table.stages_of("embedding.word_embeddings.weight", cfg, 2) == (0, 1)
    assert table.stages_of("embedding.word_embeddings.weight", cfg, 1) == (0,)
    assert table.stages_of("decoder.final_layernorm.weight", cfg, 2) == (1,)


@pytest.mark.parametrize("gated", [False, True])
def test_a_grown_model_built_without_initialisation_has_megatron_parallel_attributes(single_rank, gated):
    """build_like skips megatron's initialisation (growth writes every weight); the tensor-parallel attributes
    megatron's initialisers would set are set from the layout table: equal, parameter by parameter, to a model
    megatron built and initialised at the grown size, and the user's config keeps perform_initialization."""
    from mgrow.engine.model import build_gpt, build_like, global_names

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=64,
                      max_sequence_length=16, activation="swiglu" if gated else "gelu")
    grown = cfg.replace(num_layers=3, ffn_hidden_size=192)
    old = build_gpt(cfg, single_rank)
    built = build_like(old, grown)
    fresh = build_gpt(grown, single_rank)
    attributes = ("tensor_model_parallel", "partition_dim", "partition_stride")
    mine = {name: tuple(getattr(p, a, None) for a in attributes) for _, name, p in global_names(built)}
    theirs = {name: tuple(getattr(p, a, None) for a in attributes) for _, name, p in global_names(fresh)}
    assert mine == theirs
    assert sum(1 for value in mine.values() if value[0]) >= 5  # the partitioned weights carry them
    assert built.config.perform_initialization is True
