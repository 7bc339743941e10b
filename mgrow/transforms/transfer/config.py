"""The ``transfer:`` section of a training config.

```yaml
transfer:
  from: runs/dense/ckpt          # an mgrow checkpoint (root or step folder) of the Megatron paths (adam, megatron)
  components: [embeddings, norms, mlp, output_layer]   # default; also: attention, attention_output
  freeze: true                   # train the transferred tensors only after the unfreeze (default true)
  unfreeze_window: 20            # steps per window (default 20)
  unfreeze_threshold: 0.01       # unfreeze when mean loss of the last window improves on the window before by less
```

Checked before any process group exists, against the checkpoint's model and the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from mgrow.checkpoint import files
from mgrow.core.errors import ConfigError
from mgrow.core.model_config import ModelConfig
from mgrow.transforms.transfer import rules

_KEYS = ("from", "components", "freeze", "unfreeze_window", "unfreeze_threshold")


@dataclass(frozen=True)
class TransferConfig:
    source: str  # the YAML key `from`
    source_model: ModelConfig
    components: tuple = rules.DEFAULT_COMPONENTS
    freeze: bool = True
    unfreeze_window: int = 20
    unfreeze_threshold: float = 0.01

    def to_dict(self) -> dict:
        return {"from": self.source, "components": list(self.components), "freeze": self.freeze,
                "unfreeze_window": self.unfreeze_window, "unfreeze_threshold": self.unfreeze_threshold}


def parse(raw: Any, model: ModelConfig, tp: int, pp: int, has_growth: bool) -> Optional[TransferConfig]:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError("transfer", f"must be a mapping with keys {', '.join(_KEYS)}")
    for key in raw:
        if key not in _KEYS:
            raise ConfigError(f"transfer.{key}", f"unknown key; known keys: {', '.join(_KEYS)}")
    source = raw.get("from")
    if not isinstance(source, str) or not source:
        raise ConfigError("transfer.from", "required: the path of a checkpoint (a root or a step folder)")
    components = raw.get("components", list(rules.DEFAULT_COMPONENTS))
    if not isinstance(components, list) or not components:
        raise ConfigError("transfer.components", f"must be a non-empty list of {' | '.join(rules.COMPONENTS)}")
    for index, component in enumerate(components):
        if component not in rules.COMPONENTS:
            raise ConfigError(f"transfer.components[{index}]",
                              f"must be one of {' | '.join(rules.COMPONENTS)}, got {component!r}")
        if component in components[:index]:
            raise ConfigError(f"transfer.components[{index}]", f"{component} is listed twice")
    freeze = raw.get("freeze", True)
    if not isinstance(freeze, bool):
        raise ConfigError("transfer.freeze", f"must be true or false, got {freeze!r}")
    window = raw.get("unfreeze_window", 20)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError("transfer.unfreeze_window", f"must be a positive integer (steps), got {window!r}")
    threshold = raw.get("unfreeze_threshold", 0.01)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ConfigError("transfer.unfreeze_threshold", f"must be a number >= 0 (loss), got {threshold!r}")
    if freeze and has_growth:
        raise ConfigError("transfer.freeze", "cannot be combined with a growth schedule (growth rebuilds the "
                                             "optimizer that holds the frozen parameter group)")
    source_model = _checkpoint_model(source)
    rules.check_transfer(source_model, model, tuple(components))
    try:
        source_model.check_layout(tp, pp)
    except ConfigError as error:
        raise ConfigError("transfer.from", f"the checkpoint's model does not fit tp={tp}, pp={pp} (it is loaded on "
                                           f"the run's layout): {error}") from None
    return TransferConfig(source, source_model, tuple(components), freeze, window, float(threshold))


def _checkpoint_model(path: str) -> ModelConfig:
    import os

    if not os.path.exists(path):
        raise ConfigError("transfer.from", f"checkpoint {path} does not exist")
    folder = files.resolve(path)
    metadata = files.read_metadata(folder)
    if metadata.get("engine") != "megatron":
        raise ConfigError("transfer.from", f"{folder} is a DeepSpeed ({metadata.get('optimizer')}) checkpoint; "
                                           "transfer reads megatron dist_checkpointing checkpoints (optimizer.type "
                                           "adam or megatron)")
    return ModelConfig.from_dict(metadata["model"], where=f"{folder / files.METADATA}: model")


def checkpoint_folder(path: str):
    """The step folder ``transfer.from`` names (a step folder, or a root's ``latest``)."""
    return files.resolve(path)
