"""Build megatron-core GPTModel stages and move whole (global) tensors in and out of them."""

from __future__ import annotations

import math
import zlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from mgrow.layouts import megatron as layout_table
from mgrow.model_config import ModelConfig


def build_gpt(cfg: ModelConfig, seed: int = 1234, init: Optional[dict] = None, initialize: bool = True):
    """This rank's GPTModel stage (megatron's parallel_state must be initialised).

    Weights come from :func:`canonical_init` (or from ``init``, a dict of global
    name -> full tensor), so every TP/PP layout of one seed holds the same model.
    ``initialize=False`` leaves megatron's own initialisation (the caller fills every weight).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    config = cfg.transformer_config(tp, pp)
    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False,
                                    qk_layernorm=cfg.qk_layernorm, normalization=cfg.normalization)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        **cfg.gpt_model_kwargs(),
    )
    if cfg.bf16:
        model.bfloat16()  # params_dtype reaches the linear layers only; megatron's Float16Module casts the norms too
    if initialize:
        load_full_tensors(model, cfg, init if init is not None else CanonicalInit(cfg, seed))
    return model


def global_names(model) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(local name, global name, parameter) for every parameter of a stage.

    The tied output layer of a last stage (PP>1) is the word embedding.
    """
    for local, param in model.named_parameters():
        index = layout_table.layer_index(local)
        name = local
        if index is not None:
            name = layout_table.renumber(local, model.decoder.layers[index].layer_number - 1)
        elif local == "output_layer.weight" and model.share_embeddings_and_output_weights:
            name = "embedding.word_embeddings.weight"
        yield local, name, param


def full_shape(param: torch.Tensor, layout: layout_table.TensorLayout, tp: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if layout.partition_dim is not None:
        shape[layout.partition_dim] *= tp
    return tuple(shape)


def load_full_tensors(model, cfg: ModelConfig, full_by_name) -> None:
    """Copy this rank's TP shard of each full tensor into the stage's parameters."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for _, name, param in global_names(model):
            layout = layout_table.layout_of(name, cfg.gated_linear_unit)
            full = full_by_name[name] if isinstance(full_by_name, dict) else full_by_name(name, full_shape(param, layout, tp))
            expected = full_shape(param, layout, tp)
            if tuple(full.shape) != expected:
                raise ValueError(f"{name}: full tensor {tuple(full.shape)} does not fit shape {expected}")
            param.copy_(layout_table.tp_shard(full, layout, tp_rank, tp))


def gather_full_tensors(model, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every global tensor of the model, gathered over TP and PP, on every rank.

    One parameter at a time is held in full; used by tests and `mgrow verify`.
    """
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    local: dict[str, torch.Tensor] = {}
    for _, name, param in global_names(model):
        layout = layout_table.layout_of(name, cfg.gated_linear_unit)
        shards = [torch.empty_like(param.data) for _ in range(tp)]
        dist.all_gather(shards, param.data.contiguous(), group=tp_group)
        local[name] = layout_table.tp_merge(shards, layout)
    # Stages hold different names: share them over the pipeline group.
    stages: list = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, local, group=ps.get_pipeline_model_parallel_group())
    merged: dict[str, torch.Tensor] = {}
    for stage in stages:
        merged.update(stage)
    return merged


class CanonicalInit:
    """Megatron's init rules with one generator per global tensor name.

    Linear and embedding weights ~ N(0, std); linear_proj / linear_fc2 weights
    ~ N(0, std / sqrt(2 N)) (megatron's ``output_layer_init_method``); norm
    gains 1, biases 0. Independent of the TP/PP layout by construction.
    """

    def __init__(self, cfg: ModelConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    def __call__(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if "layernorm" in name:
            return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        if name.endswith("bias"):
            return torch.zeros(shape)
        std = self.cfg.init_method_std
        if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            std /= math.sqrt(2.0 * self.cfg.num_layers)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=generator) * std
