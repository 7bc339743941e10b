"""`mgrow bench transfer`: does a GQA or MoE model started by transfer (XATL) learn faster than from scratch?

Runs real `mgrow train` jobs on the corpus (one after the other, `--nproc` ranks each):

1. a dense MHA GPT trained ``--source-steps`` steps, saved;
2. for each target (GQA: fewer query groups; MoE: every expert a copy of the dense MLP), the same
   ``--steps`` twice, from the same seed and data: from scratch, and from the dense checkpoint with
   every shared component transferred, frozen until the loss improvement over ``--window`` steps falls
   under ``--threshold``.

Prints one JSON line: the training loss of both runs at equal steps (mean over the ``--window`` steps
ending there), the final validation losses, the unfreeze step and the logit deviation right after the
transfer.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from mgrow.core.errors import ConfigError
from mgrow.jobs.bench.efficiency import train_run
from mgrow.transforms.transfer.rules import COMPONENTS

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=4, ffn_hidden_size=256,
             vocab_size=256, max_sequence_length=64, normalization="RMSNorm", activation="swiglu",
             position_embedding_type="rope", add_bias_linear=False)
TARGETS = {"gqa": {"num_query_groups": 1}, "moe": {"num_moe_experts": 4, "moe_router_topk": 2}}


def _config(folder: str, name: str, model: dict, steps: int, **sections) -> dict:
    return {
        "model": model,
        "optimizer": {"type": "adam", "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 10},
        "train": {"steps": steps, "micro_batch_size": 8, "global_batch_size": 16,
                  "seq_length": 64, "log_interval": 10**6, "eval_batches": 4, "progress": False,
                  "metrics_path": os.path.join(folder, f"{name}.jsonl")},
        **sections,
    }


def _summary(records: list[dict], at: list[int], window: int) -> dict:
    losses = [r["loss"] for r in records if "loss" in r]
    out = {"loss_at": {str(step): sum(losses[step - window:step]) / window for step in at},
           "validation_loss": next(r["validation_loss"] for r in reversed(records) if "validation_loss" in r)}
    for record in records:
        if record.get("event") == "transfer":
            out["logit_diff_after_transfer"] = record["max_abs_logit_diff"]
        if record.get("event") == "unfreeze":
            out["unfreeze_step"] = record["step"]
    return out


def main(args) -> int:

    for flag in ("source_steps", "steps", "window", "nproc"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}", f"must be >= 1, got {getattr(args, flag)}")
    if args.steps < 2 * args.window:
        raise ConfigError("--steps", f"must be >= 2 * --window = {2 * args.window}")
    start = time.perf_counter()
    folder = args.out or tempfile.mkdtemp(prefix="mgrow_bench_transfer_")
    os.makedirs(folder, exist_ok=True)
    source_ckpt = os.path.join(folder, "source_ckpt")
    train_run("source", _config(folder, "source", MODEL, args.source_steps, checkpoint={"save": source_ckpt}),
              folder, args.nproc)
    at = sorted({args.window, args.steps // 4, args.steps // 2, args.steps} - {0})
    at = [step for step in at if step >= args.window]
    result = {"bench": "transfer", "source_model": MODEL, "source_steps": args.source_steps, "steps": args.steps,
              "nproc": args.nproc, "window": args.window, "threshold": args.threshold,
              "loss": "mean training loss of the window steps ending at each step", "targets": {}}
    for name, change in TARGETS.items():
        model = {**MODEL, **change}
        scratch = train_run(f"{name}_scratch", _config(folder, f"{name}_scratch", model, args.steps), folder,
                            args.nproc)
        transfer = {"from": source_ckpt, "components": list(COMPONENTS), "freeze": True,
                    "unfreeze_window": args.window, "unfreeze_threshold": args.threshold}
        moved = train_run(f"{name}_transfer", _config(folder, f"{name}_transfer", model, args.steps,
                                                       transfer=transfer), folder, args.nproc)
        result["targets"][name] = {"model": change, "scratch": _summary(scratch, at, args.window),
                                   "transfer": _summary(moved, at, args.window)}
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result), flush=True)
    return 0
