"""Process-group start-up: torch.distributed plus megatron's parallel_state."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mgrow import cpu_shims
from mgrow.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """Where this rank sits in the TP x PP x DP grid."""

    tp: int
    pp: int
    dp: int
    rank: int
    world: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


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


def init_distributed(tp: int, pp: int, seed: int = 1234, timeout_s: float = 600) -> Layout:
    """Join the job started by torchrun/deepspeed/mgrow and build megatron's groups.

    gloo without CUDA (every CPU shim applied), NCCL with it.
    """
    from megatron.core import parallel_state, tensor_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_world(tp, pp, world)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", str(world))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=timeout_s)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        try:
            if restart > 0:
                dist.init_process_group(backend, store=_restart_store(restart, timeout),
                                        rank=int(os.environ["RANK"]), world_size=world, timeout=timeout)
            else:
                dist.init_process_group(backend, timeout=timeout)
        except dist.DistError as error:  # the store at MASTER_ADDR:MASTER_PORT never answered
            address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            raise ConfigError("MASTER_ADDR", f"no rendezvous with rank 0 at {address} within {timeout_s:g} s "
                                             f"(is rank 0 running, and is {address} reachable from rank "
                                             f"{os.environ['RANK']}?): {type(error).__name__}") from None
    cpu_shims.apply()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_layout()


def _restart_store(restart: int, timeout: datetime.timedelta):
    """The rendezvous store of a worker that torchrun restarted, under a prefix of its own attempt.

    torchrun's agent keeps its store across restarts, and it still holds the
    addresses the dead attempt's ranks published for the default process group:
    without a fresh prefix a restarted rank connects to a dead peer's port
    (gloo "connectFullMesh failed ... Connection refused").
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=not agent_store and os.environ["RANK"] == "0", timeout=timeout)
    return dist.PrefixStore(f"mgrow/attempt_{restart}", store)


def init_single_process(seed: int = 1234) -> Layout:
    """This process as a world of one rank (TP=1, PP=1) on a free loopback port."""
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    return init_distributed(1, 1, seed)


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
