"""Where one rank's training records go: a JSON-lines file and, with a ``wandb:`` section, a W&B run.

Records are flat dicts: a step (``step``, ``loss``, ``lr``, ``tokens``,
``tokens_per_second``, ``params``), an evaluation (``step``,
``validation_loss``) or a growth event (``event: growth`` and its fields). W&B
gets the same values; growth events go under ``growth/`` with the plan as a
JSON string. Only the leader rank (global rank 0) writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class WandbConfig:
    project: str = "mgrow"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: tuple = ()
    mode: str = "offline"  # offline | online | disabled: nothing leaves the machine unless the user says online
    dir: str = "runs"  # W&B writes <dir>/wandb/


class RunLog:
    def __init__(self, metrics_path: Optional[str], wandb_cfg: Optional[WandbConfig], run_config: dict,
                 append: bool = False):
        self.file = None
        if metrics_path:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
            self.file = open(metrics_path, "a" if append else "w")  # a resumed run goes on in the same file
        self.run = None
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            import wandb

            # wandb reads these once per process: DeepSpeed's own monitor, which calls wandb.init without
            # a mode or a folder (and gets this run back), then stays offline and out of the working directory.
            os.environ.setdefault("WANDB_MODE", wandb_cfg.mode)
            os.environ.setdefault("WANDB_DIR", wandb_cfg.dir)
            os.makedirs(wandb_cfg.dir, exist_ok=True)
            self.run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, group=wandb_cfg.group,
                                  name=wandb_cfg.name, tags=list(wandb_cfg.tags), mode=wandb_cfg.mode,
                                  dir=wandb_cfg.dir, config=run_config)

    def write(self, **record) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.run is not None:
            self.run.log(_for_wandb(record))

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.run is not None:
            self.run.finish()


def _for_wandb(record: dict) -> dict:
    if record.get("event") != "growth":
        return dict(record)
    out = {"step": record["step"]}
    for key, value in record.items():
        if key not in ("event", "step") and value is not None:  # e.g. peak_device_bytes on CPU ranks
            out[f"growth/{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return out
