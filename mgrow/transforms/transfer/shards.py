"""Fill a GPTModel stage's shards from a trained GPT's (transfer.rules says which tensor from which).

Collective over the tensor-parallel group: the source is built on the same TP x PP
layout as the target (same layer count, so a layer lives on the same stage in
both), each transferred tensor is gathered from the source's TP shards one at a
time, mapped on the full tensor, and this rank's shard is copied into the target.
"""

from __future__ import annotations

import os

import torch

from mgrow.checkpoint.megatron_format import MODEL_DIR
from mgrow.core.model_config import ModelConfig
from mgrow.engine.model import build_gpt, global_names, largest_abs, position_ids, real_vocab
from mgrow.parallel import collectives
from mgrow.parallel import layout as layout_table
from mgrow.parallel.shards import gather_tp
from mgrow.transforms.transfer import rules


def load_source(folder, source_cfg: ModelConfig, seed: int, dims):
    """The checkpoint's GPTModel stage on this job's layout and device (megatron dist_checkpointing reshards TP/PP)."""
    from megatron.core import dist_checkpointing

    model = build_gpt(source_cfg, dims, seed=seed, initialize=False)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, os.path.join(str(folder), MODEL_DIR))
    model.load_state_dict(state["model"])
    return model


def copy_shared(source_model, source_cfg: ModelConfig, target_model, target_cfg: ModelConfig,
                components: tuple[str, ...], dims) -> list[str]:
    """Overwrite the target's transferred tensors on this stage; returns their global names (in order)."""
    tp, tp_rank = dims.tp, dims.tp_rank
    sources = {name: param for _, name, param in global_names(source_model)}
    done = []
    with torch.no_grad():
        for _, name, param in global_names(target_model):
            rule = rules.rule_for(name, components, source_cfg, target_cfg)
            if rule is None:
                continue
            source_layout = layout_table.layout_of(rule.source, source_cfg)
            full = rules.apply_rule(rule, gather_tp(sources[rule.source].data, source_layout, dims).float(),
                                    source_cfg, target_cfg)
            layout = layout_table.layout_of(name, target_cfg)
            expected = layout_table.full_shape(param.shape, layout, tp)
            if tuple(full.shape) != expected:
                raise ValueError(f"{name}: transferred tensor {tuple(full.shape)} does not fit shape {expected}")
            param.copy_(layout_table.tp_shard(full, layout, tp_rank, tp))
            done.append(name)
    return done


def max_logit_diff(source_model, target_model, tokens: torch.Tensor, dims):
    """max |logits_target - logits_source| over the whole vocabulary (PP = 1; None on a pipeline)."""
    if dims.pp > 1:
        return None
    tokens = tokens.to(dims.device)
    logits = []
    with torch.no_grad():
        for model in (source_model, target_model):
            model.eval()
            logits.append(real_vocab(model, model(tokens, position_ids(tokens), None)).float())  # this rank's slice
    return collectives.reduce_scalar(dims, largest_abs(logits[1] - logits[0]), "max", dims.tp_group)
