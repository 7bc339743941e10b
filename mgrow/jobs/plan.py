"""`mgrow plan`: a growth's dry run at any scale: will it fit, what will it move, how long will it take.

Nothing is allocated: the plan is bound to the model description, the table of
moves is built for every (stage, TP rank) from the layout alone, and the
memory and traffic come from :mod:`mgrow.transforms.estimate`. Per global rank
(Megatron's order: TP fastest, then DP, then PP) the mover's bytes are split by
link: a stage-to-stage send or receive goes to the peer of the same (DP, TP)
rank on the other stage; an all-reduce over DP is a ring whose every rank
sends to the next DP rank of its group and receives from the previous one; a
TP all-gather is a ring over the TP group. A link is intra-node when both ends
are on one node of ``--gpus-per-node`` consecutive ranks.

Projected time of a rank = its busier direction's intra-node bytes / intra
bandwidth + inter-node bytes / inter bandwidth (the stated ``--bandwidth``,
not measured) + its local work: the bytes it reads (old weights and optimizer
state) and writes (the new) times the seconds per byte of an index copy
(``torch.index_select``, what shard growth does) measured on this machine's
CPU when the command runs, or ``--local-bytes-per-second``.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time

from mgrow.core.errors import ConfigError
from mgrow.core.model_config import ModelConfig
from mgrow.core.plan import load_plan
from mgrow.ops.plan import steps as bind_steps
from mgrow.transforms import estimate, moves

OPTIMIZERS = ("adam", "megatron", "zero1", "zero2", "zero3")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str, field: str) -> float:
    """``80GiB``, ``25GB``, ``1.5e9`` -> bytes (``/s`` allowed after a bandwidth)."""
    found = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]i?)?b?(?:/s)?\s*", text.lower())
    if not found:
        raise ConfigError(field, f"expected a size such as 80GiB or 25GB/s, got {text!r}")
    return float(found.group(1)) * _UNITS[found.group(2) or ""]


def parse_bandwidth(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("intra", "inter") or not value:
            raise ConfigError("--bandwidth", f"expected intra=...,inter=..., got {text!r}")
        out[key.strip()] = parse_bytes(value, "--bandwidth")
    if set(out) != {"intra", "inter"}:
        raise ConfigError("--bandwidth", f"needs both intra= and inter=, got {text!r}")
    return out


def local_bytes_per_second(nbytes: int = 1 << 26) -> float:
    """Bytes written per second by an index copy of an fp32 tensor on this machine's CPU (best of three)."""
    import torch

    source = torch.randn(nbytes // 4, device="cpu")
    index = torch.randperm(source.numel(), device="cpu")
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.index_select(source, 0, index)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def _link_bytes(layout: estimate.JobLayout, by_op: dict, stage: int, dp_rank: int, tp_rank: int) -> dict[str, int]:
    """This rank's mover bytes sent and received over intra- and inter-node links."""
    me = layout.rank(stage, dp_rank, tp_rank)
    out = dict.fromkeys(("intra_sent", "intra_received", "inter_sent", "inter_received"), 0)

    def add(peer: int, sent: int, received: int) -> None:
        side = "intra" if layout.node(peer) == layout.node(me) else "inter"
        out[f"{side}_sent"] += sent
        out[f"{side}_received"] += received

    add(layout.rank(stage, (dp_rank + 1) % layout.dp, tp_rank), by_op["all_reduce"], 0)
    add(layout.rank(stage, (dp_rank - 1) % layout.dp, tp_rank), 0, by_op["all_reduce"])
    add(layout.rank(stage, dp_rank, (tp_rank + 1) % layout.tp), by_op["all_gather"], 0)
    add(layout.rank(stage, dp_rank, (tp_rank - 1) % layout.tp), 0, by_op["all_gather"])
    for peer_stage, nbytes in by_op["send_to_stage"].items():
        add(layout.rank(peer_stage, dp_rank, tp_rank), nbytes, 0)
    for peer_stage, nbytes in by_op["recv_from_stage"].items():
        add(layout.rank(peer_stage, dp_rank, tp_rank), 0, nbytes)
    return out


def run(args) -> dict:
    if args.optimizer not in OPTIMIZERS:
        raise ConfigError("--optimizer", f"must be one of {' | '.join(OPTIMIZERS)}, got {args.optimizer!r}")
    for flag in ("tp", "pp", "dp", "gpus_per_node"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}", f"must be >= 1, got {getattr(args, flag)}")
    device_memory = parse_bytes(args.device_memory, "--device-memory")
    bandwidth = parse_bandwidth(args.bandwidth)
    local_rate = (parse_bytes(args.local_bytes_per_second, "--local-bytes-per-second")
                  if args.local_bytes_per_second else None)
    old = ModelConfig.load(args.model)
    if args.bf16:
        old = old.replace(bf16=True)
    layout = estimate.JobLayout(args.tp, args.pp, args.dp, args.optimizer, args.gpus_per_node)
    old.check_layout(args.tp, args.pp)
    steps = bind_steps(load_plan(args.plan), old)
    new = steps[-1].grown
    try:
        new.check_layout(args.tp, args.pp)
    except ConfigError as error:
        raise ConfigError("--plan", f"the grown model does not fit tp={args.tp}, pp={args.pp}: {error}") from None
    local_rate = local_rate or local_bytes_per_second()

    start = time.perf_counter()
    tables = moves.build_all(steps, old, args.tp, args.pp)
    chunk_sizes = {key: estimate.largest_chunk(table, key[0]) for key, table in tables.items()}
    ranks = estimate.memory(old, new, layout, chunk_sizes)
    moved = {key: estimate.traffic(table, layout, old.bf16, moments=not args.no_moments)
             for key, table in tables.items()}

    per_rank = []
    for stage in range(args.pp):
        for dp_rank in range(args.dp):
            for tp_rank in range(args.tp):
                key = (stage, tp_rank)
                links = _link_bytes(layout, moved[key], stage, dp_rank, tp_rank)
                local = ranks[key].before_bytes + ranks[key].after_bytes - ranks[key].after["grads"]
                seconds = {"intra": max(links["intra_sent"], links["intra_received"]) / bandwidth["intra"],
                           "inter": max(links["inter_sent"], links["inter_received"]) / bandwidth["inter"],
                           "local": local / local_rate}
                per_rank.append({"rank": layout.rank(stage, dp_rank, tp_rank), "stage": stage, "dp_rank": dp_rank,
                                 "tp_rank": tp_rank, "transient_bytes": ranks[key].transient_bytes,
                                 "peak_bytes": ranks[key].peak_bytes, **links, "local_bytes": local,
                                 "seconds": sum(seconds.values()), "seconds_by_part": seconds})
    states = list(ranks.values())

    def stat(values):
        return {"max": max(values), "median": statistics.median(values)}

    def kinds(which):
        return {kind: stat([getattr(r, which)[kind] for r in states]) for kind in getattr(states[0], which)}

    result = {
        "model": {"before": args.model, "params_before": old.num_parameters(), "params_after": new.num_parameters()},
        "plan": args.plan,
        "layout": {"tp": args.tp, "pp": args.pp, "dp": args.dp, "world": layout.world, "optimizer": args.optimizer,
                   "bf16": old.bf16, "gpus_per_node": args.gpus_per_node},
        "stages_before": list(old.stage_split(args.pp).layers), "stages_after": list(new.stage_split(args.pp).layers),
        "state_bytes_before": {**kinds("before"), "total": stat([r.before_bytes for r in states])},
        "state_bytes_after": {**kinds("after"), "total": stat([r.after_bytes for r in states])},
        "transient_bytes": {**{f"{phase}_phase": stat([r.phases[phase] for r in states]) for phase in states[0].phases},
                            "total": stat([r.transient_bytes for r in states])},
        "peak_bytes": stat([r.peak_bytes for r in states]),
        "device_memory_bytes": device_memory,
        "fits_after": max(r.after_bytes for r in states) <= device_memory,
        "fits_during_growth": max(r.peak_bytes for r in states) <= device_memory,
        "ranks_over_memory": sorted({p["rank"] for p in per_rank
                                     if ranks[(p["stage"], p["tp_rank"])].peak_bytes > device_memory})[:16],
        "moved_bytes": {side: stat([p[side] for p in per_rank]) for side in
                        ("intra_sent", "intra_received", "inter_sent", "inter_received")},
        "moved_bytes_by_op": {f"{stage},{rank}": {op: moved[(stage, rank)][op] for op in estimate.TRAFFIC_OPS}
                              for stage, rank in sorted(moved)},
        "gathered_parameters": len(tables[(0, 0)].gathered()),
        "bandwidth_bytes_per_second": bandwidth,
        "local_bytes_per_second": local_rate,
        "local_rate_source": ("--local-bytes-per-second" if args.local_bytes_per_second
                              else "measured: torch.index_select of 64 MiB fp32 on this machine's CPU"),
        "projected_seconds": stat([p["seconds"] for p in per_rank]),
        "projected_seconds_by_part": {part: stat([p["seconds_by_part"][part] for p in per_rank])
                                      for part in ("intra", "inter", "local")},
        "ranks": per_rank if args.ranks else None,
        "dry_run_seconds": time.perf_counter() - start,
    }
    return result


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def table(result: dict) -> str:
    """The short table: max and median over ranks."""
    rows = [("state before", "state_bytes_before", "total", _size),
            ("  weights", "state_bytes_before", "weights", _size), ("  grads", "state_bytes_before", "grads", _size),
            ("  fp32 masters", "state_bytes_before", "masters", _size),
            ("  Adam moments", "state_bytes_before", "moments", _size),
            ("state after", "state_bytes_after", "total", _size),
            ("growth transient (largest phase)", "transient_bytes", "total", _size),
            ("  weights phase", "transient_bytes", "weights_phase", _size),
            ("  rebuild phase", "transient_bytes", "rebuild_phase", _size),
            ("  moments phase", "transient_bytes", "moments_phase", _size),
            ("peak during growth", "peak_bytes", None, _size)]
    lines = ["| per rank | max | median |", "|---|---|---|"]
    for label, section, kind, fmt in rows:
        values = result[section] if kind is None else result[section][kind]
        lines.append(f"| {label} | {fmt(values['max'])} | {fmt(values['median'])} |")
    for side in ("intra_sent", "intra_received", "inter_sent", "inter_received"):
        values = result["moved_bytes"][side]
        lines.append(f"| moved {side.replace('_', ' ')} | {_size(values['max'])} | {_size(values['median'])} |")
    for part, label in (("intra", "intra-node links"), ("inter", "inter-node links"), ("local", "local work")):
        values = result["projected_seconds_by_part"][part]
        lines.append(f"| projected s: {label} | {values['max']:.2f} | {values['median']:.2f} |")
    seconds = result["projected_seconds"]
    lines.append(f"| projected growth seconds | {seconds['max']:.2f} | {seconds['median']:.2f} |")
    memory = _size(result["device_memory_bytes"])
    lines.append(f"\nfits in {memory}: after growth {'yes' if result['fits_after'] else 'NO'}, "
                 f"during growth {'yes' if result['fits_during_growth'] else 'NO'}")
    return "\n".join(lines)


def main(args) -> int:
    result = run(args)
    print(table(result), file=sys.stderr)
    print(json.dumps(result))
    return 0
