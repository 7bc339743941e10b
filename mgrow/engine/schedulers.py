"""Megatron's ``OptimizerParamScheduler``, rebuilt on a new optimizer with the old one's settings and state."""

from __future__ import annotations

from mgrow.core.errors import ConfigError

# OptimizerParamScheduler's constructor arguments, all kept as attributes of the same name (megatron-core 0.16.1).
FIELDS = ("init_lr", "max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "start_wd", "end_wd",
          "wd_incr_steps", "wd_incr_style", "use_checkpoint_opt_param_scheduler", "override_opt_param_scheduler",
          "wsd_decay_steps", "lr_wsd_decay_style")


def check(scheduler, optimizer, field: str = "scheduler") -> None:
    """Refuse a scheduler that ``rebuild`` cannot make again, or that steps another optimizer."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if scheduler is None:
        return
    if type(scheduler) is not OptimizerParamScheduler:
        raise ConfigError(field, f"{type(scheduler).__name__} cannot be rebuilt: mgrow carries megatron's "
                                 "OptimizerParamScheduler (or None)")
    if scheduler.optimizer is not optimizer:
        raise ConfigError(field, "the scheduler steps another optimizer than the one passed")


def rebuild(old, optimizer):
    """An OptimizerParamScheduler on ``optimizer`` with ``old``'s settings, at ``old``'s step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if old is None:
        return None
    new = OptimizerParamScheduler(optimizer, **{name: getattr(old, name) for name in FIELDS})
    new.load_state_dict(old.state_dict())
    return new
