"""Every checkpoint format mgrow reads, told apart by what the folder holds.

* ``mgrow``: mgrow's own root or step folder (``latest``, ``step_*/mgrow.json``; :mod:`mgrow.checkpoint.files`);
* ``megatron-lm``: a Megatron-LM save folder or one of its iteration folders
  (``latest_checkpointed_iteration.txt``, ``iter_NNNNNNN/``; :mod:`mgrow.checkpoint.megatron_lm`);
* ``dist-checkpoint``: a plain megatron ``dist_checkpointing`` folder (``metadata.json``, ``common.pt``) of a
  model's ``sharded_state_dict``, optionally with its megatron optimizer's under ``optimizer``;
* ``deepspeed``: a DeepSpeed ``save_checkpoint`` folder of a megatron-core GPTModel (``latest``,
  ``<tag>/mp_rank_00_model_states.pt``; :mod:`mgrow.checkpoint.deepspeed_user`).

Each opens as (folder, metadata, model): ``metadata`` is mgrow's description
of it (``mgrow.json`` for mgrow's own; the same keys, with ``source_format``,
for the others), ``model`` its ModelConfig. A dist_checkpointing or DeepSpeed
folder does not say what model it holds unless mgrow wrote it; the user's
model file (``--model``) then describes it, and the load checks every tensor
against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mgrow.checkpoint import files
from mgrow.checkpoint.foreign import (DEEPSPEED_MODEL_STATES, LAYOUT_KEY, MEGATRON_LM_TRACKER, MODEL_KEY,
                                     deepspeed_tag_folder, described_model, megatron_lm_iteration)
from mgrow.core.errors import CheckpointError, ConfigError
from mgrow.core.model_config import ModelConfig

MGROW, MEGATRON_LM, DIST_CHECKPOINT, DEEPSPEED = "mgrow", "megatron-lm", "dist-checkpoint", "deepspeed"
EXPECTED = ("an mgrow root or step folder (latest, step_*/mgrow.json), a Megatron-LM save folder "
            "(latest_checkpointed_iteration.txt, iter_NNNNNNN/), a dist_checkpointing folder (metadata.json, "
            "common.pt) or a DeepSpeed checkpoint folder (latest, <tag>/mp_rank_00_model_states.pt)")


def detect(path: str, field: str) -> str:
    """Which format ``path`` is (torch-free: file names only); refuses what is none of them, naming what it
    expected to find."""
    folder = Path(path)
    if not folder.exists():
        raise ConfigError(field, f"checkpoint {path} does not exist")
    if not folder.is_dir():
        raise ConfigError(field, f"{path} is a file; a checkpoint is a folder: {EXPECTED}")
    if (folder / files.METADATA).exists() or folder.name.startswith("step_"):
        return MGROW
    if (folder / MEGATRON_LM_TRACKER).exists() or (folder.name.startswith("iter_")
                                                   and (folder.parent / MEGATRON_LM_TRACKER).exists()):
        return MEGATRON_LM
    if (folder / "metadata.json").exists() or (folder / "common.pt").exists():
        return DIST_CHECKPOINT
    if any((folder / name).exists() for name in DEEPSPEED_MODEL_STATES):
        return DEEPSPEED
    latest = folder / files.LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if name.startswith("step_"):
            return MGROW
        if any((folder / name / model).exists() for model in DEEPSPEED_MODEL_STATES):
            return DEEPSPEED
        raise CheckpointError(str(latest), f"names {name!r}, which holds neither mgrow.json nor "
                                           f"{DEEPSPEED_MODEL_STATES[0]} (a checkpoint still being written, or removed)")
    raise ConfigError(field, f"{path} holds no checkpoint mgrow reads; expected {EXPECTED}")


def open_source(path: str, field: str, model_path: Optional[str] = None) -> tuple[Path, dict, ModelConfig]:
    """(folder, metadata, model) of the checkpoint at ``path``, in any format :func:`detect` knows.
    ``model_path``: the model file of a folder that does not describe its model."""
    kind = detect(path, field)
    if kind == MGROW:
        return files.open_checkpoint(path, field)
    if kind == MEGATRON_LM:
        folder = megatron_lm_iteration(Path(path))
        from mgrow.checkpoint import megatron_lm

        metadata = megatron_lm.metadata_of(folder, field)
    elif kind == DIST_CHECKPOINT:
        folder = Path(path)
        metadata = _dist_checkpoint_metadata(folder, field, model_path)
    else:
        folder = deepspeed_tag_folder(Path(path))
        from mgrow.checkpoint import deepspeed_user

        metadata = deepspeed_user.metadata_of(folder, field, model_path)
    return folder, metadata, ModelConfig.from_dict(metadata["model"])


def _dist_checkpoint_metadata(folder: Path, field: str, model_path: Optional[str]) -> dict:
    if not (folder / "metadata.json").exists():
        raise CheckpointError(str(folder / "metadata.json"), "missing: dist_checkpointing writes it last, so the "
                                                             "folder is half-written")
    from mgrow.checkpoint import megatron_format, megatron_lm

    common = megatron_lm.read_common(folder)
    model = described_model(common.get(MODEL_KEY), model_path, folder, "dist_checkpointing")
    optimizer = common.get("optimizer")
    config = {"model": model.to_dict(), "optimizer": {"type": "adam"},
              "train": {"seq_length": min(64, model.max_sequence_length)}}
    sharding = megatron_format.FULLY_RESHARDABLE
    if optimizer is not None:
        sharding = optimizer.get("param_state_sharding_type") or megatron_format.FULLY_RESHARDABLE
        config["optimizer"] = _optimizer_settings(optimizer, distributed="param_state_sharding_type" in optimizer)
    return {
        "source_format": DIST_CHECKPOINT,
        "engine": "megatron",
        "optimizer": config["optimizer"]["type"],
        "optimizer_state": optimizer is not None,
        "sharding_type": sharding,
        "layout": common.get(LAYOUT_KEY) or {"tp": 1, "pp": 1, "dp": 1},
        "layout_known": LAYOUT_KEY in common,  # a user's folder does not say which layout saved it
        "model": model.to_dict(),
        "config": config,
        "progress": {"step": int(common.get("iteration", 0))},
    }


def _optimizer_settings(state: dict, distributed: bool) -> dict:
    """mgrow's optimizer section from a megatron optimizer's saved param groups (Adam's settings and LR bounds of
    group 0, the largest weight decay of any group: megatron's groups differ only in their decay multiplier).
    The folder holds no LR schedule: the job runs mgrow's cosine schedule between those bounds."""
    groups = (state.get("optimizer") or {}).get("param_groups") or []
    if not groups:
        return {"type": "megatron" if distributed else "adam"}
    first = groups[0]
    beta1, beta2 = first.get("betas", (0.9, 0.999))
    lr = float(first.get("max_lr", first.get("lr", 1e-4)))  # megatron's groups keep the schedule's bounds
    return {"type": "megatron" if distributed else "adam", "lr": lr, "min_lr": float(first.get("min_lr", lr)),
            "warmup_steps": 0,
            "beta1": float(beta1), "beta2": float(beta2), "eps": float(first.get("eps", 1e-8)),
            "weight_decay": max(float(g.get("weight_decay", 0.0)) for g in groups)}


def on_any_layout(metadata: dict) -> dict:
    """``metadata`` for a load on a layout other than the saving one: a DistributedOptimizer state whose format
    reshards only over DP (Megatron-LM's dp_reshardable, dp_zero_gather_scatter) is left out; the model always
    reshards."""
    from mgrow.checkpoint.megatron_format import RESHARDABLE

    if metadata.get("optimizer_state") and metadata.get("sharding_type", RESHARDABLE[0]) not in RESHARDABLE:
        return {**metadata, "optimizer_state": False}
    return metadata


def load(engine, folder: Path, metadata: dict) -> None:
    """Collective: fill ``engine`` (built for the checkpoint's model on this job's layout) from ``folder``."""
    kind = metadata.get("source_format", MGROW)
    if kind == MGROW:
        from mgrow.checkpoint import state

        state.load(engine, folder, metadata)
    elif kind == DEEPSPEED:
        raise ConfigError("--in", "a DeepSpeed checkpoint loads into the user's engine made again "
                                  "(mgrow.checkpoint.deepspeed_user.restored_job), not into an mgrow engine")
    else:
        from mgrow.checkpoint import megatron_lm

        megatron_lm.load(engine, str(folder), metadata)


def save_grown(engine, cfg, progress, out: str, metadata: dict) -> Path:
    """Collective: write a grown engine to ``out`` in the format its checkpoint was read from (``metadata``);
    returns the folder written. Megatron-LM's args and every folder mgrow writes describe the grown model."""
    kind = metadata.get("source_format", MGROW)
    if kind == MGROW:
        from mgrow.checkpoint import state

        return state.save(engine, cfg, progress, out)
    if kind == MEGATRON_LM:
        from mgrow.checkpoint import megatron_lm

        args = megatron_lm.grown_args(metadata["args"], cfg.model, engine.dims)
        return megatron_lm.save(engine, progress.step, out, args)
    if kind == DIST_CHECKPOINT:
        return _save_dist_checkpoint(engine, cfg.model, progress.step, out, metadata)
    raise ConfigError("--in", f"{kind} checkpoints are saved by their own module")


def _save_dist_checkpoint(engine, model: ModelConfig, step: int, out: str, metadata: dict) -> Path:
    """The grown model (and optimizer, in the format it was read in) as a plain dist_checkpointing folder, with
    mgrow's description of the model and layout in its common state (a loader that does not ask for them
    ignores them)."""
    from mgrow.checkpoint import megatron_format

    dims = engine.dims
    state = megatron_format.sharded_state(engine, False, metadata["sharding_type"], metadata["optimizer_state"])
    state.update({MODEL_KEY: model.to_dict(), LAYOUT_KEY: {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp},
                  "iteration": step})
    megatron_format.write(state, out)
    return Path(out)
