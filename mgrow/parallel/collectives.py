"""mgrow's own collectives, each on a tensor its backend takes.

Scalars and flags live on ``dims.comm_device`` (the GPU under NCCL, the CPU
under gloo); tensors that are data (parameter shards, moments) stay where they
are, except that gloo's send/recv cannot take CUDA tensors (they pass the raw
pointer to gloo's TCP transport), so point-to-point moves of CUDA tensors on
gloo go through a CPU copy.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

_OPS = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}


def reduce_scalar(dims, value: float, op: str = "max", group=None) -> float:
    """``value`` reduced over ``group`` (default: every rank) by ``op`` (max | min | sum), in float64."""
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=dims.comm_device)
    dist.all_reduce(tensor, op=_OPS[op], group=group)
    return float(tensor[0])


def any_rank(dims, flag: bool, group=None) -> bool:
    return reduce_scalar(dims, 1.0 if flag else 0.0, "max", group) > 0


def gather_objects(obj: Any, group=None) -> list:
    """``obj`` of every rank of ``group`` (pickled; tensors should be on the CPU), in rank order."""
    out: list = [None] * dist.get_world_size(group=group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def send(dims, tensor: torch.Tensor, peer: int) -> None:
    """Send ``tensor`` to global rank ``peer`` (a matching :func:`recv` there)."""
    if dims.stages_p2p_on_cpu and tensor.is_cuda:
        tensor = tensor.cpu()
    dist.send(tensor.contiguous(), dst=peer)


def recv(dims, shape: tuple[int, ...], dtype: torch.dtype, peer: int) -> torch.Tensor:
    """A tensor of ``shape`` from global rank ``peer``, on this rank's device."""
    staged = dims.stages_p2p_on_cpu
    buffer = torch.empty(shape, dtype=dtype, device="cpu" if staged else dims.device)
    dist.recv(buffer, src=peer)
    return buffer.to(dims.device) if staged else buffer


def all_gather(shard: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    """Every rank's ``shard`` (same shape) over ``group``, on the shard's device."""
    shards = [torch.empty_like(shard) for _ in range(size)]
    dist.all_gather(shards, shard.contiguous(), group=group)
    return shards


def broadcast_tensor(tensor: Optional[torch.Tensor], shape, dtype, dims, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s CPU ``tensor`` on every rank (on the CPU), sent over ``dims.comm_device``."""
    buffer = torch.empty(shape, dtype=dtype, device=dims.comm_device)
    if dist.get_rank() == src:
        buffer.copy_(tensor)
    dist.broadcast(buffer, src=src)
    return buffer.cpu()
