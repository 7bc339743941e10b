"""What growth needs from a training job and from its optimizer: the two interfaces an adapter implements.

:func:`mgrow.transforms.grow.grow_job` touches a job only through
:class:`GrowableJob`, and the job's optimizer only through
:class:`OptimizerState`. mgrow ships adapters for megatron-core jobs
(:class:`mgrow.engine.megatron_job.MegatronJob`: a user's model chunk, megatron
optimizer and ``OptimizerParamScheduler``) and DeepSpeed engines
(:class:`mgrow.engine.deepspeed_job.DeepSpeedJob`), and for the optimizers
behind them (:mod:`mgrow.parallel.optimizer_state`). A third party adds a
framework by implementing both.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch

from mgrow.core.model_config import ModelConfig


@runtime_checkable
class OptimizerState(Protocol):
    """Where one optimizer keeps each parameter's fp32 master and Adam moments.

    Reads are collective over the data-parallel group (every DP rank asks for the
    same parameters in the same order) and return this TP rank's whole shard;
    writes are local (each rank stores its part). ``param`` is always the model's
    own parameter.
    """

    def master(self, param: torch.nn.Parameter) -> torch.Tensor: ...

    def set_master(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Store the fp32 master, and the model parameter (in bf16: its rounding)."""

    def moment(self, param: torch.nn.Parameter, key: str) -> torch.Tensor:
        """``key``: ``exp_avg`` or ``exp_avg_sq``."""

    def set_moment(self, param: torch.nn.Parameter, key: str, value: torch.Tensor) -> None: ...

    def step(self) -> Optional[torch.Tensor]:
        """Adam's step count on this rank (None before the first step or where the rank owns no state)."""

    def init(self, step: torch.Tensor) -> None:
        """Create zero moments for every parameter and set Adam's step (before ``set_moment``)."""

    def group_of(self, param: torch.nn.Parameter) -> Optional[dict]:
        """The param group holding ``param`` on this rank (None where this rank holds none of it)."""


@runtime_checkable
class GrowableJob(Protocol):
    """One rank's part of a running job: its model stage, optimizer and LR schedule.

    ``grow_job`` calls, in order: ``describe``, ``check_rebuild``, ``logits``
    (with check tokens), ``build_model``, ``optimizer_state`` (read), ``rebuild``
    and, on success, ``destroy`` of the old job. Nothing but ``destroy`` may
    change the old job; ``rebuild`` makes the new optimizer and schedule with the
    old ones' settings and carries the schedule's state.
    """

    dims: object  # mgrow.parallel.ParallelDims of this rank

    @property
    def module(self) -> torch.nn.Module:
        """This rank's megatron-core GPTModel stage, unwrapped."""

    def describe(self) -> ModelConfig:
        """The model's description read from the live model (refuse with ConfigError what cannot be grown)."""

    def check_rebuild(self, grown: ModelConfig) -> None:
        """Refuse (ConfigError) whatever ``rebuild`` could not rebuild with the job's own settings."""

    def optimizer_state(self) -> OptimizerState: ...

    def logits(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """This rank's logits slice for ``tokens`` [b, s] on the last stage, None elsewhere."""

    def build_model(self, grown: ModelConfig) -> torch.nn.Module:
        """A GPTModel stage of the grown size with the job's own settings (its weights are overwritten)."""

    def rebuild(self, model: torch.nn.Module, grown: ModelConfig) -> "GrowableJob":
        """A new job around ``model``: optimizer and schedule as this job's, the schedule's state carried."""

    def destroy(self) -> None: ...
