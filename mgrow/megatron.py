"""Grow a megatron-core training job in the user's own loop.

    import mgrow.megatron

    model, optimizer, scheduler, report = mgrow.megatron.grow(model, optimizer, scheduler, plan)

``model`` is the rank's model chunk as the user trains it (megatron
``DistributedDataParallel`` around a ``GPTModel``, optionally with
``Float16Module`` in between; or a list of that one chunk), ``optimizer`` the
megatron optimizer from ``get_megatron_optimizer`` and ``scheduler`` the
``OptimizerParamScheduler`` (or None). The returned objects are new, made with
the passed objects' own settings (see :mod:`mgrow.engine.megatron_job`), and
the old ones are released. Call it on every rank, between two training steps.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from mgrow.engine.megatron_job import MegatronJob
from mgrow.transforms.grow import GrowthReport, grow_job


class MegatronGrowth(NamedTuple):
    model: Any  # in the form passed: a chunk, or a list of one chunk
    optimizer: Any
    scheduler: Any
    report: GrowthReport


def grow(model, optimizer, scheduler, plan, *, config_overrides: Optional[dict] = None,
         check_tokens: Optional[torch.Tensor] = None, optimizer_state: str = "keep", masked: bool = False,
         keep_old: bool = False) -> MegatronGrowth:
    """Grow the job by ``plan`` (a Plan, a dict ``{"ops": [...]}`` or a YAML path), all or nothing on every rank.

    ``config_overrides``: the ``config_overrides`` the optimizer was made with by
    ``get_megatron_optimizer``, if any (growth checks that the rebuilt optimizer
    gives every parameter the param-group settings it had). ``check_tokens``: a
    [b, s] batch of token ids, the same on every rank; the report's
    ``max_abs_logit_diff`` compares the logits on it before and after.
    ``optimizer_state``: ``keep`` carries Adam's moments and step, ``reset``
    starts Adam afresh. ``keep_old``: leave the old objects usable.

    Raises ``ConfigError`` (a plan, model or optimizer that cannot be grown; the
    same on every rank, before anything changes) or ``GrowthError`` (a failure on
    some rank, raised on every rank; every rank keeps its old objects).
    """
    job = MegatronJob(model, optimizer, scheduler, config_overrides=config_overrides)
    new, report = grow_job(job, plan, check_tokens=check_tokens, keep_old=keep_old,
                           optimizer_state=optimizer_state, masked=masked)
    return MegatronGrowth(new.model, new.optimizer, new.scheduler, report)
