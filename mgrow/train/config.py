"""Training config: one YAML with model / parallel / optimizer / train / data / deepspeed sections.

Every section is a dataclass; unknown keys and broken rules raise ConfigError
naming the dotted field, before any process group or model exists.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional


from mgrow.core.defaults import DEFAULT_SEED
from mgrow.core.errors import ConfigError
from mgrow.core.files_in import parse_yaml, read_json, read_yaml
from mgrow.core.model_config import ModelConfig
from mgrow.core.stages import FIRST, LAST
from mgrow.parallel import device
from mgrow.parallel.device import check_world
from mgrow.train import schedule
from mgrow.train.data import DEFAULT_SOURCES, check_corpus
from mgrow.train.metrics import WANDB_MODES, WandbConfig
from mgrow.transforms.transfer import config as transfer_config
from mgrow.transforms.transfer.config import TransferConfig

OPTIMIZERS = ("adam", "megatron", "zero1", "zero2", "zero3")


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    timeout_minutes: float = 10.0  # rendezvous and collectives (Megatron-LM's --distributed-timeout-minutes)
    device: str = "auto"  # auto (CUDA when torch sees a GPU) | cpu | cuda: where every rank's tensors live
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo (ranks sharing one GPU)
    # The pipeline split of the model this job starts from (the config's model, or the checkpoint's when it
    # resumes), as megatron-core's first/last stage sizes; None: the model's own, else even or most balanced.
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None


@dataclass(frozen=True)
class OptimizerConfig:
    type: str = "adam"  # adam (Megatron DDP) | megatron (DistributedOptimizer) | zero1 | zero2 | zero3
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    decay_steps: Optional[int] = None  # None: train.steps
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 0.0  # 0 disables clipping

    @property
    def zero_stage(self) -> Optional[int]:
        return int(self.type[-1]) if self.type.startswith("zero") else None


@dataclass(frozen=True)
class TrainLoopConfig:
    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 16
    seq_length: int = 64
    seed: int = DEFAULT_SEED
    log_interval: int = 10
    eval_interval: int = 0  # 0: evaluate only at the end
    eval_batches: int = 2
    progress: bool = True
    metrics_path: Optional[str] = None  # rank 0 appends one JSON line per step / evaluation
    init: str = "random"  # explicit: embedding and output layer of a fresh run from bigram statistics (mgrow/warm_start.py)


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/cache/corpus"
    # Text to build `path` from when its files are missing; empty: they must exist.
    sources: tuple = tuple(DEFAULT_SOURCES)


@dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str] = None  # root folder of the checkpoints; None: no checkpoints
    interval: int = 0  # save every N steps; 0: only at the end of training
    load: Optional[str] = None  # root (its `latest`) or step folder to resume from; a root with no checkpoint yet starts fresh


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: dict = field(default_factory=dict)  # merged into the generated DeepSpeed config
    growth: tuple = ()  # GrowthEvent, in order (mgrow.train.schedule)
    wandb: Optional[WandbConfig] = None  # None: no W&B run
    transfer: Optional[TransferConfig] = None  # None: no cross-architecture transfer (mgrow.transforms.transfer)

    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}
        out["model"] = self.model.to_dict()
        out["deepspeed"] = dict(self.deepspeed)
        out["wandb"] = None if self.wandb is None else dataclasses.asdict(self.wandb)
        out["transfer"] = None if self.transfer is None else self.transfer.to_dict()
        out["growth"] = [{**{k: v for k, v in dataclasses.asdict(e).items() if k != "plan" and v is not None},
                          "plan": e.plan.to_dict()} for e in self.growth]
        return out

    def check_world(self, world: int) -> int:
        """Layout rules that need the world size; returns dp."""
        dp = check_world(self.parallel.tp, self.parallel.pp, world)
        t, o = self.train, self.optimizer
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                "train.global_batch_size",
                f"{t.global_batch_size} must be divisible by micro_batch_size*dp = {t.micro_batch_size}*{dp}",
            )
        if o.zero_stage is not None and self.parallel.pp != 1:
            raise ConfigError("parallel.pp", f"optimizer {o.type} (DeepSpeed ZeRO) runs with pp = 1, got {self.parallel.pp}")
        micro, total = t.micro_batch_size, t.global_batch_size
        for index, event in enumerate(self.growth):
            micro, total = event.micro_batch_size or micro, event.global_batch_size or total
            if total % (micro * dp):
                raise ConfigError(f"growth[{index}].global_batch_size",
                                  f"{total} must be divisible by micro_batch_size*dp = {micro}*{dp}")
        return dp


_SECTIONS = {
    "parallel": ParallelConfig,
    "optimizer": OptimizerConfig,
    "train": TrainLoopConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
}


def _section(cls, values: Any, where: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(where, f"must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}.{key}", f"unknown key; known keys: {', '.join(fields)}")
        _check_type(f"{where}.{key}", value, fields[key])
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


def _check_type(name: str, value: Any, f: dataclasses.Field) -> None:
    default = f.default if f.default is not dataclasses.MISSING else None
    if default is None or value is None and "Optional" in str(f.type):
        return
    expected = type(default)
    if expected is tuple:
        ok = isinstance(value, (list, tuple))
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(name, f"must be of type {expected.__name__}, got {value!r}")


INITS = ("random", "explicit")


def _validate(cfg: TrainConfig) -> None:
    o, t = cfg.optimizer, cfg.train
    if o.type not in OPTIMIZERS:
        raise ConfigError("optimizer.type", f"must be one of {' | '.join(OPTIMIZERS)}, got {o.type!r}")
    for name in ("steps", "micro_batch_size", "global_batch_size", "seq_length", "log_interval", "eval_batches"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}", "must be >= 1")
    if t.init not in INITS:
        raise ConfigError("train.init", f"must be one of {' | '.join(INITS)}, got {t.init!r}")
    if t.seq_length > cfg.model.max_sequence_length:
        raise ConfigError(
            "train.seq_length", f"{t.seq_length} exceeds model.max_sequence_length {cfg.model.max_sequence_length}"
        )
    if not 0 < o.lr or not 0 <= o.min_lr <= o.lr:
        raise ConfigError("optimizer.min_lr", f"need 0 <= min_lr <= lr and lr > 0, got lr={o.lr}, min_lr={o.min_lr}")
    decay_steps = o.decay_steps or t.steps
    if not 0 <= o.warmup_steps < decay_steps:
        raise ConfigError(
            "optimizer.warmup_steps",
            f"must be >= 0 and < the decay steps (optimizer.decay_steps or train.steps = {decay_steps}), "
            f"got {o.warmup_steps}",
        )
    device.check(cfg.parallel.device, cfg.parallel.backend)
    if not cfg.parallel.timeout_minutes > 0:
        raise ConfigError("parallel.timeout_minutes", f"must be > 0, got {cfg.parallel.timeout_minutes}")
    if cfg.checkpoint.interval < 0:
        raise ConfigError("checkpoint.interval", f"must be >= 0, got {cfg.checkpoint.interval}")
    stage = (cfg.deepspeed.get("zero_optimization") or {}).get("stage")
    if stage is not None and stage != o.zero_stage:
        raise ConfigError("deepspeed.zero_optimization.stage",
                          f"{stage} contradicts optimizer.type {o.type} (zero1|zero2|zero3 choose the stage)")
    for key, wanted in (("bf16", cfg.model.bf16), ("fp16", False)):
        enabled = (cfg.deepspeed.get(key) or {}).get("enabled")
        if enabled is not None and enabled != wanted:
            raise ConfigError(f"deepspeed.{key}.enabled",
                              f"{enabled} contradicts model.bf16 {cfg.model.bf16} (model.bf16 chooses the precision)")
    if cfg.model.vocab_size < 256:
        raise ConfigError("model.vocab_size", f"the byte-level corpus needs >= 256 tokens, got {cfg.model.vocab_size}")
    cfg.model.check_layout(cfg.parallel.tp, cfg.parallel.pp)
    for key in (FIRST, LAST):
        value = getattr(cfg.parallel, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"parallel.{key}", f"must be a positive integer, got {value!r}")
        if cfg.parallel.pp == 1 and (value is not None or getattr(cfg.model, key) is not None):
            where = "parallel" if value is not None else "model"
            raise ConfigError(f"{where}.{key}", "a first/last pipeline stage size needs parallel.pp > 1")
    _check_events_fire(cfg)
    if cfg.model.is_moe and cfg.parallel.tp > 1:
        # megatron's MoE layer trains at TP > 1 only with sequence parallelism, which the local spec's
        # torch norms (WrappedTorchNorm, no Apex / Transformer Engine) refuse
        raise ConfigError("parallel.tp", f"MoE models train at tp = 1 here (megatron-core needs sequence "
                                         f"parallelism for MoE with tensor parallelism); got {cfg.parallel.tp}")
    if not cfg.data.sources:
        check_corpus(cfg.data.path)


def _check_events_fire(cfg: TrainConfig) -> None:
    """Every growth event fires, at its own step: events fire in the order listed (each once the previous one
    has), so one listed after an event that fires later would fire late, and one due at or after
    ``train.steps`` never."""
    t = cfg.train
    step, tokens, batch = 0, 0, t.global_batch_size  # the previous event's step, tokens done by then, batch then
    for index, event in enumerate(cfg.growth):
        where = f"growth[{index}]"
        if event.at_step is not None:
            due, key, value = event.at_step, "at_step", event.at_step
        else:
            per_step = batch * t.seq_length
            due = step + max(0, -(-(event.at_tokens - tokens) // per_step))
            key, value = "at_tokens", event.at_tokens
        if due < step:
            raise ConfigError(f"{where}.{key}", f"{value} comes before growth[{index - 1}], which fires at step {step}: "
                                                "events fire in the order listed; list them in the order they fire")
        if due >= t.steps:
            raise ConfigError(f"{where}.{key}", f"{value} is due at step {due}, and training ends after "
                                                f"train.steps = {t.steps}: the event would never fire")
        tokens += (due - step) * batch * t.seq_length
        step, batch = due, event.global_batch_size or batch


def run_models(cfg: TrainConfig, applied: int = 0) -> list[ModelConfig]:
    """The model the run starts from (``cfg.model``: on resume the checkpoint's, which ``applied`` growth events
    made) and the one after each growth event still to come."""
    models = [cfg.model]
    for event in cfg.growth[applied:]:
        models.append(event.plan.validate(models[-1])[-1])
    return models


def with_pipeline_split(model: ModelConfig, parallel: ParallelConfig, resumed: bool) -> ModelConfig:
    """``model`` with the pipeline split this job runs it at: ``parallel``'s first/last stage sizes when given
    (refused, naming them, when they do not fit the model); else the model's own; a resumed checkpoint's own
    split that does not fit this job's pp gives way to the even or most balanced one."""
    first, last = getattr(parallel, FIRST), getattr(parallel, LAST)
    if first is not None or last is not None:
        split = model.replace(**{FIRST: first, LAST: last})
        try:
            split.check_layout(parallel.tp, parallel.pp)
        except ConfigError as error:
            raise ConfigError(error.field.replace("model.", "parallel.", 1),
                              f"{error.rule} (the model this job starts from has {model.num_layers} layers)") from None
        return split
    return model.at_pipeline(parallel.pp) if resumed else model


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.split(".")
        if len(parts) != 2:
            raise ConfigError(key, "an override key must be section.key, e.g. train.steps")
        section = raw.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(parts[0], "is not a section")
        section[parts[1]] = parse_yaml(value, key, f"the override {item!r}")
    return raw


