"""`mgrow bench growth`: in-memory growth against the checkpoint round trip users run today, and the floor.

One job (tp x pp x dp ranks) trains a model 2 steps so Adam has state, then,
on the same ranks and the same plan:

* ``growth_seconds``: :func:`mgrow.growth.grow` in memory (the slowest rank);
* ``roundtrip_seconds``: save the checkpoint, grow it offline (load it into an
  engine, grow, save the grown checkpoint: what ``mgrow grow-checkpoint`` does),
  load the grown checkpoint into the grown layout; the process relaunch a real
  round trip adds is not counted;
* ``memcpy_floor_seconds``: the bytes growth must touch on the busiest rank
  (read every byte of its old weights and optimizer state, write every byte of
  the new) over the copy bandwidth measured in the same process on the device
  the state lives on (host memcpy on a CPU rank, a synchronized device-to-device
  copy on a CUDA rank); a copy of n bytes reads n and writes n, so
  floor = (before + after) / (2 * bandwidth);
* ``peak_device_bytes``: ``torch.cuda.max_memory_allocated`` during growth (CUDA ranks);
* ``rss_growth_bytes``: per rank, its peak resident memory during growth (VmHWM, reset just before) minus
  its resident memory just before: what ``mgrow plan`` estimates as the growth's transient;
* ``throughput_ratio``: tokens/s of the grown engine over a freshly built
  engine of the same size, timed alternately in the same job (one step each
  in turn), and ``throughput_ratio_median_step`` from their median step times.

* ``collective_calls``, ``sent_bytes``, ``received_bytes``: what each rank
  moved through torch.distributed during the in-memory growth
  (:class:`mgrow.parallel.traffic.Traffic`; ``calls_by_op`` for rank 0), and ``moved_by_rank``: what
  each rank's mover sent and received by op (its chunk loops alone, the bytes ``mgrow plan`` predicts).

``--no-roundtrip`` and ``--throughput-steps 0`` leave out those two parts (a
model of billions of parameters on one GPU). Rank 0 prints one JSON line;
``--profile FILE`` writes its cProfile of the in-memory growth.

``--scaling STUDY``: the same measurement (growth, floor, bytes; no round trip,
no throughput) for every model and plan of the study file at every TP size it
lists (DP 1), one job each; a table, and with ``--plot`` growth and floor
seconds against the state bytes growth touches.
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from mgrow.checkpoint.files import read_metadata
from mgrow.checkpoint.state import Progress, save
from mgrow.core import memory
from mgrow.core.errors import ConfigError
from mgrow.core.files_in import read_yaml
from mgrow.core.model_config import ModelConfig
from mgrow.core.plan import Plan, load_plan
from mgrow.engine.engines import build_engine, global_mean_loss
from mgrow.engine.model import build_gpt
from mgrow.jobs.launch import RankJob, check_job_flags, execute, under_launcher
from mgrow.parallel import collectives
from mgrow.parallel.dims import init_distributed, shutdown
from mgrow.parallel.traffic import Traffic
from mgrow.testing.harness import RandomBatches, check_config
from mgrow.train.restore import restored_engine
from mgrow.transforms.grow import grow

MEMCPY_BYTES = 256 * 2**20


def memcpy_bytes_per_second(device: torch.device, repeats: int = 5, nbytes: int = MEMCPY_BYTES) -> float:
    """Bytes copied per second by ``Tensor.copy_`` of a buffer on ``device`` (best of ``repeats``; on CUDA a
    device-to-device copy, synchronized before and after)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    cuda = device.type == "cuda"
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy warms the allocator and the kernel
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def state_bytes(engine) -> int:
    """This rank's bytes of model parameters, separate fp32 masters and Adam state."""
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    total = sum(p.numel() * p.element_size() for p in params)
    in_model = {p.untyped_storage().data_ptr() for p in params}
    for master, state in engine.optimizer_state().inner.state.items():
        if master.untyped_storage().data_ptr() not in in_model:  # ZeRO partitions, bf16 masters
            total += master.numel() * master.element_size()
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total


