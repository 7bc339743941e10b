"""Memory of this process: resident memory (Linux /proc) and, on a CUDA rank, torch's device allocator."""

from __future__ import annotations

import resource
from typing import Optional


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_current() -> int:
    return _status_kib("VmRSS") * 1024


def rss_reset_peak() -> bool:
    """Start a new peak (VmHWM) measurement; writing 5 to clear_refs resets it (Linux >= 4.0).

    Returns False where the kernel refuses (some sandboxes): the peak then counts from process start.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def rss_peak() -> int:
    """Peak resident bytes since :func:`rss_reset_peak` (or process start)."""
    return _status_kib("VmHWM") * 1024


def rss_peak_process() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_reset_peak(device) -> None:
    """Start a new peak measurement of ``torch.cuda.max_memory_allocated`` (nothing on a CPU rank)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def device_peak(device) -> Optional[int]:
    """Peak bytes allocated on ``device`` since :func:`device_reset_peak`, or None on the CPU."""
    if device.type != "cuda":
        return None
    import torch

    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def available_bytes(device, ranks_sharing: int) -> int:
    """What one rank may still allocate: the machine's MemAvailable (CPU) or the device's free memory (CUDA),
    split evenly over the ranks that share it."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
    else:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return free // max(1, ranks_sharing)
