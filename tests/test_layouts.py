import pytest
import torch

from mgrow.layouts import megatron as table
from mgrow.model_config import ModelConfig


@pytest.mark.parametrize("gated", [False, True])
def test_table_agrees_with_megatron_partition_attributes(single_rank, gated):
    from mgrow.model import build_gpt, global_names

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=64,
                      max_sequence_length=16, activation="swiglu" if gated else "gelu", qk_layernorm=True)
    model = build_gpt(cfg)
    for local, name, param in global_names(model):
        row = table.layout_of(name, cfg.gated_linear_unit)
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
        table.layout_of("decoder.layers.0.mlp.experts.weight")
