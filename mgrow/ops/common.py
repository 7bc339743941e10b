"""What every growth operator shares: its result, the free-entry draws, and the
machinery that grows a tensor along one axis from a per-axis rule."""

from __future__ import annotations

import hashlib
import math
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
    coordinate or layer off). The draw is counter-based: the value of an entry
    is a function of (seed, stream, tensor name, the entry's flat index in the
    full grown tensor) alone (:func:`counter_normal`), so it depends neither on
    dict order, nor on which other entries are free, nor on which rank draws
    it: a TP rank draws only its own shard's entries and gets, bit for bit, what
    the full-tensor draw gives there. ``stream`` separates the operators of one
    plan. Draws are made on the CPU, whatever the weights' device, so a plan
    gives the same new entries on every device; callers move them.
    """

    def __init__(self, std: float, seed: int, stream: int = 0):
        self.std, self.seed, self.stream = float(std), int(seed), int(stream)

    def for_stream(self, stream: int) -> "FreeValues":
        return FreeValues(self.std, self.seed, stream)

    def draw(self, name: str, shape: tuple[int, ...], rows: Optional[tuple[int, torch.Tensor]] = None) -> torch.Tensor:
        """The draws of full tensor ``name`` of ``shape``; with ``rows`` = (dim, indices), only those indices
        along ``dim`` (the tensor a shard holds there, in that order)."""
        return self.draw_at(name, flat_indices(shape, rows))

    def draw_at(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """The draws at flat (row-major) indices ``index`` of full tensor ``name`` (float32, ``index``'s shape)."""
        key = hashlib.blake2b(f"{self.seed}/{self.stream}/{name}".encode(), digest_size=8).digest()
        values = counter_normal(index.to("cpu"), key).to(torch.float32).mul_(self.std)
        return values.add_(1.0) if is_norm_gain(name) else values


_MASK32 = 0xFFFFFFFF


def flat_indices(shape: tuple[int, ...], rows: Optional[tuple[int, torch.Tensor]] = None) -> torch.Tensor:
    """Flat (row-major) indices into a tensor of ``shape``, of the whole tensor or of ``rows`` = (dim, indices)."""
    index = torch.zeros((), dtype=torch.int64, device="cpu")
    stride = 1
    for dim in reversed(range(len(shape))):
        along_dim = torch.arange(shape[dim], dtype=torch.int64, device="cpu")
        if rows is not None and rows[0] == dim:
            along_dim = rows[1].to(device="cpu", dtype=torch.int64)
        index = index + along(along_dim * stride, dim, len(shape))
        stride *= shape[dim]
    return index


def _mul32_(x: torch.Tensor, constant: int) -> torch.Tensor:
    """x = (x * constant) mod 2**32, in place, for 32-bit x held in int64 (no overflow: the constant's 16-bit
    halves)."""
    high = (x * (constant >> 16)).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(constant & 0xFFFF).add_(high).bitwise_and_(_MASK32)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser (a bijection with full avalanche), in place, on values in [0, 2**32)."""
    x.bitwise_xor_(x >> 16)
    _mul32_(x, 0x85EBCA6B)
    x.bitwise_xor_(x >> 13)
    _mul32_(x, 0xC2B2AE35)
    return x.bitwise_xor_(x >> 16)


def counter_normal(index: torch.Tensor, key: bytes) -> torch.Tensor:
    """Standard normal values (float64), one per int64 ``index`` (>= 0), a pure function of (8-byte key, index).

    A 32-bit hash of the index under the key (murmur3's finaliser, keyed, over the
    index's low then high 32 bits) is a uniform on a grid of 2**-32, and the
    inverse normal CDF (``sqrt(2) erfinv(2u - 1)``) turns it into a normal (so
    |value| < 6.3): integer arithmetic, then one float64 ``erfinv`` on the CPU,
    so every rank that draws an entry gets the same bits.
    """
    low_key, high_key = int.from_bytes(key[:4], "little"), int.from_bytes(key[4:8], "little")
    hashed = _mix32_(index.bitwise_and(_MASK32).bitwise_xor_(low_key))
    _mix32_(hashed.bitwise_xor_(index >> 32).bitwise_xor_(high_key))
    uniform = hashed.double().add_(0.5).mul_(2.0**-31).sub_(1.0)  # in (-1, 1)
    return uniform.erfinv_().mul_(math.sqrt(2.0))


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


@dataclass(frozen=True)
class Rows:
    """A shard's part of a tensor along one axis: growth from a shard to a shard.

    ``held``: the indices (of the full tensor before the op, along ``dim``) the
    shard given to the op holds, in its order; ``wanted``: the indices (of the
    full grown tensor) the op must produce, in the order wanted. Every other
    axis is whole. Growing from ``held`` to ``wanted`` gives, bit for bit, those
    rows of the full-tensor result, provided every wanted row that copies an
    old row finds it held (else :class:`NotLocal`).
    """

    dim: int
    held: torch.Tensor  # int64
    wanted: torch.Tensor  # int64

    def positions(self, src: torch.Tensor) -> torch.Tensor:
        """Where old full indices ``src`` (-1: new) lie in the held rows (-1 for new); NotLocal if one is not held."""
        size = 1 + max(int(self.held.max()) if self.held.numel() else -1, int(src.max()) if src.numel() else -1)
        where = torch.full((max(size, 0),), -1, dtype=torch.int64, device="cpu")
        where[self.held] = torch.arange(len(self.held), device="cpu")
        local = torch.where(src >= 0, where[src.clamp(min=0)], -1)
        if bool(((src >= 0) & (local < 0)).any()):
            raise NotLocal(f"rows {sorted(set(src[(src >= 0) & (local < 0)].tolist()))[:8]} along dim {self.dim} "
                           "are not held here")
        return local


class NotLocal(Exception):
    """A shard cannot be grown from the rows it holds (a grown row copies a row another shard holds)."""


def needed_rows(src: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """The old indices (sorted, unique) that the grown indices ``wanted`` copy, by axis map ``src``."""
    taken = src[wanted]
    return torch.unique(taken[taken >= 0])


def _restrict(rule: Optional[AxisRule], rows: Rows) -> AxisRule:
    """``rule`` (None: the identity) on the wanted rows, its sources as positions in the held rows."""
    if rule is None:
        src = rows.wanted
        ones = torch.ones(len(src), dtype=torch.float64, device="cpu")
        kind = torch.zeros(len(src), dtype=torch.uint8, device="cpu")
        return AxisRule(AxisMap(rows.positions(src), ones, ones.clone()), kind)
    axis = rule.axis
    src = axis.src[rows.wanted]
    if rule.mean_block is not None:
        raise NotLocal(f"mean padding along the sharded dim {rows.dim}")
    return AxisRule(AxisMap(rows.positions(src), axis.scale[rows.wanted], axis.grad_scale[rows.wanted]),
                    rule.kind[rows.wanted])


def grow_tensor(
    name: str, old: torch.Tensor, rules: dict[int, AxisRule], values: FreeValues,
    rows: Optional[Rows] = None, shape: Optional[tuple[int, ...]] = None, old_name: Optional[str] = None,
) -> tuple[torch.Tensor, TensorMap]:
    """Grow ``old`` by per-axis rules (axes without a rule are kept); at most one axis may add entries.

    With ``rows`` (and the full grown ``shape``): ``old`` holds ``rows.held``
    along ``rows.dim`` and the result is the grown rows ``rows.wanted``, its map
    in those local positions. Runs on ``old``'s device; the map it returns lives
    there too. ``old_name``: the tensor's name before the op (default ``name``).
    """
    ndim, device = old.dim(), old.device
    rules = dict(rules)
    if rows is not None:
        rules[rows.dim] = _restrict(rules.get(rows.dim), rows)
    axes = tuple((rules[d].axis if d in rules else AxisMap.identity(old.shape[d])).to(device) for d in range(ndim))
    local_shape = tuple(len(axis) for axis in axes)
    growing = [d for d, rule in rules.items() if bool(rule.kind.any())]
    if len(growing) > 1:
        raise AssertionError(f"{name}: one operator grows one axis per tensor, got axes {growing}")
    kind = torch.zeros(local_shape, dtype=torch.uint8, device=device)
    if growing:
        dim, rule = growing[0], rules[growing[0]]
        kind = along(rule.kind.to(device), dim, ndim).expand(local_shape).clone()
    tmap = TensorMap(old_name or name, axes, kind)
    grown = carry(tmap, old)
    free = tmap.mask(Kind.FREE)
    if free.any():
        index = flat_indices(shape or local_shape, None if rows is None else (rows.dim, rows.wanted))
        drawn = values.draw_at(name, index.expand(local_shape)[free.cpu()])
        grown[free] = drawn.to(device=device, dtype=grown.dtype)
    if growing and rule.mean_block is not None and grown.numel():
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
        self, name: str, old: Optional[torch.Tensor], shape: tuple[int, ...], values: FreeValues,
        rows: Optional[Rows] = None,
    ) -> tuple[torch.Tensor, TensorMap]:
        """Grown tensor ``name`` (full ``shape``) from ``old``; with ``rows``, from and to a shard (:class:`Rows`)."""
        raise NotImplementedError

    def axis_source(self, name: str, dim: int) -> Optional[torch.Tensor]:
        """Grown tensor ``name``'s axis map along ``dim`` (old index or -1 per grown index); None: unchanged."""
        return None

    def rows_needed(self, name: str, dim: int, wanted: torch.Tensor) -> torch.Tensor:
        """The rows along ``dim`` of ``source(name)`` that grown rows ``wanted`` are made from."""
        src = self.axis_source(name, dim)
        return wanted if src is None else needed_rows(src, wanted)


@dataclass(frozen=True)
class SuffixRules(OpStep):
    """Grow every tensor whose name ends in a key of ``rules`` by that key's per-axis rules; copy the rest."""

    cfg: ModelConfig
    grown: ModelConfig
    rules: dict[str, dict[int, AxisRule]]

    def grow(self, name, old, shape, values, rows=None):
        rule = _rule_for(name, self.rules)
        if rule is None and rows is None:
            return old.clone(), TensorMap.identity(name, tuple(old.shape), old.device)
        return grow_tensor(name, old, rule or {}, values, rows, shape)

    def axis_source(self, name, dim):
        rule = (_rule_for(name, self.rules) or {}).get(dim)
        return None if rule is None else rule.axis.src


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

