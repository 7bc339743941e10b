"""Memory of the rank's device as torch's caching allocator sees it (CUDA); None on a CPU rank (see ``rss``)."""

from __future__ import annotations

from typing import Optional

import torch


def reset_peak(device: torch.device) -> None:
    """Start a new peak measurement of ``torch.cuda.max_memory_allocated``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> Optional[int]:
    """Peak bytes allocated on ``device`` since :func:`reset_peak`, or None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def allocated(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    return int(torch.cuda.memory_allocated(device))
