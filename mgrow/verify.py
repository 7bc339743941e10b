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

def run(args) -> int:
    if args.before is not None or args.after is not None:
        if args.before is None or args.after is None or args.model or args.plan:
            raise ConfigError("--before", "checkpoints are compared as --before A --after B, without --model/--plan")
        from mgrow.checkpoint.offline import verify_checkpoints

        return verify_checkpoints(args.before, args.after, args.tol, args.seed, args.device, args.backend)
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
    from mgrow.parallel.dims import init_single_process

    dims = init_single_process(device=args.device, backend=args.backend)
    for plan in plans:
        report = reference_check(cfg, plan, dims, seed=args.seed)
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
                "--tp", str(args.tp), "--pp", str(args.pp), "--dp", str(args.dp), "--optimizer", optimizer,
                "--device", args.device, "--backend", args.backend]
        if args.bf16:
            argv.append("--bf16")
        for path in args.plan:
            argv += ["--plan", path]
        return spawn_local(world, argv)
    check_launcher_world(world)
    from mgrow.growth import verify_job
    from mgrow.parallel.dims import shutdown

    try:
        return verify_job.run(cfg, plans, args.tp, args.pp, optimizer, args.seed, args.tol, args.device,
                              args.backend)
    finally:
        shutdown()


def reference_check(
    cfg: ModelConfig, plan: Union[Plan, dict, str], dims, seed: int = 0, batch: int = 2, seq: int = 16
) -> dict:
    """Grow a random ``cfg`` model by ``plan`` with the reference operators; compare logits before and after.

    The operators run on full CPU tensors; the two models run on ``dims.device`` (one rank, TP=1, PP=1).
    """
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    state = random_state(cfg, seed, dims)
    tokens = random_tokens(cfg, seed, batch, seq)
    before = logits(cfg, state, tokens, dims)
    result = apply_plan(state, cfg, plan)
    after = logits(result.cfg, result.state, tokens, dims)
    return {
        "params_before": sum(t.numel() for t in state.values()),
        "params_after": sum(t.numel() for t in result.state.values()),
        "max_abs_logit_diff": float((after - before).abs().max()),
        "max_abs_logit": float(before.abs().max()),
        "ops": [op.name for op in plan.ops],
        "model_after": _dims(result.cfg),
    }


def random_state(cfg: ModelConfig, seed: int, dims) -> dict[str, torch.Tensor]:
    """Full CPU tensors of a ``cfg`` model with every parameter random and activations of order 1 (the same on
    every layout and device: drawn on the CPU generator in the model's parameter order)."""
    from mgrow.model import build_gpt, gather_full_tensors

    shapes = gather_full_tensors(build_gpt(cfg, dims, seed=seed), cfg, dims)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    state = {}
    for name, tensor in shapes.items():
        if is_norm_gain(name):
            state[name] = 0.5 + torch.rand(tensor.shape, generator=generator, device="cpu")
        elif name.endswith(".bias"):
            state[name] = 0.2 * torch.randn(tensor.shape, generator=generator, device="cpu")
        else:  # [out, in] and embeddings [rows, h]: entries N(0, 1/in), so logits stay of order 1 when tied too
            state[name] = torch.randn(tensor.shape, generator=generator, device="cpu") / math.sqrt(tensor.shape[1])
    return state


def random_tokens(cfg: ModelConfig, seed: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    """[batch, seq] token ids on the CPU (engines move batches to their device)."""
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    return torch.randint(0, cfg.vocab_size, (batch, min(seq, cfg.max_sequence_length)), generator=generator,
                         device="cpu")


def logits(cfg: ModelConfig, state: dict[str, torch.Tensor], tokens: torch.Tensor, dims) -> torch.Tensor:
    """[batch, seq, vocab] logits (on the CPU) of a megatron-core GPTModel holding ``state`` (TP=1, PP=1)."""
    from mgrow.model import build_gpt, position_ids

    model = build_gpt(cfg, dims, init=state)
    model.eval()
    tokens = tokens.to(dims.device)
    with torch.no_grad():
        return model(tokens, position_ids(tokens), None).cpu()


def load_model_config(path: str) -> ModelConfig:
    if not os.path.exists(path):
        raise ConfigError("--model", f"model file {path} does not exist")
    with open(path) as f:
        return ModelConfig.from_dict(yaml.safe_load(f))


def _dims(cfg: ModelConfig) -> dict:
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size")
    return {key: getattr(cfg, key) for key in keys}
