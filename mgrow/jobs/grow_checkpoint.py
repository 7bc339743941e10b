"""`mgrow grow-checkpoint`: grow a saved checkpoint offline, weights and optimizer state, into a new checkpoint.

The job loads checkpoint A on its own layout (or the one asked for), grows it
in memory with the transaction a running job uses (:func:`mgrow.transforms.grow.grow`:
weights, fp32 masters, Adam moments and step), and saves B in A's format
(:mod:`mgrow.checkpoint.sources`: mgrow's own, Megatron-LM's, a plain
dist_checkpointing folder). An mgrow checkpoint B carries A's progress and the
plan added to its history: a run resumed from B with A's config replays that
history, so it builds the grown model without any config edit. A Megatron-LM
checkpoint B stores the grown sizes in its args.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mgrow.checkpoint.sources import DEEPSPEED, MGROW, open_source
from mgrow.core.errors import ConfigError
from mgrow.core.plan import Plan, load_plan
from mgrow.jobs.launch import RankJob, check_job_flags, check_models_fit, checkpoint_job_layout, execute


@dataclass(frozen=True)
class GrowCheckpoint:
    folder: Path
    metadata: dict
    plan: Plan
    out: str
    tp: int
    pp: int
    device: str
    backend: str
    grown_bytes: int  # about the size of the grown checkpoint


def main(args) -> int:
    folder, metadata, model = open_source(args.source, "--in", args.model)
    tp, pp, dp = checkpoint_job_layout(args, metadata["layout"])
    model = model.at_pipeline(pp)
    try:
        plan = load_plan(args.plan)
        grown = plan.validate(model)[-1]
    except ConfigError as error:
        raise ConfigError(f"--plan {args.plan}: {error.field}", f"{error.rule} (checkpoint {folder})") from None
    check_job_flags(tp, pp, dp)
    check_models_fit((("--in", model), (f"--plan {args.plan}", grown)), tp, pp)
    if os.path.abspath(args.out) in (os.path.abspath(folder), os.path.abspath(folder.parent)):
        raise ConfigError("--out", "must be another checkpoint root than --in's (the grown checkpoint would "
                                   "replace the one it is made from)")
    job = GrowCheckpoint(folder, metadata, plan, args.out, tp, pp, args.device, args.backend, grown.checkpoint_bytes())
    return execute(RankJob(tp * pp * dp, run_rank, job))


def run_rank(job: GrowCheckpoint) -> int:
    """One rank: restore A, grow it, save B; rank 0 prints one JSON line."""
    # the ranks' imports (the parent validates without torch)
    from mgrow.checkpoint.state import claimed_root
    from mgrow.parallel.dims import init_distributed, shutdown

    try:
        seed = job.metadata["config"].get("train", {}).get("seed", 0)
        dims = init_distributed(job.tp, job.pp, seed, device=job.device, backend=job.backend)
        start = time.perf_counter()
        grown, report, progress, save = _restore_and_grow(job, dims)
        with claimed_root(job.out, "--out", job.grown_bytes, dims):
            written = save()
        seconds = time.perf_counter() - start
        if dims.rank == 0:
            print(json.dumps({"in": str(job.folder), "out": str(written), "step": progress.step,
                              "format": job.metadata.get("source_format", MGROW),
                              "optimizer_state": job.metadata.get("optimizer_state", True),
                              "params_before": report.params_before, "params_after": report.params_after,
                              "max_abs_logit_diff": report.max_abs_logit_diff,
                              "growth_seconds": report.growth_seconds, "seconds": seconds}), flush=True)
        grown.destroy()
    finally:
        shutdown()
    return 0


def _restore_and_grow(job: GrowCheckpoint, dims):
    """(grown job, report, progress, a function that saves the grown job in A's format)."""
    from mgrow.checkpoint.files import Progress
    from mgrow.testing.harness import random_tokens

    progress = Progress.from_metadata(job.metadata)
    if job.metadata.get("source_format") == DEEPSPEED:  # the user's own engine, made again and grown as it runs
        from mgrow.checkpoint import deepspeed_user
        from mgrow.transforms.grow import grow_job

        source = deepspeed_user.restored_job(job.folder, job.metadata, dims)
        model = source.describe()
        tokens = random_tokens(model, 0, batch=2, seq=min(64, model.max_sequence_length))
        grown, report = grow_job(source, job.plan, check_tokens=tokens)
        return grown, report, progress, lambda: deepspeed_user.save(grown, report.model_after, job.out, job.metadata)

    from mgrow.checkpoint.sources import save_grown
    from mgrow.train.restore import restored_engine
    from mgrow.transforms.grow import grow

    engine, cfg, progress = restored_engine(job.folder, job.metadata, dims)
    tokens = random_tokens(cfg.model, 0, batch=2, seq=cfg.train.seq_length)
    grown, grown_cfg, report = grow(engine, cfg, job.plan, check_tokens=tokens)
    progress.history.append({"step": progress.step, "plan": report.plan, "source": "offline"})
    return grown, report, progress, lambda: save_grown(grown, grown_cfg, progress, job.out, job.metadata)
