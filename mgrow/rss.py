"""Resident memory of this process (Linux /proc): current, peak since the last reset, whole-life peak."""

from __future__ import annotations

import resource


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def current() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak() -> bool:
    """Start a new peak (VmHWM) measurement; writing 5 to clear_refs resets it (Linux >= 4.0).

    Returns False where the kernel refuses (some sandboxes): the peak then counts from process start.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak() -> int:
    """Peak resident bytes since :func:`reset_peak` (or process start)."""
    return _status_kib("VmHWM") * 1024


def peak_process() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
