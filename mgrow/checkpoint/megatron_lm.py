"""Megatron-LM's checkpoint layout (``--ckpt-format torch_dist``), read and written.

::

    <root>/latest_checkpointed_iteration.txt   "1000" (or "release")
    <root>/iter_0001000/                        one dist_checkpointing folder (metadata.json, common.pt, *.distcp)

The folder holds what Megatron-LM's ``generate_state_dict`` nests
(megatron/training/checkpointing.py at core_v0.16.1; docs/library_facts.md,
"Megatron-LM's checkpoints"): ``args`` (its argparse Namespace),
``checkpoint_version`` 3.0, ``iteration``, ``model`` (the model's
``sharded_state_dict``), ``optimizer`` (the megatron optimizer's, in the
DistributedOptimizer format the content metadata names: Megatron-LM's default
``dp_reshardable``, or ``fully_reshardable``), ``opt_param_scheduler``,
``rng_state`` (a ShardedObject over (pp, tp)) and
``num_floating_point_operations_so_far``.

The model is described from ``args`` (:func:`model_from_args`), refusing by
name what mgrow cannot build; mgrow writes the ``fully_reshardable`` optimizer
format, which Megatron-LM reads from the content metadata and which loads on
any layout.
"""

from __future__ import annotations

import argparse
import os
import random

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mgrow.checkpoint import megatron_format
from mgrow.checkpoint.foreign import MEGATRON_LM_TRACKER as TRACKER
from mgrow.core.errors import CheckpointError, ConfigError
from mgrow.core.model_config import ModelConfig

CHECKPOINT_VERSION = 3.0


def iteration_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def read_common(folder: Path) -> dict:
    """The common (non-sharded) state of a dist_checkpointing folder: ``common.pt``, loaded weights-only with
    megatron-core's own safe classes (the argparse Namespace among them), as Megatron-LM loads it."""
    from megatron.core import dist_checkpointing

    if not (folder / "common.pt").is_file():
        raise CheckpointError(str(folder / "common.pt"), "missing: every dist_checkpointing folder has one")
    return dist_checkpointing.load_common_state_dict(str(folder))


# Megatron-LM arguments that change the model in ways mgrow does not build: (name, the value mgrow builds).
_UNSUPPORTED = (
    ("fp16", False), ("squared_relu", False), ("openai_gelu", False), ("apply_layernorm_1p", False),
    ("rotary_interleaved", False), ("num_experts", None), ("virtual_pipeline_model_parallel_size", None),
    ("sequence_parallel", False), ("multi_latent_attention", False), ("mtp_num_layers", None),
    ("context_parallel_size", 1), ("expert_model_parallel_size", 1),
)


def model_from_args(args, field: str) -> ModelConfig:
    """The ModelConfig of a Megatron-LM run from its stored ``args``; what mgrow cannot build is refused,
    naming ``<field>: args.<name>``."""
    values = vars(args)

    def get(name, default=None):
        return values.get(name, default)

    for name, supported in _UNSUPPORTED:
        if get(name, supported) not in (supported, None) or (supported is None and get(name) is not None):
            raise ConfigError(f"{field}: args.{name}", f"{get(name)!r} is not supported (mgrow builds {supported!r})")
    if bool(get("add_qkv_bias", False)) != bool(get("add_bias_linear", True)):
        raise ConfigError(f"{field}: args.add_qkv_bias", "a QKV bias without the other linear biases (or the other "
                                                         "way round) is not supported")
    if get("position_embedding_type", "learned_absolute") not in ("learned_absolute", "rope"):
        raise ConfigError(f"{field}: args.position_embedding_type",
                          f"{get('position_embedding_type')!r} is not supported (learned_absolute | rope)")
    for name in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings", "padded_vocab_size"):
        if get(name) is None:
            raise ConfigError(f"{field}: args.{name}", "missing: a Megatron-LM checkpoint's args always hold it")
    padded = get("padded_vocab_size")
    vocab = padded  # as Megatron-LM trains it: every padded row takes part in the softmax
    if get("tokenizer_type") == "NullTokenizer" and get("vocab_size"):
        vocab = get("vocab_size") + 1  # the tokenizer's own size: --vocab-size and its end-of-document token
    heads = get("num_attention_heads")
    try:
        return ModelConfig(
            num_layers=get("num_layers"), hidden_size=get("hidden_size"), num_attention_heads=heads,
            num_query_groups=get("num_query_groups") if get("group_query_attention") else heads,
            kv_channels=get("kv_channels"), ffn_hidden_size=get("ffn_hidden_size"),
            vocab_size=vocab, max_sequence_length=get("max_position_embeddings"),
            normalization=get("normalization", "LayerNorm"), layernorm_epsilon=get("layernorm_epsilon", 1e-5),
            activation="swiglu" if get("swiglu") else "gelu",
            position_embedding_type=get("position_embedding_type", "learned_absolute"),
            rotary_percent=get("rotary_percent", 1.0), rotary_base=get("rotary_base", 10000),
            share_embeddings_and_output_weights=not get("untie_embeddings_and_output_weights", False),
            add_bias_linear=get("add_bias_linear", True), qk_layernorm=bool(get("qk_layernorm", False)),
            apply_query_key_layer_scaling=bool(get("apply_query_key_layer_scaling", False)),
            init_method_std=get("init_method_std", 0.02), hidden_dropout=get("hidden_dropout", 0.1),
            attention_dropout=get("attention_dropout", 0.1), bf16=bool(get("bf16", False)),
            make_vocab_size_divisible_by=get("make_vocab_size_divisible_by", 128) if vocab != padded else 1,
            num_layers_in_first_pipeline_stage=get("decoder_first_pipeline_num_layers"),
            num_layers_in_last_pipeline_stage=get("decoder_last_pipeline_num_layers"),
        )
    except ConfigError as error:
        raise ConfigError(f"{field}: args ({error.field})", error.rule) from None


