"""`mgrow verify`: grow a random model by a plan and check that its logits do not change.

The reference check runs in one process at TP=1: a random model of the given
shape (norm gains, norm biases and linear biases random too: megatron's ones
and zeros would hide a wrong rule; weights scaled so activations and logits are
of order 1, so a wrong rule moves them visibly), logits on random tokens, the
plan applied by the reference operators, a megatron-core GPTModel built from
the grown weights, logits again.
"""

from __future__ import annotations

import json
import math
import os
from typing import Union

import torch
import yaml

from mgrow.errors import ConfigError
from mgrow.model_config import ModelConfig
from mgrow.ops.common import is_norm_gain
from mgrow.plan import Plan, apply_plan, load_plan
from mgrow.runtime import init_single_process

def run(args) -> int:
    if args.before is not None or args.after is not None:
        if args.before is None or args.after is None or args.model or args.plan:
            raise ConfigError("--before", "checkpoints are compared as --before A --after B, without --model/--plan")
        from mgrow.checkpoint.offline import verify_checkpoints

        return verify_checkpoints(args.before, args.after, args.tol, args.seed)
    for flag in ("model", "plan"):
        if not getattr(args, flag):
            raise ConfigError(f"--{flag}", "required (or compare two checkpoints with --before A --after B)")
    cfg = load_model_config(args.model)
    if args.bf16:
        cfg = cfg.replace(bf16=True)
    plans = [load_plan(path) for path in args.plan]
    sharded = args.optimizer is not None or (args.tp, args.pp, args.dp) != (1, 1, 1) or cfg.bf16
    for plan in plans:
        plan.validate(cfg)  # refuse an impossible plan before starting megatron, on every rank
    if sharded:
        return _run_sharded(args, cfg, plans)
    init_single_process()
    for plan in plans:
        report = reference_check(cfg, plan, seed=args.seed)
        report["tol"] = args.tol
        report["ok"] = report["max_abs_logit_diff"] <= args.tol
        print(json.dumps(report), flush=True)
        if not report["ok"]:
            return 1
    return 0


def _run_sharded(args, cfg: ModelConfig, plans: list[Plan]) -> int:
    from mgrow.train.launch import check_job_flags, check_launcher_world, spawn_local, under_launcher

    optimizer = args.optimizer or "adam"
    check_job_flags(args.tp, args.pp, args.dp, optimizer)
    try:
        cfg.check_layout(args.tp, args.pp)
    except ConfigError as error:
        raise ConfigError(f"--model ({error.field})", error.rule) from None
    for index, plan in enumerate(plans):
        try:
            plan.validate(cfg)[-1].check_layout(args.tp, args.pp)
        except ConfigError as error:
            raise ConfigError(f"--plan {args.plan[index]}", f"the grown model breaks {error}") from None
    world = args.tp * args.pp * args.dp
    if not under_launcher():
        argv = ["verify", "--model", args.model, "--tol", str(args.tol), "--seed", str(args.seed),
                "--tp", str(args.tp), "--pp", str(args.pp), "--dp", str(args.dp), "--optimizer", optimizer]
        if args.bf16:
            argv.append("--bf16")
        for path in args.plan:
            argv += ["--plan", path]
        return spawn_local(world, argv)
    check_launcher_world(world)
    from mgrow.growth import verify_job
    from mgrow.runtime import shutdown

    try:
        return verify_job.run(cfg, plans, args.tp, args.pp, optimizer, args.seed, args.tol)
    finally:
        shutdown()


def reference_check(
    cfg: ModelConfig, plan: Union[Plan, dict, str], seed: int = 0, batch: int = 2, seq: int = 16
) -> dict:
    """Grow a random ``cfg`` model by ``plan`` with the reference operators; compare logits before and after."""
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    state = random_state(cfg, seed)
    tokens = random_tokens(cfg, seed, batch, seq)
    before = logits(cfg, state, tokens)
    result = apply_plan(state, cfg, plan)
    after = logits(result.cfg, result.state, tokens)
    return {
        "params_before": sum(t.numel() for t in state.values()),
        "params_after": sum(t.numel() for t in result.state.values()),
        "max_abs_logit_diff": float((after - before).abs().max()),
        "max_abs_logit": float(before.abs().max()),
        "ops": [op.name for op in plan.ops],
        "model_after": _dims(result.cfg),
    }


def random_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Full tensors of a ``cfg`` model with every parameter random and activations of order 1."""
    from mgrow.model import build_gpt, gather_full_tensors

    shapes = gather_full_tensors(build_gpt(cfg, seed=seed), cfg)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in shapes.items():
        if is_norm_gain(name):
            state[name] = 0.5 + torch.rand(tensor.shape, generator=generator)
        elif name.endswith(".bias"):
            state[name] = 0.2 * torch.randn(tensor.shape, generator=generator)
        else:  # [out, in] and embeddings [rows, h]: entries N(0, 1/in), so logits stay of order 1 when tied too
            state[name] = torch.randn(tensor.shape, generator=generator) / math.sqrt(tensor.shape[1])
    return state


def random_tokens(cfg: ModelConfig, seed: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, cfg.vocab_size, (batch, min(seq, cfg.max_sequence_length)), generator=generator)


def logits(cfg: ModelConfig, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """[batch, seq, vocab] logits of a megatron-core GPTModel holding ``state`` (TP=1, PP=1)."""
    from mgrow.model import build_gpt

    model = build_gpt(cfg, init=state)
    model.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    with torch.no_grad():
        return model(tokens, positions, None)


def load_model_config(path: str) -> ModelConfig:
    if not os.path.exists(path):
        raise ConfigError("--model", f"model file {path} does not exist")
    with open(path) as f:
        return ModelConfig.from_dict(yaml.safe_load(f))


def _dims(cfg: ModelConfig) -> dict:
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size")
    return {key: getattr(cfg, key) for key in keys}
