"""The GPU check: mgrow's CUDA paths, run on a machine with one or more GPUs in about 8 minutes.

    launch/gpu_check.sh [--out DIR] [--work DIR] [--deadline SECONDS] [--jobs N] [--dry-run] [--device cpu]

* probe: which collectives gloo takes on CUDA tensors (two ranks on one GPU, one pair
  of processes per collective, so a crash stays a finding), result checked by value;
* a: world size 1 on NCCL: ``mgrow train`` with a growth event and a checkpoint, its
  resume, and ``mgrow verify`` on adam, megatron, zero1, zero2 and zero3, fp32 and bf16;
* b: 2 and 4 ranks sharing one GPU on gloo over CUDA tensors: ``mgrow verify`` at
  TP1 x PP2 (adam), TP2 x PP2 (megatron) and TP2 x DP2 (zero2);
* c: ``mgrow bench growth`` on a 1.44B-parameter model grown to 2.67B on one GPU:
  growth seconds against the device-to-device copy floor, peak device memory.

Writes DIR/gpu_check.json (the machine, and per check its command, exit code,
seconds and the JSON lines it printed) and DIR/gpu_check.log (the end of each
check's output; the training run's checkpoint and metrics go to --work, default
DIR), prints the summary, and exits 1 when a check of a, b or c
failed (probe results are findings about gloo, not checks of mgrow).
``--dry-run`` runs nothing: it builds every command and validates it with
mgrow's own parser, model, plan and config rules (tests/test_gpu_check.py).
``--device cpu`` rehearses the same checks on CPU ranks with small models.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
MODEL = "configs/models/tiny_gqa_swiglu.yaml"
PLANS = ("configs/plans/tiny_gqa_all_ops.yaml", "configs/plans/tiny_gqa_widen.yaml")
TRAIN_CONFIG = "configs/tiny_growth_tp2_dp2.yaml"
BENCH = {"cuda": ("configs/bench/gpu_1b.yaml", "configs/bench/gpu_1b_to_2b.yaml"),
         "cpu": (MODEL, PLANS[0])}
OPTIMIZERS = ("adam", "megatron", "zero1", "zero2", "zero3")
SHARED_GPU = (("adam", 1, 2, 1), ("megatron", 2, 2, 1), ("zero2", 2, 1, 2))  # optimizer, tp, pp, dp
PROBE_OPS = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce",
             "send_recv", "isend_irecv", "batch_isend_irecv", "coalesced_all_reduce", "coalesced_all_gather_into_tensor",
             "coalesced_reduce_scatter_tensor", "all_gather_object", "barrier")
LOGIT_TOL = 1e-5


@dataclass
class Check:
    name: str
    group: str  # probe | a | b | c
    argv: list  # the whole command
    timeout: float
    judge: Optional[Callable] = None  # (record) -> reason it failed, or None
    env: dict = field(default_factory=dict)
    mgrow_args: Optional[list] = None  # the mgrow CLI arguments, for the dry run


def mgrow(*args) -> list:
    return [sys.executable, "-m", "mgrow.cli", *map(str, args)]


def build_checks(out: Path, device: str) -> list[Check]:
    cuda = device == "cuda"
    nccl = "nccl" if cuda else "gloo"
    checks = [Check(f"probe/{op}", "probe", [sys.executable, __file__, "--probe-worker", op, "--device", device], 60)
              for op in PROBE_OPS]

    ckpt, metrics = out / "ckpt", out / "train_metrics.jsonl"
    common = ["parallel.tp=1", f"parallel.device={device}", f"parallel.backend={nccl}", "train.progress=false",
              f"train.metrics_path={metrics}", f"checkpoint.save={ckpt}", "checkpoint.interval=50",
              "train.eval_interval=0"]
    train = ["train", "--config", TRAIN_CONFIG, "--nproc", 1, *common, "train.steps=50"]
    resume = ["train", "--config", TRAIN_CONFIG, "--nproc", 1, *common, "train.steps=60", f"checkpoint.load={ckpt}"]
    checks.append(Check("a/train_growth", "a", mgrow(*train), 240, _judge_train(metrics), mgrow_args=train))
    checks.append(Check("a/train_resume", "a", mgrow(*resume), 240, _judge_resume, mgrow_args=resume))
    for optimizer in OPTIMIZERS:
        for bf16 in (False, True):
            args = ["verify", "--model", MODEL, *[a for p in PLANS for a in ("--plan", p)], "--optimizer", optimizer,
                    "--device", device, "--backend", nccl, *(["--bf16"] if bf16 else [])]
            checks.append(Check(f"a/verify_{optimizer}_{'bf16' if bf16 else 'fp32'}", "a", mgrow(*args), 240,
                                _judge_verify(len(PLANS)), mgrow_args=args))
    for optimizer, tp, pp, dp in SHARED_GPU:
        args = ["verify", "--model", MODEL, *[a for p in PLANS for a in ("--plan", p)], "--optimizer", optimizer,
                "--tp", tp, "--pp", pp, "--dp", dp, "--device", device, "--backend", "gloo"]
        checks.append(Check(f"b/verify_tp{tp}_pp{pp}_dp{dp}_{optimizer}", "b", mgrow(*args), 300,
                            _judge_verify(len(PLANS)), mgrow_args=args))
    model, plan = BENCH[device]
    bench = ["bench", "growth", "--model", model, "--plan", plan, "--optimizer", "megatron", "--bf16", "--no-roundtrip",
             "--throughput-steps", 0, "--device", device, "--backend", nccl]
    checks.append(Check("c/bench_growth", "c", mgrow(*bench), 420, _judge_bench, mgrow_args=bench))
    return checks


# ----------------------------------------------------------------------------- judging a check's output


def _json_lines(text: str) -> list:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return lines


def _judge_verify(plans: int):
    def judge(record) -> Optional[str]:
        if len(record["json"]) != plans:
            return f"expected {plans} JSON lines, got {len(record['json'])}"
        bad = [line["plan"]["ops"] for line in record["json"] if not line.get("ok")]
        return f"not ok: {bad}" if bad else None
    return judge


def _judge_train(metrics: Path):
    def judge(record) -> Optional[str]:
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        growth = [r for r in records if r.get("event") == "growth"]
        record["growth"] = growth
        record["final_loss"] = next((r["loss"] for r in reversed(records) if "loss" in r), None)
        if len(growth) != 1:
            return f"expected one growth event in {metrics}, got {len(growth)}"
        if not growth[0]["max_abs_logit_diff"] <= LOGIT_TOL:
            return f"growth moved the logits by {growth[0]['max_abs_logit_diff']}"
        return None
    return judge


def _judge_resume(record) -> Optional[str]:
    return None if "resumed from" in record["output"] else "no 'resumed from' line"


def _judge_bench(record) -> Optional[str]:
    if len(record["json"]) != 1:
        return f"expected one JSON line, got {len(record['json'])}"
    line = record["json"][0]
    return None if line["growth_seconds"] > 0 and line["memcpy_floor_seconds"] > 0 else "no timing"


# ----------------------------------------------------------------------------- running


def run_check(check: Check, deadline: float, log) -> dict:
    record = {"name": check.name, "group": check.group, "command": " ".join(map(str, check.argv))}
    remaining = deadline - time.monotonic()
    if remaining < 20:
        record.update(ok=False, status="skipped: out of time", seconds=0.0)
        return record
    timeout = min(check.timeout, remaining - 5)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **check.env}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    start = time.monotonic()
    proc = subprocess.Popen(check.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        status = "exit 0" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = f"timeout after {timeout:.0f} s"
    record.update(seconds=round(time.monotonic() - start, 1), returncode=proc.returncode, status=status,
                  json=_json_lines(output), output=output)
    reason = None if proc.returncode == 0 else status
    if reason is None and check.judge is not None:
        try:
            reason = check.judge(record)
        except Exception as error:  # noqa: BLE001 (a judge's failure is the check's)
            reason = f"could not judge: {type(error).__name__}: {error}"
    record["ok"], record["why"] = reason is None, reason
    log(f"[{record['seconds']:6.1f} s] {'ok  ' if record['ok'] else 'FAIL'} {check.name}"
        + ("" if reason is None else f": {reason}"))
    return record


def run_probe(check: Check, deadline: float) -> dict:
    """Two ranks of one collective; the result of each rank is its JSON line."""
    port = _free_port()
    start = time.monotonic()
    timeout = max(5.0, min(check.timeout, deadline - time.monotonic() - 5))
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(check.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    outputs, codes = [], []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))[0])
            codes.append(proc.returncode)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            outputs.append(proc.communicate()[0])
            codes.append("timeout")
    results = [line for out in outputs for line in _json_lines(out)]
    op = check.name.split("/", 1)[1]
    if all(code == 0 for code in codes) and len(results) == 2 and all(r["ok"] for r in results):
        status = "ok"
    elif any(code == "timeout" for code in codes):
        status = "hangs (killed after the timeout)"
    elif results and any(not r["ok"] for r in results):
        status = "; ".join(sorted({r["detail"] for r in results if not r["ok"]}))
    else:
        status = f"crashed (exit codes {codes}): " + _tail(" | ".join(outputs), 300)
    return {"name": check.name, "group": "probe", "op": op, "ok": status == "ok", "status": status,
            "seconds": round(time.monotonic() - start, 1)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, chars: int) -> str:
    return text[-chars:].replace("\n", " ")


def machine(device: str) -> dict:
    info = {"host": platform.node(), "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpus"] = torch.cuda.device_count()
            info["gpu"] = props.name
            info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        import megatron.core
        import deepspeed

        info["megatron_core"] = megatron.core.__version__
        info["deepspeed"] = deepspeed.__version__
    except Exception as error:  # noqa: BLE001 (reported, the checks then say what fails)
        info["import_error"] = f"{type(error).__name__}: {error}"
    return info


def summary(records: list) -> dict:
    out = {}
    for r in records:
        if r["group"] == "probe" or not r.get("json"):
            continue
        if r["name"].startswith(("a/verify", "b/verify")):
            out[r["name"]] = [{k: line.get(k) for k in ("max_abs_logit_diff", "logit_tol", "max_abs_vs_reference",
                                                         "max_abs_moments_vs_reference", "max_abs_step_equivalence",
                                                         "growth_seconds", "peak_device_growth_bytes", "ok")}
                              for line in r["json"]]
        elif r["name"] == "c/bench_growth":
            line = r["json"][0]
            out[r["name"]] = {k: line.get(k) for k in ("params_before", "params_after", "growth_seconds",
                                                        "memcpy_floor_seconds", "growth_over_floor",
                                                        "memcpy_bytes_per_second", "peak_device_bytes", "layout")}
    for r in records:
        if r["name"] == "a/train_growth" and r.get("growth"):
            g = r["growth"][0]
            out[r["name"]] = {k: g.get(k) for k in ("params_before", "params_after", "max_abs_logit_diff",
                                                     "held_loss_before", "held_loss_after", "growth_seconds",
                                                     "peak_device_bytes")}
            out[r["name"]]["final_loss"] = r.get("final_loss")
    return out


def dry_run(checks: list[Check]) -> int:
    """Build and validate every mgrow command with mgrow's own rules; run nothing."""
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    from mgrow.cli import _parser
    from mgrow.core.model_config import ModelConfig
    from mgrow.core.plan import load_plan
    from mgrow.train import config as train_config

    for check in checks:
        if check.group == "probe":
            assert check.name.split("/", 1)[1] in PROBE_OPS
            print(f"{check.name}: probe pair")
            continue
        args = _parser().parse_args(list(map(str, check.mgrow_args)))
        if args.command == "train":
            cfg = train_config.load(args.config, args.overrides)
            cfg.check_world(args.nproc)
        else:
            model = ModelConfig.load(args.model)
            tp, pp = getattr(args, "tp", 1), getattr(args, "pp", 1)
            for path in args.plan if isinstance(args.plan, list) else [args.plan]:
                load_plan(path).validate(model)[-1].check_layout(tp, pp)
            model.check_layout(tp, pp)
        print(f"{check.name}: {' '.join(map(str, check.mgrow_args))}")
    print(f"dry run: {len(checks)} checks, every command valid")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json and gpu_check.log")
    parser.add_argument("--work", default=None, help="folder for the training run's checkpoint and metrics (--out)")
    parser.add_argument("--deadline", type=float, default=480, help="seconds for everything; later checks are skipped")
    parser.add_argument("--jobs", type=int, default=None, help="checks run at once in parts a and b (8 on CUDA)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: rehearse on CPU ranks")
    parser.add_argument("--dry-run", action="store_true", help="validate every command, run nothing")
    parser.add_argument("--only", default=None, help="comma-separated groups to run (probe,a,b,c)")
    parser.add_argument("--probe-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_worker:
        return probe_worker(args.probe_worker, args.device)

    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out
    checks = build_checks(work, args.device)
    if args.only:
        groups = set(args.only.split(","))
        checks = [c for c in checks if c.group in groups]
    if args.dry_run:
        return dry_run(checks)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("ckpt", "train_metrics.jsonl"):
        if (work / stale).exists():
            subprocess.run(["rm", "-rf", str(work / stale)], check=True)
    deadline = time.monotonic() + args.deadline
    lines: list[str] = []

    def log(message: str) -> None:
        print(message, flush=True)
        lines.append(message)

    info = machine(args.device)
    log(f"gpu_check on {info.get('gpu', 'CPU')}: {json.dumps(info)}")
    records = []
    probes = [c for c in checks if c.group == "probe"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(probes))) as pool:
        records += list(pool.map(lambda c: run_probe(c, deadline), probes))
    for r in records:
        log(f"probe gloo + {args.device} tensors: {r['op']}: {r['status']}")
    jobs = args.jobs or (8 if args.device == "cuda" else 2)
    train = [c for c in checks if c.name.startswith("a/train")]
    parallel = [c for c in checks if c.group in ("a", "b") and c not in train]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        chained = pool.submit(lambda: [run_check(c, deadline, log) for c in train])  # the resume needs the run
        records += list(pool.map(lambda c: run_check(c, deadline, log), parallel)) + chained.result()
    records += [run_check(c, deadline, log) for c in checks if c.group == "c"]  # alone: its timing is the point

    failed = [r["name"] for r in records if r["group"] != "probe" and not r["ok"]]
    result = {"machine": info, "ok": not failed, "failed": failed, "summary": summary(records),
              "probe": {r["op"]: r["status"] for r in records if r["group"] == "probe"},
              "checks": [{k: v for k, v in r.items() if k != "output"} for r in records]}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    with open(out / "gpu_check.log", "w") as f:
        f.write("\n".join(lines) + "\n")
        for r in records:
            if "output" in r:
                f.write(f"\n===== {r['name']} ({r['status']}, {r['seconds']} s)\n{r['output'][-6000:]}\n")
    print(json.dumps({k: result[k] for k in ("ok", "failed", "summary", "probe")}, indent=1))
    return 0 if not failed else 1


