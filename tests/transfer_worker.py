"""One rank of the TP2 transfer check (tests/test_transfer.py starts two with torchrun).

    python -m torch.distributed.run --nproc-per-node 2 tests/transfer_worker.py OUT_JSON

A dense GPT and its upcycled MoE copy (4 experts, top-2, normalised), and the same dense GPT
with MHA and its GQA transfer, all at TP2: the logit differences (whole vocabulary, max over
ranks) and whether the gathered shared tensors equal the dense model's bit for bit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(out: str) -> None:
    import torch
    import torch.distributed as dist

    from launch_utils import TINY_MODEL
    from mgrow.engine.model import build_gpt, gather_full_tensors
    from mgrow.core.model_config import ModelConfig
    from mgrow.parallel.dims import init_distributed
    from mgrow.transforms.transfer import rules, shards

    dims = init_distributed(2, 1, 1234, device="cpu")
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    dense = ModelConfig(**TINY_MODEL)
    result = {}
    for name, target in (("moe", dense.replace(num_moe_experts=4, moe_router_topk=2)),
                         ("gqa", dense.replace(num_query_groups=1))):
        source_model, target_model = build_gpt(dense, dims, seed=1), build_gpt(target, dims, seed=2)
        shards.copy_shared(source_model, dense, target_model, target, rules.COMPONENTS, dims)
        source_full = gather_full_tensors(source_model, dense, dims)
        target_full = gather_full_tensors(target_model, target, dims)
        copied = [(n, rules.rule_for(n, rules.COMPONENTS, dense, target)) for n in target_full]
        result[name] = {
            "logit_diff": shards.max_logit_diff(source_model, target_model, tokens, dims),
            "copies_bitwise": all(torch.equal(target_full[n], source_full[r.source])
                                  for n, r in copied if r is not None and r.op == "copy"),
            "copies": sum(1 for _, r in copied if r is not None and r.op == "copy"),
        }
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
