"""What this rank sends and receives through torch.distributed while a block runs: calls and bytes per op.

``with Traffic() as traffic: ...`` wraps the ``torch.distributed`` functions
for the duration of the block, so every caller that looks them up on the module
at call time is counted: mgrow's collectives, megatron-core's, DeepSpeed's
``deepspeed.comm`` (which calls ``torch.distributed``). Calls made inside
torch.distributed itself (the tensors behind ``all_gather_object``) are not
seen twice.

Bytes follow the algorithms NCCL and gloo use for large tensors, for a group
of k ranks and n bytes in this rank's tensor: all_reduce (ring) sends and
receives 2n(k-1)/k; all_gather and reduce_scatter (ring) (k-1)n, with n one
rank's share; broadcast: the source sends n, every other rank receives n;
send / recv: n. Object collectives and barriers are counted as calls only.
"""

from __future__ import annotations

import collections
import functools

import torch
import torch.distributed as dist

_TENSOR_OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "send", "recv", "isend", "irecv")
_OBJECT_OPS = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list", "barrier",
               "all_to_all", "all_to_all_single", "gather", "scatter", "reduce")


def _nbytes(value) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _group_size(kwargs) -> int:
    return dist.get_world_size(group=kwargs.get("group"))


def _moved(op: str, args: tuple, kwargs: dict) -> tuple[int, int]:
    """(bytes sent, bytes received) by this rank for one call (the model in the module docstring)."""
    k = _group_size(kwargs)
    if op == "all_reduce":
        n = _nbytes(args[0] if args else kwargs.get("tensor"))
        share = 2 * n * (k - 1) // k
        return share, share
    if op in ("all_gather", "all_gather_into_tensor"):
        n = _nbytes(args[1] if len(args) > 1 else kwargs.get("tensor", kwargs.get("input_tensor")))
        return (k - 1) * n, (k - 1) * n
    if op in ("reduce_scatter", "reduce_scatter_tensor"):
        n = _nbytes(args[0] if args else kwargs.get("output"))
        return (k - 1) * n, (k - 1) * n
    if op == "broadcast":
        n = _nbytes(args[0] if args else kwargs.get("tensor"))
        src = args[1] if len(args) > 1 else kwargs.get("src")
        return (n * (k - 1), 0) if src == dist.get_rank() else (0, n)
    n = _nbytes(args[0] if args else kwargs.get("tensor"))
    return (n, 0) if op in ("send", "isend") else (0, n)


class Traffic:
    """Calls and bytes of this rank's torch.distributed operations while the block runs."""

    def __init__(self):
        self.calls: collections.Counter = collections.Counter()
        self.sent_by_op: collections.Counter = collections.Counter()
        self.received_by_op: collections.Counter = collections.Counter()
        self.sent = self.received = 0
        self._saved: dict = {}

    def __enter__(self) -> "Traffic":
        for op in (*_TENSOR_OPS, *_OBJECT_OPS):
            original = getattr(dist, op, None)
            if original is not None:
                self._saved[op] = original
                setattr(dist, op, self._wrap(op, original))
        return self

    def __exit__(self, *exc) -> None:
        for op, original in self._saved.items():
            setattr(dist, op, original)
        self._saved.clear()

    def _wrap(self, op: str, original):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            self.calls[op] += 1
            if op in _TENSOR_OPS:
                sent, received = _moved(op, args, kwargs)
                self.sent += sent
                self.received += received
                self.sent_by_op[op] += sent
                self.received_by_op[op] += received
            return original(*args, **kwargs)
        return counted

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def report(self) -> dict:
        return {"calls": dict(sorted(self.calls.items())), "sent_bytes": self.sent, "received_bytes": self.received,
                "sent_bytes_by_op": dict(sorted(self.sent_by_op.items())),
                "received_bytes_by_op": dict(sorted(self.received_by_op.items()))}
