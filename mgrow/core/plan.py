"""Growth plans: an ordered list of operators, and the model each one leads to, checked before any tensor moves.

Schema (a YAML file or the same dict)::

    ops:                                   # applied in order
      - mlp: {ffn_hidden_size: 1024}
      - heads: {num_attention_heads: 16, num_query_groups: 4}   # num_query_groups optional
      - head_dim: {kv_channels: 64}
      - hidden: {hidden_size: 512, method: auto}   # auto | zero | mean | replicate
      - layers: {insert_before: [2, 4]}            # 0-based indices into the current layers; num_layers appends on top
    init: {std: 0.02, seed: 1234}                  # distribution of the free entries

``init.std`` defaults to the model's ``init_method_std``, ``init.seed`` to 1234.
Errors are :class:`ConfigError` with fields like ``ops[2].heads.num_query_groups``.

This module is the plan's schema and each operator's *target*: which grown
models an operator can reach from a given model, as plain config arithmetic
(no torch). How the tensors grow is :mod:`mgrow.ops`.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union


from mgrow.core.defaults import DEFAULT_SEED
from mgrow.core.errors import ConfigError
from mgrow.core.files_in import read_yaml
from mgrow.core.model_config import LAYOUT_KEYS, ModelConfig

HIDDEN_METHODS = ("auto", "zero", "mean", "replicate")


# ----------------------------------------------------------------------------- the targets of each operator


def require_int(op: str, field: str, value, minimum: int, why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{op}.{field}", f"must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{op}.{field}", f"must be >= {minimum} ({why}), got {value}")
    return value


def replace_config(cfg: ModelConfig, op: str, field: str, **changes) -> ModelConfig:
    """``cfg.replace`` with a model-rule failure reported against the op's field."""
    try:
        return cfg.replace(**changes)
    except ConfigError as error:
        raise ConfigError(f"{op}.{field}", error.rule) from None


def mlp_target(cfg: ModelConfig, ffn_hidden_size: int) -> ModelConfig:
    require_int("mlp", "ffn_hidden_size", ffn_hidden_size, cfg.ffn_hidden_size, "the MLP cannot shrink")
    return replace_config(cfg, "mlp", "ffn_hidden_size", ffn_hidden_size=ffn_hidden_size)


def heads_target(cfg: ModelConfig, num_attention_heads: int, num_query_groups: Optional[int] = None) -> ModelConfig:
    """More heads (and query groups); without ``num_query_groups`` an MHA model stays MHA, a GQA one keeps its groups."""
    E, G = cfg.num_attention_heads, cfg.num_query_groups
    E2 = require_int("heads", "num_attention_heads", num_attention_heads, E, "heads cannot be removed")
    if num_query_groups is None:
        field = "num_attention_heads"
        G2 = E2 if G == E else G
    else:
        field = "num_query_groups"
        G2 = require_int("heads", field, num_query_groups, G, "query groups cannot be removed")
    if E2 % G2:
        raise ConfigError(f"heads.{field}", f"num_attention_heads ({E2}) must be divisible by num_query_groups ({G2})")
    if E2 // G2 < E // G:
        raise ConfigError(
            f"heads.{field}",
            f"{E2} heads in {G2} groups is {E2 // G2} query heads per group, fewer than the {E // G} "
            "each old group already has",
        )
    return replace_config(cfg, "heads", field, num_attention_heads=E2, num_query_groups=G2)


def rotary_percent_for(rotary_dim: int, kv_channels: int) -> float:
    """The rotary_percent whose megatron rotary dim, ``int(kv_channels * rotary_percent)``, is ``rotary_dim``."""
    percent = rotary_dim / kv_channels
    while int(kv_channels * percent) < rotary_dim:  # a quotient rounded down would lose a dim in int()
        percent = math.nextafter(percent, math.inf)
    return percent


def head_dim_target(cfg: ModelConfig, kv_channels: int) -> ModelConfig:
    """A wider head; with RoPE the rotary dim stays (the new dims are not rotated)."""
    k2 = require_int("head_dim", "kv_channels", kv_channels, cfg.kv_channels, "the head dim cannot shrink")
    changes = {"kv_channels": k2}
    if cfg.position_embedding_type == "rope":
        changes["rotary_percent"] = rotary_percent_for(cfg.rotary_dim, k2)
    return replace_config(cfg, "head_dim", "kv_channels", **changes)


