"""How a model's layers are split over pipeline stages, as megatron-core 0.16.1 splits them.

megatron-core takes ``num_layers_in_first_pipeline_stage`` and
``num_layers_in_last_pipeline_stage`` (either or both; every stage they name
holds at least one layer) and splits the remaining layers evenly over the
middle stages (transformer_config.py:1360-1430); without them every stage holds
``num_layers / pp``. mgrow describes a split as the tuple of per-stage layer
counts. When a model names no split and ``pp`` does not divide its layers,
mgrow picks the most balanced split megatron accepts: the smallest largest
stage, then the fewest layers on the last stage (which also computes the
output layer and the loss), then on the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mgrow.core.errors import ConfigError

FIRST, LAST = "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"


@dataclass(frozen=True)
class StageSplit:
    layers: tuple[int, ...]  # layers on each pipeline stage

    @property
    def pp(self) -> int:
        return len(self.layers)

    @property
    def num_layers(self) -> int:
        return sum(self.layers)

    @property
    def is_even(self) -> bool:
        return len(set(self.layers)) == 1

    def stage_of(self, layer: int) -> int:
        """The stage holding global layer ``layer`` (0-based)."""
        end = 0
        for stage, count in enumerate(self.layers):
            end += count
            if layer < end:
                return stage
        raise IndexError(f"layer {layer} of a {self.num_layers}-layer split")

    def megatron_kwargs(self) -> dict:
        """The TransformerConfig keys that make megatron build this split (None, None when it is even)."""
        if self.is_even:
            return {FIRST: None, LAST: None}
        return {FIRST: self.layers[0], LAST: self.layers[-1]}


def split(num_layers: int, pp: int, first: Optional[int] = None, last: Optional[int] = None,
          where: str = "model") -> StageSplit:
    """The split megatron-core makes of ``num_layers`` over ``pp`` stages with these first/last counts (None:
    even, or, when pp does not divide the layers, the most balanced split megatron accepts)."""
    if num_layers < pp:
        raise ConfigError(f"{where}.num_layers", f"{num_layers} layers cannot fill {pp} pipeline stages "
                                                 "(every stage holds at least one layer)")
    if first is None and last is None:
        if num_layers % pp == 0:
            return StageSplit((num_layers // pp,) * pp)
        return _balanced(num_layers, pp)
    if pp == 1:
        raise ConfigError(f"{where}.{FIRST if first is not None else LAST}",
                          "a first/last pipeline stage size needs pipeline parallel size > 1")
    for key, value in ((FIRST, first), (LAST, last)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{where}.{key}", f"must be a positive integer, got {value!r}")
    middle_layers, middle_stages = num_layers - (first or 0) - (last or 0), pp - (first is not None) - (last is not None)
    if middle_stages == 0:
        if middle_layers != 0:
            raise ConfigError(f"{where}.{FIRST if first is not None else LAST}",
                              f"first {first} + last {last} layers must be all {num_layers} layers at pp = {pp}")
        return StageSplit(tuple(v for v in (first, last) if v is not None))
    if middle_layers < middle_stages or middle_layers % middle_stages:
        raise ConfigError(f"{where}.{FIRST if first is not None else LAST}",
                          f"the {middle_layers} layers left for the {middle_stages} other stages must split evenly, "
                          "at least one each (megatron-core's rule)")
    middle = (middle_layers // middle_stages,) * middle_stages
    return StageSplit(((first,) if first is not None else ()) + middle + ((last,) if last is not None else ()))


def _balanced(num_layers: int, pp: int) -> StageSplit:
    best = None
    for first in range(1, num_layers + 1):
        for last in range(1, num_layers - first + 1):
            rest, stages = num_layers - first - last, pp - 2
            if (stages == 0 and rest) or (stages and (rest < stages or rest % stages)):
                continue
            layers = (first,) + (rest // stages,) * stages + (last,) if stages else (first, last)
            key = (max(layers), last, first)
            if best is None or key < best[0]:
                best = (key, layers)
    if best is None:  # pp == 1 never gets here (it divides); nothing else is left unsplittable
        raise ConfigError("model.num_layers", f"{num_layers} layers have no pipeline split over {pp} stages")
    return StageSplit(best[1])
