"""A DeepSpeed checkpoint that a user's own engine wrote (``engine.save_checkpoint``) of a megatron-core GPTModel.

::

    <root>/latest                                  the tag, e.g. "global_step200"
    <root>/<tag>/mp_rank_00_model_states.pt        per TP rank: the module, the DeepSpeed config, param shapes
                                                   (ZeRO-3: zero_pp_rank_<dp>_mp_rank_00_model_states.pt)
    <root>/<tag>/zero_pp_rank_*_optim_states.pt    per DP x TP rank: the ZeRO partition and Adam's state

The model states file holds what rebuilding the user's engine takes: the
DeepSpeed config (ZeRO stage, precision, batch sizes, optimizer and scheduler
sections), the TP and DP sizes, and each param group's parameters by name
(``param_shapes``); the optimizer file each group's settings. It does not say
what model the module is, so the user's model file describes it (one mgrow
wrote carries it in its client state). The engine is made again by
``deepspeed.initialize`` from those pieces on the layout that saved it (ZeRO
partitions load on their own DP size), loaded by DeepSpeed's
``load_checkpoint``, grown by :class:`mgrow.engine.deepspeed_job.DeepSpeedJob`
as a running job would be, and saved with the same tag: the user's engine,
built at the grown size with the user's own code, loads it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mgrow.checkpoint.deepspeed_format import load_plain
from mgrow.checkpoint.foreign import MODEL_KEY, deepspeed_model_states, described_model
from mgrow.core.errors import CheckpointError, ConfigError
from mgrow.core.model_config import ModelConfig

# Group keys the optimizer keeps or the scheduler sets; every other key is the user's group setting.
_NOT_SETTINGS = ("params", "step", "lr", "initial_lr")


def metadata_of(folder: Path, field: str, model_path) -> dict:
    """mgrow's description of a DeepSpeed tag folder: the model (stored by mgrow, else ``model_path``), the
    layout, the DeepSpeed config, the param groups by name with their settings, the step."""
    states = load_plain(deepspeed_model_states(folder))
    model = described_model(states.get(MODEL_KEY), model_path, folder, "DeepSpeed")
    config = states.get("ds_config")
    if not isinstance(config, dict):
        raise CheckpointError(str(deepspeed_model_states(folder)), "holds no DeepSpeed config ('ds_config')")
    stage = int((config.get("zero_optimization") or {}).get("stage", 0))
    names = [list(shapes) for shapes in states["param_shapes"]]
    settings = _group_settings(folder, stage, states, len(names))
    return {
        "source_format": "deepspeed",
        "engine": "deepspeed",
        "optimizer": f"zero{stage}",
        "optimizer_state": True,
        "layout": {"tp": int(states["mp_world_size"]), "pp": 1, "dp": int(states["dp_world_size"])},
        "model": model.to_dict(),
        "config": {"model": model.to_dict(), "train": {"seq_length": min(64, model.max_sequence_length)}},
        "progress": {"step": int(states.get("global_steps", 0))},
        "ds_config": config,
        "groups": [{"names": group, "settings": setting} for group, setting in zip(names, settings)],
        "tag": folder.name,
    }


def _group_settings(folder: Path, stage: int, states: dict, count: int) -> list[dict]:
    """Each param group's settings (weight decay, betas, ...) as the optimizer saved them."""
    if stage == 0:
        groups = (states.get("optimizer") or {}).get("param_groups")
    else:
        files = sorted(folder.glob("*_optim_states.pt"))
        if not files:
            raise CheckpointError(str(folder), f"holds no *_optim_states.pt: a ZeRO-{stage} checkpoint has one per rank")
        saved = load_plain(files[0])["optimizer_state_dict"]
        base = saved.get("base_optimizer_state", saved.get("optimizer_state_dict"))
        groups = base.get("param_groups") if isinstance(base, dict) else None
    if not groups or len(groups) != count:
        raise CheckpointError(str(folder), f"its optimizer state has {len(groups or [])} param groups, its model "
                                           f"states {count}")
    return [{k: v for k, v in group.items() if k not in _NOT_SETTINGS} for group in groups]


def restored_job(folder: Path, metadata: dict, dims):
    """A :class:`~mgrow.engine.deepspeed_job.DeepSpeedJob` holding the checkpoint: the user's engine made again
    (their DeepSpeed config and param groups) on the layout that saved it, filled by ``load_checkpoint``."""
    import deepspeed

    from mgrow.engine import ds_mpu
    from mgrow.engine.deepspeed_job import DeepSpeedJob
    from mgrow.engine.model import build_gpt

    saved = metadata["layout"]
    if (saved["tp"], saved["dp"]) != (dims.tp, dims.dp) or dims.pp != 1:
        raise ConfigError("--tp/--dp", f"a DeepSpeed checkpoint loads on the layout that saved it (tp={saved['tp']}, "
                                       f"dp={saved['dp']}, pp=1); this job has tp={dims.tp}, dp={dims.dp}, pp={dims.pp}")
    model = build_gpt(ModelConfig.from_dict(metadata["model"]), dims, initialize=False)
    params = dict(model.named_parameters())
    unknown = [n for group in metadata["groups"] for n in group["names"] if n not in params]
    if unknown:
        raise ConfigError("--model", f"does not describe the checkpoint's module: it has no parameters {unknown[:4]}")
    groups = [{**group["settings"], "params": [params[name] for name in group["names"]]} for group in metadata["groups"]]
    args = argparse.Namespace(device_rank=dims.device.index if dims.is_cuda else int(os.environ.get("LOCAL_RANK", 0)))
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=groups,
                                           config=metadata["ds_config"], mpu=ds_mpu)
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if path is None:
        raise CheckpointError(str(folder), "DeepSpeed's load_checkpoint found nothing to load")
    return DeepSpeedJob(engine, dims=dims)


def save(job, model: ModelConfig, out: str, metadata: dict) -> Path:
    """Collective: the grown job's engine as a DeepSpeed checkpoint under ``out``, with the source's tag."""
    job.engine.save_checkpoint(out, tag=metadata["tag"], client_state={MODEL_KEY: model.to_dict()})
    return Path(out) / metadata["tag"]

