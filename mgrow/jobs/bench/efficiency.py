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

A size may sweep the peak LR and repeat seeds (``lrs``, ``seeds``; see
:class:`Sweep`): each run is then compared at its own best LR, every number as
the mean and half-range over seeds (:func:`summarize_seeds`). A size's
``training`` overrides the shared keys (the full study's corpus). The results
file (``bench/results/<study>_<size>.json``) holds every trial's exact config,
metrics and wall-clock seconds; ``--rerun TRIAL`` trains one again from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import yaml

from mgrow.core.errors import ConfigError
from mgrow.jobs.bench.flops import training_flops_per_token
from mgrow.train.config import from_dict
from mgrow.train.plot import read_metrics, save_figure

SCRATCH = "scratch"
_STUDY_KEYS = ("final_model", "training", "sizes", "growth_defaults", "runs")
_RUN_KEYS = ("model", "training", "growth", "lrs", "sizes")


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


_SIZE_KEYS = ("steps", "eval_interval", "lrs", "seeds", "training")


def _merge(training: dict, overrides: Optional[dict]) -> dict:
    for section, values in (overrides or {}).items():
        training.setdefault(section, {}).update(values)
    return training


def run_configs(study: dict, size: str, out_dir: str) -> dict[str, dict]:
    """Each run's `mgrow train` config (a dict) for study size ``size``."""
    sizes = study.get("sizes") or {}
    if size not in sizes:
        raise ConfigError("--size", f"must be one of {' | '.join(sizes)}, got {size!r}")
    for key in sizes[size]:
        if key not in _SIZE_KEYS:
            raise ConfigError(f"sizes.{size}.{key}", f"unknown size key; known keys: {', '.join(_SIZE_KEYS)}")
    steps, eval_interval = sizes[size]["steps"], sizes[size]["eval_interval"]
    configs = {}
    for name, run in study["runs"].items():
        run = run or {}
        if size not in run.get("sizes", sizes):
            continue
        training = json.loads(json.dumps(study["training"]))  # a deep copy
        _merge(training, run.get("training"))
        _merge(training, sizes[size].get("training"))  # a size's keys hold for every run of that size
        training["train"].update(steps=steps, eval_interval=eval_interval,
                                 metrics_path=os.path.join(out_dir, f"{name}.jsonl"))
        events = [{**(study.get("growth_defaults") or {}),
                   **{k: v for k, v in event.items() if k != "at"}, "at_step": round(event["at"] * steps)}
                  for event in run.get("growth", [])]
        configs[name] = {"model": {**study["final_model"], **run.get("model", {})}, **training, "growth": events}
    return configs


@dataclass(frozen=True)
class Sweep:
    """A size's LR sweep and seeds: every run trains at each peak LR with the first seed, then with the
    other seeds at its own best LR (the lowest final validation loss of the first seed). min_lr keeps
    the study's min_lr / lr ratio. Without ``lrs`` and ``seeds`` a run is one trial named as the run."""

    lrs: tuple = ()
    seeds: tuple = ()

    @classmethod
    def of(cls, study: dict, size: str) -> "Sweep":
        entry = study["sizes"][size]
        lrs, seeds = tuple(entry.get("lrs") or ()), tuple(entry.get("seeds") or ())
        if lrs != tuple(sorted(set(lrs))) or any(not 0 < lr for lr in lrs):
            raise ConfigError(f"sizes.{size}.lrs", f"need distinct positive LRs in increasing order, got {list(lrs)}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"sizes.{size}.seeds", f"need distinct seeds, got {list(seeds)}")
        return cls(lrs, seeds)

    @property
    def empty(self) -> bool:
        return not self.lrs and not self.seeds

    def run_lrs(self, study: dict, run: str, size: str) -> tuple:
        """The peak LRs of ``run``: its own ``lrs`` (a run the size's list does not suit), else the size's."""
        own = (study["runs"][run] or {}).get("lrs")
        if own is None:
            return self.lrs
        if not self.lrs:
            raise ConfigError(f"runs.{run}.lrs", f"size {size!r} sweeps no LRs")
        own = tuple(own)
        if own != tuple(sorted(set(own))) or any(not 0 < lr for lr in own):
            raise ConfigError(f"runs.{run}.lrs", f"need distinct positive LRs in increasing order, got {list(own)}")
        return own


def trial_name(run: str, lr: Optional[float], seed: Optional[int]) -> str:
    return run + ("" if lr is None else f"-lr{lr:g}") + ("" if seed is None else f"-s{seed}")


def trial_config(config: dict, name: str, lr: Optional[float], seed: Optional[int], out_dir: str) -> dict:
    """``config`` at peak LR ``lr`` (min_lr scaled with it) and seed ``seed``, its metrics in out_dir/name.jsonl."""
    config = json.loads(json.dumps(config))
    if lr is not None:
        optimizer = config["optimizer"]
        optimizer["min_lr"] = optimizer.get("min_lr", 0.0) / optimizer["lr"] * lr
        optimizer["lr"] = lr
    if seed is not None:
        config["train"]["seed"] = seed
    config["train"]["metrics_path"] = os.path.join(out_dir, f"{name}.jsonl")
    return config


def curve(cfg: dict, metrics: list[dict]) -> Curve:
    """Validation loss against cumulative training FLOPs, from a run's config and metrics records."""

    train_cfg = from_dict({key: value for key, value in cfg.items() if key != "data"})  # (readable without it)
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


def summarize(curves: dict[str, Curve], reference: str = SCRATCH) -> dict[str, dict]:
    scratch = curves[reference]
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


_SUMMARY_KEYS = ("final_loss", "total_flops", "target_loss", "flops_to_target", "flops_saved",
                 "scratch_loss_at_equal_flops", "best_loss")


def _mean_and_spread(values: list) -> tuple:
    """Mean and half the range of ``values`` (None for both when any value is None)."""
    if any(v is None for v in values):
        return None, None
    return sum(values) / len(values), (max(values) - min(values)) / 2


def _verdict(difference: Optional[float], spread: Optional[float], lower: str, higher: str) -> str:
    if difference is None:
        return "not reached"
    return "no difference" if abs(difference) <= spread else (lower if difference < 0 else higher)


def summarize_seeds(curves: dict[str, list[Curve]], reference: str = SCRATCH) -> dict[str, dict]:
    """Replicate k is every run's k-th seed with the scratch run of that seed as its reference (the same
    seed gives every run the same data order); each replicate is summarized alone, then every number is
    reported as the mean over replicates, its half-range (``*_spread``) and its values (``*_by_seed``).
    A difference whose mean is within its spread is a verdict of "no difference"."""
    replicates = len(curves[reference])
    if any(len(runs) != replicates for runs in curves.values()):
        raise ValueError("every run needs one curve per seed")
    per_seed = [summarize({name: runs[k] for name, runs in curves.items()}, reference) for k in range(replicates)]
    rows = {}
    for name in curves:
        row = {}
        for key in _SUMMARY_KEYS:
            values = [summary[name][key] for summary in per_seed]
            row[key], row[f"{key}_spread"] = _mean_and_spread(values)
            row[f"{key}_by_seed"] = values
        gaps = [None if s[name]["scratch_loss_at_equal_flops"] is None
                else s[name]["final_loss"] - s[name]["scratch_loss_at_equal_flops"] for s in per_seed]
        row["loss_gap"], row["loss_gap_spread"] = _mean_and_spread(gaps)
        row["loss_gap_by_seed"] = gaps
        saving = None if row["flops_saved"] is None else -row["flops_saved"]
        row["flops_verdict"] = ("reference" if name == reference else
                                _verdict(saving, row["flops_saved_spread"], "fewer FLOPs", "more FLOPs"))
        row["loss_verdict"] = ("reference" if name == reference else
                               _verdict(row["loss_gap"], row["loss_gap_spread"], "lower", "higher"))
        rows[name] = row
    return rows


def best_lr(final_losses: dict[float, float]) -> float:
    """The peak LR whose first-seed run ends at the lowest validation loss."""
    return min(final_losses, key=lambda lr: (final_losses[lr], lr))


def plot(curves: dict, out_path: str, title: str, reference: str = SCRATCH) -> str:
    """Validation loss against FLOPs: one colour per run (scratch in black), one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for name, runs in curves.items():
        runs = runs if isinstance(runs, list) else [runs]
        style = dict(color="black", linewidth=2) if name == reference else dict(color=next(colours), linewidth=1.2)
        for k, run in enumerate(runs):
            ax.plot([f / 1e12 for f in run.flops], run.losses, label=name if k == 0 else None,
                    linestyle=("-", "--", ":")[k % 3], **style)
    scratch = curves[reference] if isinstance(curves[reference], list) else [curves[reference]]
    target = sum(run.losses[-1] for run in scratch) / len(scratch)
    ax.axhline(target, color="gray", linestyle=":", linewidth=1)
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


def _pm(mean: Optional[float], spread: Optional[float], fmt: str, scale: float = 1.0) -> str:
    if mean is None:
        return "not reached"
    return f"{mean * scale:{fmt}} ± {spread * scale:{fmt.lstrip('+')}}"


def sweep_table(rows: dict[str, dict]) -> str:
    """The study's headline: each run at its own best peak LR, mean ± half-range over seeds."""
    lines = ["| run | peak LR (final loss at each LR, first seed) | final val loss | FLOPs (1e12) | "
             "FLOPs to scratch's final loss (1e12) | FLOPs saved | scratch loss at the run's FLOPs | "
             "loss - scratch's at equal FLOPs | sweep FLOPs (1e12) | wall-clock (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        sweep = ", ".join(f"{float(lr):g}: {loss:.4f}" for lr, loss in row["sweep"].items())
        is_reference = row["flops_verdict"] == "reference"
        saved = "reference" if is_reference else "not reached" if row["flops_saved"] is None else (
            _pm(row["flops_saved"], row["flops_saved_spread"], ".0f", 100) + f" % ({row['flops_verdict']})")
        gap = "" if is_reference else (
            _pm(row["loss_gap"], row["loss_gap_spread"], "+.4f") + f" ({row['loss_verdict']})")
        equal = _pm(row["scratch_loss_at_equal_flops"], row["scratch_loss_at_equal_flops_spread"], ".4f")
        lines.append(
            f"| {name} | **{row['lr']:g}** ({sweep}) | {_pm(row['final_loss'], row['final_loss_spread'], '.4f')} | "
            f"{row['total_flops'] / 1e12:.2f} | {_pm(row['flops_to_target'], row['flops_to_target_spread'], '.2f', 1e-12)} | "
            f"{saved} | {equal} | {gap} | {row['sweep_flops'] / 1e12:.1f} | {row['seconds']:.0f} |")
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


@dataclass(frozen=True)
class Trial:
    run: str
    lr: Optional[float]
    seed: Optional[int]

    @property
    def name(self) -> str:
        return trial_name(self.run, self.lr, self.seed)


def _train_trials(trials: list[Trial], configs: dict, args) -> dict[str, tuple[list[dict], Optional[float]]]:
    """Train ``trials`` (``--jobs`` at a time, each one single-threaded rank); name -> (metrics, seconds)."""

    def one(trial: Trial):
        config = trial_config(configs[trial.run], trial.name, trial.lr, trial.seed, args.out)
        metrics_path = config["train"]["metrics_path"]
        seconds_path = os.path.join(args.out, f"{trial.name}.seconds")
        if args.reuse and _finished(metrics_path, config["train"]["steps"]):
            records, seconds = read_metrics(metrics_path), None
            if os.path.exists(seconds_path):
                with open(seconds_path) as f:
                    seconds = float(f.read())
        else:
            start = time.perf_counter()
            records = train_run(trial.name, config, args.out)
            seconds = time.perf_counter() - start
            with open(seconds_path, "w") as f:
                f.write(f"{seconds}\n")
        took = f"done in {seconds:.0f} s" if seconds is not None else "reused"
        final = [r["validation_loss"] for r in records if "validation_loss" in r][-1]
        print(f"mgrow bench efficiency: {trial.name} {took}, final validation loss {final:.4f}", file=sys.stderr)
        return config, records, seconds

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        return {t.name: done for t, done in zip(trials, pool.map(one, trials))}


def _results_path(args) -> str:
    stem = os.path.splitext(os.path.basename(args.study))[0]
    return args.results or os.path.join(os.path.dirname(args.study), "results", f"{stem}_{args.size}.json")


def rerun(args, name: str) -> int:
    """Train one trial of the results file again from its recorded config; compare the two curves."""
    path = _results_path(args)
    if not os.path.exists(path):
        raise ConfigError("--results", f"{path} does not exist: run the study first")
    with open(path) as f:
        trials = json.load(f)["trials"]
    if name not in trials:
        raise ConfigError("--rerun", f"{name!r} is not a trial of {path}; trials: {', '.join(trials)}")
    out = os.path.join(args.out, "rerun")
    os.makedirs(out, exist_ok=True)
    config = json.loads(json.dumps(trials[name]["config"]))
    config["train"]["metrics_path"] = os.path.join(out, f"{name}.jsonl")
    records = train_run(name, config, out)
    before = [r for r in trials[name]["metrics"] if "validation_loss" in r]
    after = [r for r in records if "validation_loss" in r]
    if [r["step"] for r in before] != [r["step"] for r in after]:
        raise RuntimeError(f"{name}: the rerun evaluated at other steps than the recorded run")
    diffs = [abs(a["validation_loss"] - b["validation_loss"]) for a, b in zip(after, before)]
    same = all(f"{a['validation_loss']:.4f}" == f"{b['validation_loss']:.4f}" for a, b in zip(after, before))
    print(json.dumps({"trial": name, "evaluations": len(diffs), "max_abs_diff": max(diffs),
                      "final_diff": after[-1]["validation_loss"] - before[-1]["validation_loss"],
                      "same_to_printed_digits": same,
                      "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1")}))
    return 0


def main(args) -> int:
    study = load_study(args.study)
    configs = run_configs(study, args.size, args.out)
    sweep = Sweep.of(study, args.size)
    os.makedirs(args.out, exist_ok=True)
    if args.rerun:
        return rerun(args, args.rerun)
    only = args.runs.split(",") if args.runs else list(configs)
    for name in only:
        if name not in configs:
            raise ConfigError("--runs", f"{name!r} is not a run of {args.study}; runs: {', '.join(configs)}")
    reference = SCRATCH
    only = [reference] + [name for name in only if name != reference]
    for name in only:
        from_dict(configs[name])  # every run's config is checked before the first one trains
    lrs = {run: sweep.run_lrs(study, run, args.size) or (None,) for run in only}
    seeds = sweep.seeds or (None,)
    sweep_trials = [Trial(run, lr, seeds[0]) for run in only for lr in lrs[run]]
    done = _train_trials(sweep_trials, configs, args)

    def final(trial: Trial) -> float:
        return [r["validation_loss"] for r in done[trial.name][1] if "validation_loss" in r][-1]

    swept = not sweep.empty
    best = {run: best_lr({lr: final(Trial(run, lr, seeds[0])) for lr in lrs[run]}) for run in only}
    seed_trials = [Trial(run, best[run], seed) for run in only for seed in seeds[1:]]
    done.update(_train_trials(seed_trials, configs, args))
    headline = {run: [Trial(run, best[run], seed) for seed in seeds] for run in only}
    curves = {run: [curve(*done[t.name][:2]) for t in trials] for run, trials in headline.items()}
    rows = summarize_seeds(curves, reference)
    for run, row in rows.items():
        trials = [t.name for t in sweep_trials + seed_trials if t.run == run]
        seconds = [done[t.name][2] for t in headline[run]]
        row.update(lr=best[run], seeds=list(seeds) if sweep.seeds else None,
                   sweep={str(lr): final(Trial(run, lr, seeds[0])) for lr in lrs[run]} if lrs[run] != (None,) else {},
                   lr_at_edge=len(lrs[run]) > 1 and best[run] in (lrs[run][0], lrs[run][-1]),
                   sweep_flops=sum(curve(*done[t][:2]).flops[-1] for t in trials),
                   seconds=None if None in seconds else sum(seconds) / len(seconds), seconds_by_seed=seconds)
        if row["lr_at_edge"]:
            print(f"mgrow bench efficiency: {run}'s best peak LR {best[run]:g} is at the edge of the sweep "
                  f"{list(lrs[run])}: widen its lrs", file=sys.stderr)
    result = {"study": args.study, "size": args.size, "reference": reference,
              "lrs": {run: list(values) for run, values in lrs.items()} if swept else {}, "seeds": list(sweep.seeds),
              "runs": rows, "curves": {run: [{"flops": c.flops, "validation_loss": c.losses} for c in runs]
                                       for run, runs in curves.items()},
              "trials": {name: {"config": config, "metrics": records, "seconds": seconds}
                         for name, (config, records, seconds) in done.items()}}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    if args.results or swept:
        os.makedirs(os.path.dirname(_results_path(args)) or ".", exist_ok=True)
        with open(_results_path(args), "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(curves, args.plot, f"{os.path.basename(args.study)} ({args.size})", reference)
    print(sweep_table(rows) if swept else markdown_table(rows), file=sys.stderr)
    print(json.dumps({"study": args.study, "size": args.size, "runs": rows}))
    return 0
