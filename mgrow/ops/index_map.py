"""Index maps: where every entry of a grown tensor comes from.

A growth operator turns an old full state dict into a grown one. For each grown
tensor a :class:`TensorMap` records, per axis, the old index every new index
reads (``src``; -1 for a new index) and the factor the copied entries were
multiplied by (``scale``). An entry is *new* iff ``src`` is -1 on any of its
axes; every other entry is

    grown[i, j] == scale_0[i] * scale_1[j] * old[src_0[i], src_1[j]].

The per-axis form is the primary one because sharded code slices it: a TP shard
of a grown tensor reads the matching slice of each axis map.

``kind`` (dense, the grown tensor's shape) says what each entry is: ``OLD``
(copied or scaled), or a new entry that is ``ZERO`` (must be exactly 0),
``FREE`` (any value works; drawn from the plan's init distribution) or ``MEAN``
(a mean of old entries, written by LayerNorm mean padding). A MEAN entry is not
a copy of any one old entry, so it is treated as new: its optimizer moments
start at zero, like every other new entry.

Optimizer state follows ``grad_scale``, the factor by which the gradient of a
copied entry changes at the growth point: ``exp_avg * g`` and
``exp_avg_sq * g**2``, new entries 0. For an entry whose weight was multiplied
by c and whose use was compensated by 1/c (K rescale, norm gains, qk-norm
inputs) g = 1/c, the rule m/c, v/c^2 of docs/growth_math.md. Hidden replication is the
exception: a reader's column copy is divided by m but sees the same input and
the same output gradient, so its gradient is unchanged (g = 1), while every
residual coordinate copy gets 1/m of the old gradient, so writers' rows and
norm gains/biases (copied with c = 1) have g = 1/m: m/2 and v/4 for doubling,
which is staged training's halving and quartering. These factors are the exact
gradient ratios for every rule except LayerNorm mean padding, whose padded
coordinates do not follow the old ones under a gradient; there g = 1/c is the
nominal rule (tests/test_ops_optimizer_state.py measures the others).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Optional

import torch


class Kind(IntEnum):
    OLD = 0
    ZERO = 1
    FREE = 2
    MEAN = 3


@dataclass(frozen=True)
class AxisMap:
    """One axis of a grown tensor: for each new index, its old index and factors."""

    src: torch.Tensor  # int64 [n_new]: old index, -1 for a new index
    scale: torch.Tensor  # float64 [n_new]: weight factor (1 for copies and new indices)
    grad_scale: torch.Tensor  # float64 [n_new]: gradient factor the optimizer moments follow

    @classmethod
    def identity(cls, n: int, device=None) -> "AxisMap":
        ones = torch.ones(n, dtype=torch.float64, device=device)
        return cls(torch.arange(n, device=device), ones, ones.clone())

    @property
    def is_new(self) -> torch.Tensor:
        return self.src < 0

    def to(self, device) -> "AxisMap":
        return AxisMap(self.src.to(device), self.scale.to(device), self.grad_scale.to(device))

    def __len__(self) -> int:
        return len(self.src)


@dataclass(frozen=True)
class TensorMap:
    """How one grown tensor is made from the old tensor ``old_name`` (None: a wholly new tensor)."""

    old_name: Optional[str]
    axes: tuple[AxisMap, ...]
    kind: torch.Tensor  # uint8, the grown shape: Kind per entry

    @classmethod
    def identity(cls, name: str, shape: tuple[int, ...], device=None) -> "TensorMap":
        return cls(name, tuple(AxisMap.identity(n, device) for n in shape),
                   torch.zeros(shape, dtype=torch.uint8, device=device))

    @classmethod
    def new_tensor(cls, shape: tuple[int, ...], kind: Kind, device=None) -> "TensorMap":
        def axis(n: int) -> AxisMap:
            ones = torch.ones(n, dtype=torch.float64, device=device)
            return AxisMap(torch.full((n,), -1, device=device), ones, ones.clone())

        return cls(None, tuple(axis(n) for n in shape), torch.full(shape, int(kind), dtype=torch.uint8, device=device))

    def to(self, device) -> "TensorMap":
        """The same map with its index and factor tensors on ``device`` (the weights' device)."""
        return TensorMap(self.old_name, tuple(axis.to(device) for axis in self.axes), self.kind.to(device))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(axis) for axis in self.axes)

    def new_mask(self) -> torch.Tensor:
        """True for new entries (src is -1 on some axis), from the axis maps alone."""
        mask = torch.zeros(self.shape, dtype=torch.bool, device=self.kind.device)
        for dim, axis in enumerate(self.axes):
            mask |= along(axis.is_new.to(mask.device), dim, len(self.axes))
        return mask

    def mask(self, kind: Kind) -> torch.Tensor:
        return self.kind == int(kind)


