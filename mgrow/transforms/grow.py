"""``grow_job``: grow a running job's model and optimizer state in memory, on every rank, all or nothing.

read the live model -> validate the plan and the job -> build the grown stage
-> move weights (one full parameter at a time) -> rebuild the job around it
with its own settings, carrying the LR schedule -> (bf16: set its fp32 masters)
-> move Adam moments -> hand back. The job is any :class:`GrowableJob`: a
user's megatron-core objects (:mod:`mgrow.megatron`), a user's DeepSpeed engine
(:mod:`mgrow.deepspeed`) or mgrow's own trainer engine (:func:`grow`). The old
job is not touched until every rank has succeeded: a failure on any rank (an exception in its local work) is agreed on
once per phase (the weights, the optimizer state; a rank that failed goes on with the phase's collectives only),
raised on every rank as :class:`GrowthError` naming where each failed rank failed, and every rank keeps its old
model and optimizer bit for bit.

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

import time
from dataclasses import dataclass
from typing import Optional

import torch

from mgrow.core import faults, memory
from mgrow.core.errors import ConfigError, GrowthError
from mgrow.core.model_config import ModelConfig
from mgrow.core.parameters import parameter_shapes
from mgrow.core.plan import Plan, load_plan
from mgrow.core.tolerances import preservation_tol
from mgrow.engine.model import by_global_name, largest_abs
from mgrow.engine.protocols import GrowableJob
from mgrow.ops import carry_moment
from mgrow.ops.plan import free_values, grow_one, original_source, steps as bind_steps
from mgrow.parallel import collectives
from mgrow.parallel import layout as layout_table
from mgrow.parallel.optimizer_state import MOMENTS
from mgrow.parallel.shards import gather_tp, move_between_stages, shard_rows, source_stage, take_shard
from mgrow.transforms.agreement import Agreement, PhaseFailure, RngState, agreed_step
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
    model_before: Optional[ModelConfig] = None  # read from the live model
    model_after: Optional[ModelConfig] = None
    stages_before: Optional[tuple] = None  # layers on each pipeline stage (mgrow.core.stages)
    stages_after: Optional[tuple] = None


def grow_job(job: GrowableJob, plan, *, check_tokens: Optional[torch.Tensor] = None, keep_old: bool = False,
             optimizer_state: str = "keep", masked: bool = False):
    """Grow a running job (:class:`~mgrow.engine.protocols.GrowableJob`) by ``plan``; returns (new job, report).

    The model is described from the live model (never from a retyped config), the
    plan and the job's ability to rebuild itself are checked against it on every
    rank before anything is built, and the old job is only read until every rank
    has succeeded. ``check_tokens`` ([b, s] token ids, the same on every TP/PP
    rank): logits before and after are compared on them. ``keep_old``: leave the
    old job usable (tests compare against it); otherwise it is destroyed once
    growth has succeeded. ``optimizer_state``: ``keep`` carries Adam's moments and
    step through the index maps, ``reset`` starts a fresh Adam on the grown model.
    ``masked``: masked structural growth (:mod:`mgrow.transforms.masks`): every
    new entry a mask covers is drawn at random, and the report's ``masks`` (hooks
    on the new model at m = 0) keep the function.
    """
    if optimizer_state not in ("keep", "reset"):
        raise ConfigError("optimizer_state", f"must be keep | reset, got {optimizer_state!r}")
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    dims = job.dims
    agree = Agreement(dims)
    old_cfg = agree.validate("reading the live model", job.describe)
    steps = agree.validate("checking the plan", lambda: _bound_steps(plan, old_cfg, dims))
    grown = steps[-1].grown
    agree.validate("checking the job can be rebuilt", lambda: job.check_rebuild(grown))

    before = job.logits(check_tokens) if check_tokens is not None else None
    memory.device_reset_peak(dims.device)
    start = time.perf_counter()
    rng_state = RngState(dims)
    new_job = None
    try:
        new_model = agree.run("build", lambda: job.build_model(grown))
        mover = _Mover(steps, free_values(plan, old_cfg), old_cfg, dims, agree, masked)
        mover.weights(job, new_model)
        rng_state.restore()  # building consumed random numbers; training continues on the same stream
        new_job = agree.run("rebuild", lambda: job.rebuild(new_model, grown))
        if grown.bf16:
            agree.run("fp32 masters", lambda: mover.set_masters(new_job))
        if optimizer_state == "keep":
            mover.moments(job, new_job)
        if masked:
            growth_masks = agree.run("masks", lambda: GrowthMasks.install(new_job.module, plan, old_cfg, dims))
    except BaseException:
        if new_job is not None:
            new_job.destroy()
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
        diff = _max_abs_diff(dims, before, new_job.logits(check_tokens))
        scale = collectives.reduce_scalar(dims, 0.0 if before is None else largest_abs(before.float()), "max")
        tol = preservation_tol(scale, grown.num_layers, grown.bf16)
        if not diff <= tol:  # also a NaN or an infinity, before or after
            new_job.destroy()
            raise GrowthError(f"growth failed its own check: the logits on the held batch moved by {diff:.3g} "
                              f"(largest logit before {scale:.3g}, tolerance {tol:.3g}); every rank keeps its old "
                              "model and optimizer")
    if not keep_old:
        job.destroy()
    report = GrowthReport(old_cfg.num_parameters(), grown.num_parameters(), seconds, diff, plan.to_dict(),
                          growth_masks if masked else None, peak, old_cfg, grown,
                          old_cfg.stage_split(dims.pp).layers, grown.stage_split(dims.pp).layers)
    return new_job, report


def _bound_steps(plan: Plan, old_cfg: ModelConfig, dims):
    """The plan's steps on this model; refuses an impossible plan, or a grown model the layout cannot hold."""
    steps = bind_steps(plan, old_cfg)
    try:
        steps[-1].grown.check_layout(dims.tp, dims.pp)
    except ConfigError as error:
        raise ConfigError("plan", f"the grown model does not fit tp={dims.tp}, pp={dims.pp}: {error}") from None
    return steps


