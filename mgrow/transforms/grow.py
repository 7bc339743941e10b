"""``grow``: grow a running job's model and optimizer state in memory, on every rank, all or nothing.

validate -> build the grown stage -> move weights (one full parameter at a
time) -> build the engine around it -> (bf16: set its fp32 masters) -> move
Adam moments -> carry the LR schedule -> hand back. The old engine is not
touched until every rank has succeeded: a failure on any rank (an exception in its local work) is agreed on
after every parameter, raised on every rank as :class:`GrowthError`, and every
rank keeps its old model and optimizer bit for bit.

Each grown parameter is made from one full old parameter: its holders gather
it over TP (and the optimizer assembles its DP pieces), send it to the new
owning stage if layers moved, and the owners run the reference operators on it
(:func:`mgrow.ops.plan.grow_one`) and keep their TP shard, taken after the one
documented permutation (:func:`mgrow.parallel.shards.shard_local`): old MLP units
and query groups stay on the TP rank that held them, new ones are dealt out
evenly, so the grown model computes every old partial sum in the same order.

In bf16 the full parameter read is the optimizer's fp32 master, and growth runs
on it in fp32; the new optimizer's masters are set to the grown fp32 shards and
the bf16 parameters to their rounding (the new optimizer alone would have made
its masters from the bf16 parameters, losing the masters' low bits).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import torch

from mgrow.core import faults, memory
from mgrow.core.errors import ConfigError
from mgrow.core.parameters import parameter_shapes
from mgrow.core.plan import Plan, load_plan
from mgrow.engine.engines import build_engine
from mgrow.engine.model import build_gpt, by_global_name
from mgrow.ops import carry_moment
from mgrow.ops.plan import free_values, grow_one, original_source, steps as bind_steps
from mgrow.parallel import collectives
from mgrow.parallel import layout as layout_table
from mgrow.parallel.optimizer_state import MOMENTS
from mgrow.parallel.shards import gather_tp, move_between_stages, shard_rows, source_stage, take_shard
from mgrow.transforms.agreement import Agreement, RngState, agreed_step
from mgrow.transforms.masks import GrowthMasks, free_masked_entries


@dataclass(frozen=True)
class GrowthReport:
    params_before: int
    params_after: int
    growth_seconds: float
    max_abs_logit_diff: Optional[float]  # on the check batch, None without one
    plan: dict
    masks: Optional[object] = None  # masked growth: this rank's GrowthMasks (mgrow.transforms.masks), at m = 0
    peak_device_bytes: Optional[int] = None  # CUDA: max over ranks of max_memory_allocated during growth


def grow(engine, cfg, plan, *, check_tokens: Optional[torch.Tensor] = None, keep_old: bool = False,
         optimizer_state: str = "keep", masked: bool = False):
    """Grow ``engine`` (a training config ``cfg``) by ``plan``; returns (new engine, new config, report).

    ``cfg`` may carry new batch sizes: the new engine is built with them.
    ``check_tokens`` ([b, s] token ids, the same on every TP/PP rank): logits
    before and after are compared on them. ``keep_old``: leave the old engine
    usable (tests compare against it); otherwise it is destroyed once growth has
    succeeded. ``optimizer_state``: ``keep`` carries Adam's moments and step
    through the index maps, ``reset`` starts a fresh Adam on the grown model.
    ``masked``: masked structural growth (:mod:`mgrow.transforms.masks`): every new entry a mask covers is drawn
    at random, and the report's ``masks`` (hooks on the new model at m = 0) keep the function.
    """
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    steps = bind_steps(plan, cfg.model)  # refuses an impossible plan on every rank, before anything changes
    grown = steps[-1].grown
    dims = engine.dims
    try:
        grown.check_layout(dims.tp, dims.pp)
    except ConfigError as error:
        raise ConfigError("plan", f"the grown model does not fit tp={dims.tp}, pp={dims.pp}: {error}") from None
    new_cfg = dataclasses.replace(cfg, model=grown)
    agree = Agreement(dims)

    before = engine.logits(check_tokens) if check_tokens is not None else None
    memory.device_reset_peak(dims.device)
    start = time.perf_counter()
    rng_state = RngState(dims)
    new_engine = None
    try:
        new_model = agree.run("build", lambda: build_gpt(grown, dims, initialize=False))
        mover = _Mover(steps, free_values(plan, cfg.model), cfg.model, dims, agree, masked)
        mover.weights(engine, new_model)
        rng_state.restore()  # building consumed random numbers; training continues on the same stream
        new_engine = agree.run("engine", lambda: build_engine(new_model, new_cfg, dims))
        if grown.bf16:
            agree.run("fp32 masters", lambda: mover.set_masters(new_engine))
        if optimizer_state == "keep":
            mover.moments(engine, new_engine)
        _carry_schedule(engine, new_engine)
        if masked:
            growth_masks = agree.run("masks", lambda: GrowthMasks.install(new_engine.module, plan, cfg.model, dims))
    except BaseException:
        if new_engine is not None:
            new_engine.destroy()
        rng_state.restore()
        raise
    if dims.is_cuda:
        torch.cuda.synchronize(dims.device)
    seconds = time.perf_counter() - start
    peak = memory.device_peak(dims.device)
    if peak is not None:
        peak = int(collectives.reduce_scalar(dims, peak, "max"))
    diff = None
    if check_tokens is not None:
        diff = _max_abs_diff(dims, before, new_engine.logits(check_tokens))
    if not keep_old:
        engine.destroy()
    report = GrowthReport(cfg.model.num_parameters(), grown.num_parameters(), seconds, diff, plan.to_dict(),
                          growth_masks if masked else None, peak)
    return new_engine, new_cfg, report


class _Mover:
    """The two passes over the grown model's parameters (global names, one fixed order on every rank)."""

    def __init__(self, steps, values, old_cfg, dims, agree: Agreement, masked: bool = False):
        self.steps, self.values, self.dims, self.agree = steps, values, dims, agree
        # masked growth draws the masked new entries from their own stream, after the plan's operators'
        self.mask_values = values.for_stream(len(steps)) if masked else None
        self.old_cfg, self.new_cfg = old_cfg, steps[-1].grown
        self.old_shapes = parameter_shapes(old_cfg)
        self.new_shapes = parameter_shapes(self.new_cfg)
        self.masters: dict[str, torch.Tensor] = {}  # bf16: this rank's grown fp32 shards, until set_masters
        # per grown parameter on this rank, from the weights pass: its index map and TP shard rows (the
        # moments follow the same map; recomputing it meant growing the weight again)
        self.maps: dict[str, tuple] = {}

    def _route(self, name: str):
        """(old source name or None, old holders, new holders) of grown parameter ``name``."""
        source = original_source(self.steps, name)
        holders = () if source is None else layout_table.stages_of(source, self.old_cfg, self.dims.pp)
        return source, holders, layout_table.stages_of(name, self.new_cfg, self.dims.pp)

    def _gathered(self, source, holders, destinations, read) -> Optional[torch.Tensor]:
        """The full old tensor ``read(source)``, on this rank if it is a destination."""
        needed = {source_stage(d, holders) for d in destinations}
        full = read(source) if self.dims.stage in needed else None
        return move_between_stages(full, self.old_shapes[source], holders, destinations, self.dims)

    def _my_shard(self, tensor, name, tmap):
        if name not in self.maps:
            old_shape = self.old_shapes[tmap.old_name] if tmap.old_name is not None else None
            self.maps[name] = (tmap, *shard_rows(name, tmap, old_shape, self.new_cfg, self.dims))
        _, layout, rows = self.maps[name]
        return take_shard(tensor, layout, rows, self.dims)

    def weights(self, engine, new_model) -> None:
        old = by_global_name(engine.module)
        state = engine.optimizer_state()
        new = by_global_name(new_model)

        def read(source):
            layout = layout_table.layout_of(source, self.old_cfg.gated_linear_unit)
            return gather_tp(state.master(old[source]), layout, self.dims)

        for name in self.new_shapes:
            source, holders, destinations = self._route(name)
            full = None if source is None else self._gathered(source, holders, destinations, read)
            error = None
            if self.dims.stage in destinations:
                try:
                    faults.growth_failure_point("weights", name)
                    faults.kill_point("growth", name)
                    tensor, tmap = grow_one(self.steps, self.values, name, full, self.dims.device)
                    if self.mask_values is not None:
                        tensor = free_masked_entries(name, tensor, tmap, self.mask_values)
                    shard = self._my_shard(tensor, name, tmap)
                    with torch.no_grad():
                        new[name].copy_(shard)
                    if self.new_cfg.bf16:
                        self.masters[name] = shard.clone()
                except Exception as caught:  # noqa: BLE001 (agreed on, then raised on every rank)
                    error = caught
            self.agree.check(error, f"weights of {name}")

    def set_masters(self, new_engine) -> None:
        """The new optimizer's fp32 masters from the grown fp32 shards (and the bf16 parameters from them)."""
        state = new_engine.optimizer_state()
        new = by_global_name(new_engine.module)
        for name in self.new_shapes:
            if name in self.masters:
                state.set_master(new[name], self.masters.pop(name))

    def moments(self, engine, new_engine) -> None:
        """Adam moments, one moment of one parameter at a time (m and v follow the weight's index map)."""
        old_state, new_state = engine.optimizer_state(), new_engine.optimizer_state()
        step = agreed_step(self.dims, old_state.step())
        if step is None:  # no optimizer step taken yet: the new optimizer starts fresh too
            return
        new_state.init(step)
        old = by_global_name(engine.module)
        new = by_global_name(new_engine.module)

        for name in self.new_shapes:
            source, holders, destinations = self._route(name)
            if source is None:
                continue  # a new tensor: its moments stay 0
            layout = layout_table.layout_of(source, self.old_cfg.gated_linear_unit)
            error = None
            for key in MOMENTS:
                read = lambda src: gather_tp(old_state.moment(old[src], key), layout, self.dims)  # noqa: E731
                full = self._gathered(source, holders, destinations, read)
                if self.dims.stage not in destinations or error is not None:
                    continue
                try:
                    faults.growth_failure_point("moments", name)
                    tmap = self.maps[name][0]  # the weight's index map (weights pass)
                    grown = carry_moment(tmap, full, power=MOMENTS.index(key) + 1)
                    new_state.set_moment(new[name], key, self._my_shard(grown, name, tmap))
                except Exception as caught:  # noqa: BLE001
                    error = caught
            self.agree.check(error, f"optimizer state of {name}")


def _carry_schedule(old, new) -> None:
    """The LR schedule continues where it was (and DeepSpeed's step counters with it)."""
    new.scheduler.num_steps = old.scheduler.num_steps
    new.scheduler.step(increment=0)
    for counter in ("global_steps", "global_samples"):
        if hasattr(getattr(old, "engine", None), counter):
            setattr(new.engine, counter, getattr(old.engine, counter))


def _max_abs_diff(dims, before, after) -> float:
    local = 0.0 if before is None else float((after.float() - before.float()).abs().max())
    return collectives.reduce_scalar(dims, local, "max")