def run(bench: "GrowthBench") -> int:
    """The bench on this rank; rank 0 prints the JSON line."""
    model, plan, optimizer, seed = bench.model, bench.plan, bench.optimizer, bench.seed
    dims = init_distributed(bench.tp, bench.pp, seed, device=bench.device, backend=bench.backend)
    cfg = check_config(model, dims, optimizer, min(64, model.max_sequence_length))
    cfg.check_world(dims.world)
    batches = RandomBatches(cfg, seed, dims)
    engine = build_engine(build_gpt(model, dims, seed=seed), cfg, dims)
    for step in range(2):
        engine.train_step(batches(step))
    bandwidth = memcpy_bytes_per_second(dims.device, nbytes=2**30 if dims.is_cuda else MEMCPY_BYTES)
    before = state_bytes(engine)

    dist.barrier()
    memory.rss_reset_peak()
    rss_before = memory.rss_current()
    profiler = cProfile.Profile() if bench.profile and dims.rank == 0 else None
    if profiler:
        profiler.enable()
    with Traffic() as traffic:
        grown, grown_cfg, report = grow(engine, cfg, plan, keep_old=True)
    if profiler:
        profiler.disable()
        with open(bench.profile, "w") as out:
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(40)
    growth_seconds = _max(report.growth_seconds)
    after = state_bytes(grown)
    peaks = _gather(memory.rss_peak_process())
    rss_growth = _gather(memory.rss_peak() - rss_before)

    roundtrip_seconds, parts = None, None
    if bench.roundtrip:
        roundtrip_seconds, parts = _roundtrip(engine, cfg, plan, dims)
    engine.destroy()
    del engine
    grown_tps = fresh_tps = median_ratio = None
    if bench.throughput_steps:
        fresh = build_engine(build_gpt(grown_cfg.model, dims, seed=seed + 1), grown_cfg, dims)
        grown_tps, fresh_tps, median_ratio = _alternate_throughput(grown, fresh, RandomBatches(grown_cfg, seed, dims),
                                                                   bench.throughput_steps)

    floor = (_max(before) + _max(after)) / (2 * _min(bandwidth))
    result = {
        "layout": {**dims.describe(), "optimizer": optimizer, "bf16": model.bf16},
        "plan": report.plan,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "growth_seconds": growth_seconds,
        "roundtrip_seconds": roundtrip_seconds,
        "roundtrip_parts_seconds": parts,
        "memcpy_floor_seconds": floor,
        "memcpy_bytes_per_second": _min(bandwidth),
        "state_bytes_before": _gather(before),
        "state_bytes_after": _gather(after),
        "peak_rss_bytes": peaks,
        "rss_growth_bytes": rss_growth,
        "peak_device_bytes": report.peak_device_bytes,
        "roundtrip_over_growth": None if roundtrip_seconds is None else roundtrip_seconds / growth_seconds,
        "growth_over_floor": growth_seconds / floor,
        "grown_tokens_per_second": grown_tps,
        "fresh_tokens_per_second": fresh_tps,
        "throughput_ratio": None if grown_tps is None else grown_tps / fresh_tps,
        "throughput_ratio_median_step": median_ratio,
        "throughput_steps": bench.throughput_steps,
        "collective_calls": _gather(traffic.total_calls),
        "sent_bytes": _gather(traffic.sent),
        "received_bytes": _gather(traffic.received),
        "calls_by_op": traffic.report()["calls"],
        "calls_by_rank": _gather(traffic.report()["calls"]),
        "p2p_bytes_by_rank": _gather({"sent": traffic.sent_by_op["send"], "received": traffic.received_by_op["recv"]}),
        "planned_by_rank": _gather(report.planned_traffic),
        "moved_by_rank": _gather(report.moved_traffic),
    }
    if dims.rank == 0:
        print(json.dumps(result), flush=True)
        if bench.result_path:
            with open(bench.result_path, "w") as out:
                json.dump(result, out)
    return 0


