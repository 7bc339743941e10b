"""Ranks that share one GPU run gloo over CUDA tensors; what gloo cannot take goes through the CPU.

NCCL refuses two ranks on one GPU, so a machine with one GPU runs a TP x PP x DP
job as several ranks on that GPU with the gloo backend. gloo runs all-reduce,
broadcast and all-gather on CUDA tensors itself (it stages them through pinned
host memory), but its send/recv and coalesced all-gather hand the CUDA tensor's
raw pointer to its TCP transport. Applied only on gloo + CUDA ranks, this module:

* gives megatron's ``pipeline_parallel.p2p_communication`` a ``torch`` whose
  ``distributed.isend/irecv/P2POp/batch_isend_irecv`` move CPU copies (a recv
  copies back to the CUDA tensor when its request is waited on);
* replaces ``_coalescing_manager`` in megatron's ``param_and_grad_buffer`` with
  a context that lets each bucket's collective run by itself (mgrow never
  overlaps them, so every op is synchronous and nothing waits on the manager);
* widens DeepSpeed's own CPU staging (``deepspeed.comm.torch._needs_cpu_staging``,
  written for gloo on Apple's MPS tensors) to CUDA tensors.

mgrow's own point-to-point moves stage themselves (:mod:`mgrow.parallel.collectives`).
``launch/gpu_check.py`` probes which collectives gloo takes on CUDA tensors
without any of this.
"""

from __future__ import annotations

import contextlib
import importlib
import types

import torch
import torch.distributed as dist

_applied = False


class _StagedWork:
    """Requests on CPU copies; ``wait`` waits for them, then copies received values to the CUDA tensors."""

    def __init__(self, works, copies, keep=()):
        self.works, self.copies, self.keep = [w for w in works if w is not None], list(copies), keep

    def wait(self, *args, **kwargs):
        for work in self.works:
            work.wait()
        with torch.no_grad():  # megatron's receive buffers require grad
            for device_tensor, cpu_tensor in self.copies:
                device_tensor.copy_(cpu_tensor)
        self.copies = []
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works) and not self.copies


def isend(tensor, dst=None, group=None, tag=0, **kwargs):
    staged = tensor.detach().cpu()
    return _StagedWork([dist.isend(staged, dst, group, tag, **kwargs)], [], keep=(staged,))


def irecv(tensor, src=None, group=None, tag=0, **kwargs):
    staged = torch.empty_like(tensor, device="cpu")
    return _StagedWork([dist.irecv(staged, src, group, tag, **kwargs)], [(tensor, staged)])


def P2POp(op, tensor, peer=None, group=None, tag=0, **kwargs):  # noqa: N802 (torch's name)
    if op is isend:
        real = dist.P2POp(dist.isend, tensor.detach().cpu(), peer, group, tag, **kwargs)
    elif op is irecv:
        real = dist.P2POp(dist.irecv, torch.empty_like(tensor, device="cpu"), peer, group, tag, **kwargs)
        real.mgrow_copy_back = (tensor, real.tensor)
    else:
        raise ValueError(f"P2POp of {op!r}: megatron's p2p sends only isend / irecv")
    return real


def batch_isend_irecv(ops):
    copies = [op.mgrow_copy_back for op in ops if hasattr(op, "mgrow_copy_back")]
    return [_StagedWork(dist.batch_isend_irecv(ops), copies, keep=ops)]


class _StagedDistributed(types.ModuleType):
    def __init__(self):
        super().__init__("torch.distributed")
        self.isend, self.irecv, self.P2POp, self.batch_isend_irecv = isend, irecv, P2POp, batch_isend_irecv

    def __getattr__(self, name):
        return getattr(dist, name)


class _StagedTorch(types.ModuleType):
    """``torch`` as megatron's p2p_communication sees it on a gloo + CUDA rank: the module's own ``torch``
    (torch itself, or the CPU shims' proxy on the CPU ranks of the tests) with staged point-to-point calls."""

    def __init__(self, base):
        super().__init__("torch")
        self._base = base
        self.distributed = _StagedDistributed()

    def __getattr__(self, name):
        return getattr(self._base, name)


@contextlib.contextmanager
def _one_by_one(group=None, device=None, async_ops=False):
    """megatron's buffers coalesce their buckets' collectives; here each runs by itself, synchronously."""
    if async_ops:
        raise RuntimeError("gloo over CUDA runs megatron's gradient and parameter collectives synchronously; "
                           "overlap_grad_reduce / overlap_param_gather are not supported there")
    yield None


def _cuda_or_mps(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.device.type in ("cuda", "mps")


def apply() -> None:
    """Install the staging once (gloo + CUDA ranks only; tests apply it on CPU ranks, where it copies CPU to CPU)."""
    global _applied
    if _applied:
        return
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.pipeline_parallel import p2p_communication

    p2p_communication.torch = _StagedTorch(p2p_communication.torch)
    param_and_grad_buffer._coalescing_manager = _one_by_one
    try:  # deepspeed.comm's own name ``torch`` is torch itself: import the submodule by its full name
        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:  # DeepSpeed is only needed on the ZeRO paths
        pass
    else:
        ds_torch._needs_cpu_staging = _cuda_or_mps
    _applied = True
