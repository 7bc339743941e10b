"""Run `mgrow train` and other commands as multi-rank jobs from tests: on the rank pool (tests/rank_pool.py), or as
real torchrun / local-launcher processes where the launcher itself is what a test is about."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from rank_pool import pool

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(
    num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
    vocab_size=256, max_sequence_length=32, normalization="RMSNorm", activation="swiglu",
    position_embedding_type="rope", add_bias_linear=False,
)


# What init_single_process (the in-process test rank) puts in os.environ: a child process would take
# itself for a rank of that one-process world.
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict:
    """This process's environment without rank variables, one OpenMP thread per rank."""
    return {**{k: v for k, v in os.environ.items() if k not in RANK_ENV}, "OMP_NUM_THREADS": "1"}


@dataclass
class JobResult:
    returncode: int
    stdout: str
    stderr: str
    rank_stderr: dict  # rank -> that rank's stderr (torchrun --redirects)
    metrics: list


def write_config(tmp_path: Path, **sections) -> Path:
    config = {
        "model": dict(TINY_MODEL),
        "parallel": {"device": "cpu"},  # the suite's jobs run on CPU ranks, also on a machine with a GPU
        "optimizer": {"type": "adam", "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "train": {"steps": 5, "micro_batch_size": 2, "global_batch_size": 8, "seq_length": 32,
                  "log_interval": 1, "eval_batches": 1, "progress": False,
                  "metrics_path": str(tmp_path / "metrics.jsonl")},
        "data": {"path": str(REPO / "data" / "cache" / "corpus")},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun(tmp_path: Path, nproc: int, config: Path, *overrides: str, timeout: float = 240) -> JobResult:
    """One torchrun job on loopback; each rank's stderr is kept apart."""
    from conftest import free_port

    logs = tmp_path / "torchrun_logs"
    metrics = tmp_path / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--redirects=3", f"--log-dir={logs}",
        "-m", "mgrow.cli", "train", "--config", str(config), *overrides,
    ]
    env = {**clean_env(), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    rank_stderr = {}
    for path in glob.glob(str(logs / "**" / "stderr.log"), recursive=True):
        rank_stderr[int(Path(path).parent.name)] = Path(path).read_text()
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return JobResult(done.returncode, done.stdout, done.stderr, rank_stderr, records)


def train_job(tmp_path: Path, nproc: int, config: Path, *overrides: str, timeout: float = 240,
              env: Optional[dict] = None) -> JobResult:
    """``mgrow train`` on ``nproc`` ranks of the rank pool, as under torchrun (every rank reports its own errors:
    a rank that fails does not stop the others, which is what a test of per-rank errors needs)."""
    metrics = tmp_path / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    done = pool().cli(nproc, ["train", "--config", config, *overrides], env=env, timeout=timeout)
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return JobResult(done.returncode, done.stdout, done.stderr, done.rank_stderr, records)


def launched_train_job(tmp_path: Path, nproc: int, config: Path, *overrides: str, timeout: float = 240) -> JobResult:
    """``mgrow train --nproc``: the local launcher itself (ranks forked from a preloaded forkserver)."""
    metrics = tmp_path / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    command = [sys.executable, "-m", "mgrow.cli", "train", "--config", str(config), "--nproc", str(nproc), *overrides]
    env = {**clean_env(), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return JobResult(done.returncode, done.stdout, done.stderr, {}, records)


def mgrow_job(nproc: int, *args, env: Optional[dict] = None, timeout: float = 300):
    """``mgrow <args>`` on ``nproc`` ranks of the rank pool (``returncode``, ``stdout``, ``stderr`` as from
    ``subprocess.run``); one rank runs the commands that work in one process (``verify`` of the reference
    operators or of two checkpoints)."""
    return pool().cli(nproc, [str(a) for a in args], env=env, timeout=timeout)


def step_losses(result: JobResult) -> list[float]:
    assert result.returncode == 0, result.stderr[-4000:] + "".join(result.rank_stderr.values())[-4000:]
    return [r["loss"] for r in result.metrics if "loss" in r]
