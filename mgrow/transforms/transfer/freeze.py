"""When to unfreeze transferred tensors: once the loss stops improving (the frozen groups themselves are
:mod:`mgrow.engine.param_groups`)."""

from __future__ import annotations

from typing import Optional

from mgrow.engine.param_groups import is_frozen, unfreeze


class UnfreezeRule:
    """Unfreeze once the mean loss of the last ``window`` steps is lower than the mean of the ``window``
    steps before by less than ``threshold`` (every rank sees the same global losses, so all agree).
    After a resume the windows start again from the resumed step."""

    def __init__(self, window: int, threshold: float, lr: float, min_lr: float):
        self.window, self.threshold, self.lr, self.min_lr = window, threshold, lr, min_lr
        self.losses: list[float] = []

    def improvement(self, loss: float) -> Optional[float]:
        """Record a step's loss; the window's improvement when it fell under the threshold, else None."""
        self.losses.append(loss)
        if len(self.losses) < 2 * self.window:
            return None
        before = sum(self.losses[-2 * self.window:-self.window]) / self.window
        last = sum(self.losses[-self.window:]) / self.window
        return before - last if before - last < self.threshold else None

    def after_step(self, engine, steps_done: int, loss: float) -> Optional[dict]:
        """Unfreeze when due; the metrics record of the unfreeze event, else None."""
        gain = self.improvement(loss)
        if gain is None:
            return None
        unfreeze(engine, self.lr, self.min_lr)
        return dict(event="unfreeze", step=steps_done, window=self.window, loss_improvement=gain,
                    threshold=self.threshold)


def rule_for_run(engine, cfg) -> Optional[UnfreezeRule]:
    """The unfreeze rule of a run whose transferred parameters are frozen now (None: nothing to unfreeze)."""
    t = cfg.transfer
    if t is None or not t.freeze or not is_frozen(engine):
        return None
    return UnfreezeRule(t.unfreeze_window, t.unfreeze_threshold, cfg.optimizer.lr, cfg.optimizer.min_lr)
