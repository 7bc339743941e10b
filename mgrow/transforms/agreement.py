"""All or nothing across ranks: the agreement after each unit of local work, and the RNG state to restore.

A transform (growth, fusion) does its local work in units (a step, or a phase
over every parameter: :class:`PhaseFailure`); after each unit every rank says
whether it failed, in one collective. If any rank did, every rank raises the
same :class:`~mgrow.core.errors.GrowthError` naming the failed ranks, where and
their errors, and keeps the objects it had: the transform builds new ones and
touches the old ones only to read them.
"""

from __future__ import annotations

from typing import Optional

import torch

from mgrow.core.errors import ConfigError, GrowthError, GrowthRefused
from mgrow.parallel import collectives


class Agreement:
    """After each unit of local work: did any rank fail? Then every rank raises the same GrowthError."""

    def __init__(self, dims, action: str = "growth"):
        self.dims, self.action = dims, action

    def check(self, error: Optional[BaseException], what: str) -> None:
        if not collectives.any_rank(self.dims, error is not None):
            return
        messages = collectives.gather_objects(None if error is None else f"{type(error).__name__}: {error}")
        failed = "; ".join(f"rank {rank}: {message}" for rank, message in enumerate(messages) if message)
        raise GrowthError(f"{self.action} failed at {what} ({failed}); every rank keeps its old model and "
                          "optimizer") from error

    def check_phase(self, failure: "PhaseFailure", phase: str) -> None:
        """One agreement for a whole phase of local work: each rank's first failure in it (if any). The error
        names the unit where the failed ranks failed (``<phase> of <unit>`` when they agree on one)."""
        if not collectives.any_rank(self.dims, failure.error is not None):
            return
        reports = collectives.gather_objects(None if failure.error is None else
                                             (failure.unit, f"{type(failure.error).__name__}: {failure.error}"))
        units = {report[0] for report in reports if report}
        if len(units) == 1:
            at = f"{phase} of {units.pop()}"
            failed = "; ".join(f"rank {rank}: {report[1]}" for rank, report in enumerate(reports) if report)
        else:
            at = phase
            failed = "; ".join(f"rank {rank}: {report[0]}: {report[1]}" for rank, report in enumerate(reports)
                               if report)
        raise GrowthError(f"{self.action} failed at {at} ({failed}); every rank keeps its old model and "
                          "optimizer") from failure.error

    def validate(self, what: str, fn):
        """``run`` for a check of the inputs: when every rank refused them with the same ConfigError, it is
        raised on every rank as :class:`GrowthRefused` (naming the field and the rule); any other failure is a
        GrowthError."""
        result, error = None, None
        try:
            result = fn()
        except Exception as caught:  # noqa: BLE001 (agreed on, then raised on every rank)
            error = caught
        if not collectives.any_rank(self.dims, error is not None):
            return result
        mine = f"{type(error).__name__}: {error}" if isinstance(error, ConfigError) else None
        if len(set(collectives.gather_objects(mine))) == 1 and mine is not None:
            raise GrowthRefused(error.field, error.rule) from error
        self.check(error, what)

    def run(self, what: str, fn):
        result, error = None, None
        try:
            result = fn()
        except Exception as caught:  # noqa: BLE001 (agreed on, then raised on every rank)
            error = caught
        self.check(error, what)
        return result


class PhaseFailure:
    """The first failure of this rank's local work in a phase (the rank goes on with the phase's collectives,
    doing no more local work, so every rank reaches the phase's one agreement)."""

    def __init__(self):
        self.unit: Optional[str] = None
        self.error: Optional[BaseException] = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def record(self, unit: str, error: BaseException) -> None:
        if self.error is None:
            self.unit, self.error = unit, error


class RngState:
    """torch's CPU generator, the device's CUDA generator and megatron's model-parallel RNG tracker, as they were:
    building a model draws random numbers, and training must go on from the same streams."""

    def __init__(self, dims):
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        self.device = dims.device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if dims.is_cuda else None
        self.tracker = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}

    def restore(self) -> None:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        get_cuda_rng_tracker().set_states({k: v.clone() for k, v in self.tracker.items()})


def agreed_step(dims, step: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The Adam step every rank continues from (a rank that owns no optimizer state has none of its own).

    A CPU tensor, as torch's Adam keeps its step (not capturable, not fused).
    """
    value = collectives.reduce_scalar(dims, -1.0 if step is None else float(step), "max")
    if value < 0:
        return None
    return torch.tensor(value, dtype=torch.float32, device="cpu")