def from_dict(raw: dict, base_dir: str = ".") -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError("config", "must be a YAML mapping")
    known = set(_SECTIONS) | {"model", "deepspeed", "growth", "wandb", "transfer"}
    for key in raw:
        if key not in known:
            raise ConfigError(key, f"unknown section; known sections: {', '.join(sorted(known))}")
    if "model" not in raw:
        raise ConfigError("model", "required: a mapping of model keys or the path of a model YAML")
    model = raw["model"]
    if isinstance(model, str):
        path = model if os.path.isabs(model) else os.path.join(base_dir, model)
        model = read_yaml(path, "model", "model file")
    sections = {name: _section(cls, raw.get(name), name) for name, cls in _SECTIONS.items()}
    deepspeed = _deepspeed_section(raw.get("deepspeed"), base_dir)
    model = ModelConfig.from_dict(model)
    parallel = sections["parallel"]
    model.check_layout(parallel.tp, parallel.pp)  # before the growth events, which start from this model
    growth = schedule.parse(raw.get("growth"), model, parallel.tp, parallel.pp)
    wandb = None if raw.get("wandb") is None else _section(WandbConfig, raw["wandb"], "wandb")
    if wandb is not None and wandb.mode not in WANDB_MODES:
        raise ConfigError("wandb.mode", f"must be one of {' | '.join(WANDB_MODES)}, got {wandb.mode!r}")
    transfer = transfer_config.parse(raw.get("transfer"), model, parallel.tp, parallel.pp, bool(growth))
    cfg = TrainConfig(model=model, deepspeed=deepspeed, growth=growth, wandb=wandb, transfer=transfer, **sections)
    _validate(cfg)
    return cfg


def _deepspeed_section(value: Any, base_dir: str) -> dict:
    """DeepSpeed config keys: a mapping, or the path of a DeepSpeed JSON (configs/deepspeed/*.json)."""
    if value is None:
        return {}
    if isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(base_dir, value)
        value = read_json(path, "deepspeed", "DeepSpeed config file")
    if not isinstance(value, dict):
        raise ConfigError("deepspeed", "must be a mapping of DeepSpeed config keys or the path of a DeepSpeed JSON")
    return value


def load(path: str, overrides: Optional[list[str]] = None) -> TrainConfig:
    raw = read_yaml(path, "--config", "config file") or {}
    raw = apply_overrides(raw, list(overrides or []))
    # Paths inside a config resolve against the repository root or cwd, like Megatron-LM's.
    return from_dict(raw, base_dir=".")
