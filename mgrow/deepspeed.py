"""Grow a DeepSpeed training job in the user's own loop.

    import mgrow.deepspeed

    engine, optimizer, lr_scheduler, report = mgrow.deepspeed.grow(engine, plan)

``engine`` is what ``deepspeed.initialize`` returned, around a megatron-core
``GPTModel`` (ZeRO 0-3, fp32 or bf16). The new engine is made by
``deepspeed.initialize`` from the user's own DeepSpeed config, optimizer and LR
scheduler, with the scheduler's state, Adam's moments and step and the engine's
counters carried (see :mod:`mgrow.engine.deepspeed_job`); the old engine is
destroyed. Call it on every rank, between two training steps.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch

from mgrow.engine.deepspeed_job import DeepSpeedJob
from mgrow.transforms.grow import GrowthReport, grow_job


class DeepSpeedGrowth(NamedTuple):
    engine: Any
    optimizer: Any
    lr_scheduler: Any
    report: GrowthReport


def grow(engine, plan, *, lr_scheduler: Optional[Callable] = None, config: Optional[dict] = None,
         check_tokens: Optional[torch.Tensor] = None, optimizer_state: str = "keep", masked: bool = False,
         keep_old: bool = False) -> DeepSpeedGrowth:
    """Grow the engine's model by ``plan`` (a Plan, a dict ``{"ops": [...]}`` or a YAML path), all or nothing.

    ``lr_scheduler``: a callable ``optimizer -> scheduler``; needed only when the
    engine's scheduler was passed to ``deepspeed.initialize`` as an object.
    ``config``: a DeepSpeed config for the new engine (say, new batch sizes);
    default: the engine's own. ``check_tokens``, ``optimizer_state``, ``masked``,
    ``keep_old``: as in :func:`mgrow.megatron.grow`.
    """
    job = DeepSpeedJob(engine, lr_scheduler=lr_scheduler, config=config)
    new, report = grow_job(job, plan, check_tokens=check_tokens, keep_old=keep_old,
                           optimizer_state=optimizer_state, masked=masked)
    return DeepSpeedGrowth(new.engine, new.engine.optimizer, new.engine.lr_scheduler, report)
