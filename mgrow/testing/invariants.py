"""The invariants every growth must keep, checked on a random model: what ``mgrow verify`` runs.

:func:`reference_check` (one process, TP=1): a random model of the given shape,
logits on random tokens, the plan applied by the reference operators, a
megatron-core GPTModel built from the grown weights, logits again.

:func:`growth_check` (every rank of a TP x PP x DP job): train a random model 2
steps on an optimizer path, grow it in memory by each plan, and report against
the engine trained for two steps:

* ``max_abs_logit_diff``: logits on one batch before vs after growth, within
  ``logit_tol`` (``--tol``; in bf16, for plans that rescale old weights,
  :func:`bf16_logit_tol` of ``max_abs_logit``, the largest logit before);
* ``max_abs_vs_reference`` / ``max_abs_moments_vs_reference``: the gathered grown
  fp32 weights (the masters in bf16) / Adam moments vs the reference operators
  (and their index maps) on the gathered original, in the mover's shard-local
  order (:func:`mgrow.parallel.shards.shard_local`);
* ``max_abs_params_vs_masters``: the model's parameters vs their masters
  (in bf16, vs the masters' bf16 rounding): 0 bit for bit;
* ``max_abs_step_equivalence``: one more step on the grown and on the old
  engine with the same batch, old slice vs old model (null for plans that
  rescale old weights or change epsilon: their gradients move);
* ``growth_seconds``, ``peak_rss_bytes`` (max over ranks, whole process) and
  ``peak_rss_growth_bytes`` (max over ranks, during growth only); on CUDA
  ``peak_device_growth_bytes`` (``torch.cuda.max_memory_allocated`` during growth, max over ranks).

:func:`compare_checkpoints` (one process): the logits, weights and moments of two checkpoints.

On CUDA ranks torch's deterministic algorithms are on (warn-only where an op has
no deterministic kernel), so the exact comparisons compare one computation each.
"""

from __future__ import annotations

from typing import Optional

import torch

from mgrow.core import memory
from mgrow.core.model_config import ModelConfig
from mgrow.core.parameters import parameter_shapes
from mgrow.core.plan import Plan
from mgrow.checkpoint import deepspeed_user
from mgrow.core.tolerances import bf16_logit_tol
from mgrow.engine.engines import build_engine
from mgrow.engine.model import build_gpt, largest_abs
from mgrow.ops import Kind, apply_to_optimizer_state, carry
from mgrow.ops.plan import apply_plan
from mgrow.parallel import collectives
from mgrow.parallel.shards import shard_local
from mgrow.testing.harness import (
    RandomBatches,
    check_config,
    gather_state,
    max_abs,
    random_state,
    random_tokens,
    reference_logits,
)
from mgrow.train.restore import restored_engine
from mgrow.transforms.grow import grow

STEP_TOL = 1e-6


def reference_check(cfg: ModelConfig, plan: Plan, dims, seed: int = 0, batch: int = 2, seq: int = 16) -> dict:
    """Grow a random ``cfg`` model by ``plan`` with the reference operators; compare logits before and after.

    The operators run on full CPU tensors; the two models run on ``dims.device`` (one rank, TP=1, PP=1).
    """
    state = random_state(cfg, seed, dims)
    tokens = random_tokens(cfg, seed, batch, seq)
    before = reference_logits(cfg, state, tokens, dims)
    result = apply_plan(state, cfg, plan)
    after = reference_logits(result.cfg, result.state, tokens, dims)
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size")
    return {
        "params_before": sum(t.numel() for t in state.values()),
        "params_after": sum(t.numel() for t in result.state.values()),
        "max_abs_logit_diff": float((after - before).abs().max()),
        "max_abs_logit": float(before.abs().max()),
        "ops": [op.name for op in plan.ops],
        "model_after": {key: getattr(result.cfg, key) for key in keys},
    }


