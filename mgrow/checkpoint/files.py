"""A checkpoint root on disk: atomic step folders, the ``latest`` pointer, and a manifest of every file.

::

    <root>/latest                 "step_00000040" (replaced atomically, after the folder is complete)
    <root>/step_00000040/
        mgrow.json                what the checkpoint holds: config, layout, progress, plan history, manifest
        rng.pt                    every rank's RNG state
        model/ or deepspeed/      the framework's own checkpoint (dist_checkpointing / DeepSpeed)

A save writes ``<root>/.tmp.step_00000040`` and renames it into place once
every rank has written its files; only then does ``latest`` change. A process
killed mid-save leaves a ``.tmp.*`` folder behind and ``latest`` on the
previous complete checkpoint. ``mgrow.json`` lists every file with its size, so
a missing or truncated file is refused by name before anything is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mgrow.core.errors import CheckpointError, ConfigError
from mgrow.core.model_config import ModelConfig

LATEST = "latest"
METADATA = "mgrow.json"
FORMAT = "mgrow-checkpoint/1"


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


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def temporary(root: str, step: int) -> Path:
    return Path(root) / f".tmp.{step_name(step)}"


def prepare(root: str, step: int) -> Path:
    """An empty temporary folder for the checkpoint of ``step`` (rank 0 only)."""
    tmp = temporary(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)  # a save that died before
    tmp.mkdir(parents=True)
    return tmp


def manifest(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def commit(root: str, step: int, metadata: dict) -> Path:
    """Write ``mgrow.json`` (with the manifest), rename the folder into place, then point ``latest`` at it."""
    tmp, final = temporary(root, step), Path(root) / step_name(step)
    metadata = {**metadata, "format": FORMAT, "files": manifest(tmp)}
    _write_atomic(tmp / METADATA, json.dumps(metadata, indent=1, sort_keys=True))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)  # the same step saved again (a restarted run)
    os.replace(tmp, final)
    _write_atomic(Path(root) / LATEST, step_name(step))
    return final


def is_step_folder(path: str) -> bool:
    return (Path(path) / METADATA).exists() or Path(path).name.startswith("step_")


def resolve(path: str) -> Path:
    """The step folder ``path`` names: a step folder itself, or a root whose ``latest`` names one."""
    folder = Path(path)
    if is_step_folder(path):
        return folder
    pointer = folder / LATEST
    if not pointer.exists():
        raise CheckpointError(str(pointer), "no checkpoint here: neither a step folder nor a root with a `latest` file")
    name = pointer.read_text().strip()
    if not name.startswith("step_") or "/" in name:
        raise CheckpointError(str(pointer), f"must name a step folder (step_NNNNNNNN), holds {name!r}")
    if not (folder / name).is_dir():
        raise CheckpointError(str(pointer), f"names {name}, which is not there")
    return folder / name


def has_checkpoint(root: str) -> bool:
    return (Path(root) / LATEST).exists()


def read_metadata(folder: Path) -> dict:
    """``mgrow.json`` of a step folder, after checking every file it lists is there at its size."""
    path = folder / METADATA
    if not path.exists():
        raise CheckpointError(str(path), "missing: the step folder is not a complete mgrow checkpoint")
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(str(path), f"corrupted (not JSON: {error})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(str(path), f"not an {FORMAT} checkpoint (format {metadata.get('format')!r})"
                              if isinstance(metadata, dict) else "corrupted (not a mapping)")
    for name, size in metadata["files"].items():
        file = folder / name
        if not file.exists():
            raise CheckpointError(str(file), "missing (the checkpoint's manifest lists it)")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(str(file), f"truncated or altered: {actual} bytes, the manifest says {size}")
    return metadata


def open_checkpoint(path: str, field: str) -> tuple[Path, dict, ModelConfig]:
    """(step folder, metadata, model) of the checkpoint ``path`` (a root or a step folder), every file checked;
    errors name ``field`` or the file."""
    if not os.path.exists(path):
        raise ConfigError(field, f"checkpoint {path} does not exist")
    folder = resolve(path)
    metadata = read_metadata(folder)
    return folder, metadata, ModelConfig.from_dict(metadata["model"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