def hidden_target(cfg: ModelConfig, hidden_size: int, method: str = "auto") -> ModelConfig:
    """A wider residual stream; padding rescales the norms' epsilon by h/h', replication keeps it."""
    h = cfg.hidden_size
    h2 = require_int("hidden", "hidden_size", hidden_size, h, "the hidden width cannot shrink")
    if method not in HIDDEN_METHODS:
        raise ConfigError("hidden.method", f"must be one of {' | '.join(HIDDEN_METHODS)}, got {method!r}")
    if method == "zero" and cfg.normalization == "LayerNorm":
        raise ConfigError(
            "hidden.method",
            "zero padding is not function preserving with LayerNorm (it moves the mean); use mean or auto",
        )
    if method == "mean" and cfg.normalization == "RMSNorm":
        raise ConfigError(
            "hidden.method",
            "mean padding is not function preserving with RMSNorm (it changes the mean square); use zero or auto",
        )
    if method == "replicate":
        if h2 % h:
            raise ConfigError("hidden.hidden_size", f"replicate needs an integer multiple of {h}, got {h2}")
        return replace_config(cfg, "hidden", "hidden_size", hidden_size=h2)
    return replace_config(cfg, "hidden", "hidden_size", hidden_size=h2,
                          layernorm_epsilon=cfg.layernorm_epsilon * h / h2)


def layer_order(cfg: ModelConfig, insert_before: Sequence[int] = (), num_layers: Optional[int] = None) -> list:
    """For each layer of the grown model, the old layer index it is, or None for a new layer."""
    N = cfg.num_layers
    if isinstance(insert_before, (str, bytes)) or not isinstance(insert_before, Sequence):
        raise ConfigError("layers.insert_before", f"must be a list of layer indices, got {insert_before!r}")
    for position, index in enumerate(insert_before):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= N:
            raise ConfigError(
                "layers.insert_before",
                f"entry {position} ({index!r}) must be a layer index in 0..{N} (the model has {N} layers; {N} appends)",
            )
    if num_layers is None and not insert_before:
        raise ConfigError("layers.insert_before", "give insert_before (a non-empty list) or num_layers")
    inserted = N + len(insert_before)
    if num_layers is None:
        total = inserted
    else:
        total = require_int("layers", "num_layers", num_layers, inserted,
                            f"{N} layers plus {len(insert_before)} inserted")
    order: list = []
    for old in range(N + 1):
        order.extend([None] * list(insert_before).count(old))
        if old < N:
            order.append(old)
    return order + [None] * (total - inserted)


def layers_target(cfg: ModelConfig, insert_before: Sequence[int] = (), num_layers: Optional[int] = None,
                  num_layers_in_first_pipeline_stage: Optional[int] = None,
                  num_layers_in_last_pipeline_stage: Optional[int] = None) -> ModelConfig:
    """More layers; the pipeline split of the grown model is the one given (megatron-core's first/last stage
    sizes, checked against the job's pipeline size when the plan meets a layout) or, by default, the even or
    most balanced one (:mod:`mgrow.core.stages`)."""
    for key, value in (("num_layers_in_first_pipeline_stage", num_layers_in_first_pipeline_stage),
                       ("num_layers_in_last_pipeline_stage", num_layers_in_last_pipeline_stage)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"layers.{key}", f"must be a positive integer, got {value!r}")
    return replace_config(cfg, "layers", "num_layers", num_layers=len(layer_order(cfg, insert_before, num_layers)),
                          num_layers_in_first_pipeline_stage=num_layers_in_first_pipeline_stage,
                          num_layers_in_last_pipeline_stage=num_layers_in_last_pipeline_stage)


def fused_config(a: ModelConfig, b: ModelConfig, field: str = "--b") -> ModelConfig:
    """The target of Deep Fusion (:mod:`mgrow.ops.fusion`): twice the hidden width, heads, query groups and MLP
    of two models of one config; refuses two models whose configs differ (``field`` names the second one)."""
    for key, value in a.to_dict().items():
        if getattr(b, key) != value and key not in LAYOUT_KEYS:
            raise ConfigError(f"{field}: model.{key}", f"fusion needs two models of one config: {getattr(b, key)!r} "
                                                       f"here, {value!r} in the first model")
    return a.replace(
        hidden_size=2 * a.hidden_size,
        num_attention_heads=2 * a.num_attention_heads,
        num_query_groups=2 * a.num_query_groups,
        kv_channels=a.kv_channels,
        ffn_hidden_size=2 * a.ffn_hidden_size,
    )


@dataclass(frozen=True)
class Operator:
    target: Callable[..., ModelConfig]  # the grown model, or a ConfigError naming the key
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


OPERATORS = {
    "mlp": Operator(mlp_target, ("ffn_hidden_size",)),
    "heads": Operator(heads_target, ("num_attention_heads",), ("num_query_groups",)),
    "head_dim": Operator(head_dim_target, ("kv_channels",)),
    "hidden": Operator(hidden_target, ("hidden_size",), ("method",)),
    "layers": Operator(layers_target, (), ("insert_before", "num_layers", "num_layers_in_first_pipeline_stage",
                                           "num_layers_in_last_pipeline_stage")),
}


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class GrowthOp:
    name: str  # a key of OPERATORS
    args: dict[str, Any]  # the operator's keyword arguments


