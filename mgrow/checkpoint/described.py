"""The model another tool's checkpoint holds: what mgrow stores in the folders it writes, or the user's model file.

A dist_checkpointing folder or a DeepSpeed checkpoint does not say what model
it holds. mgrow writes its description into the ones it writes (the common
state of a dist_checkpointing folder, the client state of a DeepSpeed
checkpoint; a loader that does not ask for those keys ignores them); for the
others the user's model file (``--model``) describes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mgrow.core.errors import ConfigError
from mgrow.core.model_config import ModelConfig

MODEL_KEY, LAYOUT_KEY = "mgrow_model", "mgrow_layout"


def described_model(stored: Optional[dict], model_path: Optional[str], folder: Path, kind: str) -> ModelConfig:
    """The model a folder holds: what mgrow stored in it, else the user's model file."""
    if stored is not None:
        return ModelConfig.from_dict(stored, where=f"{folder} ({MODEL_KEY})")
    if model_path is None:
        raise ConfigError("--model", f"{folder} is a {kind} folder, which does not say what model it holds: give "
                                     "its model file (ModelConfig keys)")
    return ModelConfig.load(model_path)
