"""The growth schedule of a training config: when to grow, by which plan, and how training goes on.

```yaml
growth:
  - at_step: 200                 # after 200 optimizer steps (or at_tokens: 26214400, the first step at/after it)
    plan: {ops: [...], init: {...}}    # a plan mapping or the path of a plan YAML
    lr_warmup_steps: 50          # 0 (default): the LR schedule just continues
    optimizer_state: keep        # keep (default): Adam moments follow the index maps | reset: fresh Adam
    micro_batch_size: 8          # optional: new batch sizes from this event on
    global_batch_size: 64
    mask: {steps: 100}           # optional: masked growth (MSG): new units ramp in behind a mask over 100 steps
```

Events are validated in order against the model as the earlier events grew it,
and against the layout, before any process group exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from mgrow.core.errors import ConfigError
from mgrow.core.model_config import ModelConfig
from mgrow.core.plan import Plan, load_plan

OPTIMIZER_STATES = ("keep", "reset")
_MASK_KEYS = ("steps",)
_KEYS = ("at_step", "at_tokens", "plan", "lr_warmup_steps", "optimizer_state", "micro_batch_size",
         "global_batch_size", "mask")


@dataclass(frozen=True)
class GrowthEvent:
    plan: Plan
    at_step: Optional[int] = None
    at_tokens: Optional[int] = None
    lr_warmup_steps: int = 0
    optimizer_state: str = "keep"
    micro_batch_size: Optional[int] = None
    global_batch_size: Optional[int] = None
    mask: Optional["MaskSpec"] = None  # masked growth (mgrow.transforms.masks): m ramps 0 -> 1 over mask.steps

    def due(self, steps_done: int, tokens_done: int) -> bool:
        if self.at_step is not None:
            return steps_done >= self.at_step
        return tokens_done >= self.at_tokens


def parse(raw: Any, model: ModelConfig, tp: int, pp: int) -> tuple[GrowthEvent, ...]:
    """The ``growth`` section: a list of events, each checked against the model it will meet."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("growth", "must be a list of growth events")
    events, previous = [], None
    for index, entry in enumerate(raw):
        where = f"growth[{index}]"
        event = _parse_event(where, entry)
        try:
            grown = event.plan.validate(model)[-1]
        except ConfigError as error:
            raise ConfigError(f"{where}.plan.{error.field}", error.rule) from None
        try:
            grown.check_layout(tp, pp)
        except ConfigError as error:
            raise ConfigError(f"{where}.plan", f"the grown model breaks {error}") from None
        if previous is not None and _trigger(event) <= _trigger(previous) and _kind(event) == _kind(previous):
            raise ConfigError(f"{where}.{_kind(event)}", f"events must come in order: {_trigger(event)} is not "
                                                         f"after the previous event's {_trigger(previous)}")
        if (previous is not None and previous.mask is not None and _kind(event) == _kind(previous) == "at_step"
                and event.at_step < previous.at_step + previous.mask.steps):
            end = previous.at_step + previous.mask.steps
            raise ConfigError(f"{where}.at_step", f"{event.at_step} is inside the mask ramp of growth[{index - 1}] "
                                                  f"(steps {previous.at_step}..{end}); grow again at step >= {end}")
        events.append(event)
        previous, model = event, grown
    return tuple(events)


def final_model(model: ModelConfig, events: tuple[GrowthEvent, ...]) -> ModelConfig:
    for event in events:
        model = event.plan.validate(model)[-1]
    return model


def _parse_event(where: str, entry: Any) -> GrowthEvent:
    if not isinstance(entry, dict):
        raise ConfigError(where, "must be a mapping with at_step or at_tokens and plan")
    for key in entry:
        if key not in _KEYS:
            raise ConfigError(f"{where}.{key}", f"unknown key; a growth event takes {', '.join(_KEYS)}")
    if ("at_step" in entry) == ("at_tokens" in entry):
        raise ConfigError(f"{where}.at_step", "give exactly one of at_step and at_tokens")
    trigger = "at_step" if "at_step" in entry else "at_tokens"
    _positive(f"{where}.{trigger}", entry[trigger], minimum=1)
    if "plan" not in entry:
        raise ConfigError(f"{where}.plan", "required: a plan mapping or the path of a plan YAML")
    try:
        plan = load_plan(entry["plan"])
    except ConfigError as error:
        inner = "" if error.field == "plan" else f".{error.field}"  # "plan": the plan as a whole
        raise ConfigError(f"{where}.plan{inner}", error.rule) from None
    warmup = entry.get("lr_warmup_steps", 0)
    _positive(f"{where}.lr_warmup_steps", warmup, minimum=0)
    state = entry.get("optimizer_state", "keep")
    if state not in OPTIMIZER_STATES:
        raise ConfigError(f"{where}.optimizer_state", f"must be one of {' | '.join(OPTIMIZER_STATES)}, got {state!r}")
    for key in ("micro_batch_size", "global_batch_size"):
        if key in entry:
            _positive(f"{where}.{key}", entry[key], minimum=1)
    mask = None
    if "mask" in entry:
        mask = parse_mask(f"{where}.mask", entry["mask"])
    return GrowthEvent(plan=plan, at_step=entry.get("at_step"), at_tokens=entry.get("at_tokens"), mask=mask,
                       lr_warmup_steps=warmup, optimizer_state=state, micro_batch_size=entry.get("micro_batch_size"),
                       global_batch_size=entry.get("global_batch_size"))


@dataclass(frozen=True)
class MaskSpec:
    steps: int  # K: m = min(1, (step - grow_step) / K)


def parse_mask(where: str, raw: Any) -> Optional[MaskSpec]:
    """A growth event's ``mask`` mapping (``where`` is its field, e.g. ``growth[0].mask``)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(where, f"must be a mapping like {{steps: 100}}, got {raw!r}")
    for key in raw:
        if key not in _MASK_KEYS:
            raise ConfigError(f"{where}.{key}", f"unknown key; mask takes {', '.join(_MASK_KEYS)}")
    if "steps" not in raw:
        raise ConfigError(f"{where}.steps", "required: the number of steps over which the mask ramps from 0 to 1")
    steps = raw["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"{where}.steps", f"must be an integer >= 1, got {steps!r}")
    return MaskSpec(steps)


def with_batch(train, event: GrowthEvent):
    """The train section with the event's batch sizes (unchanged where the event gives none)."""
    changes = {k: getattr(event, k) for k in ("micro_batch_size", "global_batch_size") if getattr(event, k)}
    return dataclasses.replace(train, **changes)


def _kind(event: GrowthEvent) -> str:
    return "at_step" if event.at_step is not None else "at_tokens"


def _trigger(event: GrowthEvent) -> int:
    return event.at_step if event.at_step is not None else event.at_tokens


def _positive(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(field, f"must be an integer >= {minimum}, got {value!r}")
