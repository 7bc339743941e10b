"""Ranks of tests/test_huggingface.py: an mgrow checkpoint's logits on a layout, gathered over TP (rank 0 of the
last stage writes them to OUT/logits.pt)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def logits(out_dir: str, checkpoint: str, tp: int, pp: int, tokens: list) -> None:
    from mgrow.checkpoint.sources import open_source
    from mgrow.parallel import collectives
    from mgrow.parallel.dims import init_distributed
    from mgrow.train.restore import restored_engine

    folder, metadata, _ = open_source(checkpoint, "--in")
    dims = init_distributed(tp, pp, 0, device="cpu", backend="gloo")
    engine, _, _ = restored_engine(folder, metadata, dims)
    local = engine.logits(torch.tensor(tokens))
    if dims.is_last_stage:
        # every rank's real-vocabulary columns, in rank order (the padding is at the end)
        parts = collectives.gather_objects(local.cpu(), group=dims.tp_group)
        if dims.tp_rank == 0:
            torch.save(torch.cat(parts, dim=-1), Path(out_dir) / "logits.pt")
    engine.destroy()
    dist.barrier()
