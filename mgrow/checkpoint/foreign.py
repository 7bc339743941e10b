"""Other tools' checkpoint folders, as far as file names tell (no torch): where a Megatron-LM save folder's
iteration is, which file holds a DeepSpeed checkpoint's model states, and which model a folder holds.

A dist_checkpointing folder or a DeepSpeed checkpoint does not say what model
it holds. mgrow writes its description into the ones it writes (the common
state of a dist_checkpointing folder, the client state of a DeepSpeed
checkpoint; a loader that does not ask for those keys ignores them); for the
others the user's model file (``--model``) describes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mgrow.core.errors import CheckpointError, ConfigError
from mgrow.core.model_config import ModelConfig

MODEL_KEY, LAYOUT_KEY = "mgrow_model", "mgrow_layout"
MEGATRON_LM_TRACKER = "latest_checkpointed_iteration.txt"
# TP rank 0's model states of a DeepSpeed checkpoint (ZeRO-3 writes one per DP rank, named after both)
DEEPSPEED_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def megatron_lm_iteration(path: Path) -> Path:
    """The iteration folder a Megatron-LM save folder's tracker names (or ``path`` itself, an iteration
    folder); refuses a tracker that names nothing, or a folder dist_checkpointing has not finished."""
    folder, tracker = path, path / MEGATRON_LM_TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            folder = path / "release"
        elif text.isdigit():
            folder = path / f"iter_{int(text):07d}"
        else:
            raise CheckpointError(str(tracker), f"must hold an iteration number or 'release', holds {text!r}")
        if not folder.is_dir():
            raise CheckpointError(str(tracker), f"names {folder.name}, which is not there")
    if not (folder / "metadata.json").is_file():
        raise CheckpointError(str(folder / "metadata.json"), "missing: dist_checkpointing writes it last, so the "
                                                             "iteration folder is half-written")
    return folder


def deepspeed_model_states(folder: Path) -> Path:
    for name in DEEPSPEED_MODEL_STATES:
        if (folder / name).exists():
            return folder / name
    raise CheckpointError(str(folder / DEEPSPEED_MODEL_STATES[0]), "missing: the tag folder is not a complete "
                                                                   "DeepSpeed checkpoint")


def deepspeed_tag_folder(path: Path) -> Path:
    """The tag folder of a DeepSpeed checkpoint: ``path`` itself, or the one its ``latest`` names."""
    if any((path / name).exists() for name in DEEPSPEED_MODEL_STATES):
        return path
    folder = path / (path / "latest").read_text().strip()
    deepspeed_model_states(folder)
    return folder


def described_model(stored: Optional[dict], model_path: Optional[str], folder: Path, kind: str) -> ModelConfig:
    """The model a folder holds: what mgrow stored in it, else the user's model file."""
    if stored is not None:
        return ModelConfig.from_dict(stored, where=f"{folder} ({MODEL_KEY})")
    if model_path is None:
        raise ConfigError("--model", f"{folder} is a {kind} folder, which does not say what model it holds: give "
                                     "its model file (ModelConfig keys)")
    return ModelConfig.load(model_path)
