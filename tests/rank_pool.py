"""Pre-started ranks for the test suite: one world of ranks per size, kept for the whole test run.

Most tests run a multi-rank job whose subject is growth, checkpoints or training, not the launcher. Starting
those ranks costs seconds of imports each time (megatron-core, DeepSpeed, torch.distributed); the pool pays
that once per world size. A job is a module-level function, named ``"module:function"``, called on every
rank of a world with the environment torchrun gives its workers (the ranks take the path they take under
torchrun). Between jobs every rank destroys its process groups, megatron's parallel state and DeepSpeed's
group caches, and restores its environment and working directory. A job that does not end within its
timeout, or whose rank dies, takes its world down; the next job of that size starts a fresh one.

Tests of the launchers themselves (torchrun, the deepspeed launcher, mgrow's local launcher, restarts and
killed ranks) start real processes instead.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import importlib
import io
import multiprocessing
import multiprocessing.connection
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
TESTS = str(Path(__file__).resolve().parent)
PRELOAD = ["mgrow.jobs.launch", "megatron.core.models.gpt", "megatron.core.optimizer", "megatron.core.distributed",
           "megatron.core.pipeline_parallel", "deepspeed", "mgrow.train.loop", "mgrow.testing.invariants",
           "mgrow.jobs.train", "mgrow.jobs.verify", "mgrow.cli"]


@dataclass
class JobOutput:
    """What ``subprocess.run`` would give for the job, and each rank's own streams."""

    returncode: int  # the first non-zero rank's exit code, else 0
    stdout: str  # every rank's stdout, in rank order
    stderr: str
    rank_stdout: dict
    rank_stderr: dict


class _World:
    def __init__(self, context, size: int):
        self.size = size
        self.conns, self.procs = [], []
        for rank in range(size):
            parent, child = context.Pipe()
            # not daemonic: dist_checkpointing's writer starts processes of its own
            proc = context.Process(target=_serve, args=(rank, size, child), name=f"pool{size}-rank{rank}")
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self.procs)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(5)

    def run(self, job: tuple, timeout: float) -> list:
        for conn in self.conns:
            conn.send(job)
        results: list = [None] * self.size
        pending = dict(enumerate(self.conns))
        deadline = time.monotonic() + timeout
        while pending:
            ready = multiprocessing.connection.wait(list(pending.values()), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self.kill()
                raise subprocess.TimeoutExpired(job[0], timeout)
            for rank, conn in list(pending.items()):
                if conn in ready:
                    try:
                        results[rank] = conn.recv()
                    except EOFError:  # the rank died (a kill point, a crash)
                        results[rank] = (-9, "", "the pool rank died\n")
                    del pending[rank]
        return results


class RankPool:
    def __init__(self):
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.worlds: dict[int, _World] = {}

    def run(self, nproc: int, target: str, args: Any = (), env: Optional[dict] = None, timeout: float = 300,
            cwd: Path = REPO) -> JobOutput:
        """``target(*args)`` (``"module:function"``) on every rank of a world of ``nproc`` ranks."""
        world = self.worlds.get(nproc)
        if world is None or not world.alive():
            if world is not None:
                world.kill()
            world = self.worlds[nproc] = _World(self.context, nproc)
        job = (target, tuple(args), dict(env or {}), str(cwd), free_port())
        results = world.run(job, timeout)
        if any(code == -9 for code, _, _ in results):
            world.kill()
        codes = [code for code, _, _ in results]
        return JobOutput(returncode=next((code for code in codes if code), 0),
                         stdout="".join(out for _, out, _ in results), stderr="".join(err for _, _, err in results),
                         rank_stdout={rank: out for rank, (_, out, _) in enumerate(results)},
                         rank_stderr={rank: err for rank, (_, _, err) in enumerate(results)})

    def cli(self, nproc: int, argv: list, env: Optional[dict] = None, timeout: float = 300) -> JobOutput:
        """``mgrow <argv>`` on every rank, as under torchrun."""
        return self.run(nproc, "mgrow.cli:main", ([str(a) for a in argv],), env=env, timeout=timeout)

    def close(self) -> None:
        for world in self.worlds.values():
            for conn in world.conns:
                with contextlib.suppress(OSError):
                    conn.send(None)
            for proc in world.procs:
                proc.join(10)
            world.kill()
        self.worlds = {}


_POOL: Optional[RankPool] = None


def pool() -> RankPool:
    """The test run's pool (started on first use; closed at the end of the session, or at exit)."""
    global _POOL
    if _POOL is None:
        _POOL = RankPool()
        atexit.register(close)
    return _POOL


def close() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.close()
        _POOL = None


def _serve(rank: int, size: int, conn) -> None:
    """A pool rank: run jobs until told to stop."""
    import torch

    sys.path.insert(0, TESTS)
    # One intra-op thread per rank, as torchrun gives its workers (OMP_NUM_THREADS=1): the forkserver imported
    # torch with one thread per core, and ranks sharing the cores would spin against each other.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    baseline = _global_state()
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(_run_job(rank, size, job, baseline))


def _run_job(rank: int, size: int, job: tuple, baseline: dict) -> tuple:
    target, args, env, cwd, port = job
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
    os.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module, function = target.split(":")
            code = getattr(importlib.import_module(module), function)(*args)
            code = int(code or 0)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:  # noqa: BLE001 (reported as the rank's traceback and exit code 1)
            traceback.print_exc()
            code = 1
        finally:
            _reset(baseline)
    os.chdir(saved_cwd)
    os.environ.clear()
    os.environ.update(saved_env)
    return code, out.getvalue(), err.getvalue()


# Module-level state that a finished process would have dropped and that the libraries' own teardown leaves
# behind: megatron's destroy_model_parallel misses some groups (the partial data-parallel ones), DeepSpeed keeps
# its group caches and ZeRO-3's forward module stack. A process group kept alive keeps its gloo threads and
# sockets: left alone, each pool rank would grow by dozens of threads per job and the suite would slow down as
# it goes.
GLOBAL_STATE_MODULES = ("megatron.core.parallel_state", "deepspeed.utils.groups",
                        "deepspeed.runtime.zero.parameter_offload")


def _reset(baseline: dict) -> None:
    """Drop what a finished process would drop: models, process groups, the libraries' module-level state."""
    import gc

    import deepspeed
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from mgrow.engine.deepspeed_job import release_zero3_references
    from mgrow.engine.megatron_job import release_megatron_ddp
    from mgrow.parallel.dims import shutdown

    # A model a job left behind (the last one of a training run, one a test worker built) sits in a reference
    # cycle through autograd nodes that only its engine's teardown breaks.
    for obj in gc.get_objects():
        if isinstance(obj, DistributedDataParallel):
            release_megatron_ddp(obj)
        elif isinstance(obj, deepspeed.DeepSpeedEngine) and dist.is_initialized():  # its teardown logs by rank
            obj.destroy()
            release_zero3_references(obj.module)
    RotaryEmbedding.forward.cache_clear()  # keyed by rotary modules, which hold their context-parallel group
    shutdown()
    for module_name, values in baseline.items():
        module = sys.modules[module_name]
        for name, value in values.items():
            setattr(module, name, copy.copy(value))
    gc.collect()


def _global_state() -> dict:
    """The plain-data module globals (None, numbers, strings, containers) of ``GLOBAL_STATE_MODULES`` as a
    fresh process has them."""
    state = {}
    for module_name in GLOBAL_STATE_MODULES:
        module = importlib.import_module(module_name)
        state[module_name] = {name: copy.copy(value) for name, value in vars(module).items()
                              if not name.startswith("__") and _plain(value)}
    return state


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, dict, set, tuple))
