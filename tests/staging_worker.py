"""One rank of the gloo-over-CUDA staging check (tests/test_gloo_cuda.py starts four with mgrow's local launcher).

    staging_worker.main([OUT_JSON])

TP1 x PP2 x DP2 with the DistributedOptimizer on CPU ranks: three training steps as megatron
runs them, then :func:`mgrow.parallel.gloo_cuda.apply` (its p2p proxies copy every pipeline
send/recv through CPU buffers and megatron's buffers run their collectives one by one; on CPU
ranks the copies are CPU to CPU), a fresh engine from the same weights and the same three
steps. Rank 0 writes both loss lists and whether the gathered weights agree bit for bit.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from mgrow.testing.harness import RandomBatches, check_config as train_config, gather_state
    from mgrow.engine.model import build_gpt
    from mgrow.core.model_config import ModelConfig
    from mgrow.parallel import gloo_cuda
    from mgrow.parallel.dims import init_distributed, shutdown
    from mgrow.engine.engines import build_engine, global_mean_loss

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from launch_utils import TINY_MODEL

    model = ModelConfig(**TINY_MODEL)
    dims = init_distributed(1, 2, 1234, device="cpu")
    cfg = train_config(model, dims, "megatron", 16)
    runs = []
    for staged in (False, True):
        if staged:
            gloo_cuda.apply()
        engine = build_engine(build_gpt(model, dims, seed=7), cfg, dims)
        batches = RandomBatches(cfg, 7, dims)
        losses = [global_mean_loss(engine.train_step(batches(step)), dims) for step in range(3)]
        runs.append((losses, gather_state(engine, model)["weight"]))
    (plain, plain_weights), (staged, staged_weights) = runs
    if dims.rank == 0:
        Path(argv[0]).write_text(json.dumps({
            "plain": plain, "staged": staged,
            "weights_equal": all(torch.equal(plain_weights[n], staged_weights[n]) for n in plain_weights),
            # DeepSpeed's collectives stage CUDA tensors through the CPU too
            "deepspeed_stages_cuda": importlib.import_module("deepspeed.comm.torch")._needs_cpu_staging
            is gloo_cuda._cuda_or_mps,
        }))
    dist.barrier()
    shutdown()