# The largest std of the free entries a plan may ask for. New entries enter the function only behind zeros or
# masks; their std sets how fast they wake up. megatron initialises at 0.02 and the widest draw mgrow uses is
# 0.5 (masked growth's tests); above 1 the new units' activations would dwarf the old ones' at any fan-in.
MAX_INIT_STD = 1.0


@dataclass(frozen=True)
class InitSpec:
    std: Optional[float] = None  # None: the model's init_method_std
    seed: int = DEFAULT_SEED


@dataclass(frozen=True)
class Plan:
    ops: tuple[GrowthOp, ...]
    init: InitSpec = field(default_factory=InitSpec)

    def validate(self, cfg: ModelConfig) -> list[ModelConfig]:
        """Check every op against the model it will meet; the model after each op.

        Raises ConfigError (field ``ops[i].op.key``) for the first impossible target; touches no tensor.
        """
        if cfg.is_moe:
            raise ConfigError("model.num_moe_experts", f"the growth operators grow dense models only; this model "
                                                       f"has {cfg.num_moe_experts} MoE experts")
        out = []
        for index, op in enumerate(self.ops):
            with _field_prefix(f"ops[{index}]."):
                cfg = OPERATORS[op.name].target(cfg, **op.args)
            out.append(cfg)
        return out

    def init_std(self, cfg: ModelConfig) -> float:
        """The std of the free entries: ``init.std``, or the model's ``init_method_std``."""
        return cfg.init_method_std if self.init.std is None else self.init.std

    def to_dict(self) -> dict:
        init = {"seed": self.init.seed} if self.init.std is None else {"std": self.init.std, "seed": self.init.seed}
        return {"ops": [{op.name: dict(op.args)} for op in self.ops], "init": init}


def load_plan(source: Union[dict, str, os.PathLike]) -> Plan:
    """Parse a plan (dict or YAML path) and check its schema: known ops, known keys, required keys."""
    if isinstance(source, (str, os.PathLike)):
        source = read_yaml(str(source), "plan", "plan file")
    if not isinstance(source, dict):
        raise ConfigError("plan", "must be a mapping with keys ops and init")
    for key in source:
        if key not in ("ops", "init"):
            raise ConfigError(str(key), "unknown plan key; known keys: init, ops")
    raw_ops = source.get("ops")
    if not isinstance(raw_ops, list) or not raw_ops:
        raise ConfigError("ops", "must be a non-empty list of operators")
    return Plan(tuple(_parse_op(index, entry) for index, entry in enumerate(raw_ops)), _parse_init(source.get("init")))


def _parse_op(index: int, entry: Any) -> GrowthOp:
    where = f"ops[{index}]"
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(where, "must map one operator name to its keys, e.g. {mlp: {ffn_hidden_size: 1024}}")
    (name, args), = entry.items()
    if name not in OPERATORS:
        raise ConfigError(f"{where}.{name}", f"unknown operator; known operators: {', '.join(OPERATORS)}")
    operator = OPERATORS[name]
    if not isinstance(args, dict):
        raise ConfigError(f"{where}.{name}", "must be a mapping of the operator's keys")
    known = operator.required + operator.optional
    for key in args:
        if key not in known:
            raise ConfigError(f"{where}.{name}.{key}", f"unknown key; {name} takes {', '.join(known)}")
    for key in operator.required:
        if key not in args:
            raise ConfigError(f"{where}.{name}.{key}", "required")
    return GrowthOp(name, dict(args))


def _parse_init(raw: Any) -> InitSpec:
    if raw is None:
        return InitSpec()
    if not isinstance(raw, dict):
        raise ConfigError("init", "must be a mapping with keys std and seed")
    for key in raw:
        if key not in ("std", "seed"):
            raise ConfigError(f"init.{key}", "unknown key; init takes std, seed")
    std, seed = raw.get("std"), raw.get("seed", DEFAULT_SEED)
    if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float)) or not std > 0):
        raise ConfigError("init.std", f"must be a number > 0, got {std!r}")
    if std is not None and not std <= MAX_INIT_STD:
        raise ConfigError("init.std", f"must be at most {MAX_INIT_STD:g} (a finite number), got {std!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError("init.seed", f"must be an integer >= 0, got {seed!r}")
    return InitSpec(None if std is None else float(std), seed)


@contextlib.contextmanager
def _field_prefix(prefix: str):
    """Re-raise a ConfigError with ``prefix`` in front of its field."""
    try:
        yield
    except ConfigError as error:
        raise ConfigError(prefix + error.field, error.rule) from None
