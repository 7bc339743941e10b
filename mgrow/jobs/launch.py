"""Running a command on its ranks: as one rank under torchrun / the deepspeed launcher, or local ranks started here.

Every command that needs ranks validates its arguments first (in the parent,
before torch is imported; under a launcher on every rank) and hands back a
:class:`RankJob`: how many ranks, a module-level function, and the parsed,
validated command it receives. :func:`execute` runs it: under a launcher this
process is one of the ranks; otherwise :func:`launch_local` starts the ranks.

The local launcher imports no torch. Rank 0 picks a free loopback port just
before it starts the rendezvous store (torchrun's ``--standalone`` also takes a
free port) and passes it to the other ranks; each rank gets the variables torchrun gives its workers
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``), and starts the ranks from a forkserver that has imported
megatron-core and DeepSpeed once, instead of ``nproc`` interpreters importing
them each. On a machine with a GPU the ranks are spawned instead: importing
DeepSpeed asks CUDA for its devices, and a CUDA driver initialised in the
forkserver cannot be used in the processes forked from it. Like torchrun's
agent, the first rank to fail ends the job: the others are stopped, and its
exit code is the job's.
"""

from __future__ import annotations

import glob
import multiprocessing
import multiprocessing.connection
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from mgrow.core.errors import ConfigError, GrowthError, TrainingStopped

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# What every rank imports anyway (about 5 s of CPU each on a small machine): imported once, in the forkserver.
RANK_PRELOAD = (
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.pipeline_parallel",
    "deepspeed",
    "mgrow.train.loop",
    "mgrow.testing.invariants",
)
STOP_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class RankJob:
    world: int  # ranks the job needs
    run_rank: Callable[[Any], int]  # a module-level function, run on every rank with ``payload``
    payload: Any  # the parsed, validated command (picklable)


def exit_code(fn: Callable[[Any], int], argument: Any) -> int:
    """``fn(argument)``'s exit code, with mgrow's errors as one line on stderr: ``mgrow: error: <field>: <rule>``
    (2, bad input), the growth failure (1) or a training stop on a non-finite loss or weights (3). Every rank
    reports its own."""
    try:
        return fn(argument) or 0
    except ConfigError as error:
        print(f"mgrow: error: {error}", file=sys.stderr)
        return 2
    except GrowthError as error:
        print(f"mgrow: error: {error}", file=sys.stderr)
        return 1
    except TrainingStopped as error:
        print(f"mgrow: error: {error}", file=sys.stderr)
        return 3


def under_launcher() -> bool:
    return all(name in os.environ for name in LAUNCHER_ENV)


def check_job_flags(tp: int, pp: int, dp: int, optimizer: Optional[str] = None) -> None:
    """The --tp/--pp/--dp (and --optimizer) of a command that runs its own job (verify, grow-checkpoint, bench)."""
    for flag, value in (("--tp", tp), ("--pp", pp), ("--dp", dp)):
        if value < 1:
            raise ConfigError(flag, f"must be >= 1, got {value}")
    if optimizer is not None and optimizer.startswith("zero") and pp != 1:
        raise ConfigError("--pp", f"optimizer {optimizer} (DeepSpeed ZeRO) runs with pp = 1, got {pp}")


def checkpoint_job_layout(args, saved: dict) -> tuple[int, int, int]:
    """(tp, pp, dp) of a job that loads a checkpoint: each flag given, else the checkpoint's ``saved`` layout."""
    return tuple(getattr(args, k) if getattr(args, k) is not None else saved[k] for k in ("tp", "pp", "dp"))


def check_models_fit(models, tp: int, pp: int) -> None:
    """Each ``(what, model)`` splits on tp x pp; the error names ``what``."""
    for what, model in models:
        try:
            model.check_layout(tp, pp)
        except ConfigError as error:
            raise ConfigError(what, f"the model does not fit tp={tp}, pp={pp}: {error}") from None


def check_launcher_world(world: int) -> None:
    """Under a launcher, its WORLD_SIZE must be the job's tp*pp*dp."""
    if int(os.environ["WORLD_SIZE"]) != world:
        raise ConfigError("--dp", f"tp*pp*dp = {world} must equal the launcher's WORLD_SIZE {os.environ['WORLD_SIZE']}")


def execute(job: RankJob) -> int:
    """Run ``job``: this process is one of its ranks under a launcher; otherwise start its ranks here."""
    if under_launcher():
        check_launcher_world(job.world)
        return job.run_rank(job.payload) or 0
    return launch_local(job.world, job.run_rank, job.payload)


def launch_local(nproc: int, fn: Callable[[Any], int], payload: Any) -> int:
    """Run ``fn(payload)`` as ``nproc`` local ranks; 0, or the exit code of the first rank that failed."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read when a rank (or the forkserver) imports torch
    if _gpu_visible():
        context = multiprocessing.get_context("spawn")
    else:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(RANK_PRELOAD))
    ports = context.SimpleQueue()  # rank 0 -> the others: the rendezvous port
    ranks = [context.Process(target=_rank_main, args=(rank, nproc, ports, fn, payload), name=f"rank{rank}")
             for rank in range(nproc)]
    for rank in ranks:
        rank.start()
    try:
        running = list(ranks)
        while running:
            multiprocessing.connection.wait([rank.sentinel for rank in running])
            for rank in [r for r in running if not r.is_alive()]:
                running.remove(rank)
                rank.join()
                if rank.exitcode != 0:
                    _stop(running)
                    return rank.exitcode if rank.exitcode > 0 else 1
        return 0
    except BaseException:
        _stop([rank for rank in ranks if rank.is_alive()])
        raise


def _rank_main(rank: int, world: int, ports, fn: Callable[[Any], int], payload: Any) -> None:
    """One local rank: the environment torchrun gives its workers, then ``fn(payload)``."""
    if rank == 0:
        port = _free_port()
        for _ in range(world - 1):
            ports.put(port)
    else:
        port = ports.get()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = exit_code(fn, payload)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        sys.exit(code)


def _stop(ranks: list) -> None:
    for rank in ranks:
        rank.terminate()
    for rank in ranks:
        rank.join(STOP_GRACE_SECONDS)
        if rank.is_alive():
            rank.kill()
            rank.join()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU to this process, without importing torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))
