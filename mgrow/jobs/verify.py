"""`mgrow verify`: grow a random model by each plan and check the growth invariants, or compare two checkpoints.

* ``--model M --plan P`` at TP = PP = DP = 1 without ``--optimizer`` or ``--bf16``:
  the reference operators alone, in this process (:func:`reference_check`);
* with ``--tp/--pp/--dp/--optimizer/--bf16``: a job of tp x pp x dp ranks
  (:func:`mgrow.testing.invariants.growth_check`), rank 0 printing one JSON line per plan;
* ``--before A --after B``: two checkpoints' logits, weights and moments, in this process.

Every flag, model and plan is checked before torch is imported; a failed
invariant exits 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mgrow.checkpoint.sources import DEEPSPEED, open_source
from mgrow.core.errors import ConfigError
from mgrow.core.model_config import ModelConfig
from mgrow.core.plan import Plan, load_plan
from mgrow.jobs.launch import RankJob, check_job_flags, execute


@dataclass(frozen=True)
class GrowthCheck:
    """What every rank of a sharded check runs: the parsed, validated command."""

    model: ModelConfig
    plans: tuple[Plan, ...]
    tp: int
    pp: int
    optimizer: str
    seed: int
    tol: float
    device: str
    backend: str


def main(args) -> int:
    if args.before is not None or args.after is not None:
        if args.before is None or args.after is None or args.plan:
            raise ConfigError("--before", "checkpoints are compared as --before A --after B, without --plan")
        return _compare(args)
    for flag in ("model", "plan"):
        if not getattr(args, flag):
            raise ConfigError(f"--{flag}", "required (or compare two checkpoints with --before A --after B)")
    cfg = ModelConfig.load(args.model)
    if args.bf16:
        cfg = cfg.replace(bf16=True)
    plans = [load_plan(path) for path in args.plan]
    for plan in plans:
        plan.validate(cfg)  # refuse an impossible plan before starting megatron, on every rank
    if args.optimizer is None and (args.tp, args.pp, args.dp) == (1, 1, 1) and not cfg.bf16:
        return _reference(args, cfg, plans)
    optimizer = args.optimizer or "adam"
    check_job_flags(args.tp, args.pp, args.dp, optimizer)
    try:
        cfg.check_layout(args.tp, args.pp)
    except ConfigError as error:
        raise ConfigError(f"--model ({error.field})", error.rule) from None
    for index, plan in enumerate(plans):
        try:
            plan.validate(cfg)[-1].check_layout(args.tp, args.pp)
        except ConfigError as error:
            raise ConfigError(f"--plan {args.plan[index]}", f"the grown model breaks {error}") from None
    check = GrowthCheck(cfg, tuple(plans), args.tp, args.pp, optimizer, args.seed, args.tol, args.device, args.backend)
    return execute(RankJob(args.tp * args.pp * args.dp, run_rank, check))


def run_rank(check: GrowthCheck) -> int:
    """One rank of the sharded check; rank 0 prints the reports; 1 when an invariant failed."""
    # the ranks' imports (the parent validates without torch)
    from mgrow.parallel.dims import init_distributed, shutdown
    from mgrow.testing.invariants import growth_check

    try:
        dims = init_distributed(check.tp, check.pp, check.seed, device=check.device, backend=check.backend)
        reports = growth_check(check.model, list(check.plans), dims, check.optimizer, check.seed, check.tol)
        if dims.rank == 0:
            for report in reports:
                print(json.dumps(report), flush=True)
        return 0 if all(report["ok"] for report in reports) else 1
    finally:
        shutdown()


def _reference(args, cfg: ModelConfig, plans: list[Plan]) -> int:
    from mgrow.parallel.dims import init_single_process
    from mgrow.testing.invariants import reference_check

    dims = init_single_process(device=args.device, backend=args.backend)
    for plan in plans:
        report = reference_check(cfg, plan, dims, seed=args.seed)
        report["tol"] = args.tol
        report["ok"] = report["max_abs_logit_diff"] <= args.tol
        print(json.dumps(report), flush=True)
        if not report["ok"]:
            return 1
    return 0


def _compare(args) -> int:
    checkpoints = [open_source(args.before, "--before", args.model), open_source(args.after, "--after", args.model)]
    vocab = {model.vocab_size for _, _, model in checkpoints}
    if len(vocab) != 1:
        raise ConfigError("--after", f"the checkpoints have different vocabularies ({sorted(vocab)}): their "
                                     "logits cannot be compared")
    deepspeed = [metadata["layout"] for _, metadata, _ in checkpoints if metadata.get("source_format") == DEEPSPEED]
    if deepspeed:  # the users' engines, made again on the layout that saved them (ZeRO partitions do not move)
        if len(deepspeed) != 2 or deepspeed[0] != deepspeed[1]:
            raise ConfigError("--after", "a DeepSpeed checkpoint is compared with a DeepSpeed checkpoint of the same "
                                         f"layout (grow-checkpoint writes one); layouts {deepspeed}")
        compare = DeepSpeedCompare(tuple(checkpoints), args.tol, args.seed, args.device, args.backend)
        return execute(RankJob(deepspeed[0]["tp"] * deepspeed[0]["dp"], run_deepspeed_compare, compare))
    from mgrow.checkpoint.sources import on_any_layout
    from mgrow.parallel.dims import init_single_process
    from mgrow.testing.invariants import compare_checkpoints

    # compared on one rank: an optimizer state that loads only on its own TP x PP is left out (no moments)
    checkpoints = [(folder, on_any_layout(metadata), model) for folder, metadata, model in checkpoints]
    dims = init_single_process(device=args.device, backend=args.backend)
    report = compare_checkpoints(checkpoints, dims, args.tol, args.seed)
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


@dataclass(frozen=True)
class DeepSpeedCompare:
    checkpoints: tuple
    tol: float
    seed: int
    device: str
    backend: str


def run_deepspeed_compare(compare: DeepSpeedCompare) -> int:
    """One rank of the comparison of two DeepSpeed checkpoints' logits; rank 0 prints the report."""
    from mgrow.parallel.dims import init_distributed, shutdown
    from mgrow.testing.invariants import compare_deepspeed_checkpoints

    try:
        layout = compare.checkpoints[0][1]["layout"]
        dims = init_distributed(layout["tp"], 1, compare.seed, device=compare.device, backend=compare.backend)
        report = compare_deepspeed_checkpoints(list(compare.checkpoints), dims, compare.tol, compare.seed)
        if dims.rank == 0:
            print(json.dumps(report), flush=True)
        return 0 if report["ok"] else 1
    finally:
        shutdown()
