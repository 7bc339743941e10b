"""One rank of a masked-growth job (tests/test_masked_growth.py starts it with mgrow's local launcher).

    masked_worker.main([OUT_DIR, MODEL_JSON, PLAN_JSON, OPTIMIZER, TP, PP, RAMP_STEPS])

Train a model 2 steps, grow it with ``grow(..., masked=True)`` (random masked entries, hooks at m = 0),
then: the logit difference at m = 0 (grow's own check), without the hooks, with hooks rebuilt from the
plan alone (what a resume mid-ramp does), and the ramp over RAMP_STEPS training steps: m per step and the
mask hooks left afterwards. Rank 0 writes OUT_DIR/result.json (every number a max over ranks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mgrow.engine.model import largest_abs


def main(argv: list[str]) -> None:
    out_dir, model_json, plan_json, optimizer, tp, pp, ramp_steps = argv
    from mgrow.transforms.grow import grow
    from mgrow.transforms.masks import GrowthMasks, MaskRamp
    from mgrow.testing.harness import RandomBatches, check_config as train_config
    from mgrow.engine.model import build_gpt
    from mgrow.core.model_config import ModelConfig
    from mgrow.core.plan import load_plan
    from mgrow.parallel.dims import init_distributed, shutdown
    from mgrow.engine.engines import build_engine, global_mean_loss
    from mgrow.testing.harness import random_state, random_tokens

    model = ModelConfig(**json.loads(model_json))
    plan = load_plan(json.loads(plan_json))
    dims = init_distributed(int(tp), int(pp), 1234, device="cpu")
    cfg = train_config(model, dims, optimizer, min(8, model.max_sequence_length))
    engine = build_engine(build_gpt(model, dims, init=random_state(model, 0, dims)), cfg, dims)
    batches = RandomBatches(cfg, 1234, dims)
    for step in range(2):
        engine.train_step(batches(step))
    tokens = random_tokens(model, 0, batch=2, seq=cfg.train.seq_length)
    before = engine.logits(tokens)

    engine, grown_cfg, report = grow(engine, cfg, plan, check_tokens=tokens, masked=True)
    result = {"at_zero": report.max_abs_logit_diff, "params_after": report.params_after}
    report.masks.remove()
    own_hooks = _hook_count(engine.module)  # the framework's own (DeepSpeed ZeRO-3 hooks every module)
    result["without_masks"] = _max_diff(before, engine.logits(tokens))
    masks = GrowthMasks.install(engine.module, plan, model, dims)
    result["rebuilt_at_zero"] = _max_diff(before, engine.logits(tokens))
    ramp, seen, losses = MaskRamp(masks, 2, int(ramp_steps)), [], []
    for step in range(2, 3 + int(ramp_steps)):
        seen.append(ramp.before_step(step))
        losses.append(global_mean_loss(engine.train_step(batches(step)), dims))
    result["mask_per_step"], result["losses"] = seen, losses
    result["hooks_left"] = int(_max_over_ranks(_hook_count(engine.module) - own_hooks))
    if dims.rank == 0:
        Path(out_dir, "result.json").write_text(json.dumps(result))
    dist.barrier()
    engine.destroy()
    shutdown()


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _max_diff(before, after) -> float:
    return _max_over_ranks(0.0 if before is None else largest_abs(after.float() - before.float()))


def _max_over_ranks(value: float) -> float:
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor[0])


if __name__ == "__main__":
    main(sys.argv[1:8])
