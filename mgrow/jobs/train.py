"""`mgrow train`: every rank refuses a bad config before anything starts, then runs the training loop.

Under torchrun or the deepspeed launcher this process is one rank; otherwise
``--nproc`` local ranks are started (default tp x pp, i.e. DP = 1).
"""

from __future__ import annotations

import os

from mgrow.core.errors import ConfigError
from mgrow.jobs.launch import RankJob, execute, under_launcher
from mgrow.train import config as train_config
from mgrow.train.resume import find_resume


def main(args) -> int:
    cfg = train_config.load(args.config, args.overrides)
    if under_launcher() and args.nproc is not None and args.nproc != int(os.environ["WORLD_SIZE"]):
        raise ConfigError("--nproc", f"{args.nproc} local ranks asked for, but RANK and WORLD_SIZE = "
                                     f"{os.environ['WORLD_SIZE']} are set as a launcher sets them (stale variables? "
                                     "unset RANK, WORLD_SIZE and LOCAL_RANK to start local ranks)")
    world = int(os.environ["WORLD_SIZE"]) if under_launcher() else args.nproc or cfg.parallel.tp * cfg.parallel.pp
    cfg.check_world(world)
    find_resume(cfg)  # a checkpoint that does not fit is refused here too, before the ranks start
    return execute(RankJob(world, run_rank, cfg))


def run_rank(cfg) -> int:
    # the ranks' imports (the parent validates without torch)
    from mgrow.parallel.dims import shutdown
    from mgrow.train.loop import train

    try:
        train(cfg)
    finally:
        shutdown()
    return 0