def _roundtrip(engine, cfg, plan, dims) -> tuple[float, dict]:
    """Save, grow offline (load, grow, save) and load the grown checkpoint: seconds in all and by part."""
    with tempfile.TemporaryDirectory(prefix="mgrow-bench-") as scratch:
        scratch = collectives.broadcast_object(scratch)
        dist.barrier()
        parts = {}
        start = time.perf_counter()
        folder = save(engine, cfg, Progress(step=2), f"{scratch}/before")
        parts["save"] = time.perf_counter() - start
        offline, offline_cfg, progress = restored_engine(folder, read_metadata(folder), dims)
        offline, offline_grown_cfg, _ = grow(offline, offline_cfg, plan)
        grown_folder = save(offline, offline_grown_cfg, progress, f"{scratch}/after")
        offline.destroy()
        parts["grow_offline"] = time.perf_counter() - start - parts["save"]
        loaded, _, _ = restored_engine(grown_folder, read_metadata(grown_folder), dims)
        dist.barrier()
        seconds = time.perf_counter() - start
        parts["load"] = seconds - parts["save"] - parts["grow_offline"]
        loaded.destroy()
        dist.barrier()
    return seconds, parts


def _alternate_throughput(grown, fresh, batches, steps: int) -> tuple[float, float, float]:
    """Training tokens/s of two engines of one size, one step each in turn (the machine's noise hits both),
    and the ratio of their median step times (grown over fresh tokens/s), which one slow step cannot move."""
    seconds: dict[str, list[float]] = {"grown": [], "fresh": []}
    for step in range(steps + 1):
        batch = batches(step)
        for name, engine in (("grown", grown), ("fresh", fresh)):
            dist.barrier()
            start = time.perf_counter()
            global_mean_loss(engine.train_step(batch), engine.dims)  # ends when the step has on every rank
            if step > 0:  # the first step of each warms allocators
                seconds[name].append(time.perf_counter() - start)
    slowest = {name: [max(per_rank) for per_rank in zip(*_gather(times))] for name, times in seconds.items()}
    tokens = steps * batches.gbs * batches.seq
    median_ratio = statistics.median(slowest["fresh"]) / statistics.median(slowest["grown"])
    return tokens / sum(slowest["grown"]), tokens / sum(slowest["fresh"]), median_ratio


def _gather(value: float) -> list:
    return collectives.gather_objects(value)


def _max(value: float) -> float:
    return max(_gather(value))


def _min(value: float) -> float:
    return min(_gather(value))


@dataclass(frozen=True)
class GrowthBench:
    model: ModelConfig
    plan: Plan
    tp: int
    pp: int
    optimizer: str
    seed: int
    throughput_steps: int
    profile: Optional[str]
    roundtrip: bool
    device: str
    backend: str
    result_path: Optional[str] = None  # rank 0 also writes the JSON line here


def main(args) -> int:
    """``mgrow bench growth``: validate, then run the job on its ranks (or the scaling study's jobs)."""
    if args.scaling:
        if args.model or args.plan:
            raise ConfigError("--scaling", "the study file names the models and plans; leave out --model/--plan")
        if under_launcher():
            raise ConfigError("--scaling", "starts local ranks for each point (TP sizes differ): run it without a "
                                           "launcher")
        return scaling(args)
    for flag in ("model", "plan"):
        if not getattr(args, flag):
            raise ConfigError(f"--{flag}", "required (or --scaling STUDY)")
    model = ModelConfig.load(args.model)
    if args.bf16:
        model = model.replace(bf16=True)
    plan = load_plan(args.plan)
    check_job_flags(args.tp, args.pp, args.dp, args.optimizer)
    if args.throughput_steps < 0:
        raise ConfigError("--throughput-steps", f"must be >= 0 (0: no throughput comparison), got {args.throughput_steps}")
    for what, cfg in (("--model", model), (f"--plan {args.plan}", plan.validate(model)[-1])):
        try:
            cfg.check_layout(args.tp, args.pp)
        except ConfigError as error:
            raise ConfigError(what, f"the model does not fit tp={args.tp}, pp={args.pp}: {error}") from None
    bench = GrowthBench(model, plan, args.tp, args.pp, args.optimizer, args.seed, args.throughput_steps, args.profile,
                        args.roundtrip, args.device, args.backend)
    return execute(RankJob(args.tp * args.pp * args.dp, run_rank, bench))


