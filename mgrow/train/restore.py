"""An engine on this job's layout and device holding a checkpoint's model and optimizer state."""

from __future__ import annotations

from mgrow.checkpoint.files import Progress
from mgrow.checkpoint.sources import load
from mgrow.core.model_config import ModelConfig
from mgrow.engine.engines import build_engine
from mgrow.engine.model import build_gpt
from mgrow.train.config import TrainConfig, from_dict


def training_config(metadata: dict, dims) -> TrainConfig:
    """The config a checkpoint was saved with, on this job's layout and device, without its schedule,
    checkpoints or W&B."""
    parallel = {"tp": dims.tp, "pp": dims.pp, "device": dims.device.type, "backend": dims.backend}
    model = ModelConfig.from_dict(metadata["model"]).at_pipeline(dims.pp).to_dict()
    raw = {**metadata["config"], "model": model, "parallel": parallel,
           "growth": None, "wandb": None, "checkpoint": {}}
    raw["train"] = {**raw.get("train", {}), "metrics_path": None, "progress": False}
    return from_dict(raw)


def restored_engine(folder, metadata, dims):
    """(engine, config, progress): an engine on this job's layout and device holding the checkpoint's model and
    optimizer state."""
    cfg = training_config(metadata, dims)
    engine = build_engine(build_gpt(cfg.model, dims, seed=cfg.train.seed), cfg, dims)
    load(engine, folder, metadata)
    return engine, cfg, Progress.from_metadata(metadata)