# ----------------------------------------------------------------------------- the probe's worker


def probe_worker(op: str, device: str) -> int:
    """One of two ranks on one device over gloo: run ``op`` on tensors of ``device`` and check the values."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, other = dist.get_rank(), 1 - dist.get_rank()
    if device == "cuda":
        torch.cuda.set_device(0)
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")

    def full(value, n=4):
        return torch.full((n,), float(value), device=dev)

    ok, detail = False, ""
    try:
        if op == "all_reduce":
            t = full(rank + 1)
            dist.all_reduce(t)
            ok = bool((t == 3).all())
        elif op == "broadcast":
            t = full(rank + 1)
            dist.broadcast(t, src=0)
            ok = bool((t == 1).all())
        elif op == "all_gather":
            outs = [full(0) for _ in range(2)]
            dist.all_gather(outs, full(rank + 1))
            ok = bool((outs[0] == 1).all() and (outs[1] == 2).all())
        elif op == "all_gather_into_tensor":
            out = full(0, 8)
            dist.all_gather_into_tensor(out, full(rank + 1))
            ok = bool((out[:4] == 1).all() and (out[4:] == 2).all())
        elif op == "reduce_scatter_tensor":
            out = full(0)
            dist.reduce_scatter_tensor(out, torch.arange(8, device=dev, dtype=torch.float32))
            ok = bool(torch.equal(out, 2 * torch.arange(4 * rank, 4 * rank + 4, device=dev, dtype=torch.float32)))
        elif op == "reduce":
            t = full(rank + 1)
            dist.reduce(t, dst=0)
            ok = bool((t == 3).all()) if rank == 0 else True
        elif op == "send_recv":
            t = full(7 if rank == 0 else 0)
            (dist.send if rank == 0 else dist.recv)(t, 1 - rank)
            ok = bool((t == 7).all())
        elif op == "isend_irecv":
            t = full(7 if rank == 0 else 0)
            (dist.isend if rank == 0 else dist.irecv)(t, 1 - rank).wait()
            ok = bool((t == 7).all())
        elif op == "batch_isend_irecv":
            send, recv = full(rank + 1), full(0)
            ops = [dist.P2POp(dist.isend, send, other), dist.P2POp(dist.irecv, recv, other)]
            for work in dist.batch_isend_irecv(ops if rank == 0 else ops[::-1]):
                work.wait()
            ok = bool((recv == other + 1).all())
        elif op.startswith("coalesced_"):
            from torch.distributed.distributed_c10d import _coalescing_manager

            inner = op[len("coalesced_"):]
            if inner == "all_reduce":
                ts = [full(rank + 1), full(rank + 2)]
                with _coalescing_manager():
                    for t in ts:
                        dist.all_reduce(t)
                ok = bool((ts[0] == 3).all() and (ts[1] == 5).all())
            elif inner == "all_gather_into_tensor":
                outs = [full(0, 8), full(0, 8)]
                with _coalescing_manager():
                    for out, value in zip(outs, (rank + 1, rank + 3)):
                        dist.all_gather_into_tensor(out, full(value))
                ok = bool((outs[0][:4] == 1).all() and (outs[0][4:] == 2).all() and (outs[1][4:] == 4).all())
            else:
                outs = [full(0), full(0)]
                with _coalescing_manager():
                    for out in outs:
                        dist.reduce_scatter_tensor(out, torch.arange(8, device=dev, dtype=torch.float32))
                want = 2 * torch.arange(4 * rank, 4 * rank + 4, device=dev, dtype=torch.float32)
                ok = all(bool(torch.equal(out, want)) for out in outs)
        elif op == "all_gather_object":
            objects: list = [None, None]
            dist.all_gather_object(objects, {"rank": rank})
            ok = objects == [{"rank": 0}, {"rank": 1}]
        elif op == "barrier":
            dist.barrier()
            ok = True
        else:
            raise ValueError(f"unknown op {op}")
        if device == "cuda":
            torch.cuda.synchronize()
        detail = "ok" if ok else "wrong result"
    except Exception as error:  # noqa: BLE001 (the finding)
        detail = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    print(json.dumps({"op": op, "rank": rank, "ok": ok, "detail": detail}), flush=True)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