def scaling(args) -> int:
    """``--scaling STUDY``: growth, floor and bytes for each (model, plan) of the study at each TP size."""

    study = read_yaml(args.scaling, "--scaling", "scaling study")
    points = []
    for index, entry in enumerate(study.get("points", [])):
        where = f"--scaling {args.scaling}: points[{index}]"
        model, plan = ModelConfig.load(entry["model"], f"{where}.model"), load_plan(entry["plan"])
        grown = plan.validate(model)[-1]
        for tp in study.get("tp", [1]):
            for what, cfg in ((f"{where}.model", model), (f"{where}.plan", grown)):
                try:
                    cfg.check_layout(tp, 1)
                except ConfigError as error:
                    raise ConfigError(what, f"does not fit tp={tp}: {error}") from None
            points.append((entry, model, plan, tp))
    if not points:
        raise ConfigError(f"--scaling {args.scaling}", "lists no points (points: [{model, plan}], tp: [...])")
    results = []
    with tempfile.TemporaryDirectory(prefix="mgrow-scaling-") as scratch:
        for index, (entry, model, plan, tp) in enumerate(points):
            path = os.path.join(scratch, f"{index}.json")
            bench = GrowthBench(model, plan, tp, 1, args.optimizer, args.seed, 0, None, False, args.device,
                                args.backend, path)
            code = execute(RankJob(tp, run_rank, bench))
            if code:
                return code
            with open(path) as f:
                result = json.load(f)
            results.append({"model": entry["model"], "tp": tp, **result})
    print("| model | TP | params before -> after | state MB (max rank) before -> after | growth s | floor s | "
          "growth / floor | collectives per rank | MB sent / received (max rank) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mb = 2**20
        print(f"| {os.path.basename(r['model'])} | {r['tp']} | {r['params_before'] / 1e6:.1f}M -> "
              f"{r['params_after'] / 1e6:.1f}M | {max(r['state_bytes_before']) / mb:.0f} -> "
              f"{max(r['state_bytes_after']) / mb:.0f} | {r['growth_seconds']:.2f} | {r['memcpy_floor_seconds']:.3f} | "
              f"{r['growth_over_floor']:.0f}x | {max(r['collective_calls'])} | {max(r['sent_bytes']) / mb:.3g} / "
              f"{max(r['received_bytes']) / mb:.3g} |", flush=True)
    if args.plot:
        _plot_scaling(results, args.plot)
    return 0


def _plot_scaling(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for tp in sorted({r["tp"] for r in results}):
        rows = sorted((r for r in results if r["tp"] == tp), key=lambda r: max(r["state_bytes_before"]))
        touched = [(max(r["state_bytes_before"]) + max(r["state_bytes_after"])) / 2**20 for r in rows]
        ax.plot(touched, [r["growth_seconds"] for r in rows], "o-", label=f"growth, TP {tp}")
        ax.plot(touched, [r["memcpy_floor_seconds"] for r in rows], "x:", label=f"memcpy floor, TP {tp}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("state bytes growth touches on the busiest rank (MB, before + after)")
    ax.set_ylabel("seconds")
    ax.set_title("mgrow bench growth --scaling (2-core CPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_rank(bench: GrowthBench) -> int:
    try:
        return run(bench)
    finally:
        shutdown()
