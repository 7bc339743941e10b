"""The table of moves: every grown parameter's route from the old shards to the new ones, decided once.

Per grown parameter (global names, one fixed order on every rank): the old
tensor it is made from (or none), the old stages that hold it and the new
stages that will, its TP layout, and for this rank the rows along the TP dim
its old shard holds and its grown shard must have. A parameter grows
*shard-local* when every TP rank's grown shard copies only old rows that rank
holds (the documented permutation keeps old MLP units, heads and query groups
on their rank, :func:`mgrow.parallel.layout.shard_local_order`); then no TP
rank reads another's shard, and a layer that changes stage sends each TP
rank's old shard to its peer once. Where the layout cannot keep a unit on one
rank (megatron splits one query group over several TP ranks, TP > groups) the
parameter is *gathered*: its holders all-gather it over TP and grow the full
tensor, as the reference operators do.

The table is built from the plan, the two model descriptions and the parallel
layout alone (index metadata on the CPU, no tensor read), for every TP rank so
that each rank agrees on which parameters are gathered, then executed by the
mover (:mod:`mgrow.transforms.grow`) for the weights and again for each
moment. Its byte counts are what the growth bench reports as planned traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mgrow.core.model_config import ModelConfig
from mgrow.core.parameters import parameter_shapes
from mgrow.ops.common import NotLocal, Rows
from mgrow.ops.plan import original_source, source_chain
from mgrow.parallel import layout as layout_table
from mgrow.parallel.shards import source_stage

FP32_BYTES = 4


@dataclass(frozen=True)
class Move:
    name: str  # the grown parameter's global name
    source: Optional[str]  # the old parameter it is made from; None: a new tensor
    holders: tuple[int, ...]  # old stages holding the source
    destinations: tuple[int, ...]  # new stages holding the grown parameter
    layout: layout_table.TensorLayout  # TP layout of the grown parameter (the source's is the same role)
    old_shape: Optional[tuple[int, ...]]  # full shapes
    new_shape: tuple[int, ...]
    local: bool  # grown shard-local on every TP rank; False: gathered over TP and grown whole
    rows: Optional[Rows]  # this rank's real rows along the TP dim (old held, grown wanted); None: replicated
    old_padding: int = 0  # zero rows at the end of this rank's old / grown shard (a padded vocabulary)
    new_padding: int = 0

    @property
    def old_shard_shape(self) -> Optional[tuple[int, ...]]:
        if self.old_shape is None:
            return None
        return _shard_shape(self.old_shape, self.rows, "held", self.old_padding)

    @property
    def new_shard_shape(self) -> tuple[int, ...]:
        return _shard_shape(self.new_shape, self.rows, "wanted", self.new_padding)

    def sends(self, stage: int) -> tuple[int, ...]:
        """The new stages ``stage`` sends the source to (stage to stage, peer to peer)."""
        if self.source is None:
            return ()
        return tuple(d for d in self.destinations if d != stage and source_stage(d, self.holders) == stage)

    def receives(self, stage: int) -> Optional[int]:
        """The old stage ``stage`` receives the source from, or None."""
        if self.source is None or stage not in self.destinations or stage in self.holders:
            return None
        return source_stage(stage, self.holders)

    def moved_elements(self) -> int:
        """Elements one send of this move carries: this rank's old shard (local) or the whole old tensor."""
        shape = self.old_shard_shape if self.local else self.old_shape
        return 0 if shape is None else _numel(shape)


