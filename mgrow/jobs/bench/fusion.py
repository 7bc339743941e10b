"""`mgrow bench fusion`: train two models, fuse them (`mgrow fuse`), train the fused model on; against the
fused size trained from scratch for the same steps.

The bench file (``bench/fusion.yaml``) names the parents' model, the training
keys every run shares, the parents' steps and seeds, and the steps after
fusion. Every run is one ``mgrow train`` job on one rank. The fused run's
FLOPs include both parents' (the fused model is not free); the table is
:func:`mgrow.jobs.bench.efficiency.summarize`'s, with the scratch run as reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from mgrow.core.errors import ConfigError
from mgrow.core.model_config import ModelConfig
from mgrow.core.plan import fused_config
from mgrow.jobs.bench.efficiency import SCRATCH, Curve, curve, markdown_table, plot, summarize, train_run
from mgrow.train.config import from_dict

_KEYS = ("model", "training", "parents", "sizes")


def load_bench(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError("--study", f"bench file {path} does not exist")
    with open(path) as f:
        spec = yaml.safe_load(f)
    for key in _KEYS:
        if key not in (spec or {}):
            raise ConfigError(key, f"required in {path}: {', '.join(_KEYS)}")
    seeds = spec["parents"].get("seeds")
    if not (isinstance(seeds, list) and len(seeds) == 2):
        raise ConfigError("parents.seeds", f"must be the two parents' seeds, got {seeds!r}")
    return spec


def configs(spec: dict, size: str, out: str) -> dict[str, dict]:
    """The `mgrow train` config of each parent, of the fused run and of the scratch run."""

    if size not in spec["sizes"]:
        raise ConfigError("--size", f"must be one of {' | '.join(spec['sizes'])}, got {size!r}")
    steps, eval_interval = spec["sizes"][size]["steps"], spec["sizes"][size]["eval_interval"]
    model = ModelConfig.from_dict(spec["model"])
    fused = fused_config(model, model).to_dict()

    def run(name: str, model: dict, steps: int, seed: int, **checkpoint) -> dict:
        training = json.loads(json.dumps(spec["training"]))
        training["train"].update(steps=steps, eval_interval=eval_interval, seed=seed,
                                 metrics_path=os.path.join(out, f"{name}.jsonl"))
        return {"model": model, **training, "checkpoint": checkpoint}

    (seed_a, seed_b), parent_steps = spec["parents"]["seeds"], spec["parents"]["steps"]
    return {
        "parent_a": run("parent_a", spec["model"], parent_steps, seed_a, save=os.path.join(out, "parent_a")),
        "parent_b": run("parent_b", spec["model"], parent_steps, seed_b, save=os.path.join(out, "parent_b")),
        "fused": run("fused", fused, steps, seed_a, load=os.path.join(out, "fused")),
        SCRATCH: run(SCRATCH, fused, steps, seed_a),
    }


def main(args) -> int:

    spec = load_bench(args.study)
    runs = configs(spec, args.size, args.out)
    for cfg in runs.values():
        from_dict({**cfg, "checkpoint": {}})  # every config checked before anything trains
    os.makedirs(args.out, exist_ok=True)

    parents = {name: curve(runs[name], train_run(name, runs[name], args.out)) for name in ("parent_a", "parent_b")}
    fuse = subprocess.run([sys.executable, "-m", "mgrow.cli", "fuse", "--a", runs["parent_a"]["checkpoint"]["save"],
                           "--b", runs["parent_b"]["checkpoint"]["save"], "--out", runs["fused"]["checkpoint"]["load"]],
                          capture_output=True, text=True)
    if fuse.returncode:
        raise RuntimeError(f"mgrow fuse failed ({fuse.returncode}): {fuse.stderr[-2000:]}")
    fusion = json.loads([line for line in fuse.stdout.splitlines() if line.startswith("{")][-1])
    parent_flops = sum(c.flops[-1] for c in parents.values())
    fused = curve(runs["fused"], train_run("fused", runs["fused"], args.out))
    curves = {SCRATCH: curve(runs[SCRATCH], train_run(SCRATCH, runs[SCRATCH], args.out)),
              "fused (FLOPs include both parents)": Curve([f + parent_flops for f in fused.flops], fused.losses)}
    rows = summarize(curves)
    if args.plot:
        plot(curves, args.plot, f"{os.path.basename(args.study)} ({args.size})")
    print(markdown_table(rows), file=sys.stderr)
    result = {"study": args.study, "size": args.size, "runs": rows,
              "parents_final_loss": {name: c.losses[-1] for name, c in parents.items()},
              "parent_flops": parent_flops,
              "max_abs_logit_diff_vs_average": fusion["max_abs_logit_diff_vs_average"],
              "max_abs_logit_diff_a_b": fusion["max_abs_logit_diff_a_b"]}
    print(json.dumps(result))
    return 0
