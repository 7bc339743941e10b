"""Ranks of tests/test_checkpoint_formats.py: checkpoints written the way other tools write them, then grown
offline by `mgrow grow-checkpoint` and resumed.

Megatron-LM does not install from the package index, so its checkpoint is built here from megatron-core's own
``sharded_state_dict`` calls and the layout Megatron-LM's ``megatron/training/checkpointing.py`` (core_v0.16.1)
describes: ``latest_checkpointed_iteration.txt``, ``iter_NNNNNNN/`` holding ``args`` (an argparse Namespace with
Megatron-LM's argument names, written out here by hand), ``checkpoint_version``, ``iteration``, ``model``,
``optimizer`` in Megatron-LM's default ``dp_reshardable`` DistributedOptimizer format, ``opt_param_scheduler``,
``rng_state`` and the content metadata. None of it goes through mgrow's writer.

Each job writes OUT/rank<R>.json; the test judges them.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

SEED = 7
MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
             vocab_size=300, max_sequence_length=32, normalization="RMSNorm", activation="swiglu",
             position_embedding_type="rope", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)
TRAIN = dict(micro_batch_size=2, global_batch_size=4, seq_length=16, seed=SEED, steps=8)
OPTIMIZER = dict(lr=3e-3, min_lr=3e-4, warmup_steps=2, decay_steps=8, weight_decay=0.01, beta1=0.9, beta2=0.95,
                 eps=1e-8, clip_grad=1.0)
PLAN = {"ops": [{"mlp": {"ffn_hidden_size": 96}}, {"hidden": {"hidden_size": 48}},
                {"layers": {"insert_before": [1], "num_layers": 3}}]}
SAVED_AT = 2  # steps before the checkpoint; two more after it


def _config(tp, pp, optimizer, bf16=False):
    from mgrow.train.config import from_dict

    return from_dict({"model": {**MODEL, "bf16": bf16}, "parallel": {"tp": tp, "pp": pp, "device": "cpu"},
                      "optimizer": {"type": optimizer, **OPTIMIZER}, "train": {**TRAIN, "progress": False}})


def _losses(engine, cfg, dims, steps) -> list[float]:
    from mgrow.engine.engines import global_mean_loss
    from mgrow.testing.harness import RandomBatches

    batches = RandomBatches(cfg, SEED, dims)
    out = []
    for step in steps:
        out.append(global_mean_loss(engine.train_step(batches(step)), dims))  # (steps the LR schedule too)
    return out


def _megatron_lm_args(cfg, dims) -> argparse.Namespace:
    """What Megatron-LM's argparse stores for this run (its names: --ffn-hidden-size, --swiglu, ...)."""
    m, o, t = cfg.model, cfg.optimizer, cfg.train
    return argparse.Namespace(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, group_query_attention=True, num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels, max_position_embeddings=m.max_sequence_length, seq_length=t.seq_length,
        position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0, rotary_interleaved=False,
        normalization="RMSNorm", layernorm_epsilon=1e-5, swiglu=True, squared_relu=False,
        untie_embeddings_and_output_weights=True, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        apply_query_key_layer_scaling=False, apply_layernorm_1p=False, init_method_std=0.02,
        hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=128,
        padded_vocab_size=m.padded_vocab_size(dims.tp),
        tokenizer_type="NullTokenizer", vocab_size=m.vocab_size - 1,  # (its vocabulary is --vocab-size + EOD)
        bf16=m.bf16, fp16=False, params_dtype=torch.bfloat16 if m.bf16 else torch.float32,
        tensor_model_parallel_size=dims.tp, pipeline_model_parallel_size=dims.pp, world_size=dims.world,
        data_parallel_size=dims.dp, use_distributed_optimizer=True, lr=o.lr, min_lr=o.min_lr,
        lr_warmup_iters=o.warmup_steps, lr_decay_iters=o.decay_steps, lr_decay_style="cosine",
        weight_decay=o.weight_decay, adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad,
        train_iters=t.steps, micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
        seed=t.seed, ckpt_format="torch_dist", consumed_train_samples=SAVED_AT * t.global_batch_size,
    )


