"""One rank of a growth test job (tests/test_growth_jobs.py starts it with mgrow's local launcher).

    growth_worker.main([MODE, OUT_DIR, MODEL_JSON, PLAN_JSON, OPTIMIZER, TP, PP])

MODE ``failure``: train 2 steps, snapshot the state, grow with a failure injected
(MGROW_INJECT_GROWTH_FAILURE in the environment) or by a plan the layout refuses,
record the error, compare the state bit for bit, train one more step.
MODE ``reset``: train 2 steps, grow with optimizer_state reset, record the new Adam step and take a step.
MODE ``memory``: train 2 steps, grow, record peak RSS growth during grow and the
state bytes of the old and new shards.
MODE ``continue``: train on the corpus, grow, train 20 more steps; record the losses.
Each rank writes OUT_DIR/rank<R>.json.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(argv: list[str]) -> None:
    mode, out_dir, model_json, plan_json, optimizer, tp, pp = argv
    from mgrow.core import memory
    from mgrow.core.errors import ConfigError
    from mgrow.core.errors import GrowthError
    from mgrow.transforms.estimate import CHUNK_ELEMENTS
    from mgrow.transforms.grow import grow
    from mgrow.testing.harness import RandomBatches, check_config as train_config, gather_state
    from mgrow.engine.model import build_gpt
    from mgrow.core.model_config import ModelConfig
    from mgrow.core.plan import load_plan
    from mgrow.parallel.dims import init_distributed, shutdown
    from mgrow.engine.engines import build_engine, global_mean_loss

    model = ModelConfig(**json.loads(model_json))
    plan = load_plan(json.loads(plan_json))
    dims = init_distributed(int(tp), int(pp), 1234, device="cpu")
    cfg = train_config(model, dims, optimizer, min(32, model.max_sequence_length))
    result: dict = {"rank": dims.rank}
    if mode == "continue":
        from mgrow.train.data import TokenWindows
        from mgrow.train.loop import Batches

        repo = Path(__file__).resolve().parents[1]
        windows = TokenWindows(str(repo / "data" / "cache" / "corpus"), "train", cfg.train.seq_length, 1234)
        batches = Batches(windows, cfg, dims)
        cfg = _with_lr(cfg, 3e-3)
    else:
        batches = RandomBatches(cfg, 1234, dims)
    engine = build_engine(build_gpt(model, dims, seed=1234), cfg, dims)
    steps_before = 30 if mode == "continue" else 2
    losses = [global_mean_loss(engine.train_step(batches(step)), dims) for step in range(steps_before)]

    if mode == "failure":
        (before, lr_before) = _snapshot(engine, model, gather_state)
        try:
            grow(engine, cfg, plan)
            result["error"] = None
        except (GrowthError, ConfigError) as error:
            result["error"] = f"{type(error).__name__}: {error}"
        (after, lr_after) = _snapshot(engine, model, gather_state)
        result["compared"] = sum(len(tensors) for tensors in before.values())
        result["unchanged"] = lr_before == lr_after and all(
            torch.equal(before[kind][name], after[kind][name]) for kind in before for name in before[kind]
        )
        result["next_loss"] = global_mean_loss(engine.train_step(batches(steps_before)), dims)
    elif mode == "reset":
        engine, _, _ = grow(engine, cfg, plan, optimizer_state="reset")
        result["step_after_reset"] = engine.optimizer_state().step()
        result["next_loss"] = global_mean_loss(engine.train_step(batches(steps_before)), dims)
    elif mode == "memory":
        old_bytes = _state_bytes(engine)
        # one bulk read of one tensor kind: this rank's whole old shards in fp32 (capped at a chunk)
        bulk_bytes = 4 * min(CHUNK_ELEMENTS, sum(p.numel() for p in engine.module.parameters()))
        memory.rss_reset_peak()
        start = memory.rss_current()
        engine, grown_cfg, report = grow(engine, cfg, plan)
        result["rss_growth"] = memory.rss_peak() - start
        result["old_state_bytes"] = old_bytes
        result["new_state_bytes"] = _state_bytes(engine)
        result["largest_param_state_bytes"] = 3 * 4 * max(math.prod(s) for s in _shapes(grown_cfg.model))
        result["bulk_read_bytes"] = bulk_bytes
        result["whole_model_state_bytes"] = 3 * 4 * (model.num_parameters() + grown_cfg.model.num_parameters())
    else:
        engine, cfg, report = grow(engine, cfg, plan)
        result["growth_seconds"] = report.growth_seconds
        after = [global_mean_loss(engine.train_step(batches(steps_before + step)), dims) for step in range(20)]
        result["losses_before"], result["losses_after"] = losses, after
    Path(out_dir, f"rank{dims.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    engine.destroy()
    shutdown()


def _with_lr(cfg, lr: float):
    import dataclasses

    return dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, lr=lr, min_lr=lr / 10))


def _snapshot(engine, model, gather_state) -> tuple[dict, float]:
    state = gather_state(engine, model)
    return {kind: {name: t.clone() for name, t in tensors.items()} for kind, tensors in state.items()}, engine.lr()


def _shapes(cfg):
    from mgrow.core.parameters import parameter_shapes

    return parameter_shapes(cfg).values()


def _state_bytes(engine) -> int:
    """Bytes of this rank's weights, gradients and Adam moments (what growth must hold twice at most)."""
    local = sum(p.numel() for p in engine.module.parameters())
    state = engine.optimizer_state()
    moments = sum(t.numel() for t in _moment_tensors(state))
    return 4 * (2 * local + moments)


def _moment_tensors(state):
    for per_param in state.inner.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in per_param:
                yield per_param[key]


if __name__ == "__main__":
    main(sys.argv[1:8])