def rescales(result, cfg: ModelConfig) -> bool:
    """Does the plan multiply old weights or change epsilon (then old gradients change at the growth point)?"""
    if result.cfg.layernorm_epsilon != cfg.layernorm_epsilon:
        return True
    return any(bool((axis.scale[axis.src >= 0] != 1).any()) for tmap in result.maps.values() for axis in tmap.axes)


def growth_check(model: ModelConfig, plans: list[Plan], dims, optimizer: str, seed: int, tol: float) -> list[dict]:
    """Collective: one report per plan (the invariants above), every entry's ``ok`` set; the same on every rank."""
    if dims.is_cuda:
        torch.use_deterministic_algorithms(True, warn_only=True)
    cfg = check_config(model, dims, optimizer, min(16, model.max_sequence_length))
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
        memory.rss_reset_peak()
        start_rss = memory.rss_current()
        grown_engine, grown_cfg, report = grow(engine, cfg, plan, check_tokens=check_tokens, keep_old=True)
        growth_rss = memory.rss_peak() - start_rss
        reference = apply_plan(original["weight"], model, plan)
        local = ShardLocal(reference, model, dims.tp)
        grown = gather_state(grown_engine, grown_cfg.model)
        moments_diff = 0.0
        for name, tmap in reference.maps.items():
            if tmap.old_name is None:
                continue
            m, v = apply_to_optimizer_state(tmap, original["exp_avg"][tmap.old_name],
                                            original["exp_avg_sq"][tmap.old_name])
            moments_diff = max(moments_diff, max_abs(grown["exp_avg"][name], local(name, m)),
                               max_abs(grown["exp_avg_sq"][name], local(name, v)))
        logit_tol = tol
        if model.bf16 and rescales(reference, model):
            logit_tol = max(tol, bf16_logit_tol(max_abs_logit, grown_cfg.model.num_layers))
        reports.append({
            "plan": plan.to_dict(),
            "layout": {**dims.describe(), "optimizer": optimizer},
            "bf16": model.bf16,
            "params_before": report.params_before,
            "params_after": report.params_after,
            "stages": [list(report.stages_before), list(report.stages_after)],
            "max_abs_logit_diff": report.max_abs_logit_diff,
            "max_abs_logit": max_abs_logit,
            "logit_tol": logit_tol,
            "max_abs_vs_reference": max(max_abs(grown["weight"][n], local(n, t)) for n, t in reference.state.items()),
            "max_abs_moments_vs_reference": moments_diff,
            # the masters hold bits a bf16 copy would lose (else the bitwise master check proves nothing)
            "masters_finer_than_bf16": any(bool((w != w.bfloat16().float()).any()) for w in original["weight"].values()),
            "max_abs_params_vs_masters": max(
                max_abs(grown["param"][n].float(), grown["weight"][n].to(model.dtype).float()) for n in grown["weight"]),
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
            reports[index]["max_abs_step_equivalence"] = step_equivalence(local, after, grown_after)
    peak = int(collectives.reduce_scalar(dims, memory.rss_peak_process(), "max"))
    for entry in reports:
        entry["peak_rss_bytes"] = peak
        entry["ok"] = bool(
            entry["max_abs_logit_diff"] <= entry["logit_tol"]
            and entry["max_abs_vs_reference"] == 0.0
            and entry["max_abs_moments_vs_reference"] == 0.0
            and entry["max_abs_params_vs_masters"] == 0.0
            and (entry["max_abs_step_equivalence"] is None or entry["max_abs_step_equivalence"] <= STEP_TOL)
        )
    engine.destroy()
    return reports


class ShardLocal:
    """Reference-order tensors of a grown model in the mover's shard-local order."""

    def __init__(self, reference, model: ModelConfig, tp: int):
        self.maps, self.new_cfg, self.tp = reference.maps, reference.cfg, tp
        self.old_shapes = parameter_shapes(model)

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        tmap = self.maps[name]
        old_shape = self.old_shapes[tmap.old_name] if tmap.old_name is not None else None
        return shard_local(tensor, name, tmap, old_shape, self.new_cfg, self.tp)


def step_equivalence(local: ShardLocal, old_after: dict, grown_after: dict) -> float:
    """max |grown - old| over the old entries after one more step on both (in the grown model's order)."""
    worst = 0.0
    for name, tmap in local.maps.items():
        if tmap.old_name is None:
            continue
        kept = local(name, tmap.kind == int(Kind.OLD))
        expected = local(name, carry(tmap, old_after[tmap.old_name]))
        if kept.any():
            worst = max(worst, float((grown_after[name][kept] - expected[kept]).abs().max()))
    return worst


def compare_checkpoints(checkpoints: list, dims, tol: float, seed: int) -> dict:
    """Logits of two checkpoints' models (``checkpoints``: two (folder, metadata, model)) on one batch, and, when
    they hold the same model, their weights and Adam moments (max-abs; 0.0 = bitwise)."""
    seq = min(min(m.max_sequence_length for _, _, m in checkpoints),
              checkpoints[0][1]["config"].get("train", {}).get("seq_length", 64))
    tokens = random_tokens(checkpoints[0][2], seed, batch=2, seq=seq)
    same_model = checkpoints[0][2] == checkpoints[1][2]
    logits, params, states = [], [], []
    for folder, metadata, model in checkpoints:
        params.append(model.num_parameters())
        engine, _, _ = restored_engine(folder, metadata, dims)
        logits.append(engine.logits(tokens).float())
        if same_model:
            states.append(gather_state(engine, model))
        engine.destroy()
    diff = float((logits[1] - logits[0]).abs().max())
    return {"before": str(checkpoints[0][0]), "after": str(checkpoints[1][0]), "params_before": params[0],
            "params_after": params[1], "max_abs_logit_diff": diff, "max_abs_logit": float(logits[0].abs().max()),
            "max_abs_weight_diff": _state_diff(states, ("weight",)) if same_model else None,
            "max_abs_moments_diff": _state_diff(states, ("exp_avg", "exp_avg_sq")) if same_model else None,
            "tol": tol, "ok": diff <= tol}


def compare_deepspeed_checkpoints(checkpoints: list, dims, tol: float, seed: int) -> dict:
    """Collective, on the layout that saved them: the logits of two DeepSpeed checkpoints' models, each loaded
    into the user's engine made again (:func:`mgrow.checkpoint.deepspeed_user.restored_job`)."""
    model = checkpoints[0][2]
    tokens = random_tokens(model, seed, batch=2, seq=min(64, model.max_sequence_length))
    logits = []
    for folder, metadata, _ in checkpoints:
        job = deepspeed_user.restored_job(folder, metadata, dims)
        logits.append(job.logits(tokens).float())  # this TP rank's vocabulary slice
        job.destroy()
    diff = collectives.reduce_scalar(dims, largest_abs(logits[1] - logits[0]), "max")
    return {"before": str(checkpoints[0][0]), "after": str(checkpoints[1][0]),
            "params_before": checkpoints[0][2].num_parameters(), "params_after": checkpoints[1][2].num_parameters(),
            "max_abs_logit_diff": diff, "max_abs_logit": collectives.reduce_scalar(dims, largest_abs(logits[0]), "max"),
            "max_abs_weight_diff": None, "max_abs_moments_diff": None, "tol": tol, "ok": diff <= tol}


def _state_diff(states: list, keys: tuple) -> Optional[float]:
    """Max-abs difference of two gathered states over ``keys`` (None when a checkpoint has no moments yet)."""
    worst = 0.0
    for key in keys:
        a, b = states[0].get(key, {}), states[1].get(key, {})
        if a.keys() != b.keys() or not a:
            return None
        worst = max([worst] + [float((a[name] - b[name]).abs().max()) for name in a])
    return worst


def _max_abs_logit(dims, logits) -> float:
    return collectives.reduce_scalar(dims, 0.0 if logits is None else largest_abs(logits.float()), "max")
