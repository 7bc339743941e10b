"""Random models, tokens and batches that are the same on every layout and device, and whole-model gathers.

Everything here draws on the CPU generator and returns CPU tensors: the same
seed gives the same model on any TP x PP x DP layout and on any device.
"""

from __future__ import annotations

import math

import torch

from mgrow.core.model_config import ModelConfig
from mgrow.core.parameters import is_norm_gain, parameter_shapes
from mgrow.engine.model import build_gpt, by_global_name, gather_full_tensors, position_ids, real_vocab
from mgrow.parallel import collectives
from mgrow.parallel import layout as layout_table
from mgrow.parallel.optimizer_state import MOMENTS
from mgrow.parallel.shards import gather_tp
from mgrow.train.config import DataConfig, OptimizerConfig, ParallelConfig, TrainConfig, TrainLoopConfig

# Adam settings of the checks. Growth that changes a reduction's length or order (a longer head dim, heads moved
# between TP ranks, other DP shard ranges) changes gradients by fp32 rounding, ~1e-7 relative. Adam's update
# m/(sqrt(v)+eps) turns that into lr-sized differences for entries whose gradient is itself at the rounding
# level (measured: 1e-4 at lr 1e-3, eps 1e-8; 1.5e-6 at lr 1e-3, eps 1e-6). The checks therefore step with
# lr 1e-4 and eps 1e-6: 1e-6 is 1% of the largest Adam step, and a wrongly carried moment moves a step by ~lr.
ADAM_LR, ADAM_EPS = 1e-4, 1e-6


def check_config(model: ModelConfig, dims, optimizer: str, seq_length: int):
    """The training config of a check: Adam at ADAM_LR / ADAM_EPS, no clipping (the new weights' gradients would
    enter the global norm), micro-batches of 2, 4 sequences per DP rank, no data files."""
    return TrainConfig(
        model=model,
        parallel=ParallelConfig(dims.tp, dims.pp, device=dims.device.type, backend=dims.backend),
        optimizer=OptimizerConfig(type=optimizer, lr=ADAM_LR, min_lr=ADAM_LR / 10, warmup_steps=1, clip_grad=0.0,
                                  eps=ADAM_EPS),
        train=TrainLoopConfig(steps=100, micro_batch_size=2, global_batch_size=4 * dims.dp, seq_length=seq_length,
                              progress=False),
        data=DataConfig(sources=()),
    )


def random_state(cfg: ModelConfig, seed: int, dims) -> dict[str, torch.Tensor]:
    """Full CPU tensors of a ``cfg`` model with every parameter random and activations of order 1.

    Norm gains, norm biases and linear biases are random too (megatron's ones and zeros would hide a wrong
    rule), weights scaled so activations and logits are of order 1 (a wrong rule moves them visibly). Drawn
    in the order of a built model's parameters.
    """
    names = gather_full_tensors(build_gpt(cfg, dims, seed=seed), cfg, dims)
    shapes = parameter_shapes(cfg)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    state = {}
    for name in names:
        shape = shapes[name]
        if is_norm_gain(name):
            state[name] = 0.5 + torch.rand(shape, generator=generator, device="cpu")
        elif name.endswith(".bias"):
            state[name] = 0.2 * torch.randn(shape, generator=generator, device="cpu")
        else:  # [out, in] and embeddings [rows, h]: entries N(0, 1/in), so logits stay of order 1 when tied too
            state[name] = torch.randn(shape, generator=generator, device="cpu") / math.sqrt(shape[1])
    return state


def random_tokens(cfg: ModelConfig, seed: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    """[batch, seq] token ids on the CPU (engines move batches to their device)."""
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    return torch.randint(0, cfg.vocab_size, (batch, min(seq, cfg.max_sequence_length)), generator=generator,
                         device="cpu")


def reference_logits(cfg: ModelConfig, state: dict[str, torch.Tensor], tokens: torch.Tensor, dims) -> torch.Tensor:
    """[batch, seq, vocab] logits (on the CPU) of a megatron-core GPTModel holding ``state`` (TP=1, PP=1)."""
    model = build_gpt(cfg, dims, init=state)
    model.eval()
    tokens = tokens.to(dims.device)
    with torch.no_grad():
        return real_vocab(model, model(tokens, position_ids(tokens), None)).cpu()


class RandomBatches:
    """Token batches of global step ``i``: this DP rank's micro-batches (CPU), the same on every layout."""

    def __init__(self, cfg, seed: int, dims):
        t = cfg.train
        self.vocab, self.seq, self.seed = cfg.model.vocab_size, t.seq_length, seed
        self.gbs, self.mbs = t.global_batch_size, t.micro_batch_size
        self.per_rank = self.gbs // dims.dp
        self.offset = dims.dp_rank * self.per_rank

    def __call__(self, step: int) -> list[torch.Tensor]:
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 7919 + step)
        tokens = torch.randint(0, self.vocab, (self.gbs, self.seq + 1), generator=generator, device="cpu")
        return list(tokens[self.offset : self.offset + self.per_rank].split(self.mbs))


def gather_state(engine, cfg: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    """{"weight"|"param"|"exp_avg"|"exp_avg_sq": {global name: full tensor}} on every rank, on the CPU.

    "weight" is the fp32 master, "param" the model's own parameter (bf16 in a bf16 model).
    """
    dims = engine.dims
    params = by_global_name(engine.module)
    state = engine.optimizer_state()
    has_moments = collectives.any_rank(dims, state.step() is not None)
    local = {"weight": {}, "param": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name in parameter_shapes(cfg):
        if dims.stage not in layout_table.stages_of(name, cfg, dims.pp):
            continue
        layout = layout_table.layout_of(name, cfg)
        local["weight"][name] = gather_tp(state.master(params[name]), layout, dims).cpu()
        local["param"][name] = gather_tp(_model_value(params[name]), layout, dims).cpu()
        if has_moments:
            for key in MOMENTS:
                local[key][name] = gather_tp(state.moment(params[name], key), layout, dims).cpu()
    merged = {key: {} for key in local}
    for stage in collectives.gather_objects(local, group=dims.pp_group):
        for key in merged:
            merged[key].update(stage[key])
    return merged


def _model_value(param) -> torch.Tensor:
    if hasattr(param, "ds_tensor"):  # ZeRO-3 keeps a partition; gathered over DP for the check
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param.detach()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| (inf for other shapes, 0 for empty tensors)."""
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) if a.numel() else 0.0
