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


def training_state_bytes(model, tp: int, pp: int, dp: int, sharded_optimizer: bool) -> int:
    """About the bytes one rank holds for ``model`` (a ModelConfig): its share of the weights, the gradients
    and Adam's fp32 state (two moments, and an fp32 master in bf16), the optimizer state split over ``dp``
    when the optimizer shards it (DistributedOptimizer, ZeRO). Activations are not counted."""
    per_rank = model.num_parameters() / (tp * pp)
    weights = 2 if model.bf16 else 4
    adam = 8 + (4 if model.bf16 else 0)
    return int(per_rank * (weights + 4 + adam / (dp if sharded_optimizer else 1)))


def growth_peak_bytes(old, new, tp: int, pp: int, dp: int, sharded_optimizer: bool) -> int:
    """About a rank's peak while growing ``old`` into ``new``: both models' training state at once, and the
    largest grown tensor held whole three times (old, grown, and a moment) in fp32."""
    from mgrow.core.parameters import parameter_shapes

    largest = max(_numel(shape) for shape in parameter_shapes(new).values())
    both = training_state_bytes(old, tp, pp, dp, sharded_optimizer) + training_state_bytes(new, tp, pp, dp,
                                                                                         sharded_optimizer)
    return both + 3 * 4 * largest


def _numel(shape) -> int:
    out = 1
    for size in shape:
        out *= size
    return out
