"""`mgrow train`: one rank under torchrun / the deepspeed launcher, or start local ranks itself."""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

from mgrow.errors import ConfigError
from mgrow.train import config as train_config

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def under_launcher() -> bool:
    return all(name in os.environ for name in LAUNCHER_ENV)


def check_job_flags(tp: int, pp: int, dp: int, optimizer: Optional[str] = None) -> None:
    """The --tp/--pp/--dp (and --optimizer) of a command that runs its own job (verify, grow-checkpoint, bench)."""
    for flag, value in (("--tp", tp), ("--pp", pp), ("--dp", dp)):
        if value < 1:
            raise ConfigError(flag, f"must be >= 1, got {value}")
    if optimizer is not None and optimizer.startswith("zero") and pp != 1:
        raise ConfigError("--pp", f"optimizer {optimizer} (DeepSpeed ZeRO) runs with pp = 1, got {pp}")


def check_launcher_world(world: int) -> None:
    """Under a launcher, its WORLD_SIZE must be the job's tp*pp*dp."""
    if int(os.environ["WORLD_SIZE"]) != world:
        raise ConfigError("--dp", f"tp*pp*dp = {world} must equal the launcher's WORLD_SIZE {os.environ['WORLD_SIZE']}")


def train_command(config_path: str, nproc: Optional[int], overrides: list[str]) -> int:
    cfg = train_config.load(config_path, overrides)  # every rank refuses a bad config before anything starts
    if under_launcher():
        from mgrow.parallel.dims import shutdown
        from mgrow.train.loop import train

        try:
            train(cfg)
        finally:
            shutdown()
        return 0
    nproc = nproc or cfg.parallel.tp * cfg.parallel.pp
    cfg.check_world(nproc)
    return spawn_local(nproc, ["train", "--config", config_path, *overrides])


# What every rank imports anyway (about 5 s of CPU each on a small machine): imported once, in the
# forkserver the local ranks are forked from.
RANK_PRELOAD = (
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.pipeline_parallel",
    "deepspeed",
    "mgrow.train.loop",
    "mgrow.growth.verify_job",
)


def spawn_local(nproc: int, cli_args: list[str]) -> int:
    """Run ``mgrow <cli_args>`` as ``nproc`` local ranks; the first failure's exit code."""
    return launch_local(nproc, _cli_rank, cli_args)


def launch_local(nproc: int, fn: Callable, *args) -> int:
    """Run ``fn(*args)`` as ``nproc`` local ranks under torch elastic's agent; the first failure's exit code.

    The same agent and rendezvous as ``torchrun --standalone`` (``elastic_launch``),
    with the ranks forked from one forkserver that has imported megatron-core and
    DeepSpeed already, instead of ``nproc`` fresh interpreters importing them each.
    On a machine with a GPU the ranks are spawned instead: importing DeepSpeed asks
    CUDA for its devices, and a CUDA driver initialised in the forkserver cannot be
    used by the processes forked from it.
    ``fn`` must be importable by name (a module-level function).
    """
    import multiprocessing
    import uuid

    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read when the forkserver imports torch
    start_method = "spawn" if torch.cuda.device_count() > 0 else "forkserver"
    if start_method == "forkserver":
        multiprocessing.set_forkserver_preload(list(RANK_PRELOAD))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method=start_method,
    )
    try:
        elastic_launch(config, _worker)(fn, *args)
    except ChildFailedError as error:
        _, first = error.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 1
    return 0


def _worker(fn: Callable, *args):
    """``fn(*args)`` in a local rank: a non-zero return value becomes the rank's exit code."""
    code = fn(*args)
    if code:
        sys.exit(code)
    return code


def _cli_rank(cli_args: list[str]) -> int:
    from mgrow.cli import main

    return main(cli_args)
