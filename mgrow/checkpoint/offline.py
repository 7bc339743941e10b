"""Checkpoints outside a training run: ``mgrow grow-checkpoint`` and ``mgrow verify --before A --after B``.

``grow-checkpoint`` loads checkpoint A on its own layout (or the one asked
for), grows it in memory with the same transaction a running job uses
(:func:`mgrow.growth.grow`: weights, fp32 masters, Adam moments and step),
and saves B with A's progress and the plan added to its history. A run
resumed from B with A's config replays that history, so it builds the grown
model without any config edit.
"""

from __future__ import annotations

import json
import os
import time

from mgrow.checkpoint import Progress, Resume, files, load, save
from mgrow.errors import ConfigError
from mgrow.model_config import ModelConfig


def read(path: str, field: str):
    """(step folder, metadata, model) of the checkpoint ``path``; errors name ``field`` or the file."""
    if not os.path.exists(path):
        raise ConfigError(field, f"checkpoint {path} does not exist")
    folder = files.resolve(path)
    metadata = files.read_metadata(folder)
    return folder, metadata, ModelConfig.from_dict(metadata["model"])


def training_config(metadata: dict, dims):
    """The config a checkpoint was saved with, on this job's layout and device, without its schedule,
    checkpoints or W&B."""
    from mgrow.train.config import from_dict

    parallel = {"tp": dims.tp, "pp": dims.pp, "device": dims.device.type, "backend": dims.backend}
    raw = {**metadata["config"], "model": metadata["model"], "parallel": parallel,
           "growth": None, "wandb": None, "checkpoint": {}}
    raw["train"] = {**raw["train"], "metrics_path": None, "progress": False}
    return from_dict(raw)


def restored_engine(folder, metadata, dims):
    """An engine on this job's layout and device holding the checkpoint's model and optimizer state."""
    from mgrow.model import build_gpt
    from mgrow.train.engines import build_engine

    cfg = training_config(metadata, dims)
    progress = Progress.from_metadata(metadata)
    resume = Resume(folder, metadata, cfg, progress)
    engine = build_engine(build_gpt(cfg.model, dims, seed=cfg.train.seed), cfg, dims)
    load(engine, resume)
    return engine, cfg, progress


# ----------------------------------------------------------------------------- grow-checkpoint


def grow_command(args) -> int:
    from mgrow.plan import load_plan
    from mgrow.train.launch import check_job_flags, check_launcher_world, spawn_local, under_launcher

    folder, metadata, model = read(args.source, "--in")
    saved = metadata["layout"]
    tp, pp, dp = (getattr(args, k) if getattr(args, k) is not None else saved[k] for k in ("tp", "pp", "dp"))
    try:
        plan = load_plan(args.plan)
        grown = plan.validate(model)[-1]
    except ConfigError as error:
        raise ConfigError(f"--plan {args.plan}: {error.field}", f"{error.rule} (checkpoint {folder})") from None
    check_job_flags(tp, pp, dp)
    for what, cfg in (("--in", model), (f"--plan {args.plan}", grown)):
        try:
            cfg.check_layout(tp, pp)
        except ConfigError as error:
            raise ConfigError(what, f"the model does not fit tp={tp}, pp={pp}: {error}") from None
    if os.path.abspath(args.out) == os.path.abspath(folder.parent):
        raise ConfigError("--out", "must be another checkpoint root than --in's (the grown checkpoint would "
                                   "replace the one it is made from)")
    if not under_launcher():
        argv = ["grow-checkpoint", "--in", str(folder), "--plan", args.plan, "--out", args.out,
                "--tp", str(tp), "--pp", str(pp), "--dp", str(dp), "--device", args.device, "--backend", args.backend]
        return spawn_local(tp * pp * dp, argv)
    check_launcher_world(tp * pp * dp)
    return _grow_job(folder, metadata, plan, args.out, tp, pp, args.device, args.backend)


def _grow_job(folder, metadata, plan, out: str, tp: int, pp: int, device: str, backend: str) -> int:
    import torch.distributed as dist

    from mgrow.growth import grow
    from mgrow.parallel.dims import init_distributed, shutdown
    from mgrow.verify import random_tokens

    try:
        dims = init_distributed(tp, pp, metadata["config"]["train"]["seed"], device=device, backend=backend)
        engine, cfg, progress = restored_engine(folder, metadata, dims)
        tokens = random_tokens(cfg.model, 0, batch=2, seq=cfg.train.seq_length)
        start = time.perf_counter()
        engine, grown_cfg, report = grow(engine, cfg, plan, check_tokens=tokens)
        progress.history.append({"step": progress.step, "plan": report.plan, "source": "offline"})
        written = save(engine, grown_cfg, progress, out)
        seconds = time.perf_counter() - start
        if dist.get_rank() == 0:
            print(json.dumps({"in": str(folder), "out": str(written), "step": progress.step,
                              "params_before": report.params_before, "params_after": report.params_after,
                              "max_abs_logit_diff": report.max_abs_logit_diff,
                              "growth_seconds": report.growth_seconds, "seconds": seconds}), flush=True)
        engine.destroy()
    finally:
        shutdown()
    return 0


# ----------------------------------------------------------------------------- verify --before --after


def verify_checkpoints(before: str, after: str, tol: float, seed: int, device: str = "auto",
                       backend: str = "auto") -> int:
    """Logits of A and B's models (TP=1, PP=1, one process) on one batch; one JSON line; 1 beyond ``tol``.

    When both hold the same model, the weights and Adam moments are compared too (max-abs; 0.0 = bitwise).
    """
    from mgrow.growth.verify_job import gather_state
    from mgrow.parallel.dims import init_single_process
    from mgrow.verify import random_tokens

    checkpoints = [read(before, "--before"), read(after, "--after")]
    vocab = {model.vocab_size for _, _, model in checkpoints}
    if len(vocab) != 1:
        raise ConfigError("--after", f"the checkpoints have different vocabularies ({sorted(vocab)}): their "
                                     "logits cannot be compared")
    dims = init_single_process(device=device, backend=backend)
    seq = min(min(m.max_sequence_length for _, _, m in checkpoints), checkpoints[0][1]["config"]["train"]["seq_length"])
    tokens = random_tokens(checkpoints[0][2], seed, batch=2, seq=seq)
    same_model = checkpoints[0][2] == checkpoints[1][2]
    logits, params, states = [], [], []
    for folder, metadata, model in checkpoints:
        engine, _, _ = restored_engine(folder, metadata, dims)
        logits.append(engine.logits(tokens).float())
        params.append(model.num_parameters())
        if same_model:
            states.append(gather_state(engine, model))
        engine.destroy()
    diff = float((logits[1] - logits[0]).abs().max())
    report = {"before": str(checkpoints[0][0]), "after": str(checkpoints[1][0]), "params_before": params[0],
              "params_after": params[1], "max_abs_logit_diff": diff, "max_abs_logit": float(logits[0].abs().max()),
              "max_abs_weight_diff": _max_diff(states, ("weight",)) if same_model else None,
              "max_abs_moments_diff": _max_diff(states, ("exp_avg", "exp_avg_sq")) if same_model else None,
              "tol": tol, "ok": diff <= tol}
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


def _max_diff(states: list, keys: tuple):
    """Max-abs difference of two gathered states over ``keys`` (None when a checkpoint has no moments yet)."""
    worst = 0.0
    for key in keys:
        a, b = states[0][key], states[1][key]
        if a.keys() != b.keys() or not a:
            return None
        worst = max([worst] + [float((a[name] - b[name]).abs().max()) for name in a])
    return worst
