"""Ranks of tests/test_traffic.py: a known set of torch.distributed calls, counted by mgrow.parallel.traffic."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


def known_calls(out_dir: str) -> None:
    from mgrow.parallel import collectives
    from mgrow.parallel.dims import init_distributed
    from mgrow.parallel.traffic import Traffic

    dims = init_distributed(1, 1, 0, device="cpu", backend="gloo")  # 2 ranks: DP 2
    before = dist.all_reduce
    with Traffic() as traffic:
        dist.all_reduce(torch.ones(1000))  # 4000 bytes: ring sends and receives 2 * 4000 * 1/2
        collectives.all_gather(torch.ones(100), None, 2)  # 400 bytes each way
        if dims.rank == 0:
            dist.send(torch.ones(10), dst=1)  # 40 bytes
        else:
            dist.recv(torch.empty(10), src=0)
        dist.broadcast(torch.ones(25), src=0)  # 100 bytes out of rank 0, into rank 1
        collectives.gather_objects({"a": 1})  # a call, no bytes counted
    Path(out_dir, f"rank{dims.rank}.json").write_text(json.dumps({**traffic.report(),
                                                                  "restored": dist.all_reduce is before}))