def grow(engine, cfg, plan, **options):
    """Grow mgrow's own training engine (``cfg``: its training config, which may carry new batch sizes for the
    new engine); returns (new engine, new config, report). The same growth as :func:`grow_job` (the engines'
    ``describe`` also checks that the config's model is the live one)."""
    previous = engine.cfg
    engine.cfg = cfg
    try:
        new_engine, report = grow_job(engine, plan, **options)
    except BaseException:
        engine.cfg = previous
        raise
    return new_engine, new_engine.cfg, report


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
            layout = layout_table.layout_of(source, self.old_cfg)
            return gather_tp(state.master(old[source]), layout, self.dims)

        failure = PhaseFailure()
        for name in self.new_shapes:
            source, holders, destinations = self._route(name)
            full = None if source is None else self._gathered(source, holders, destinations, read)
            if self.dims.stage in destinations and not failure.failed:
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
                    failure.record(name, caught)
        self.agree.check_phase(failure, "weights")

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

        failure = PhaseFailure()
        for name in self.new_shapes:
            source, holders, destinations = self._route(name)
            if source is None:
                continue  # a new tensor: its moments stay 0
            layout = layout_table.layout_of(source, self.old_cfg)
            for key in MOMENTS:
                read = lambda src: gather_tp(old_state.moment(old[src], key), layout, self.dims)  # noqa: E731
                full = self._gathered(source, holders, destinations, read)
                if self.dims.stage not in destinations or failure.failed:
                    continue
                try:
                    faults.growth_failure_point("moments", name)
                    tmap = self.maps[name][0]  # the weight's index map (weights pass)
                    grown = carry_moment(tmap, full, power=MOMENTS.index(key) + 1)
                    new_state.set_moment(new[name], key, self._my_shard(grown, name, tmap))
                except Exception as caught:  # noqa: BLE001
                    failure.record(name, caught)
        self.agree.check_phase(failure, "optimizer state")


def _max_abs_diff(dims, before, after) -> float:
    local = 0.0 if before is None else largest_abs(after.float() - before.float())
    return collectives.reduce_scalar(dims, local, "max")
