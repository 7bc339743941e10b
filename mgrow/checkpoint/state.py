"""Whole training state on disk: save and load on any TP/PP/DP layout.

A checkpoint holds the model and optimizer in the framework's own format
(megatron ``dist_checkpointing`` on the Megatron paths, DeepSpeed's on the ZeRO
paths), plus ``mgrow.json``: the config it was saved with, its layout, the
LR-schedule position, the data position, the growth-schedule position, the
plan history and a manifest of every file; and every rank's RNG state.
Checking a checkpoint against a training config before resuming is
:mod:`mgrow.train.resume`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from mgrow.checkpoint import deepspeed_format, files, megatron_format
from mgrow.checkpoint.files import Progress
from mgrow.core import faults
from mgrow.core.errors import CheckpointError, ConfigError
from mgrow.parallel import collectives

RNG_FILE = "rng.pt"

__all__ = ["Progress", "save", "load"]  # Progress lives with the metadata format (checkpoint.files)


def _engine_kind(optimizer_type: str) -> str:
    return "deepspeed" if optimizer_type.startswith("zero") else "megatron"


def _format(kind: str):
    return deepspeed_format if kind == "deepspeed" else megatron_format


def save(engine, cfg, progress: Progress, root: str) -> Path:
    """Collective: write the whole training state as ``<root>/step_<progress.step>``, then point ``latest`` at it.
    An optimizer that has not stepped yet (an imported model) has no state to save: a resume starts it fresh."""
    dims = engine.dims
    tmp = files.temporary(root, progress.step)
    if dims.rank == 0:
        files.prepare(root, progress.step)
    dist.barrier()
    optimizer_state = engine.optimizer_state().step() is not None
    _format(_engine_kind(cfg.optimizer.type)).save(engine, str(tmp), optimizer_state)
    states = collectives.gather_objects(_rng_state(dims))
    if dims.rank == 0:
        torch.save(states, tmp / RNG_FILE)
    faults.kill_point("save", progress.step)
    dist.barrier()  # every rank's files are written
    final = Path(root) / files.step_name(progress.step)
    if dims.rank == 0:
        final = files.commit(root, progress.step, {
            "engine": _engine_kind(cfg.optimizer.type),
            "optimizer": cfg.optimizer.type,
            "layout": {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp},
            "model": cfg.model.to_dict(),
            "config": cfg.to_dict(),
            "progress": dataclasses.asdict(progress),
            "scheduler_steps": int(engine.scheduler.num_steps),
            "optimizer_state": optimizer_state,
        })
    dist.barrier()
    return final


@contextlib.contextmanager
def claimed_root(root: str, field: str, need_bytes: int, dims):
    """Collective, before a job writes under ``root``: rank 0 checks it can be written, has room for
    ``need_bytes`` and is this job's alone (:func:`mgrow.checkpoint.files.claim_root`); every rank raises what it
    found. Rank 0 holds the root's lock for the block and releases it however the block ends."""
    lock = _claim_root(root, field, need_bytes, dims)
    try:
        yield
    finally:
        if lock is not None:
            files.release_root(lock)


def _claim_root(root: str, field: str, need_bytes: int, dims):
    lock, refused = None, None
    if dims.rank == 0:
        try:
            lock = files.claim_root(root, field, need_bytes)
        except ConfigError as error:
            refused = (type(error), error.field, error.rule)
    refused = collectives.broadcast_object(refused)
    if refused is not None:
        kind, field_name, rule = refused
        raise kind(field_name, rule)
    return lock


def load(engine, folder: Path, metadata: dict) -> None:
    """Collective: fill ``engine`` (built for the checkpoint's model on the current layout) with the state saved
    in step folder ``folder`` (``metadata``: its ``mgrow.json``). Every file's bytes are checked against the
    manifest's hashes first, each rank a share; a file that differs is refused on every rank, by name."""
    _verify(Path(folder), metadata, engine.dims)
    _format(metadata["engine"]).load(engine, str(folder), metadata)
    engine.scheduler.num_steps = metadata["scheduler_steps"]
    engine.scheduler.step(increment=0)
    dims = engine.dims
    if metadata["layout"] == {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp}:
        _set_rng_state(torch.load(Path(folder) / RNG_FILE, weights_only=True)[dims.rank], dims)
    # On another layout the ranks keep the seeded streams they started with (no rank maps to an old one).


def _verify(folder: Path, metadata: dict, dims) -> None:
    error = None
    try:
        files.verify_contents(folder, metadata, dims.rank, dims.world)
    except CheckpointError as caught:
        error = caught
    found = [e for e in collectives.gather_objects(None if error is None else (error.field, error.rule)) if e]
    if found:
        raise CheckpointError(*found[0])


def _rng_state(dims) -> dict:
    """This rank's generators as CPU tensors: torch's CPU one, its device's CUDA one, megatron's tracker."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if dims.is_cuda:
        state["cuda"] = torch.cuda.get_rng_state(dims.device)
    return state


def _set_rng_state(state: dict, dims) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    if dims.is_cuda and "cuda" in state:  # a checkpoint saved on CPU ranks has no CUDA generator state
        torch.cuda.set_rng_state(state["cuda"], dims.device)
    get_cuda_rng_tracker().set_states(state["tracker"])
