"""``ParallelDims``: one rank's place in the TP x PP x DP grid, its groups, its device and its backend.

Built once, when the rank joins the job (:func:`init_distributed`), and passed
to whatever needs a device or a group: model building, engines, growth,
checkpoints. Nothing else decides the device.
"""

from __future__ import annotations

import datetime
import errno
import os
import socket
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mgrow.core.defaults import DEFAULT_SEED
from mgrow.core.errors import ConfigError
from mgrow.parallel import cpu_shims, gloo_cuda
from mgrow.parallel import device as device_choice


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    pp: int
    dp: int
    rank: int
    world: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    backend: str  # "nccl" | "gloo"
    tp_group: object = field(default=None, compare=False, repr=False)
    pp_group: object = field(default=None, compare=False, repr=False)
    dp_group: object = field(default=None, compare=False, repr=False)
    stage_peers: tuple = field(default=(), compare=False, repr=False)  # global rank of each stage, this (tp, dp)

    @classmethod
    def from_parallel_state(cls, device: torch.device, backend: str) -> "ParallelDims":
        """This rank's dims from megatron's ``parallel_state`` (initialised) and the device decision."""
        from megatron.core import parallel_state as ps

        return cls(
            tp=ps.get_tensor_model_parallel_world_size(),
            pp=ps.get_pipeline_model_parallel_world_size(),
            dp=ps.get_data_parallel_world_size(),
            rank=dist.get_rank(),
            world=dist.get_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(),
            device=torch.device(device),
            backend=backend,
            tp_group=ps.get_tensor_model_parallel_group(),
            pp_group=ps.get_pipeline_model_parallel_group(),
            dp_group=ps.get_data_parallel_group(),
            stage_peers=tuple(dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())),
        )

    @classmethod
    def of_running_job(cls, device: torch.device) -> "ParallelDims":
        """The dims of a job that set up torch.distributed and megatron's parallel_state itself."""
        from megatron.core import parallel_state as ps

        if not dist.is_initialized() or not ps.model_parallel_is_initialized():
            raise ConfigError("parallel_state", "torch.distributed and megatron's parallel_state must be initialised "
                                                "before growth (megatron.core.parallel_state.initialize_model_parallel)")
        return cls.from_parallel_state(device, dist.get_backend())

    @property
    def stage(self) -> int:
        return self.pp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def comm_device(self) -> torch.device:
        """Where tensors of mgrow's own control collectives live: the device under NCCL, the CPU under gloo.

        Flags and scalars (the growth agreement, the agreed Adam step, reduced losses) go
        over the job's one process group, so NCCL needs them on the GPU; gloo takes CPU
        tensors natively, so a gloo job (CPU ranks, or ranks sharing one GPU) keeps them there.
        """
        return self.device if self.backend == "nccl" else torch.device("cpu")

    @property
    def stages_p2p_on_cpu(self) -> bool:
        """gloo's send/recv hand the tensor's raw pointer to its TCP transport: CUDA tensors go through the CPU."""
        return self.backend == "gloo" and self.is_cuda

    def describe(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "device": str(self.device), "backend": self.backend}


def init_distributed(tp: int, pp: int, seed: int = DEFAULT_SEED, timeout_s: float = 600, device: str = "auto",
                     backend: str = "auto") -> ParallelDims:
    """Join the job started by torchrun / the deepspeed launcher / mgrow and build megatron's groups.

    The device decision (:mod:`mgrow.parallel.device`) comes first, on every rank; a
    CPU rank gets the CPU shims, ranks sharing a GPU over gloo the p2p staging.
    """
    from megatron.core import parallel_state, tensor_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device_choice.check_world(tp, pp, world)
    choice = device_choice.resolve(device, backend)
    device_choice.prepare_process(choice)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", str(world))
        timeout = datetime.timedelta(seconds=timeout_s)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
            if os.environ["RANK"] == "0":
                _check_port_free(address, port)
            else:
                _check_port_serves_a_store(address, port)
        try:
            if restart > 0:
                dist.init_process_group(choice.backend, store=_restart_store(restart, timeout),
                                        rank=int(os.environ["RANK"]), world_size=world, timeout=timeout)
            else:
                dist.init_process_group(choice.backend, timeout=timeout)
        except dist.DistError as error:  # the store at MASTER_ADDR:MASTER_PORT never answered
            address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            raise ConfigError("MASTER_ADDR", f"no rendezvous with rank 0 at {address} within {timeout_s:g} s "
                                             f"(is rank 0 running, and is {address} reachable from rank "
                                             f"{os.environ['RANK']}?): {type(error).__name__}") from None
    cpu_shims.define_missing_te_gemm()
    if not choice.is_cuda:
        cpu_shims.apply()
    elif choice.backend == "gloo":
        gloo_cuda.apply()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelDims.from_parallel_state(choice.device, choice.backend)


def _check_port_free(address: str, port: int) -> None:
    """Rank 0 is about to serve the rendezvous store on ``port``: say so plainly when another process has it."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError("MASTER_PORT", f"port {port} is in use by another process on this host "
                                                 f"({address}); choose a free MASTER_PORT") from None


def _check_port_serves_a_store(address: str, port: int, probe_seconds: float = 10.0) -> None:
    """A rank other than 0: when something already listens on the rendezvous port it must answer as a
    torch.distributed store (rank 0's); a process that holds the port and never answers is named instead of
    waiting out the rendezvous timeout. Nothing listening yet (rank 0 not up) is left to the rendezvous.

    The probe runs in a daemon thread: torch's TCPStore client blocks past its own timeout on a listener that
    accepts and never answers, and the thread is simply left behind when the rank exits with the error.
    """
    try:
        socket.create_connection((address, port), timeout=probe_seconds).close()
    except OSError:
        return
    answered = threading.Event()

    def probe():
        try:
            store = dist.TCPStore(address, port, is_master=False, timeout=datetime.timedelta(seconds=probe_seconds),
                                  wait_for_workers=False)
            store.check(["mgrow/probe"])
            answered.set()
        except Exception:  # noqa: BLE001 (a listener that does not answer as a store: reported below)
            pass

    threading.Thread(target=probe, daemon=True, name="mgrow-store-probe").start()
    if not answered.wait(probe_seconds):
        raise ConfigError("MASTER_PORT", f"port {port} on {address} is held by a process that does not answer as "
                                         "rank 0's rendezvous store (in use by another process?); choose a free "
                                         "MASTER_PORT")


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


def init_single_process(seed: int = DEFAULT_SEED, device: str = "auto", backend: str = "auto") -> ParallelDims:
    """This process as a world of one rank (TP=1, PP=1) on a free loopback port."""
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    return init_distributed(1, 1, seed, device=device, backend=backend)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
