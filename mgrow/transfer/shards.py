"""Fill a GPTModel stage's shards from a trained GPT's (transfer.rules says which tensor from which).

Collective over the tensor-parallel group: the source is built on the same TP x PP
layout as the target (same layer count, so a layer lives on the same stage in
both), each transferred tensor is gathered from the source's TP shards one at a
time, mapped on the full tensor, and this rank's shard is copied into the target.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mgrow.layouts import megatron as layout_table
from mgrow.model import build_gpt, full_shape, global_names
from mgrow.model_config import ModelConfig
from mgrow.transfer import rules


def load_source(folder, source_cfg: ModelConfig, seed: int):
    """The checkpoint's GPTModel stage on the current layout (megatron dist_checkpointing reshards TP/PP)."""
    from megatron.core import dist_checkpointing

    from mgrow.checkpoint.megatron_format import MODEL_DIR

    model = build_gpt(source_cfg, seed=seed, initialize=False)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, os.path.join(str(folder), MODEL_DIR))
    model.load_state_dict(state["model"])
    return model


def _gather(param: torch.Tensor, layout: layout_table.TensorLayout) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if layout.partition_dim is None:
        return param.data
    shards = [torch.empty_like(param.data) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, param.data.contiguous(), group=ps.get_tensor_model_parallel_group())
    return layout_table.tp_merge(shards, layout)


def copy_shared(source_model, source_cfg: ModelConfig, target_model, target_cfg: ModelConfig,
                components: tuple[str, ...]) -> list[str]:
    """Overwrite the target's transferred tensors on this stage; returns their global names (in order)."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    sources = {name: param for _, name, param in global_names(source_model)}
    done = []
    with torch.no_grad():
        for _, name, param in global_names(target_model):
            rule = rules.rule_for(name, components, source_cfg, target_cfg)
            if rule is None:
                continue
            source_layout = layout_table.layout_of(rule.source, source_cfg.gated_linear_unit)
            full = rules.apply_rule(rule, _gather(sources[rule.source], source_layout).float(), source_cfg,
                                    target_cfg)
            layout = layout_table.layout_of(name, target_cfg.gated_linear_unit)
            expected = full_shape(param, layout, tp)
            if tuple(full.shape) != expected:
                raise ValueError(f"{name}: transferred tensor {tuple(full.shape)} does not fit shape {expected}")
            param.copy_(layout_table.tp_shard(full, layout, tp_rank, tp))
            done.append(name)
    return done


def max_logit_diff(source_model, target_model, tokens: torch.Tensor):
    """max |logits_target - logits_source| over the whole vocabulary (PP = 1; None on a pipeline)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        return None
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    logits = []
    with torch.no_grad():
        for model in (source_model, target_model):
            model.eval()
            logits.append(model(tokens, positions, None).float())  # this TP rank's vocab slice
    diff = (logits[1] - logits[0]).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    return float(diff)