def _numel(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def _shard_shape(shape, rows: Optional[Rows], which: str, padding: int) -> tuple[int, ...]:
    if rows is None:
        return tuple(shape)
    out = list(shape)
    out[rows.dim] = len(getattr(rows, which)) + padding
    return tuple(out)


@dataclass(frozen=True)
class MoveTable:
    moves: tuple[Move, ...]
    stage: int

    def __iter__(self):
        return iter(self.moves)

    def gathered(self) -> list[str]:
        return [m.name for m in self.moves if not m.local]

    def planned_bytes(self) -> dict:
        """Bytes this rank sends and receives stage to stage per tensor pass (the weights; each moment again),
        fp32. TP gathers of gathered parameters are not included (their count is ``gathered``)."""
        sent = sum(move.moved_elements() * len(move.sends(self.stage)) for move in self.moves)
        received = sum(move.moved_elements() for move in self.moves if move.receives(self.stage) is not None)
        return {"stage_sent_bytes": sent * FP32_BYTES, "stage_received_bytes": received * FP32_BYTES,
                "gathered_parameters": len(self.gathered())}


def build(bound, old_cfg: ModelConfig, dims) -> MoveTable:
    """The table of moves of grown model ``bound[-1].grown`` from ``old_cfg`` on this rank (``dims``)."""
    return MoveTable(_moves_by_tp_rank(bound, old_cfg, dims.tp, dims.pp)[dims.tp_rank], dims.stage)


def build_all(bound, old_cfg: ModelConfig, tp: int, pp: int) -> dict[tuple[int, int], MoveTable]:
    """Every rank's table, by (stage, TP rank), from the layout alone: what a dry run of the growth reads (the
    DP ranks of one (stage, TP rank) share a table)."""
    by_rank = _moves_by_tp_rank(bound, old_cfg, tp, pp)
    return {(stage, rank): MoveTable(by_rank[rank], stage) for stage in range(pp) for rank in range(tp)}


def _moves_by_tp_rank(bound, old_cfg: ModelConfig, tp: int, pp: int) -> list[tuple[Move, ...]]:
    new_cfg = bound[-1].grown
    old_shapes, new_shapes = parameter_shapes(old_cfg), parameter_shapes(new_cfg)
    moves: list[list[Move]] = [[] for _ in range(tp)]
    for name, new_shape in new_shapes.items():
        source = original_source(bound, name)
        holders = () if source is None else layout_table.stages_of(source, old_cfg, pp)
        destinations = layout_table.stages_of(name, new_cfg, pp)
        layout = layout_table.layout_of(name, new_cfg)
        old_shape = None if source is None else tuple(old_shapes[source])
        if layout.partition_dim is None:
            move = Move(name, source, holders, destinations, layout, old_shape, tuple(new_shape), True, None)
            for rank in range(tp):
                moves[rank].append(move)
            continue
        order = _grown_order(bound, name, source, layout, old_shape, new_shape, new_cfg, tp)
        per_rank = [_shard_rows(layout, old_shape, new_shape, order, rank, tp) for rank in range(tp)]
        local = all(_grows_locally(bound, name, source, rows) for rows, _, _ in per_rank)
        for rank, (rows, old_padding, new_padding) in enumerate(per_rank):
            moves[rank].append(Move(name, source, holders, destinations, layout, old_shape, tuple(new_shape), local,
                                    rows, old_padding, new_padding))
    return [tuple(table) for table in moves]


def _shard_rows(layout, old_shape, new_shape, order, rank: int, tp: int):
    """(Rows of TP rank ``rank``'s shards along the TP dim, old padding rows, new padding rows); ``order``: the
    grown axis's shard-local order, or None for megatron's plain split."""
    dim = layout.partition_dim
    held = torch.empty(0, dtype=torch.int64, device="cpu")
    old_padding = 0
    if old_shape is not None:
        held, old_padding = _split(old_shape[dim], layout, rank, tp)
    wanted, new_padding = _split(new_shape[dim], layout, rank, tp)
    if order is not None:
        wanted = order[wanted]
    return Rows(dim, held, wanted), old_padding, new_padding


def _split(length: int, layout, rank: int, tp: int) -> tuple[torch.Tensor, int]:
    """TP rank ``rank``'s indices of a full axis of ``length`` as megatron splits it (real rows; padding count)."""
    index = layout_table.shard_indices(length, layout, rank, tp)
    real = index[index >= 0]
    return real, len(index) - len(real)


def _grown_order(bound, name, source, layout, old_shape, new_shape, new_cfg, tp: int):
    """The documented permutation of the grown TP axis (old units stay on their rank), or None: megatron's
    plain split. Depends only on the composed axis map along the TP dim."""
    if tp == 1 or source is None or layout.vocab_parallel:
        return None
    dim = layout.partition_dim
    src = torch.arange(old_shape[dim], device="cpu")
    for step, target in zip(bound, source_chain(bound, name)[1:]):
        step_src = step.axis_source(target, dim)
        if step_src is not None:
            src = torch.where(step_src >= 0, src[step_src.clamp(min=0)], -1)
    return layout_table.shard_local_order(src, old_shape[dim], layout, tp, layout_table.tp_unit(name, new_cfg))


def _grows_locally(bound, name, source, rows: Rows) -> bool:
    """Whether this shard's grown rows copy only old rows the shard holds."""
    if source is None:
        return True
    chain = source_chain(bound, name)
    wanted = rows.wanted
    for step, target in reversed(list(zip(bound, chain[1:]))):
        wanted = step.rows_needed(target, rows.dim, wanted)
    try:
        rows.positions(wanted)
    except NotLocal:
        return False
    return True