def training_config_from_args(args, model: ModelConfig) -> dict:
    """mgrow's training config (a dict) for the optimizer and batch settings of a Megatron-LM run."""
    values = vars(args)
    steps = values.get("train_iters") or 1
    return {
        "model": model.to_dict(),
        "optimizer": {"type": "megatron" if values.get("use_distributed_optimizer") else "adam",
                      "lr": values.get("lr") or 1e-4, "min_lr": values.get("min_lr") or 0.0,
                      "warmup_steps": values.get("lr_warmup_iters") or 0,
                      "decay_steps": values.get("lr_decay_iters") or steps,
                      "weight_decay": values.get("weight_decay", 0.01), "beta1": values.get("adam_beta1", 0.9),
                      "beta2": values.get("adam_beta2", 0.999), "eps": values.get("adam_eps", 1e-8),
                      "clip_grad": values.get("clip_grad") or 0.0},
        "train": {"steps": steps, "micro_batch_size": values.get("micro_batch_size") or 1,
                  "global_batch_size": values.get("global_batch_size") or 1,
                  "seq_length": values.get("seq_length") or model.max_sequence_length,
                  "seed": values.get("seed", 1234)},
    }


def metadata_of(folder: Path, field: str) -> dict:
    """mgrow's description of a Megatron-LM iteration folder: its model (from ``args``), layout, training
    config, progress and optimizer format (what :func:`load` and `mgrow grow-checkpoint` need)."""
    common = read_common(folder)
    for key in ("args", "iteration"):
        if key not in common:
            raise CheckpointError(str(folder / "common.pt"), f"has no {key!r}: not a Megatron-LM checkpoint")
    args = common["args"]
    model = model_from_args(args, field)
    values = vars(args)
    tp, pp = values.get("tensor_model_parallel_size", 1), values.get("pipeline_model_parallel_size", 1)
    world = values.get("world_size") or tp * pp
    content = common.get("content_metadata") or {}
    optimizer = common.get("optimizer")
    sharding = content.get("distrib_optim_sharding_type")
    if isinstance(optimizer, dict) and "param_state_sharding_type" in optimizer:
        sharding = optimizer["param_state_sharding_type"]
    config = training_config_from_args(args, model)
    if optimizer is not None and (sharding is not None) != (config["optimizer"]["type"] == "megatron"):
        raise CheckpointError(str(folder / "common.pt"), "its optimizer state and args.use_distributed_optimizer "
                                                         "disagree")
    iteration = int(common["iteration"])
    return {
        "source_format": "megatron-lm",
        "engine": "megatron",
        "optimizer": config["optimizer"]["type"],
        "optimizer_state": optimizer is not None,
        "sharding_type": sharding or megatron_format.FULLY_RESHARDABLE,
        "layout": {"tp": tp, "pp": pp, "dp": world // (tp * pp)},
        "model": model.to_dict(),
        "config": config,
        "progress": {"step": iteration, "first_step": iteration,
                     "first_sample": int(values.get("consumed_train_samples") or 0)},
        "scheduler": common.get("opt_param_scheduler"),
        "args": args,
    }


def load(engine, folder: str, metadata: dict) -> None:
    """Collective: the model, the optimizer (when saved), the LR schedule and, on the saving layout, the RNG
    state of a Megatron-LM iteration folder."""
    dims = engine.dims
    saved = metadata["layout"]
    if (metadata["optimizer_state"] and metadata["sharding_type"] not in megatron_format.RESHARDABLE
            and metadata.get("layout_known", True) and (saved["tp"], saved["pp"]) != (dims.tp, dims.pp)):
        raise ConfigError("--tp/--pp", f"the checkpoint's optimizer state is {metadata['sharding_type']}, which "
                                       f"loads only on the TP x PP that saved it (tp={saved['tp']}, pp={saved['pp']})")
    same_layout = saved == {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp}
    extra = {"rng_state": _rng_sharded(None, dims)} if same_layout and _has_rng(folder) else {}
    loaded = megatron_format.load_from(engine, folder, metadata["sharding_type"], metadata["optimizer_state"], extra)
    scheduler = metadata.get("scheduler")
    if scheduler is not None:  # the run's own schedule (its values, not the ones args gave the engine)
        engine.scheduler.use_checkpoint_opt_param_scheduler = True
        engine.scheduler.num_steps = 0
        engine.scheduler.load_state_dict(scheduler)
        engine.scheduler.use_checkpoint_opt_param_scheduler = False
    if "rng_state" in loaded:
        _set_rng(loaded["rng_state"][0], dims)


def save(engine, iteration: int, root: str, args: argparse.Namespace) -> Path:
    """Collective: write ``engine`` as Megatron-LM's ``<root>/iter_NNNNNNN`` (``args``: the Namespace to store,
    the grown sizes already in it) and point the tracker at it; returns the iteration folder."""
    dims = engine.dims
    folder = Path(root) / iteration_name(iteration)
    stepped = engine.optimizer_state().step() is not None  # (saved with --no-save-optim: nothing to save)
    state = megatron_format.sharded_state(engine, is_loading=False, optimizer=stepped)
    distributed = stepped and megatron_format.distributed_optimizer(engine) is not None
    state.update({
        "args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
        "opt_param_scheduler": engine.scheduler.state_dict(),
        "rng_state": _rng_sharded([_rng_state()], dims),
        "num_floating_point_operations_so_far": 0,
    })
    content = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if distributed:
        content["distrib_optim_sharding_type"] = megatron_format.FULLY_RESHARDABLE
    if dims.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    megatron_format.write(state, str(folder), content_metadata=content)
    dist.barrier()
    if dims.rank == 0:
        tmp = Path(root) / f".{TRACKER}.tmp"
        tmp.write_text(str(iteration))
        os.replace(tmp, Path(root) / TRACKER)
    dist.barrier()
    return folder


def grown_args(args: argparse.Namespace, grown: ModelConfig, dims) -> argparse.Namespace:
    """A copy of a run's stored args with the grown model's sizes, as Megatron-LM's own flags would give them
    (``--num-layers`` ... ``--ffn-hidden-size``); the layout is the job's that wrote it."""
    values = dict(vars(args))
    values.update(
        num_layers=grown.num_layers, hidden_size=grown.hidden_size, num_attention_heads=grown.num_attention_heads,
        num_query_groups=grown.num_query_groups, group_query_attention=grown.num_query_groups != grown.num_attention_heads,
        kv_channels=grown.kv_channels, ffn_hidden_size=grown.ffn_hidden_size, layernorm_epsilon=grown.layernorm_epsilon,
        tensor_model_parallel_size=dims.tp, pipeline_model_parallel_size=dims.pp, world_size=dims.world,
        data_parallel_size=dims.dp, padded_vocab_size=grown.padded_vocab_size(dims.tp),
        decoder_first_pipeline_num_layers=grown.num_layers_in_first_pipeline_stage,
        decoder_last_pipeline_num_layers=grown.num_layers_in_last_pipeline_stage,
    )
    return argparse.Namespace(**values)


def _has_rng(folder: str) -> bool:
    """Whether the folder holds Megatron-LM's ``rng_state`` (it does unless saved with ``--no-save-rng``)."""
    from torch.distributed.checkpoint import FileSystemReader

    return any(key.startswith("rng_state/") for key in FileSystemReader(folder).read_metadata().state_dict_metadata)


def _rng_sharded(data, dims):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", data, (dims.pp, dims.tp), (dims.pp_rank, dims.tp_rank),
                         replica_id=dims.dp_rank)


def _rng_state() -> dict:
    """This rank's generators, keyed as Megatron-LM's ``get_rng_state`` keys them."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "rng_tracker_states": get_cuda_rng_tracker().get_states()}


def _set_rng(state: dict, dims) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if dims.is_cuda and state.get("cuda_rng_state") is not None:
        torch.cuda.set_rng_state(state["cuda_rng_state"], dims.device)
    get_cuda_rng_tracker().set_states(state["rng_tracker_states"])
