"""Ranks of tests/test_guards.py: growth that checks its own result before it commits."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
            vocab_size=256, max_sequence_length=32, normalization="RMSNorm", activation="swiglu",
            position_embedding_type="rope", add_bias_linear=False)
PLAN = {"ops": [{"mlp": {"ffn_hidden_size": 96}}, {"hidden": {"hidden_size": 48}}]}


def self_check(out_dir: str, case: str) -> None:
    """TP2: grow a model whose growth cannot preserve its logits (``nan``: one old weight is NaN; ``wrong``: a
    grown weight is off by 0.5, as a wrong rule would leave it); record what every rank raised."""
    from mgrow.core.errors import GrowthError
    from mgrow.core.model_config import ModelConfig
    from mgrow.engine.engines import build_engine, global_mean_loss
    from mgrow.engine.model import build_gpt
    from mgrow.parallel.dims import init_distributed, shutdown
    from mgrow.testing.harness import RandomBatches, check_config, gather_state, random_tokens
    from mgrow.transforms import grow as grow_module

    dims = init_distributed(2, 1, 1234, device="cpu")
    model = ModelConfig(**TINY)
    cfg = check_config(model, dims, "megatron", 16)
    engine = build_engine(build_gpt(model, dims, seed=1234), cfg, dims)
    batches = RandomBatches(cfg, 1234, dims)
    engine.train_step(batches(0))
    if case == "nan":
        with torch.no_grad():
            engine.module.decoder.final_layernorm.weight[0] = float("nan")
    else:
        original = grow_module.grow_one

        def off_by_half(steps, values, name, full, device, rows=None):
            tensor, tmap = original(steps, values, name, full, device, rows)
            return (tensor + 0.5 if name == "decoder.final_layernorm.weight" else tensor), tmap

        grow_module.grow_one = off_by_half
    before = gather_state(engine, model)["weight"]
    try:
        grow_module.grow(engine, cfg, PLAN, check_tokens=random_tokens(model, 0, batch=2, seq=16))
        error = None
    except GrowthError as caught:
        error = str(caught)
    finally:
        if case != "nan":
            grow_module.grow_one = original
    after = gather_state(engine, model)["weight"]
    kept = all(torch.equal(before[n].view(torch.int32), after[n].view(torch.int32)) for n in before)  # bits: NaN
    result = {"error": error, "kept": kept}
    if case == "wrong":  # a job whose growth was refused trains on
        result["loss_after"] = global_mean_loss(engine.train_step(batches(1)), dims)
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    engine.destroy()
    shutdown()
