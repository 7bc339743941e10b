"""`mgrow bench efficiency`: compute saved by growing, against training the final model from scratch.

A study file (``bench/efficiency.yaml``) names the final model, the training
keys every run shares and the runs: ``scratch`` trains the final model, every
other run starts smaller (``model`` overrides) and grows to it by its growth
events, or starts differently (``training`` overrides, e.g. ``train.init``). All runs see
the same token budget and data order. Each run is one ``mgrow train`` job on
one rank; its metrics file gives the validation loss (the whole validation
split) every ``eval_interval`` steps, and the FLOPs up to each step are counted
with :mod:`mgrow.jobs.bench.flops` from the model in effect at each step.

For each run the study reports, against the scratch run's final validation loss L*:

* ``flops_to_target``: the training FLOPs at which its validation loss first
  reaches L* (linear between evaluations; None when it never does);
* ``flops_saved``: 1 - flops_to_target / the scratch run's own flops_to_target;
* ``final_loss`` and ``scratch_loss_at_equal_flops``: its final validation
  loss, and the scratch run's validation loss at the same FLOPs (interpolated).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import yaml

from mgrow.core.errors import ConfigError
from mgrow.jobs.bench.flops import training_flops_per_token
from mgrow.train.config import from_dict
from mgrow.train.plot import read_metrics, save_figure

SCRATCH = "scratch"
_STUDY_KEYS = ("final_model", "training", "sizes", "growth_defaults", "runs")
_RUN_KEYS = ("model", "training", "growth")


@dataclass(frozen=True)
class Curve:
    """One run's validation losses against the training FLOPs spent up to each evaluation."""

    flops: list[float]
    losses: list[float]

    def flops_to_reach(self, target: float) -> Optional[float]:
        previous = None
        for flops, loss in zip(self.flops, self.losses):
            if loss <= target:
                if previous is None:
                    return flops
                f0, l0 = previous
                return f0 + (l0 - target) / (l0 - loss) * (flops - f0)
            previous = (flops, loss)
        return None

    def loss_at(self, flops: float) -> Optional[float]:
        """The loss at ``flops`` (linear between evaluations; None outside the evaluated range)."""
        points = list(zip(self.flops, self.losses))
        for (f0, l0), (f1, l1) in zip(points, points[1:]):
            if f0 <= flops <= f1:
                return l0 + (flops - f0) / (f1 - f0) * (l1 - l0)
        return None


