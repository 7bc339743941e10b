"""`mgrow fuse`: two checkpoints of one model config -> one checkpoint of the fused, twice-as-wide model.

The job loads A and B on one TP x PP x DP layout and fuses them in memory
(:func:`mgrow.transforms.fuse.fuse`, all or nothing on every rank). F starts a
new run: step 0 and the LR schedule from its start (warmup again), A's training
config with F's model, so ``mgrow train`` with F's model resumes it on any
layout; Adam's moments are fused like the weights and its step is A's. (A fresh
Adam is not an option: megatron's torch-AdamW state dict drops a step of 0,
``if step:`` in optimizer.py, and the saved state then cannot be loaded.) The
logits of F, A and B on one batch are compared: F(A, A) must equal A; for
A != B the deviation from (z_A + z_B) / 2 is reported, not bounded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from mgrow.checkpoint.files import open_checkpoint
from mgrow.core.errors import ConfigError
from mgrow.core.plan import fused_config
from mgrow.jobs.launch import RankJob, check_job_flags, check_models_fit, checkpoint_job_layout, execute


@dataclass(frozen=True)
class Fuse:
    a: tuple  # (step folder, metadata)
    b: tuple
    out: str
    tp: int
    pp: int
    device: str
    backend: str


def main(args) -> int:
    folder_a, metadata_a, model_a = open_checkpoint(args.a, "--a")
    folder_b, metadata_b, model_b = open_checkpoint(args.b, "--b")
    fused = fused_config(model_a, model_b, field="--b")
    tp, pp, dp = checkpoint_job_layout(args, metadata_a["layout"])
    for metadata in (metadata_a, metadata_b):
        check_job_flags(tp, pp, dp, metadata["optimizer"])
    check_models_fit((("--a", model_a), ("the fused model", fused)), tp, pp)
    out = os.path.abspath(args.out)
    for flag, folder in (("--a", folder_a), ("--b", folder_b)):
        if out in (os.path.abspath(folder), os.path.abspath(folder.parent)):
            raise ConfigError("--out", f"must be another checkpoint root than {flag}'s (the fused checkpoint would "
                                       "replace the one it is made from)")
    job = Fuse((folder_a, metadata_a), (folder_b, metadata_b), args.out, tp, pp, args.device, args.backend)
    return execute(RankJob(tp * pp * dp, run_rank, job))


def run_rank(job: Fuse) -> int:
    """One rank: restore A and B, fuse them, save F; rank 0 prints one JSON line."""
    # the ranks' imports (the parent validates without torch)
    from mgrow.checkpoint.state import Progress, save
    from mgrow.parallel.dims import init_distributed, shutdown
    from mgrow.testing.harness import random_tokens
    from mgrow.train.restore import restored_engine
    from mgrow.transforms.fuse import fuse, logit_deviation

    try:
        dims = init_distributed(job.tp, job.pp, job.a[1]["config"]["train"]["seed"], device=job.device,
                                backend=job.backend)
        engine_a, cfg, _ = restored_engine(*job.a, dims)
        engine_b, _, _ = restored_engine(*job.b, dims)
        engine, fused_cfg = fuse(engine_a, engine_b, cfg)
        tokens = random_tokens(cfg.model, 0, batch=2, seq=cfg.train.seq_length)
        deviation = logit_deviation(engine_a, engine_b, engine, tokens)
        written = save(engine, fused_cfg, Progress(), job.out)
        if dims.rank == 0:
            print(json.dumps({"a": str(job.a[0]), "b": str(job.b[0]), "out": str(written),
                              "params_a": cfg.model.num_parameters(),
                              "params_fused": fused_cfg.model.num_parameters(),
                              "model": fused_cfg.model.to_dict(), **deviation}), flush=True)
        for each in (engine_a, engine_b, engine):
            each.destroy()
    finally:
        shutdown()
    return 0
