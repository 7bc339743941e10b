"""The table of moves and shard-local growth (issue 21), in one process.

For every TP rank the table names, each grown shard made from that rank's own
old shard (``grow_one`` with the table's rows) equals, bit for bit, the shard
the reference path takes: the whole old tensor grown by the reference
operators, put in the documented shard-local order and split as megatron
splits it. Adam's moments carried by the local map equal the reference's the
same way. Where megatron splits one query group over several TP ranks the table
says so (the parameter is gathered).
"""

from types import SimpleNamespace

import pytest
import torch

from mgrow.core.model_config import ModelConfig
from mgrow.core.parameters import parameter_shapes
from mgrow.core.plan import load_plan
from mgrow.ops.index_map import carry_moment
from mgrow.ops.plan import apply_plan, free_values, grow_one, steps as bind_steps
from mgrow.parallel import layout as layout_table
from mgrow.parallel.shards import shard_local
from mgrow.transforms import moves

GQA = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
                  ffn_hidden_size=64, vocab_size=50, max_sequence_length=16, normalization="RMSNorm",
                  activation="swiglu", position_embedding_type="rope", qk_layernorm=True)
LN = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, kv_channels=8, ffn_hidden_size=64,
                 vocab_size=50, max_sequence_length=16, normalization="LayerNorm", activation="gelu",
                 position_embedding_type="learned_absolute")
EVERY_OP = {"ops": [{"mlp": {"ffn_hidden_size": 96}}, {"heads": {"num_attention_heads": 8}},
                    {"head_dim": {"kv_channels": 12}}, {"hidden": {"hidden_size": 48}},
                    {"layers": {"insert_before": [1], "num_layers": 4}}], "init": {"std": 0.02, "seed": 5}}
NEW_GROUPS = {"ops": [{"heads": {"num_attention_heads": 8, "num_query_groups": 4}}, {"mlp": {"ffn_hidden_size": 128}},
                      {"layers": {"insert_before": [0, 2]}}], "init": {"std": 0.02, "seed": 5}}
REPLICATE = {"ops": [{"hidden": {"hidden_size": 64, "method": "replicate"}}], "init": {"std": 0.02, "seed": 5}}


def reference_shard(full, name, tmap, old_shape, new_cfg, tp, rank):
    layout = layout_table.layout_of(name, new_cfg)
    if layout.partition_dim is None:
        return full
    ordered = shard_local(full, name, tmap, old_shape, new_cfg, tp)
    return layout_table.tp_shard(ordered, layout, rank, tp)


@pytest.mark.parametrize("cfg, plan, tp, gathered", [
    (GQA, EVERY_OP, 2, set()), (LN, EVERY_OP, 2, set()), (GQA, NEW_GROUPS, 2, set()), (LN, REPLICATE, 4, set()),
    # 2 query groups on 4 TP ranks: megatron splits each group's QKV rows over two ranks, and the grown groups
    # do not keep the old heads' rows on their rank: QKV and linear_proj are gathered, everything else is local
    (GQA, NEW_GROUPS, 4, {"linear_qkv.weight", "linear_qkv.bias", "linear_proj.weight"}),
])
def test_each_rank_grows_its_shard_from_its_own_old_shard(cfg, plan, tp, gathered):
    plan = load_plan(plan)
    generator = torch.Generator().manual_seed(0)
    state = {n: torch.randn(s, generator=generator) for n, s in parameter_shapes(cfg).items()}
    moments = {n: torch.rand(s, generator=generator) for n, s in parameter_shapes(cfg).items()}
    whole = apply_plan(state, cfg, plan)
    bound, values = bind_steps(plan, cfg), free_values(plan, cfg)
    new_cfg = bound[-1].grown
    for rank in range(tp):
        dims = SimpleNamespace(tp=tp, tp_rank=rank, pp=1, stage=0)
        table = moves.build(bound, cfg, dims)
        assert {name.split(".", 3)[-1].split(".", 1)[-1] for name in table.gathered()} == gathered
        for move in table:
            if not move.local:
                continue
            expected = reference_shard(whole.state[move.name], move.name, whole.maps[move.name], move.old_shape,
                                       new_cfg, tp, rank)
            old_shard = None
            if move.source is not None:
                old_layout = layout_table.layout_of(move.source, cfg)
                old_shard = layout_table.tp_shard(state[move.source], old_layout, rank, tp)
                old_moment = layout_table.tp_shard(moments[move.source], old_layout, rank, tp)
            if move.rows is not None and move.old_padding and old_shard is not None:
                keep = old_shard.shape[0] - move.old_padding
                old_shard, old_moment = old_shard[:keep], old_moment[:keep]
            tensor, tmap = grow_one(bound, values, move.name, old_shard, rows=move.rows)
            if move.new_padding:
                tensor = torch.cat([tensor, tensor.new_zeros((move.new_padding, *tensor.shape[1:]))])
            assert tensor.shape == move.new_shard_shape, move.name
            assert torch.equal(tensor, expected), (rank, move.name)
            if move.source is not None:
                full_moment = carry_moment(whole.maps[move.name], moments[move.source], 2)
                expected = reference_shard(full_moment, move.name, whole.maps[move.name], move.old_shape, new_cfg,
                                           tp, rank)
                local = carry_moment(tmap, old_moment, 2)
                if move.new_padding:
                    local = torch.cat([local, local.new_zeros((move.new_padding, *local.shape[1:]))])
                assert torch.equal(local, expected), (rank, move.name)


def test_the_table_plans_the_stage_to_stage_bytes_of_moved_layers():
    # 2 layers on PP 2 -> 4: two new layers first, so old layer 0 moves from stage 0 to stage 1
    plan = load_plan({"ops": [{"layers": {"insert_before": [0, 0]}}]})
    bound = bind_steps(plan, GQA)
    sent = moves.build(bound, GQA, SimpleNamespace(tp=2, tp_rank=1, pp=2, stage=0)).planned_bytes()
    received = moves.build(bound, GQA, SimpleNamespace(tp=2, tp_rank=1, pp=2, stage=1)).planned_bytes()
    layer0 = [n for n in parameter_shapes(GQA) if n.startswith("decoder.layers.0.")]
    # each TP rank sends its own shard: half of each TP-split tensor, all of a replicated one
    halves = sum(torch.Size(s).numel() // (2 if layout_table.layout_of(n, GQA).partition_dim is not None else 1)
                 for n, s in parameter_shapes(GQA).items() if n in layer0)
    assert sent["stage_sent_bytes"] == received["stage_received_bytes"] == 4 * halves
    assert sent["stage_received_bytes"] == received["stage_sent_bytes"] == 0