def load_study(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError("--study", f"study file {path} does not exist")
    with open(path) as f:
        study = yaml.safe_load(f)
    if not isinstance(study, dict):
        raise ConfigError("--study", f"{path} must be a YAML mapping")
    for key in study:
        if key not in _STUDY_KEYS:
            raise ConfigError(key, f"unknown study key; known keys: {', '.join(_STUDY_KEYS)}")
    if SCRATCH not in (study.get("runs") or {}):
        raise ConfigError("runs", f"the study needs a run named {SCRATCH!r}, the reference")
    for name, run in study["runs"].items():
        for key in run or {}:
            if key not in _RUN_KEYS:
                raise ConfigError(f"runs.{name}.{key}", f"unknown run key; known keys: {', '.join(_RUN_KEYS)}")
    return study


def run_configs(study: dict, size: str, out_dir: str) -> dict[str, dict]:
    """Each run's `mgrow train` config (a dict) for study size ``size``."""
    sizes = study.get("sizes") or {}
    if size not in sizes:
        raise ConfigError("--size", f"must be one of {' | '.join(sizes)}, got {size!r}")
    steps, eval_interval = sizes[size]["steps"], sizes[size]["eval_interval"]
    configs = {}
    for name, run in study["runs"].items():
        run = run or {}
        training = json.loads(json.dumps(study["training"]))  # a deep copy
        for section, values in (run.get("training") or {}).items():
            training.setdefault(section, {}).update(values)
        training["train"].update(steps=steps, eval_interval=eval_interval,
                                 metrics_path=os.path.join(out_dir, f"{name}.jsonl"))
        events = [{**(study.get("growth_defaults") or {}),
                   **{k: v for k, v in event.items() if k != "at"}, "at_step": round(event["at"] * steps)}
                  for event in run.get("growth", [])]
        configs[name] = {"model": {**study["final_model"], **run.get("model", {})}, **training, "growth": events}
    return configs


def curve(cfg: dict, metrics: list[dict]) -> Curve:
    """Validation loss against cumulative training FLOPs, from a run's config and metrics records."""

    train_cfg = from_dict(cfg)
    seq = train_cfg.train.seq_length
    models = [train_cfg.model]
    for event in train_cfg.growth:
        models.append(event.plan.validate(models[-1])[-1])
    spent, tokens_before, model_index, flops_at_step = 0.0, 0, 0, {0: 0.0}
    for record in metrics:
        if record.get("event") == "growth":
            model_index += 1
        elif "loss" in record:
            tokens = record["tokens"]
            spent += (tokens - tokens_before) * training_flops_per_token(models[model_index], seq)
            tokens_before = tokens
            flops_at_step[record["step"]] = spent
    evaluations = [(flops_at_step[r["step"]], r["validation_loss"]) for r in metrics if "validation_loss" in r]
    return Curve([f for f, _ in evaluations], [loss for _, loss in evaluations])


def summarize(curves: dict[str, Curve]) -> dict[str, dict]:
    scratch = curves[SCRATCH]
    target = scratch.losses[-1]
    scratch_flops = scratch.flops_to_reach(target)  # its first evaluation at or under its final loss
    rows = {}
    for name, run in curves.items():
        reach = run.flops_to_reach(target)
        rows[name] = dict(
            final_loss=run.losses[-1], total_flops=run.flops[-1], target_loss=target,
            flops_to_target=reach, flops_saved=None if reach is None else 1 - reach / scratch_flops,
            scratch_loss_at_equal_flops=scratch.loss_at(run.flops[-1]),
            best_loss=min(run.losses),
        )
    return rows


def plot(curves: dict[str, Curve], out_path: str, title: str) -> str:
    import matplotlib


    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name, run in curves.items():
        style = dict(color="black", linewidth=2) if name == SCRATCH else dict(linewidth=1.2)
        ax.plot([f / 1e12 for f in run.flops], run.losses, label=name, **style)
    ax.axhline(curves[SCRATCH].losses[-1], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("training FLOPs (1e12, analytic count)")
    ax.set_ylabel("validation loss (nats per byte)")
    return save_figure(fig, ax, title, out_path)


def markdown_table(rows: dict[str, dict]) -> str:
    lines = ["| run | final val loss | FLOPs (1e12) | FLOPs to scratch's final loss | FLOPs saved | "
             "scratch val loss at equal FLOPs |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        reach = "not reached" if row["flops_to_target"] is None else f"{row['flops_to_target'] / 1e12:.2f}"
        saved = "" if row["flops_saved"] is None else f"{100 * row['flops_saved']:.0f}%"
        equal = "" if row["scratch_loss_at_equal_flops"] is None else f"{row['scratch_loss_at_equal_flops']:.4f}"
        lines.append(f"| {name} | {row['final_loss']:.4f} | {row['total_flops'] / 1e12:.2f} | {reach} | {saved} | "
                     f"{equal} |")
    return "\n".join(lines)


def train_run(name: str, config: dict, out_dir: str, nproc: int | None = None) -> list[dict]:
    """Train ``config`` as ``mgrow train`` (its YAML and log in ``out_dir/name.*``); its metrics records."""

    path, log_path = os.path.join(out_dir, f"{name}.yaml"), os.path.join(out_dir, f"{name}.log")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    metrics_path = config["train"]["metrics_path"]
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    command = [sys.executable, "-m", "mgrow.cli", "train", "--config", path, *(["--nproc", str(nproc)] if nproc else [])]
    with open(log_path, "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"mgrow train --config {path} failed ({done.returncode}); see {log_path}")
    return read_metrics(metrics_path)


def _finished(metrics_path: str, steps: int) -> bool:
    """Whether a run's metrics file holds its final evaluation (``--reuse`` then reads it instead of training)."""

    return os.path.exists(metrics_path) and any(
        r.get("step") == steps and "validation_loss" in r for r in read_metrics(metrics_path))


def main(args) -> int:

    study = load_study(args.study)
    configs = run_configs(study, args.size, args.out)
    only = args.runs.split(",") if args.runs else list(configs)
    for name in only:
        if name not in configs:
            raise ConfigError("--runs", f"{name!r} is not a run of {args.study}; runs: {', '.join(configs)}")
    if SCRATCH not in only:
        only.insert(0, SCRATCH)
    for name in only:
        from_dict(configs[name])  # every run's config is checked before the first one trains
    os.makedirs(args.out, exist_ok=True)
    curves, seconds = {}, {}
    for name in only:
        metrics_path = configs[name]["train"]["metrics_path"]
        if args.reuse and _finished(metrics_path, configs[name]["train"]["steps"]):
            seconds[name], records = None, read_metrics(metrics_path)
        else:
            start = time.perf_counter()
            records = train_run(name, configs[name], args.out)
            seconds[name] = time.perf_counter() - start
        curves[name] = curve(configs[name], records)
        took = "reused" if seconds[name] is None else f"done in {seconds[name]:.0f} s"
        print(f"mgrow bench efficiency: {name} {took}, final validation loss {curves[name].losses[-1]:.4f}",
              file=sys.stderr)
    rows = summarize(curves)
    for name, row in rows.items():
        row["seconds"] = seconds[name]
    result = {"study": args.study, "size": args.size, "runs": rows,
              "curves": {name: {"flops": c.flops, "validation_loss": c.losses} for name, c in curves.items()}}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    if args.plot:
        plot(curves, args.plot, f"{os.path.basename(args.study)} ({args.size})")
    print(markdown_table(rows), file=sys.stderr)
    print(json.dumps({"study": args.study, "size": args.size, "runs": rows}))
    return 0
