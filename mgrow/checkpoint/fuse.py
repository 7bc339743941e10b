"""``mgrow fuse``: two checkpoints of one model config -> one checkpoint of the fused, twice-as-wide model.

The job loads A and B on one TP x PP x DP layout (each with its own optimizer
path), builds F's GPTModel stage on the same layout and fills it one
parameter at a time: this stage's TP ranks gather A's and B's fp32 masters of
that parameter (every stage already holds A's and B's copies of the
parameters it owns, so nothing crosses stages), :func:`mgrow.ops.fusion.fuse_tensor`
makes F's full tensor, and each rank keeps its shard. F starts a new run:
step 0 and the LR schedule from its start (warmup again), A's training config
with F's model, so ``mgrow train`` with F's model resumes it on any layout.
Adam's moments are fused like the weights and its step is A's. (A fresh Adam
is not an option: megatron's torch-AdamW state dict drops a step of 0,
``if step:`` in optimizer.py, and the saved state then cannot be loaded.)
The logits of F, A and B on one batch are compared: F(A, A) must equal A;
for A != B the deviation from (z_A + z_B) / 2 is reported, not bounded.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.distributed as dist

from mgrow.checkpoint import Progress, save
from mgrow.checkpoint.offline import read, restored_engine
from mgrow.errors import ConfigError
from mgrow.ops.fusion import fuse_moment, fuse_tensor, fused_config


def fuse_command(args) -> int:
    from mgrow.train.launch import check_job_flags, check_launcher_world, spawn_local, under_launcher

    folder_a, metadata_a, model_a = read(args.a, "--a")
    folder_b, metadata_b, model_b = read(args.b, "--b")
    fused = fused_config(model_a, model_b, field="--b")
    saved = metadata_a["layout"]
    tp, pp, dp = (getattr(args, k) if getattr(args, k) is not None else saved[k] for k in ("tp", "pp", "dp"))
    for metadata in (metadata_a, metadata_b):
        check_job_flags(tp, pp, dp, metadata["optimizer"])
    for what, cfg in (("--a", model_a), ("the fused model", fused)):
        try:
            cfg.check_layout(tp, pp)
        except ConfigError as error:
            raise ConfigError(what, f"the model does not fit tp={tp}, pp={pp}: {error}") from None
    out = os.path.abspath(args.out)
    for flag, folder in (("--a", folder_a), ("--b", folder_b)):
        if out in (os.path.abspath(folder), os.path.abspath(folder.parent)):
            raise ConfigError("--out", f"must be another checkpoint root than {flag}'s (the fused checkpoint would "
                                       "replace the one it is made from)")
    if not under_launcher():
        argv = ["fuse", "--a", str(folder_a), "--b", str(folder_b), "--out", args.out,
                "--tp", str(tp), "--pp", str(pp), "--dp", str(dp), "--device", args.device, "--backend", args.backend]
        return spawn_local(tp * pp * dp, argv)
    check_launcher_world(tp * pp * dp)
    return _fuse_job((folder_a, metadata_a), (folder_b, metadata_b), args.out, tp, pp, args.device, args.backend)


def _fuse_job(a, b, out: str, tp: int, pp: int, device: str, backend: str) -> int:
    from mgrow.parallel.dims import init_distributed, shutdown
    from mgrow.verify import random_tokens

    try:
        dims = init_distributed(tp, pp, a[1]["config"]["train"]["seed"], device=device, backend=backend)
        engine_a, cfg, _ = restored_engine(*a, dims)
        engine_b, _, _ = restored_engine(*b, dims)
        fused_cfg = dataclasses.replace(cfg, model=fused_config(cfg.model, cfg.model))
        engine = fuse_engines(engine_a, engine_b, cfg.model, fused_cfg)
        tokens = random_tokens(cfg.model, 0, batch=2, seq=cfg.train.seq_length)
        deviation = logit_deviation(engine_a, engine_b, engine, tokens)
        written = save(engine, fused_cfg, Progress(), out)
        if dist.get_rank() == 0:
            print(json.dumps({"a": str(a[0]), "b": str(b[0]), "out": str(written),
                              "params_a": cfg.model.num_parameters(),
                              "params_fused": fused_cfg.model.num_parameters(),
                              "model": fused_cfg.model.to_dict(), **deviation}), flush=True)
        for each in (engine_a, engine_b, engine):
            each.destroy()
    finally:
        shutdown()
    return 0


def fuse_engines(engine_a, engine_b, model_cfg, fused_cfg):
    """Collective: a new engine (``fused_cfg``) holding F(A, B), built shard by shard on the current layout.

    Weights from A's and B's fp32 masters; Adam moments by the same rules with A's step (none when A
    has taken no step yet).
    """
    from mgrow.growth.shards import gather_tp, split_tp
    from mgrow.growth.transaction import agreed_step
    from mgrow.layouts import megatron as layout_table
    from mgrow.layouts.optimizer_state import MOMENTS
    from mgrow.model import build_gpt, global_names, load_full_tensors
    from mgrow.train.engines import build_engine

    dims = engine_a.dims
    sources = [({name: param for _, name, param in global_names(e.module)}, e.optimizer_state())
               for e in (engine_a, engine_b)]

    def full_of(name: str, read) -> list[torch.Tensor]:
        """A's and B's full tensor ``read(state, param)`` of parameter ``name`` (collective over TP)."""
        layout = layout_table.layout_of(name, model_cfg.gated_linear_unit)
        return [gather_tp(read(state, params[name]), layout, dims) for params, state in sources]

    def shard(name: str, full: torch.Tensor) -> torch.Tensor:
        return split_tp(full, layout_table.layout_of(name, model_cfg.gated_linear_unit), dims)

    masters: dict[str, torch.Tensor] = {}

    def fused_weight(name: str, shape) -> torch.Tensor:
        fused = fuse_tensor(name, *full_of(name, lambda source, param: source.master(param)), model_cfg)
        if fused_cfg.model.bf16:
            masters[name] = shard(name, fused)
        return fused

    model = build_gpt(fused_cfg.model, dims, initialize=False)
    load_full_tensors(model, fused_cfg.model, fused_weight, dims)
    engine = build_engine(model, fused_cfg, dims)
    state = engine.optimizer_state()
    fused_params = [(name, param) for _, name, param in global_names(engine.module)]
    if fused_cfg.model.bf16:  # the parameters hold the bf16 rounding; the fp32 masters get the fused values
        for name, param in fused_params:
            state.set_master(param, masters.pop(name))
    step = agreed_step(dims, sources[0][1].step())
    if step is None:
        return engine
    state.init(step)
    for name, param in fused_params:
        for power, key in enumerate(MOMENTS, start=1):
            full = full_of(name, lambda source, param: source.moment(param, key))
            state.set_moment(param, key, shard(name, fuse_moment(name, *full, model_cfg, power)))
    return engine


def logit_deviation(engine_a, engine_b, engine, tokens: torch.Tensor) -> dict:
    """max |z_F - (z_A + z_B) / 2| and max |(z_A + z_B) / 2| over every rank's logits (vocab slices)."""
    z_a, z_b, z_f = (e.logits(tokens) for e in (engine_a, engine_b, engine))
    values = torch.zeros(3, dtype=torch.float64, device=engine.dims.comm_device)
    if z_f is not None:
        average = (z_a.float() + z_b.float()) / 2
        values[0] = float((z_f.float() - average).abs().max())
        values[1] = float(average.abs().max())
        values[2] = float((z_a.float() - z_b.float()).abs().max())
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return {"max_abs_logit_diff_vs_average": float(values[0]), "max_abs_logit_average": float(values[1]),
            "max_abs_logit_diff_a_b": float(values[2])}
