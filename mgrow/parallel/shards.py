"""Moving one full parameter between shards: TP gather and split, PP stage to stage.

Every call here is collective over the TP group of one stage, or point to
point between two stages' ranks of equal (tp, dp) coordinates; the caller
runs them for the same parameters in the same order on every rank. Tensors
stay on the device they are on; ``dims`` is the rank's
:class:`~mgrow.parallel.dims.ParallelDims`.
"""

from __future__ import annotations

import torch

from mgrow.parallel import layout as layout_table
from mgrow.parallel import collectives


def gather_tp(shard: torch.Tensor, layout: layout_table.TensorLayout, dims) -> torch.Tensor:
    """The full tensor from this TP group's shards (replicated tensors are returned as they are)."""
    if layout.partition_dim is None:
        return shard.detach().clone()
    if dims.tp == 1:
        return layout_table.tp_merge([shard.detach()], layout).clone()  # (a vocabulary's padding dropped)
    return layout_table.tp_merge(collectives.all_gather(shard.detach(), dims.tp_group, dims.tp), layout)


def split_tp(full: torch.Tensor, layout: layout_table.TensorLayout, dims) -> torch.Tensor:
    return layout_table.tp_shard(full, layout, dims.tp_rank, dims.tp)


def source_stage(destination: int, holders: tuple[int, ...]) -> int:
    """The old stage a destination stage reads a tensor from: itself if it holds it, else the first holder."""
    return destination if destination in holders else holders[0]


def move_between_stages(
    tensor, shape: tuple[int, ...], holders: tuple[int, ...], destinations: tuple[int, ...], dims
):
    """Make a full fp32 tensor held by the old stages ``holders`` available on every stage of ``destinations``.

    Returns the tensor on destination ranks (None elsewhere), on the rank's device;
    sends where the destination does not hold it already.
    """
    received = tensor if dims.stage in destinations and dims.stage in holders else None
    for destination in destinations:
        source = source_stage(destination, holders)
        if source == destination:
            continue
        if dims.stage == source:
            collectives.send(dims, tensor, dims.stage_peers[destination])
        elif dims.stage == destination:
            received = collectives.recv(dims, shape, torch.float32, dims.stage_peers[source])
    return received


def _local_order(name: str, tmap, old_shape, new_cfg, tp: int):
    """The shard-local order of the grown tensor's TP dim, worked out on the CPU (index metadata)."""
    layout = layout_table.layout_of(name, new_cfg)
    if tp == 1 or layout.partition_dim is None or tmap.old_name is None or layout.vocab_parallel:
        return layout, None  # (growth never reorders the vocabulary)
    order = layout_table.shard_local_order(
        tmap.axes[layout.partition_dim].src.cpu(), old_shape[layout.partition_dim], layout, tp,
        layout_table.tp_unit(name, new_cfg),
    )
    return layout, order


def shard_local(tensor: torch.Tensor, name: str, tmap, old_shape: tuple[int, ...], new_cfg, tp: int) -> torch.Tensor:
    """``tensor`` (grown, reference order) reordered along its TP dim so old units stay on their ranks.

    This is the documented permutation between the gathered grown shards and the
    reference operators' result (:func:`layout_table.shard_local_order`).
    """
    layout, order = _local_order(name, tmap, old_shape, new_cfg, tp)
    return tensor if order is None else tensor.index_select(layout.partition_dim, order.to(tensor.device))


def shard_rows(name: str, tmap, old_shape, new_cfg, dims):
    """(layout, this rank's indices along the TP dim of the grown reference-order tensor, on the rank's
    device), or (layout, None) where the shard is the plain TP split. Depends only on the index map:
    computed once per parameter."""
    layout, order = _local_order(name, tmap, old_shape, new_cfg, dims.tp)
    if order is None:
        return layout, None
    along = layout_table.TensorLayout(layout.pattern, 0, layout.stride)
    return layout, layout_table.tp_shard(order, along, dims.tp_rank, dims.tp).to(dims.device)


def take_shard(tensor: torch.Tensor, layout, rows, dims) -> torch.Tensor:
    if rows is None:
        return split_tp(tensor, layout, dims)
    return tensor.index_select(layout.partition_dim, rows.to(tensor.device))

