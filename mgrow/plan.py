"""Growth plans: an ordered list of operators, checked against a model before anything changes.

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
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import yaml

from mgrow.errors import ConfigError
from mgrow.model_config import ModelConfig
from mgrow.ops import FreeValues, GrowthResult, TensorMap, compose, identity_maps
from mgrow.ops import head_dim, heads, hidden, layers, mlp
from mgrow.ops.common import OpStep, apply_step, check_state


@dataclass(frozen=True)
class Operator:
    grown_config: Callable[..., ModelConfig]
    step: Callable[..., OpStep]
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


OPERATORS = {
    "mlp": Operator(mlp.grown_config, mlp.step, ("ffn_hidden_size",)),
    "heads": Operator(heads.grown_config, heads.step, ("num_attention_heads",), ("num_query_groups",)),
    "head_dim": Operator(head_dim.grown_config, head_dim.step, ("kv_channels",)),
    "hidden": Operator(hidden.grown_config, hidden.step, ("hidden_size",), ("method",)),
    "layers": Operator(layers.grown_config, layers.step, (), ("insert_before", "num_layers")),
}
DEFAULT_SEED = 1234


@dataclass(frozen=True)
class GrowthOp:
    name: str  # a key of OPERATORS
    args: dict[str, Any]  # the operator's keyword arguments


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
                cfg = OPERATORS[op.name].grown_config(cfg, **op.args)
            out.append(cfg)
        return out

    def steps(self, cfg: ModelConfig) -> list[OpStep]:
        """The ops bound to the models they meet, validated first (nothing is touched)."""
        self.validate(cfg)
        out = []
        for op in self.ops:
            out.append(OPERATORS[op.name].step(cfg, **op.args))
            cfg = out[-1].grown
        return out

    def free_values(self, cfg: ModelConfig) -> FreeValues:
        return FreeValues(cfg.init_method_std if self.init.std is None else self.init.std, self.init.seed)

    def to_dict(self) -> dict:
        init = {"seed": self.init.seed} if self.init.std is None else {"std": self.init.std, "seed": self.init.seed}
        return {"ops": [{op.name: dict(op.args)} for op in self.ops], "init": init}


def load_plan(source: Union[dict, str, os.PathLike]) -> Plan:
    """Parse a plan (dict or YAML path) and check its schema: known ops, known keys, required keys."""
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise ConfigError("plan", f"plan file {source} does not exist")
        with open(source) as f:
            source = yaml.safe_load(f)
    if not isinstance(source, dict):
        raise ConfigError("plan", "must be a mapping with keys ops and init")
    for key in source:
        if key not in ("ops", "init"):
            raise ConfigError(str(key), "unknown plan key; known keys: init, ops")
    raw_ops = source.get("ops")
    if not isinstance(raw_ops, list) or not raw_ops:
        raise ConfigError("ops", "must be a non-empty list of operators")
    return Plan(tuple(_parse_op(index, entry) for index, entry in enumerate(raw_ops)), _parse_init(source.get("init")))


def apply_plan(
    state: dict[str, torch.Tensor], cfg: ModelConfig, plan: Union[Plan, dict, str, os.PathLike]
) -> GrowthResult:
    """Grow ``state`` (model ``cfg``) by every op of ``plan`` in order; ``maps`` lead from ``state`` to the result."""
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    steps = plan.steps(cfg)  # every target checked against the model it will meet, before any tensor is touched
    check_state(state, cfg, "plan")
    values = plan.free_values(cfg)
    result = GrowthResult(state, cfg, identity_maps(state))
    for index, (op, step) in enumerate(zip(plan.ops, steps)):
        grown = apply_step(step, result.state, values.for_stream(index), op.name)
        result = GrowthResult(grown.state, grown.cfg, compose(result.maps, grown.maps))
    return result


def original_source(steps: list[OpStep], name: str) -> Optional[str]:
    """The tensor of the model before ``steps`` that grown tensor ``name`` is made from (None: new)."""
    for step in reversed(steps):
        name = step.source(name)
        if name is None:
            return None
    return name


def grow_one(
    steps: list[OpStep], values: FreeValues, name: str, original: Optional[torch.Tensor], device=None
) -> tuple[torch.Tensor, TensorMap]:
    """Grown tensor ``name`` and its map from ``original`` (the tensor :func:`original_source` names).

    The same ops as :func:`apply_plan`, on one tensor: the sharded mover holds one full parameter at a time.
    Both come back on ``device`` (default: ``original``'s, or the CPU for a new tensor).
    """
    if device is None:
        device = original.device if original is not None else torch.device("cpu")
    from mgrow.layouts.megatron import parameter_shapes

    chain = [name]  # the tensor's name before each step, last step first
    for step in reversed(steps):
        chain.append(step.source(chain[-1]))
        if chain[-1] is None:
            break
    chain.reverse()
    first = len(steps) - (len(chain) - 1)  # the step that creates the tensor, or 0
    tensor, tmap = original, None
    if original is not None:
        tensor = original.to(device)
        tmap = TensorMap.identity(chain[0], tuple(original.shape), device)
    for index in range(first, len(steps)):
        step, target = steps[index], chain[index - first + 1]
        shape = parameter_shapes(step.grown)[target]
        tensor, step_map = step.grow(target, tensor, shape, values.for_stream(index))
        tensor, step_map = tensor.to(device), step_map.to(device)  # a new tensor is made on the CPU
        tmap = step_map if tmap is None else compose({chain[index - first]: tmap}, {target: step_map})[target]
    return tensor, tmap


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
