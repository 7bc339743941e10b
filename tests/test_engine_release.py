"""A model that growth replaces is freed: megatron's DDP and DeepSpeed's ZeRO-3 each keep a replaced model alive
through references their own teardown leaves (docs/library_facts.md); the engines' destroy() cuts them."""

import pytest

from rank_pool import pool

PLAN = {"ops": [{"mlp": {"ffn_hidden_size": 96}}]}


def released_after_growth(optimizer: str) -> None:
    """On each rank: train, grow, train on; the old model must be gone after a collection."""
    import gc
    import weakref

    import torch.distributed as dist

    from mgrow.core.model_config import ModelConfig
    from mgrow.core.plan import load_plan
    from mgrow.engine.engines import build_engine, global_mean_loss
    from mgrow.engine.model import build_gpt
    from mgrow.parallel.dims import init_distributed, shutdown
    from mgrow.testing.harness import RandomBatches, check_config
    from mgrow.transforms.grow import grow

    from launch_utils import TINY_MODEL

    model = ModelConfig(**TINY_MODEL)
    dims = init_distributed(1, 1, 1234, device="cpu")
    cfg = check_config(model, dims, optimizer, 16)
    batches = RandomBatches(cfg, 1234, dims)
    engine = build_engine(build_gpt(model, dims, seed=1234), cfg, dims)
    global_mean_loss(engine.train_step(batches(0)), dims)
    old_model = weakref.ref(engine.module)
    engine, cfg, _ = grow(engine, cfg, load_plan(PLAN))
    global_mean_loss(engine.train_step(batches(1)), dims)
    gc.collect()
    alive = old_model() is not None
    engine.destroy()
    dist.barrier()
    shutdown()
    assert not alive, f"{optimizer}: the model replaced by growth is still alive"


@pytest.mark.parametrize("optimizer", ["adam", "megatron", "zero2", "zero3"])
def test_growth_frees_the_replaced_model(optimizer):
    done = pool().run(2, "test_engine_release:released_after_growth", (optimizer,))
    assert done.returncode == 0, done.stderr[-3000:]
