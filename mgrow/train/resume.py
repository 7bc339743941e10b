"""Resuming from a checkpoint: which one, and whether it fits the training config, before torch is imported.

:func:`find_resume` / :func:`open_for_resume` check, on every rank and before any process group or
model exists, that every file is whole and that the config describes the model
the checkpoint holds (the config's model grown by the growth events and
offline plans the checkpoint records), and refuses with the file or field at
fault. Events already applied are not applied again.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mgrow.checkpoint import files
from mgrow.checkpoint.files import Progress
from mgrow.core.errors import CheckpointError, ConfigError
from mgrow.core.model_config import ModelConfig
from mgrow.core.plan import load_plan
from mgrow.train.config import TrainConfig
from mgrow.train.schedule import with_batch

# Config fields a resume must keep: they decide which samples the data position points at.
_SAME_DATA = ("seq_length", "seed")


def find_resume(cfg: TrainConfig) -> Optional["Resume"]:
    """The checkpoint to resume from (checked against ``cfg``), or None to start fresh."""
    path = cfg.checkpoint.load
    if path is None:
        return None
    if not os.path.exists(path) and path != cfg.checkpoint.save:
        raise CheckpointError("checkpoint.load", f"{path} does not exist")
    if not files.is_step_folder(path) and not files.has_checkpoint(path):
        return None  # like Megatron-LM's --load: a checkpoint root with nothing in it yet starts a fresh run
    return open_for_resume(path, cfg)


@dataclass(frozen=True)
class Resume:
    folder: Path
    metadata: dict
    cfg: TrainConfig  # the config to build the engine with: the checkpoint's model, the batch sizes in force
    progress: Progress


def open_for_resume(path: str, cfg: TrainConfig) -> Resume:
    """Check the checkpoint at ``path`` (a root or a step folder) against ``cfg``; nothing is loaded yet.

    Runs on every rank before any process group exists; raises CheckpointError naming the file or field.
    """
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
    """``model`` grown as a checkpoint's history records: the schedule's ``events`` and offline plans, in order.

    A plan that does not fit the model means the model is not the checkpoint's: the model reached so far is
    returned, and the caller reports the first key that differs from the checkpoint's.
    """
    scheduled = iter(events)
    for entry in history:
        plan = next(scheduled).plan if entry["source"] == "schedule" else load_plan(entry["plan"])
        try:
            model = plan.validate(model)[-1]
        except ConfigError:
            return model
    return model
