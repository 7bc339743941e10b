"""Failures on purpose, for the tests of the growth transaction, checkpoints and restarts.

Two hooks, both read from the environment, both inert unless set:

* ``MGROW_INJECT_GROWTH_FAILURE=RANK:PHASE:PARAMETER`` makes that rank raise while
  growing (or fusing) that parameter (PHASE: ``weights`` | ``moments``); the
  transaction must then leave every rank as it was.
* ``MGROW_INJECT_KILL=WHERE:WHAT[:RANK][,WHERE:WHAT[:RANK]...]`` kills that rank
  (default 1, or 0 in a one-rank job) with SIGKILL, as a node failure would:
  ``train:S`` before the update of step S, ``growth:PARAMETER`` while growth
  moves that parameter, ``save:S`` after the rank wrote its part of step S's
  checkpoint and before the folder is committed. The i-th entry applies to
  the i-th attempt of a torchrun job (``TORCHELASTIC_RESTART_COUNT`` = i), so
  one job can die several ways in turn and then finish.
"""

from __future__ import annotations

import os
import signal

GROWTH_FAILURE_ENV = "MGROW_INJECT_GROWTH_FAILURE"
KILL_ENV = "MGROW_INJECT_KILL"


def growth_failure_point(phase: str, name: str) -> None:
    import torch.distributed as dist

    target = os.environ.get(GROWTH_FAILURE_ENV)
    if target and target == f"{dist.get_rank()}:{phase}:{name}":
        raise RuntimeError(f"injected failure ({GROWTH_FAILURE_ENV}={target})")


def kill_point(where: str, what) -> None:
    targets = os.environ.get(KILL_ENV, "").split(",")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt >= len(targets) or not targets[attempt]:
        return
    import torch.distributed as dist

    parts = targets[attempt].split(":")
    rank = int(parts[2]) if len(parts) > 2 else min(1, dist.get_world_size() - 1)
    if parts[0] == where and parts[1] == str(what) and dist.get_rank() == rank:
        os.kill(os.getpid(), signal.SIGKILL)