def _save_like_megatron_lm(engine, cfg, dims, root: Path, iteration: int) -> None:
    """Megatron-LM's save_checkpoint for ``--ckpt-format torch_dist`` with the distributed optimizer."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    metadata = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
                "chained_optim_avoid_prefix": True}
    model = engine.ddp.module.sharded_state_dict(metadata=metadata)
    rng = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": None,
            "rng_tracker_states": get_cuda_rng_tracker().get_states()}]
    state = {
        "args": _megatron_lm_args(cfg, dims), "checkpoint_version": 3.0, "iteration": iteration, "model": model,
        "optimizer": engine.optimizer.sharded_state_dict(model, metadata=metadata),
        "opt_param_scheduler": engine.scheduler.state_dict(),
        "rng_state": ShardedObject("rng_state", rng, (dims.pp, dims.tp), (dims.pp_rank, dims.tp_rank),
                                   replica_id=dims.dp_rank),
        "num_floating_point_operations_so_far": 0,
    }
    folder = root / f"iter_{iteration:07d}"
    if dims.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, str(folder), content_metadata=metadata)
    if dims.rank == 0:
        (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    dist.barrier()


def _write(out_dir: str, result: dict) -> None:
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


def megatron_lm_source(out_dir: str, root: str) -> None:
    """TP2 x PP2, DistributedOptimizer, bf16: train 2 steps, save as Megatron-LM does, then grow in memory
    by PLAN and train 2 more steps (the reference)."""
    from mgrow.engine.engines import build_engine
    from mgrow.engine.model import build_gpt
    from mgrow.parallel.dims import init_distributed
    from mgrow.transforms.grow import grow

    dims = init_distributed(2, 2, SEED, device="cpu", backend="gloo")
    cfg = _config(2, 2, "megatron", bf16=True)
    engine = build_engine(build_gpt(cfg.model, dims, seed=SEED), cfg, dims)
    before = _losses(engine, cfg, dims, range(1, SAVED_AT + 1))
    _save_like_megatron_lm(engine, cfg, dims, Path(root), SAVED_AT)
    grown, grown_cfg, _ = grow(engine, cfg, PLAN)
    after = _losses(grown, grown_cfg, dims, range(SAVED_AT + 1, SAVED_AT + 3))
    grown.destroy()
    _write(out_dir, {"before": before, "after": after})


def megatron_lm_resume(out_dir: str, root: str, tp: int, pp: int) -> None:
    """A megatron-core loop on another layout resumes the grown Megatron-LM checkpoint: 2 steps."""
    from mgrow.checkpoint.sources import open_source
    from mgrow.parallel.dims import init_distributed
    from mgrow.train.restore import restored_engine

    folder, metadata, model = open_source(root, "--in")
    dims = init_distributed(tp, pp, SEED, device="cpu", backend="gloo")
    engine, cfg, progress = restored_engine(folder, metadata, dims)
    after = _losses(engine, cfg, dims, range(progress.step + 1, progress.step + 3))
    _write(out_dir, {"after": after, "step": progress.step, "model": model.to_dict(), "lr": engine.lr()})
    engine.destroy()


def plain_source(out_dir: str, folder: str, tp: int, optimizer: str, sharding: str) -> None:
    """A user's own loop saves ``dist_checkpointing.save`` folders at TP ``tp``: the model's sharded_state_dict
    alone (``optimizer`` none), or nested under ``model`` with the megatron optimizer's under ``optimizer``
    (DistributedOptimizer state in ``sharding``); after 2 training steps."""
    from megatron.core import dist_checkpointing

    from mgrow.engine.engines import build_engine
    from mgrow.engine.model import build_gpt
    from mgrow.parallel.dims import init_distributed

    dims = init_distributed(tp, 1, SEED, device="cpu", backend="gloo")
    cfg = _config(tp, 1, "adam" if optimizer == "none" else optimizer)
    engine = build_engine(build_gpt(cfg.model, dims, seed=SEED), cfg, dims)
    losses = _losses(engine, cfg, dims, range(1, SAVED_AT + 1))
    model = engine.ddp.module.sharded_state_dict()
    if optimizer == "none":
        state = model
    else:
        kwargs = {"metadata": {"distrib_optim_sharding_type": sharding}} if optimizer == "megatron" else {}
        state = {"model": model, "optimizer": engine.optimizer.sharded_state_dict(model, **kwargs)}
    Path(folder).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, folder)
    engine.destroy()
    _write(out_dir, {"losses": losses})


def _example():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import deepspeed_train

    return deepspeed_train


def deepspeed_source(out_dir: str, root: str, zero: int) -> None:
    """examples/deepspeed_train.py's engine (GPT-2 style, tied embeddings, weight-decay groups, DeepSpeed AdamW +
    WarmupDecayLR) at DP2: 2 steps, ``engine.save_checkpoint(root)``, then grown in memory by the example's plan
    and trained 2 more steps (the reference)."""
    import mgrow.deepspeed

    example = _example()
    device = example.setup()
    engine = example.build(example.SIZES, device, zero, 8)
    before = [example.train_step(engine, step, device) for step in range(SAVED_AT)]
    engine.save_checkpoint(root)
    grown, _, _, _ = mgrow.deepspeed.grow(engine, example.PLAN)
    after = [example.train_step(grown, step, device) for step in range(SAVED_AT, SAVED_AT + 2)]
    grown.destroy()
    _write(out_dir, {"before": before, "after": after})


def deepspeed_user_resume(out_dir: str, root: str, zero: int, sizes: dict) -> None:
    """The user's own code builds the grown size and loads the grown checkpoint with ``load_checkpoint``."""
    example = _example()
    device = example.setup()
    engine = example.build(sizes, device, zero, 8)
    path, client = engine.load_checkpoint(root)
    after = [example.train_step(engine, step, device) for step in range(SAVED_AT, SAVED_AT + 2)]
    _write(out_dir, {"after": after, "path": path, "global_steps": engine.global_steps})
    engine.destroy()
