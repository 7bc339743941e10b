"""One rank of `mgrow verify --tp --pp --dp --optimizer`: train a random model, grow it, check the invariants.

For each plan, against the engine trained for two steps:

* ``max_abs_logit_diff``: logits on one batch before vs after growth, within
  ``logit_tol`` (``--tol``; in bf16, for plans that rescale old weights,
  :func:`bf16_logit_tol` of ``max_abs_logit``, the largest logit before);
* ``max_abs_vs_reference`` / ``max_abs_moments_vs_reference``: the gathered grown
  fp32 weights (the masters in bf16) / Adam moments vs the reference operators
  (and their index maps) on the gathered original (the mover keeps megatron's
  order: no permutation);
* ``max_abs_params_vs_masters``: the model's parameters vs their masters
  (in bf16, vs the masters' bf16 rounding): 0 bit for bit;
* ``max_abs_step_equivalence``: one more step on the grown and on the old
  engine with the same batch, old slice vs old model (null for plans that
  rescale old weights or change epsilon: their gradients move);
* ``growth_seconds``, ``peak_rss_bytes`` (max over ranks, whole process) and
  ``peak_rss_growth_bytes`` (max over ranks, during growth only); on CUDA
  ``peak_device_growth_bytes`` (``torch.cuda.max_memory_allocated`` during growth, max over ranks).

Gathering whole models here is for checking only; growth itself never does. The
reference runs on the gathered CPU tensors; on CUDA ranks torch's deterministic
algorithms are on (warn-only where an op has no deterministic kernel), so the
exact comparisons compare one computation each.
"""

from __future__ import annotations

import json
import torch

from mgrow import rss
from mgrow.growth.shards import gather_tp, shard_local
from mgrow.layouts import megatron as layout_table
from mgrow.layouts.optimizer_state import MOMENTS
from mgrow.model import global_names
from mgrow.model_config import ModelConfig
from mgrow.ops import Kind, apply_to_optimizer_state, carry
from mgrow.parallel import collectives
from mgrow.plan import Plan, apply_plan

STEP_TOL = 1e-6
# Growth that changes a reduction's length or order (a longer head dim, heads moved between TP ranks,
# other DP shard ranges) changes gradients by fp32 rounding, ~1e-7 relative. Adam's update m/(sqrt(v)+eps)
# turns that into lr-sized differences for entries whose gradient is itself at the rounding level (measured:
# 1e-4 at lr 1e-3, eps 1e-8; 1.5e-6 at lr 1e-3, eps 1e-6). The check therefore steps with lr 1e-4 and
# eps 1e-6: 1e-6 is 1% of the largest Adam step, and a wrongly carried moment moves a step by ~lr.
ADAM_LR, ADAM_EPS = 1e-4, 1e-6
BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits


def bf16_logit_tol(max_abs_logit: float, num_layers: int) -> float:
    """How far bf16 logits may move when growth rescales old weights (hidden width, head dim, epsilon).

    The grown model's bf16 parameters are the roundings of the grown fp32 masters, so a rescaled
    weight differs from the rescaled old bf16 weight by one rounding, relative u = 2^-8. First-order,
    each of the bf16 values written along the residual path (embedding, then the attention and MLP
    outputs of each of the ``num_layers`` layers, the final norm, the output layer) then moves the
    logits by at most u times their scale: tol = (2 * num_layers + 3) * u * max|logit|.
    Plans that rescale nothing leave every old bf16 parameter bit for bit and add exact zeros: their
    logits are checked against the fp32 tolerance instead.
    """
    return (2 * num_layers + 3) * BF16_UNIT_ROUNDOFF * max_abs_logit