def identity_maps(state: dict[str, torch.Tensor]) -> dict[str, TensorMap]:
    return {name: TensorMap.identity(name, tuple(t.shape)) for name, t in state.items()}


def compose(first: dict[str, TensorMap], second: dict[str, TensorMap]) -> dict[str, TensorMap]:
    """The map of ``second`` applied after ``first``: original tensors -> final tensors."""
    composed = {}
    for name, outer in second.items():
        if outer.old_name is None:
            composed[name] = outer
            continue
        inner = first[outer.old_name]
        axes = tuple(_compose_axis(a, b) for a, b in zip(inner.axes, outer.axes))
        inherited = _gather(inner.kind, [axis.src.clamp(min=0) for axis in outer.axes])
        kind = torch.where(outer.kind != Kind.OLD, outer.kind, inherited)
        composed[name] = TensorMap(inner.old_name, axes, kind)
    return composed


def carry(tmap: TensorMap, old: Optional[torch.Tensor]) -> torch.Tensor:
    """``old`` under the map: copied entries times their scale, new entries 0."""
    return _carry(tmap, old, [axis.scale for axis in tmap.axes])


def apply_to_optimizer_state(
    tmap: TensorMap, exp_avg: Optional[torch.Tensor], exp_avg_sq: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam moments for the grown tensor: m * g and v * g**2 on copied entries, 0 on new ones."""
    return carry_moment(tmap, exp_avg, 1), carry_moment(tmap, exp_avg_sq, 2)


def gradient_factor(weight_scale: float) -> float:
    """The factor by which an entry's gradient changes when its weight is multiplied by c and its use is
    compensated by 1/c (the rule every operator and fusion follow, unless an axis states its own): 1/c."""
    return 1.0 / weight_scale


def moment_factor(gradient_scale, power: int):
    """Adam's moment ``power`` (1: exp_avg, 2: exp_avg_sq) of an entry whose gradient is multiplied by g: g**power."""
    return gradient_scale**power


def carry_moment(tmap: TensorMap, moment: Optional[torch.Tensor], power: int) -> torch.Tensor:
    """One Adam moment for the grown tensor: ``moment * g**power`` on copied entries, 0 on new ones."""
    return _carry(tmap, moment, [moment_factor(axis.grad_scale, power) for axis in tmap.axes])


def _carry(tmap: TensorMap, old: Optional[torch.Tensor], factors: list[torch.Tensor]) -> torch.Tensor:
    """On ``old``'s device (the map's tensors follow it there)."""
    if tmap.old_name is None or old is None:
        return torch.zeros(tmap.shape, dtype=old.dtype if old is not None else torch.float32,
                           device=old.device if old is not None else tmap.kind.device)
    if old.dim() != len(tmap.axes) or any(
        axis.src.numel() and int(axis.src.max()) >= n for axis, n in zip(tmap.axes, old.shape)
    ):
        raise ValueError(f"{tmap.old_name}: old tensor {tuple(old.shape)} does not fit its map")
    # In the tensor's own dtype: the sharded mover runs this on one full parameter at a time and
    # its peak memory is bounded by that parameter's size, not twice it.
    grown = _gather(old, [axis.src.clamp(min=0).to(old.device) for axis in tmap.axes])
    for dim, factor in enumerate(factors):
        if not bool((factor == 1).all()):
            grown.mul_(along(factor.to(device=grown.device, dtype=grown.dtype), dim, grown.dim()))
    grown[tmap.new_mask().to(grown.device)] = 0.0
    return grown


def _compose_axis(inner: AxisMap, outer: AxisMap) -> AxisMap:
    copied = outer.src >= 0
    at = outer.src.clamp(min=0)
    one = torch.ones((), dtype=torch.float64, device=outer.src.device)
    return AxisMap(
        torch.where(copied, inner.src[at], -1),
        torch.where(copied, outer.scale * inner.scale[at], one),
        torch.where(copied, outer.grad_scale * inner.grad_scale[at], one),
    )


def _gather(tensor: torch.Tensor, indices: list[torch.Tensor]) -> torch.Tensor:
    for dim, index in enumerate(indices):
        tensor = tensor.index_select(dim, index)
    return tensor


def along(values: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return values.view(shape)
