"""Whole training state on disk: save, check, and resume on any TP/PP/DP layout.

A checkpoint holds the model and optimizer in the framework's own format
(megatron ``dist_checkpointing`` on the Megatron paths, DeepSpeed's on the ZeRO
paths), plus ``mgrow.json``: the config it was saved with, its layout, the
LR-schedule position, the data position, the growth-schedule position, the
plan history and a manifest of every file; and every rank's RNG state.

Resuming (:func:`open_for_resume`) checks, before any process group or model
exists, that every file is whole and that the config describes the model the
checkpoint holds (the config's model grown by the growth events already
applied), and refuses with the file or field at fault. Events already applied
are not applied again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from mgrow import faults
from mgrow.checkpoint import files
from mgrow.checkpoint.files import CheckpointError
from mgrow.model_config import ModelConfig
from mgrow.parallel import collectives

RNG_FILE = "rng.pt"
# Config fields a resume must keep: they decide which samples the data position points at.
_SAME_DATA = ("seq_length", "seed")

__all__ = ["CheckpointError", "Progress", "Resume", "save", "open_for_resume", "load"]


@dataclass
class Progress:
    """Where a run is: steps done, data stream position, growth-schedule position, LR re-warm."""

    step: int = 0
    first_step: int = 0  # the data stream reads step ``first_step`` from sample ``first_sample`` on
    first_sample: int = 0
    growth_applied: int = 0  # events of the config's growth schedule applied so far
    rewarm: Optional[tuple] = None  # (start step, length) of an LR re-warm in progress
    history: list = field(default_factory=list)  # every growth so far: {step, plan, source: schedule|offline}
    # a masked growth's ramp in progress: {start, steps, plan, model (before the event)}; resume rebuilds its hooks
    mask_ramp: Optional[dict] = None

    @classmethod
    def from_metadata(cls, metadata: dict) -> "Progress":
        saved = metadata["progress"]
        return cls(**{**saved, "rewarm": None if saved["rewarm"] is None else tuple(saved["rewarm"])})


@dataclass(frozen=True)
class Resume:
    folder: Path
    metadata: dict
    cfg: object  # the TrainConfig to build the engine with: the checkpoint's model, the batch sizes in force
    progress: Progress


def _engine_kind(optimizer_type: str) -> str:
    return "deepspeed" if optimizer_type.startswith("zero") else "megatron"


def _format(kind: str):
    if kind == "deepspeed":
        from mgrow.checkpoint import deepspeed_format

        return deepspeed_format
    from mgrow.checkpoint import megatron_format

    return megatron_format


def save(engine, cfg, progress: Progress, root: str) -> Path:
    """Collective: write the whole training state as ``<root>/step_<progress.step>``, then point ``latest`` at it."""
    dims = engine.dims
    tmp = files.temporary(root, progress.step)
    if dims.rank == 0:
        files.prepare(root, progress.step)
    dist.barrier()
    _format(_engine_kind(cfg.optimizer.type)).save(engine, str(tmp))
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
        })
    dist.barrier()
    return final


def open_for_resume(path: str, cfg) -> Resume:
    """Check the checkpoint at ``path`` (a root or a step folder) against ``cfg``; nothing is loaded yet.

    Runs on every rank before any process group exists; raises CheckpointError naming the file or field.
    """
    from mgrow.train.schedule import with_batch

    folder = files.resolve(path)
    metadata = files.read_metadata(folder)
    where = str(folder / files.METADATA)
    progress = Progress.from_metadata(metadata)
    if metadata["optimizer"] != cfg.optimizer.type:
        raise CheckpointError("optimizer.type", f"the checkpoint {folder} holds {metadata['optimizer']} optimizer "
                                                f"state; resume with optimizer.type {metadata['optimizer']}, "
                                                f"got {cfg.optimizer.type}")
    saved_train = metadata["config"]["train"]
    for key in _SAME_DATA:
        if saved_train[key] != getattr(cfg.train, key):
            raise CheckpointError(f"train.{key}", f"the checkpoint {folder} was trained with {saved_train[key]}, "
                                                  f"got {getattr(cfg.train, key)} (the data position would "
                                                  "point at other samples)")
    if progress.growth_applied > len(cfg.growth):
        raise CheckpointError("growth", f"the checkpoint {folder} has applied {progress.growth_applied} growth "
                                        f"events, the config has only {len(cfg.growth)}")
    applied = cfg.growth[: progress.growth_applied]
    saved = ModelConfig.from_dict(metadata["model"], where=f"{where}: model")
    expected = replay_history(cfg.model, applied, progress.history)
    if expected != saved and not (progress.growth_applied == 0 and cfg.model == saved):
        key = next(k for k, v in saved.to_dict().items() if getattr(expected, k) != v)
        raise CheckpointError(f"model.{key}", f"the checkpoint {folder} holds a model with {key} = "
                                              f"{getattr(saved, key)}; the config's model grown as the checkpoint "
                                              f"records ({len(progress.history)} growths) has "
                                              f"{getattr(expected, key)}")
    saved.check_layout(cfg.parallel.tp, cfg.parallel.pp)
    train = cfg.train
    for event in applied:
        train = with_batch(train, event)
    return Resume(folder, metadata, dataclasses.replace(cfg, model=saved, train=train), progress)


def replay_history(model: ModelConfig, events, history: list) -> ModelConfig:
    """``model`` grown as a checkpoint's history records: the schedule's ``events`` and offline plans, in order."""
    from mgrow.plan import load_plan

    scheduled = iter(events)
    for entry in history:
        plan = next(scheduled).plan if entry["source"] == "schedule" else load_plan(entry["plan"])
        try:
            model = plan.validate(model)[-1]
        except Exception:  # noqa: BLE001 (a plan that does not fit: the model cannot be the checkpoint's)
            return model
    return model


def load(engine, resume: Resume) -> None:
    """Collective: fill ``engine`` (built from ``resume.cfg`` on the current layout) with the saved state."""
    kind = resume.metadata["engine"]
    _format(kind).load(engine, str(resume.folder), resume.metadata)
    engine.scheduler.num_steps = resume.metadata["scheduler_steps"]
    engine.scheduler.step(increment=0)
    dims = engine.dims
    if resume.metadata["layout"] == {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp}:
        _set_rng_state(torch.load(resume.folder / RNG_FILE, weights_only=True)[dims.rank], dims)
    # On another layout the ranks keep the seeded streams they started with (no rank maps to an old one).


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
