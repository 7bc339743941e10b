"""`mgrow train`: one rank under torchrun / the deepspeed launcher, or start local ranks itself."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

from mgrow.train import config as train_config

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def under_launcher() -> bool:
    return all(name in os.environ for name in LAUNCHER_ENV)


def train_command(config_path: str, nproc: Optional[int], overrides: list[str]) -> int:
    cfg = train_config.load(config_path, overrides)  # every rank refuses a bad config before anything starts
    if under_launcher():
        from mgrow.runtime import shutdown
        from mgrow.train.loop import train

        try:
            train(cfg)
        finally:
            shutdown()
        return 0
    nproc = nproc or cfg.parallel.tp * cfg.parallel.pp
    cfg.check_world(nproc)
    return spawn_local(nproc, ["train", "--config", config_path, *overrides])


def spawn_local(nproc: int, cli_args: list[str]) -> int:
    """Run ``mgrow <cli_args>`` as ``nproc`` local ranks (torchrun --standalone); its exit code."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "mgrow.cli", *cli_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(command, env=env)
