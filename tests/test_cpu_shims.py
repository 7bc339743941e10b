"""The CPU shims stay small, scoped and necessary.

The in-process rank of these tests is a CPU rank (``conftest.one_rank``), so the shims are
applied there whether or not the machine has a GPU; the test that asserts what a CPU-only
machine does skips where torch sees a GPU.
"""

import importlib
import inspect

import pytest
import torch

from mgrow.parallel import cpu_shims


@pytest.mark.parametrize("module_name, cuda_call", sorted(cpu_shims.PATCHED_MODULES.items()))
def test_each_patched_module_still_hard_codes_cuda(module_name, cuda_call):
    """Fails when a megatron-core upgrade drops the CUDA-only call: then drop the module from the shim."""
    source = inspect.getsource(importlib.import_module(module_name))
    assert cuda_call in source


def test_scoped_wrappers_still_guard_cuda_only_code():
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    DistOpt = distrib_optimizer.DistributedOptimizer
    assert "'torch.cuda.FloatTensor'" in inspect.getsource(DistOpt._build_model_and_main_param_groups)
    assert "'torch.cuda.BFloat16Tensor'" in inspect.getsource(Float16OptimizerWithFloat16Params.__init__)
    assert "send_tensor.cuda()" in inspect.getsource(DistOpt.get_parameter_state_dp_zero)
    assert "'torch.cuda.FloatTensor'" in inspect.getsource(clip_grads.clip_grad_by_total_norm_fp32)
    assert "weight.data.cuda()" in inspect.getsource(LanguageModule.setup_embeddings_and_output_layer)


def test_shims_are_applied_on_cpu_ranks_only(single_rank):
    import megatron.core.utils as mc_utils
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    assert single_rank.device.type == "cpu" and cpu_shims.needed(single_rank.device) and cpu_shims.apply()
    assert not cpu_shims.needed(torch.device("cuda", 0))
    assert mc_utils.torch.cuda.current_device() == "cpu"
    assert mc_utils.torch.zeros(2, device="cuda").device.type == "cpu"
    assert distrib_optimizer.DistributedOptimizer.__init__.__mgrow_shim__
    assert Float16OptimizerWithFloat16Params.__init__.__mgrow_shim__
    # torch itself is untouched outside the patched modules.
    assert torch.zeros is not mc_utils.torch.zeros
    assert torch.Tensor.type(torch.zeros(1)) == "torch.FloatTensor"


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts what a machine without a GPU does")
def test_auto_device_is_the_cpu_without_a_gpu():
    from mgrow.parallel import device

    choice = device.resolve("auto", "auto")
    assert (choice.device.type, choice.backend) == ("cpu", "gloo")


def test_deepspeed_builds_its_shm_all_reduce_only_where_marked_compatible(single_rank):
    """Fails when DeepSpeed stops gating the op on ``__compatible_ops__`` (then the CPU ranks would compile it)."""
    import deepspeed.ops

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # deepspeed.comm.torch is also torch itself

    assert "deepspeed.ops.__compatible_ops__.get(builder.NAME, False)" in inspect.getsource(ds_torch.build_shm_op)
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False  # set by cpu_shims.apply
    assert ds_torch.build_shm_op() is None


def test_cuda_type_names_are_scoped():
    with cpu_shims._cuda_type_names():
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.zeros(1).type(torch.float64).dtype == torch.float64
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_rng_tracker_forks_on_cpu(single_rank):
    """model_parallel_cuda_manual_seed + fork() (dropout) work on CPU and restore the default generator."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(7)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork():
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the tracker's own stream advanced
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), first)


def test_moe_router_gating_needs_the_missing_te_gemm_name(single_rank):
    """Without Transformer Engine megatron-core 0.16.1 never binds ``te_general_gemm`` yet reads it in the
    MoE router's gating (NameError); the shim binds it to None. Fails when an upgrade defines it itself."""
    import inspect

    from megatron.core.transformer.moe import moe_utils

    source = inspect.getsource(moe_utils)
    assert "te_general_gemm is not None" in source
    assert "te_general_gemm = None" not in source  # megatron still has no fallback of its own
    assert moe_utils.HAVE_TE or moe_utils.te_general_gemm is None  # bound by cpu_shims.define_missing_te_gemm
