"""Run megatron-core 0.16 on CPU ranks (gloo): applied on every rank whose device is the CPU.

megatron-core hard-codes CUDA in a handful of places (docs/library_facts.md, "CPU
ranks"). Rather than patch torch globally, each affected megatron
module gets its own ``torch`` name rebound to :class:`_CpuTorch`, a thin proxy
that forwards everything to torch except:

* ``torch.cuda.current_device()`` -> ``"cpu"``   (GlobalMemoryBuffer.get_tensor,
  param_and_grad_buffer, rotary_pos_embedding, p2p_communication, moe.router,
  distrib_optimizer, state_dict_saver),
* ``torch.cuda.synchronize()`` -> no-op          (p2p_communication, filesystem_async),
* ``torch.cuda.{get_rng_state,set_rng_state,manual_seed}`` -> CPU generator
  (CudaRNGStatesTracker.add / model_parallel_cuda_manual_seed),
* factory functions given ``device="cuda"`` allocate on CPU (schedules,
  optimizer, clip_grads, utils).

Three calls are not module-level and get scoped wrappers instead:

* ``tensor_parallel.random._get/_set_cuda_rng_state`` -> CPU RNG state
  (CudaRNGStatesTracker.fork, used by dropout);
* ``Tensor.type()`` reports ``torch.cuda.*`` names for CPU tensors, but only
  while ``DistributedOptimizer.__init__``, ``Float16OptimizerWithFloat16Params.__init__``
  (bf16) and ``clip_grad_by_total_norm_fp32`` run (they assert
  ``param.type() == 'torch.cuda.FloatTensor'`` or ``'torch.cuda.BFloat16Tensor'``);
* ``Tensor.cuda()`` is the identity while the DistributedOptimizer gathers its
  parameter state (``get_parameter_state_dp_zero``, distrib_optimizer.py:1089,
  used by the ``fully_reshardable`` checkpoint format) and while the tied
  output layer of the last pipeline stage is synchronised
  (``LanguageModule.setup_embeddings_and_output_layer``, language_module.py:244).

And DeepSpeed: its CPU accelerator JIT-compiles (about a minute on two cores, once
per checkout) and loads in every rank a shared-memory all-reduce for inference
(``deepspeed_shm_comm``, ``deepspeed.comm.torch.build_shm_op``); training never calls it,
so it is marked as not available on CPU ranks.

Nothing is applied on a CUDA rank (:mod:`mgrow.parallel.dims` decides), and megatron's files are
never edited.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

# Modules whose global ``torch`` is swapped for the proxy, and, for each, a
# CUDA-only spelling that must still appear in its source; tests/test_cpu_shims.py
# fails when an upgrade removes it (the shim would then be dead weight).
PATCHED_MODULES = {
    "megatron.core.utils": "torch.cuda.current_device()",
    "megatron.core.tensor_parallel.random": "torch.cuda.get_rng_state()",
    "megatron.core.tensor_parallel.layers": "torch.cuda.current_device()",
    "megatron.core.tensor_parallel.mappings": "torch.cuda.current_device()",  # QKV gather when groups < TP ranks
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "torch.cuda.current_device()",
    "megatron.core.transformer.dot_product_attention": "torch.cuda.current_device()",
    "megatron.core.transformer.moe.router": "torch.cuda.current_device()",  # TopKRouter.gating moves its weight
    "megatron.core.transformer.utils": "device=\"cuda\"",
    "megatron.core.pipeline_parallel.schedules": "device=\"cuda\"",
    "megatron.core.pipeline_parallel.p2p_communication": "torch.cuda.current_device()",
    "megatron.core.distributed.param_and_grad_buffer": "torch.cuda.current_device()",
    "megatron.core.optimizer.optimizer": "device='cuda'",
    "megatron.core.optimizer.clip_grads": "device='cuda'",
    "megatron.core.optimizer.distrib_optimizer": "torch.cuda.current_device()",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "torch.cuda.current_device()",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "torch.cuda.synchronize()",
}

_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "randn", "rand", "empty_like", "zeros_like")
_CPU_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return "cpu"
    return device


class _CpuCuda(types.SimpleNamespace):
    """``torch.cuda`` as the patched megatron modules see it on a CPU rank."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """``torch`` as the patched megatron modules see it on a CPU rank."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda(
            current_device=lambda: "cpu",
            synchronize=lambda *a, **k: None,
            get_rng_state=lambda *a, **k: torch.get_rng_state(),
            set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
            manual_seed=lambda seed: torch.manual_seed(seed),
        )
        for name in _FACTORIES:
            setattr(self, name, self._cpu_factory(getattr(torch, name)))

    @staticmethod
    def _cpu_factory(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            return fn(*args, **kwargs)

        return wrapper

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def _cuda_type_names():
    """Let CPU tensors pass megatron's ``param.type() == 'torch.cuda.FloatTensor'`` checks."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not self.is_cuda:
            name = original(self)
            return _CPU_TYPE_NAMES.get(name, name)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


@contextlib.contextmanager
def _cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _scoped(fn, *contexts):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for make_context in contexts:
                stack.enter_context(make_context())
            return fn(*args, **kwargs)

    wrapper.__mgrow_shim__ = True
    return wrapper


_applied = False


def needed(device: torch.device) -> bool:
    """The shims are for CPU ranks, whether or not the machine has a GPU."""
    return torch.device(device).type == "cpu"


def define_missing_te_gemm() -> None:
    """megatron-core 0.16.1's MoE router gating (``RouterGatingLinearFunction``, moe_utils.py:1192) tests
    ``te_general_gemm is not None``, but without Transformer Engine the name is never bound (NameError).
    Bind it to None so the torch.mm path runs; needed with or without CUDA, whenever TE is absent."""
    from megatron.core.transformer.moe import moe_utils

    if not moe_utils.HAVE_TE and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def skip_deepspeed_shm_comm() -> None:
    """DeepSpeed builds its CPU inference all-reduce only where ``deepspeed.ops.__compatible_ops__`` says it can."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def apply() -> bool:
    """Install the CPU shims once (a CPU rank); returns True."""
    global _applied
    define_missing_te_gemm()
    if _applied:
        return True
    skip_deepspeed_shm_comm()
    proxy = _CpuTorch()
    for module_name in PATCHED_MODULES:
        importlib.import_module(module_name).torch = proxy

    from megatron.core.tensor_parallel import random as mc_random

    mc_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mc_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    from megatron.core.optimizer import clip_grads, distrib_optimizer

    DistOpt = distrib_optimizer.DistributedOptimizer
    DistOpt.__init__ = _scoped(DistOpt.__init__, _cuda_type_names)
    DistOpt.get_parameter_state_dp_zero = _scoped(
        DistOpt.get_parameter_state_dp_zero, _cuda_is_identity
    )
    clip_grads.clip_grad_by_total_norm_fp32 = _scoped(
        clip_grads.clip_grad_by_total_norm_fp32, _cuda_type_names
    )
    # optimizer.py imported the function by name before we wrapped it.
    from megatron.core.optimizer import optimizer as mc_optimizer

    Float16Optimizer = mc_optimizer.Float16OptimizerWithFloat16Params
    Float16Optimizer.__init__ = _scoped(Float16Optimizer.__init__, _cuda_type_names)

    mc_optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _scoped(
        LanguageModule.setup_embeddings_and_output_layer, _cuda_is_identity
    )
    _applied = True
    return True