def train_config(model: ModelConfig, dims, optimizer: str, seq_length: int):
    from mgrow.train.config import DataConfig, OptimizerConfig, ParallelConfig, TrainConfig, TrainLoopConfig

    dp = dims.dp
    return TrainConfig(
        model=model,
        parallel=ParallelConfig(dims.tp, dims.pp, device=dims.device.type, backend=dims.backend),
        # No clipping: the new weights' gradients would enter the global norm (GROWTH_MATH, optimizer state).
        optimizer=OptimizerConfig(type=optimizer, lr=ADAM_LR, min_lr=ADAM_LR / 10, warmup_steps=1, clip_grad=0.0, eps=ADAM_EPS),
        train=TrainLoopConfig(steps=100, micro_batch_size=2, global_batch_size=4 * dp, seq_length=seq_length,
                              progress=False),
        data=DataConfig(sources=()),
    )


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
    """{"weight"|"param"|"exp_avg"|"exp_avg_sq": {global name: full tensor}} on every rank (checking only).

    "weight" is the fp32 master, "param" the model's own parameter (bf16 in a bf16 model). Full tensors
    come back on the CPU.
    """
    dims = engine.dims
    params = {name: p for _, name, p in global_names(engine.module)}
    state = engine.optimizer_state()
    has_moments = collectives.any_rank(dims, state.step() is not None)
    local = {"weight": {}, "param": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name in layout_table.parameter_shapes(cfg):
        if dims.stage not in layout_table.stages_of(name, cfg, dims.pp):
            continue
        layout = layout_table.layout_of(name, cfg.gated_linear_unit)
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


def rescales(result, cfg: ModelConfig) -> bool:
    """Does the plan multiply old weights or change epsilon (then old gradients change at the growth point)?"""
    if result.cfg.layernorm_epsilon != cfg.layernorm_epsilon:
        return True
    return any(bool((axis.scale[axis.src >= 0] != 1).any()) for tmap in result.maps.values() for axis in tmap.axes)


def run(model: ModelConfig, plans: list[Plan], tp: int, pp: int, optimizer: str, seed: int, tol: float,
        device: str = "auto", backend: str = "auto") -> int:
    from mgrow.growth import grow
    from mgrow.model import build_gpt
    from mgrow.parallel.dims import init_distributed
    from mgrow.train.engines import build_engine
    from mgrow.verify import random_state, random_tokens

    dims = init_distributed(tp, pp, seed, device=device, backend=backend)
    if dims.is_cuda:
        torch.use_deterministic_algorithms(True, warn_only=True)
    cfg = train_config(model, dims, optimizer, min(16, model.max_sequence_length))
    cfg.check_world(dims.world)
    engine = build_engine(build_gpt(model, dims, init=random_state(model, seed, dims)), cfg, dims)
    batches = RandomBatches(cfg, seed, dims)
    for step in range(2):
        engine.train_step(batches(step))
    original = gather_state(engine, model)
    check_tokens = random_tokens(model, seed, batch=2, seq=cfg.train.seq_length)
    max_abs_logit = _max_abs_logit(dims, engine.logits(check_tokens))

    reports, stepped = [], []
    for plan in plans:
        rss.reset_peak()
        start_rss = rss.current()
        grown_engine, grown_cfg, report = grow(engine, cfg, plan, check_tokens=check_tokens, keep_old=True)
        growth_rss = rss.peak() - start_rss
        reference = apply_plan(original["weight"], model, plan)
        local = _ShardLocal(reference, model, tp)
        grown = gather_state(grown_engine, grown_cfg.model)
        moments_diff = 0.0
        for name, tmap in reference.maps.items():
            if tmap.old_name is None:
                continue
            m, v = apply_to_optimizer_state(tmap, original["exp_avg"][tmap.old_name],
                                            original["exp_avg_sq"][tmap.old_name])
            moments_diff = max(moments_diff, _max_abs(grown["exp_avg"][name], local(name, m)),
                               _max_abs(grown["exp_avg_sq"][name], local(name, v)))
        logit_tol = tol
        if model.bf16 and rescales(reference, model):
            logit_tol = max(tol, bf16_logit_tol(max_abs_logit, grown_cfg.model.num_layers))
        reports.append({
            "plan": plan.to_dict(),
            "layout": {**dims.describe(), "optimizer": optimizer},
            "bf16": model.bf16,
            "params_before": report.params_before,
            "params_after": report.params_after,
            "max_abs_logit_diff": report.max_abs_logit_diff,
            "max_abs_logit": max_abs_logit,
            "logit_tol": logit_tol,
            "max_abs_vs_reference": max(_max_abs(grown["weight"][n], local(n, t)) for n, t in reference.state.items()),
            "max_abs_moments_vs_reference": moments_diff,
            # the masters hold bits a bf16 copy would lose (else the bitwise master check proves nothing)
            "masters_finer_than_bf16": any(bool((w != w.bfloat16().float()).any()) for w in original["weight"].values()),
            "max_abs_params_vs_masters": max(
                _max_abs(grown["param"][n].float(), grown["weight"][n].to(model.dtype).float()) for n in grown["weight"]),
            "max_abs_step_equivalence": None,
            "growth_seconds": collectives.reduce_scalar(dims, report.growth_seconds, "max"),
            "peak_rss_growth_bytes": int(collectives.reduce_scalar(dims, max(0, growth_rss), "max")),
            "peak_device_growth_bytes": report.peak_device_bytes,
        })
        if not rescales(reference, model):
            grown_engine.train_step(batches(2))
            stepped.append((len(reports) - 1, local, gather_state(grown_engine, grown_cfg.model)["weight"]))
        grown_engine.destroy()

    if stepped:
        engine.train_step(batches(2))
        after = gather_state(engine, model)["weight"]
        for index, local, grown_after in stepped:
            reports[index]["max_abs_step_equivalence"] = _step_equivalence(local, after, grown_after)
    peak = int(collectives.reduce_scalar(dims, rss.peak_process(), "max"))
    ok = True
    for entry in reports:
        entry["peak_rss_bytes"] = peak
        entry["ok"] = bool(
            entry["max_abs_logit_diff"] <= entry["logit_tol"]
            and entry["max_abs_vs_reference"] == 0.0
            and entry["max_abs_moments_vs_reference"] == 0.0
            and entry["max_abs_params_vs_masters"] == 0.0
            and (entry["max_abs_step_equivalence"] is None or entry["max_abs_step_equivalence"] <= STEP_TOL)
        )
        ok &= entry["ok"]
        if dims.rank == 0:
            print(json.dumps(entry), flush=True)
    return 0 if ok else 1


class _ShardLocal:
    """Reference-order tensors of a grown model in the mover's shard-local order."""

    def __init__(self, reference, model: ModelConfig, tp: int):
        self.maps, self.new_cfg, self.tp = reference.maps, reference.cfg, tp
        self.old_shapes = layout_table.parameter_shapes(model)

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        tmap = self.maps[name]
        old_shape = self.old_shapes[tmap.old_name] if tmap.old_name is not None else None
        return shard_local(tensor, name, tmap, old_shape, self.new_cfg, self.tp)


def _step_equivalence(local: _ShardLocal, old_after: dict, grown_after: dict) -> float:
    worst = 0.0
    for name, tmap in local.maps.items():
        if tmap.old_name is None:
            continue
        kept = local(name, tmap.kind == int(Kind.OLD))
        expected = local(name, carry(tmap, old_after[tmap.old_name]))
        if kept.any():
            worst = max(worst, float((grown_after[name][kept] - expected[kept]).abs().max()))
    return worst


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) if a.numel() else 0.0


def _max_abs_logit(dims, logits) -> float:
    return collectives.reduce_scalar(dims, 0.0 if logits is None else float(logits.float().abs().max()), "max")
