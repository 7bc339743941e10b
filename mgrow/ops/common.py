"""What every growth operator shares: its result, the free-entry draws, and the
machinery that grows a tensor along one axis from a per-axis rule."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from mgrow.core.model_config import ModelConfig
from mgrow.core.parameters import is_norm_gain, parameter_shapes
from mgrow.ops.index_map import AxisMap, Kind, TensorMap, along, carry, gradient_factor


@dataclass(frozen=True)
class GrowthResult:
    state: dict[str, torch.Tensor]  # grown full tensors by global name
    cfg: ModelConfig  # the grown model's dimensions
    maps: dict[str, TensorMap]  # by grown name: where each entry came from

    def transformer_config(self, tp: int = 1, pp: int = 1):
        return self.cfg.transformer_config(tp, pp)


class FreeValues:
    """The values of free entries, drawn like a fresh model's.

    Every free entry is N(0, std), except those of norm gains, which are
    1 + N(0, std) (a fresh norm's gain is 1; a gain near 0 would switch the new
    coordinate or layer off). One generator per (seed, stream, tensor name)
    draws a full tensor of the grown shape, and a free entry takes the value at
    its own position, so the result depends neither on dict order nor on which
    other entries are free. ``stream`` separates the operators of one plan.
    Draws are made on the CPU generator, whatever the weights' device, so a plan
    gives the same new entries on every device; callers move them.
    """

    def __init__(self, std: float, seed: int, stream: int = 0):
        self.std, self.seed, self.stream = float(std), int(seed), int(stream)

    def for_stream(self, stream: int) -> "FreeValues":
        return FreeValues(self.std, self.seed, stream)

    def draw(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        key = hashlib.blake2b(f"{self.seed}/{self.stream}/{name}".encode(), digest_size=8).digest()
        generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(key, "little") >> 1)
        values = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu") * self.std
        return values + 1.0 if is_norm_gain(name) else values


@dataclass(frozen=True)
class AxisRule:
    """How one axis grows inside one operator: the axis map plus, per new index,
    its Kind; MEAN indices are the mean of the old indices of their block of
    ``mean_block`` consecutive grown indices."""

    axis: AxisMap
    kind: torch.Tensor  # uint8 [n_new], OLD exactly where axis.src >= 0
    mean_block: Optional[int] = None


class AxisBuilder:
    """Builds an :class:`AxisRule` segment by segment, in grown-index order, on the CPU: a rule is index
    metadata computed once per operator; :func:`grow_tensor` moves it to the weights' device."""

    def __init__(self):
        self._src: list[torch.Tensor] = []
        self._scale: list[torch.Tensor] = []
        self._grad: list[torch.Tensor] = []
        self._kind: list[torch.Tensor] = []

    def old(self, indices: Iterable[int], scale: float = 1.0, grad_scale: Optional[float] = None) -> "AxisBuilder":
        src = torch.as_tensor(list(indices), dtype=torch.int64, device="cpu")
        n = len(src)
        self._src.append(src)
        self._scale.append(torch.full((n,), float(scale), dtype=torch.float64, device="cpu"))
        grad = gradient_factor(scale) if grad_scale is None else float(grad_scale)
        self._grad.append(torch.full((n,), grad, dtype=torch.float64, device="cpu"))
        self._kind.append(torch.full((n,), int(Kind.OLD), dtype=torch.uint8, device="cpu"))
        return self

    def new(self, count: int, kind: Kind) -> "AxisBuilder":
        self._src.append(torch.full((count,), -1, dtype=torch.int64, device="cpu"))
        self._scale.append(torch.ones(count, dtype=torch.float64, device="cpu"))
        self._grad.append(torch.ones(count, dtype=torch.float64, device="cpu"))
        self._kind.append(torch.full((count,), int(kind), dtype=torch.uint8, device="cpu"))
        return self

    def build(self, mean_block: Optional[int] = None) -> AxisRule:
        cat = lambda parts, dtype: torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device="cpu")  # noqa: E731
        axis = AxisMap(cat(self._src, torch.int64), cat(self._scale, torch.float64), cat(self._grad, torch.float64))
        return AxisRule(axis, cat(self._kind, torch.uint8), mean_block)


