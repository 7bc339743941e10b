"""The decisions about a rank that need no process group: the job's degrees (``check_world``), and which
device the rank's tensors live on and which backend its collectives use.

``parallel.device``: ``auto`` (CUDA when torch sees a GPU, else CPU) | ``cpu`` | ``cuda``.
``parallel.backend``: ``auto`` (NCCL on CUDA, gloo on CPU) | ``nccl`` | ``gloo``.

A CUDA rank uses ``cuda:LOCAL_RANK``, or the one GPU it sees when the launcher
gives each task its own (``CUDA_VISIBLE_DEVICES`` naming one device). NCCL refuses
two ranks on one GPU, so ranks that share a GPU (a development machine with one
GPU) run gloo over CUDA tensors. ``check`` needs no torch; ``resolve`` asks torch
what the machine has and refuses what it cannot give, naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mgrow.core.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "nccl", "gloo")


def check(device: str, backend: str, where: str = "parallel") -> None:
    """The rules that need no machine: known names, and no NCCL without CUDA."""
    if device not in DEVICES:
        raise ConfigError(f"{where}.device", f"must be one of {' | '.join(DEVICES)}, got {device!r}")
    if backend not in BACKENDS:
        raise ConfigError(f"{where}.backend", f"must be one of {' | '.join(BACKENDS)}, got {backend!r}")
    if device == "cpu" and backend == "nccl":
        raise ConfigError(f"{where}.backend", "nccl needs CUDA tensors; device cpu runs gloo")


@dataclass(frozen=True)
class DeviceChoice:
    device: "object"  # torch.device
    backend: str  # nccl | gloo

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve(device: str = "auto", backend: str = "auto", where: str = "parallel") -> DeviceChoice:
    """This rank's device and backend, from the request and what torch sees (LOCAL_RANK, GPUs visible)."""
    import torch

    check(device, backend, where)
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise ConfigError(f"{where}.device", "cuda asked for, but torch sees no GPU "
                                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    if backend == "nccl" and not available:
        raise ConfigError(f"{where}.backend", "nccl needs a GPU, and torch sees none")
    use_cuda = device == "cuda" or (device == "auto" and available)
    if not use_cuda:
        return DeviceChoice(torch.device("cpu"), "gloo")
    count = torch.cuda.device_count()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if count == 1:
        index = 0  # the launcher gave this task one GPU, or every local rank shares the one there is
    elif local_rank < count:
        index = local_rank
    else:
        raise ConfigError(f"{where}.device", f"LOCAL_RANK {local_rank} has no GPU of its own: torch sees {count}")
    chosen = backend if backend != "auto" else "nccl"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if chosen == "nccl" and local_world > count:
        raise ConfigError(f"{where}.backend", f"nccl needs one GPU per rank: {local_world} ranks on this node, "
                                              f"{count} GPU(s) visible; ranks that share a GPU run "
                                              f"{where}.backend gloo")
    return DeviceChoice(torch.device("cuda", index), chosen)


def prepare_process(choice: DeviceChoice) -> None:
    """Point torch and DeepSpeed at the chosen device before any CUDA work or DeepSpeed accelerator exists."""
    import torch

    if choice.is_cuda:
        torch.cuda.set_device(choice.device)
        # bit-for-bit checks on CUDA need cuBLAS's deterministic workspace; read when cuBLAS starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif torch.cuda.is_available():
        # a CPU rank on a GPU machine: DeepSpeed would otherwise pick its CUDA accelerator
        os.environ["DS_ACCELERATOR"] = "cpu"
        import sys

        if "deepspeed" in sys.modules:
            from deepspeed.accelerator import set_accelerator
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

            set_accelerator(CPU_Accelerator())


def check_world(tp: int, pp: int, world: int) -> int:
    """dp = world / (tp*pp); refuse sizes that do not divide."""
    for name, value in (("parallel.tp", tp), ("parallel.pp", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(name, f"must be a positive integer, got {value!r}")
    if world % (tp * pp):
        raise ConfigError(
            "parallel", f"tp*pp = {tp}*{pp} = {tp * pp} must divide the world size {world}"
        )
    return world // (tp * pp)
