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
previous complete checkpoint. ``mgrow.json`` lists every file with its size and
its BLAKE2b hash, and carries the hash of its own content: a missing or truncated
file is refused by name before anything is loaded (sizes), a file whose bytes
changed when it is loaded (:func:`verify_contents`, each rank a share of the
files), and an altered ``mgrow.json`` when it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
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
        saved = metadata["progress"]  # (another tool's checkpoint gives the step and data position only)
        rewarm = saved.get("rewarm")
        return cls(**{**saved, "rewarm": None if rewarm is None else tuple(rewarm)})


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


def digest(path: Path) -> str:
    """BLAKE2b (128-bit) of a file's bytes: fast enough to hash a checkpoint as it is committed."""
    hasher = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def manifest(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): {"size": p.stat().st_size, "blake2b": digest(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def content_checksum(metadata: dict) -> str:
    """The hash of ``mgrow.json``'s content without its ``checksum`` key (canonical JSON)."""
    body = json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True)
    return hashlib.blake2b(body.encode(), digest_size=16).hexdigest()


def commit(root: str, step: int, metadata: dict) -> Path:
    """Write ``mgrow.json`` (with the manifest), rename the folder into place, then point ``latest`` at it."""
    tmp, final = temporary(root, step), Path(root) / step_name(step)
    metadata = {**metadata, "format": FORMAT, "files": manifest(tmp)}
    metadata["checksum"] = content_checksum(metadata)
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
    if "checksum" in metadata and metadata["checksum"] != content_checksum(metadata):
        raise CheckpointError(str(path), "altered: its content does not match the checksum it was written with")
    entries = metadata.get("files")
    if not isinstance(entries, dict):
        raise CheckpointError(str(path), "corrupted: it has no manifest of files (key 'files')")
    for name, entry in entries.items():
        file = folder / name
        if not file.exists():
            raise CheckpointError(str(file), "missing (the checkpoint's manifest lists it)")
        size = entry["size"] if isinstance(entry, dict) else entry  # older checkpoints listed sizes only
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(str(file), f"truncated or altered: {actual} bytes, the manifest says {size}")
    return metadata


def verify_contents(folder: Path, metadata: dict, rank: int = 0, world: int = 1) -> None:
    """Hash this rank's share of the checkpoint's files (every ``world``-th, from ``rank``) against the manifest;
    refuses the first that differs, by name. Checkpoints written before hashes were recorded pass."""
    for index, (name, entry) in enumerate(sorted(metadata["files"].items())):
        if index % world != rank or not isinstance(entry, dict):
            continue
        if digest(folder / name) != entry["blake2b"]:
            raise CheckpointError(str(folder / name), "altered: its bytes do not match the hash the manifest "
                                                      "recorded when it was written (a flipped byte, a torn copy)")


def open_checkpoint(path: str, field: str) -> tuple[Path, dict, ModelConfig]:
    """(step folder, metadata, model) of the checkpoint ``path`` (a root or a step folder), every file checked;
    errors name ``field`` or the file."""
    if not os.path.exists(path):
        raise ConfigError(field, f"checkpoint {path} does not exist")
    folder = resolve(path)
    metadata = read_metadata(folder)
    return folder, metadata, ModelConfig.from_dict(metadata["model"])


LOCK = ".lock"


def claim_root(root: str, field: str, need_bytes: int) -> Path:
    """Before a job writes its first checkpoint under ``root`` (its rank 0): the root can be written, has room
    for one checkpoint of ``need_bytes``, and is this job's alone. Returns the lock file, held until
    :func:`release_root`. A lock left by a dead process of this host is taken over; a live one refuses."""
    folder = Path(root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(field, f"cannot write checkpoints under {root}: {error.strerror or error}") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise ConfigError(field, f"{root} has {free / 2**30:.2f} GiB free; one checkpoint of this run needs about "
                                 f"{need_bytes / 2**30:.2f} GiB (weights and optimizer state)")
    lock = folder / LOCK
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        holder = _lock_holder(lock)
        alive = holder.get("host") != mine["host"] or _alive(holder.get("pid"))
        if alive and holder.get("pid") != mine["pid"]:
            raise CheckpointError(str(lock), f"{root} is in use by the job with pid {holder.get('pid')} on "
                                             f"{holder.get('host')} since {holder.get('since')}: one job per "
                                             "checkpoint root (if that job is gone, remove this file)") from None
        _write_atomic(lock, json.dumps(mine))  # a dead process's lock (or this process's own): taken over
        return lock
    with os.fdopen(descriptor, "w") as f:
        f.write(json.dumps(mine))
    return lock


def release_root(lock: Path) -> None:
    """Remove the lock, if it is still this process's."""
    if _lock_holder(lock).get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


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