def grow_tensor(
    name: str, old: torch.Tensor, rules: dict[int, AxisRule], values: FreeValues
) -> tuple[torch.Tensor, TensorMap]:
    """Grow ``old`` by per-axis rules (axes without a rule are kept); at most one axis may add entries.

    Runs on ``old``'s device; the map it returns lives there too.
    """
    ndim, device = old.dim(), old.device
    axes = tuple((rules[d].axis if d in rules else AxisMap.identity(old.shape[d])).to(device) for d in range(ndim))
    shape = tuple(len(axis) for axis in axes)
    growing = [d for d, rule in rules.items() if bool(rule.axis.is_new.any())]
    if len(growing) > 1:
        raise AssertionError(f"{name}: one operator grows one axis per tensor, got axes {growing}")
    kind = torch.zeros(shape, dtype=torch.uint8, device=device)
    if growing:
        dim, rule = growing[0], rules[growing[0]]
        kind = along(rule.kind.to(device), dim, ndim).expand(shape).clone()
    tmap = TensorMap(name, axes, kind)
    grown = carry(tmap, old)
    free = tmap.mask(Kind.FREE)
    if free.any():
        grown[free] = values.draw(name, shape).to(device=device, dtype=grown.dtype)[free]
    if growing and rule.mean_block is not None:
        grown = _fill_block_means(grown, dim, rule)
    return grown, tmap


class OpStep:
    """One operator applied to one model, tensor by tensor.

    ``source(name)`` is the tensor of the model before the op that grown tensor
    ``name`` is made from (None: a wholly new tensor); ``grow`` makes it. The
    whole-state operators and the sharded mover (one full parameter at a time)
    both run these two calls, so the math lives here only once.
    """

    cfg: ModelConfig  # the model before the op
    grown: ModelConfig  # the model after it

    def source(self, name: str) -> Optional[str]:
        return name

    def grow(
        self, name: str, old: Optional[torch.Tensor], shape: tuple[int, ...], values: FreeValues
    ) -> tuple[torch.Tensor, TensorMap]:
        raise NotImplementedError


@dataclass(frozen=True)
class SuffixRules(OpStep):
    """Grow every tensor whose name ends in a key of ``rules`` by that key's per-axis rules; copy the rest."""

    cfg: ModelConfig
    grown: ModelConfig
    rules: dict[str, dict[int, AxisRule]]

    def grow(self, name, old, shape, values):
        rule = _rule_for(name, self.rules)
        if rule is None:
            return old.clone(), TensorMap.identity(name, tuple(old.shape), old.device)
        return grow_tensor(name, old, rule, values)


def apply_step(step: OpStep, state: dict[str, torch.Tensor], values: FreeValues, op: str) -> GrowthResult:
    """Run ``step`` over a whole full state dict."""
    check_state(state, step.cfg, op)
    grown_state, maps = {}, {}
    for name, shape in parameter_shapes(step.grown).items():
        source = step.source(name)
        grown_state[name], maps[name] = step.grow(name, None if source is None else state[source], shape, values)
    return GrowthResult(grown_state, step.grown, maps)


def check_state(state: dict[str, torch.Tensor], cfg: ModelConfig, op: str) -> None:
    """Refuse a state dict that cannot be the model ``cfg`` describes."""
    numel = sum(t.numel() for t in state.values())
    if numel != cfg.num_parameters():
        raise ValueError(f"{op}: the state dict holds {numel} parameters, the model config {cfg.num_parameters()}")


def _rule_for(name: str, rules: dict[str, dict[int, AxisRule]]) -> Optional[dict[int, AxisRule]]:
    for suffix, rule in rules.items():
        if name == suffix or name.endswith("." + suffix):
            return rule
    return None


def _fill_block_means(grown: torch.Tensor, dim: int, rule: AxisRule) -> torch.Tensor:
    block = rule.mean_block
    moved = grown.movedim(dim, -1)
    blocks = moved.reshape(*moved.shape[:-1], -1, block).double()
    old = (~rule.axis.is_new).view(-1, block).double().to(grown.device)
    means = (blocks * old).sum(-1, keepdim=True) / old.sum(-1, keepdim=True)
    is_mean = (rule.kind == int(Kind.MEAN)).view(-1, block).to(grown.device)
    filled = torch.where(is_mean, means, blocks).to(grown.dtype)
    return filled.reshape(moved.shape).movedim(-1, dim).contiguous()

