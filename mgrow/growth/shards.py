"""Moving one full parameter between shards: TP gather and split, PP stage to stage.

Every call here is collective over the TP group of one stage, or point to
point between two stages' ranks of equal (tp, dp) coordinates; the caller
runs them for the same parameters in the same order on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mgrow.layouts import megatron as layout_table


class Grid:
    """This rank's place in the TP x PP x DP grid, and its peers."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.stage = ps.get_pipeline_model_parallel_rank()
        self.stage_peers = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())  # by stage


def gather_tp(shard: torch.Tensor, layout: layout_table.TensorLayout, grid: Grid) -> torch.Tensor:
    """The full tensor from this TP group's shards (replicated tensors are returned as they are)."""
    if layout.partition_dim is None or grid.tp == 1:
        return shard.detach().clone()
    shards = [torch.empty_like(shard) for _ in range(grid.tp)]
    dist.all_gather(shards, shard.detach().contiguous(), group=grid.tp_group)
    return layout_table.tp_merge(shards, layout)


def split_tp(full: torch.Tensor, layout: layout_table.TensorLayout, grid: Grid) -> torch.Tensor:
    return layout_table.tp_shard(full, layout, grid.tp_rank, grid.tp)


def source_stage(destination: int, holders: tuple[int, ...]) -> int:
    """The old stage a destination stage reads a tensor from: itself if it holds it, else the first holder."""
    return destination if destination in holders else holders[0]


def move_between_stages(
    tensor, shape: tuple[int, ...], holders: tuple[int, ...], destinations: tuple[int, ...], grid: Grid
):
    """Make a full tensor held by the old stages ``holders`` available on every stage of ``destinations``.

    Returns the tensor on destination ranks (None elsewhere); sends where the
    destination does not hold it already.
    """
    received = tensor if grid.stage in destinations and grid.stage in holders else None
    for destination in destinations:
        source = source_stage(destination, holders)
        if source == destination:
            continue
        if grid.stage == source:
            dist.send(tensor.contiguous(), dst=grid.stage_peers[destination])
        elif grid.stage == destination:
            received = torch.empty(shape, dtype=torch.float32)
            dist.recv(received, src=grid.stage_peers[source])
    return received


def _local_order(name: str, tmap, old_shape, new_cfg, tp: int):
    layout = layout_table.layout_of(name, new_cfg.gated_linear_unit)
    if tp == 1 or layout.partition_dim is None or tmap.old_name is None:
        return layout, None
    order = layout_table.shard_local_order(
        tmap.axes[layout.partition_dim].src, old_shape[layout.partition_dim], layout, tp,
        layout_table.tp_unit(name, new_cfg),
    )
    return layout, order


def shard_local(tensor: torch.Tensor, name: str, tmap, old_shape: tuple[int, ...], new_cfg, tp: int) -> torch.Tensor:
    """``tensor`` (grown, reference order) reordered along its TP dim so old units stay on their ranks.

    This is the documented permutation between the gathered grown shards and the
    reference operators' result (:func:`layout_table.shard_local_order`).
    """
    layout, order = _local_order(name, tmap, old_shape, new_cfg, tp)
    return tensor if order is None else tensor.index_select(layout.partition_dim, order)


def shard_rows(name: str, tmap, old_shape, new_cfg, grid: Grid):
    """(layout, this rank's indices along the TP dim of the grown reference-order tensor), or (layout, None)
    where the shard is the plain TP split. Depends only on the index map: computed once per parameter."""
    layout, order = _local_order(name, tmap, old_shape, new_cfg, grid.tp)
    if order is None:
        return layout, None
    along = layout_table.TensorLayout(layout.pattern, 0, layout.stride)
    return layout, layout_table.tp_shard(order, along, grid.tp_rank, grid.tp)


def take_shard(tensor: torch.Tensor, layout, rows, grid: Grid) -> torch.Tensor:
    return split_tp(tensor, layout, grid) if rows is None else tensor.index_select(layout.partition_dim, rows)

