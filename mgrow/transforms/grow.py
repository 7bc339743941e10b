"""``grow_job``: grow a running job's model and optimizer state in memory, on every rank, all or nothing.

read the live model -> validate the plan and the job -> build the grown stage
-> decide every move once (:mod:`mgrow.transforms.moves`) -> move weights ->
rebuild the job around them with its own settings, carrying the LR schedule
-> (bf16: set its fp32 masters) -> move Adam moments -> hand back. The job is
any :class:`GrowableJob`: a user's megatron-core objects (:mod:`mgrow.megatron`),
a user's DeepSpeed engine (:mod:`mgrow.deepspeed`) or mgrow's own trainer
engine (:func:`grow`). The old job is not touched until every rank has
succeeded: a failure on any rank (an exception in its local work) is agreed on
once per phase (the weights, the optimizer state; a rank that failed goes on
with the phase's collectives only), raised on every rank as
:class:`GrowthError` naming where each failed rank failed, and every rank keeps
its old model and optimizer bit for bit.

Each TP rank grows its own shard from its own old shard (:func:`mgrow.ops.plan.grow_one`
with the table's rows): the documented permutation
(:func:`mgrow.parallel.layout.shard_local_order`) keeps old MLP units and query
groups on the TP rank that held them and deals new ones out evenly, so the
grown model computes every old partial sum in the same order, and the free
entries are counter-based draws, so a shard's are the full draw's. The
optimizer's pieces of the old shards are read in bulk (one DP collective per
chunk of the table per tensor kind), layers that change stage are sent peer to
peer once per pass, and only parameters whose query groups megatron splits over
several TP ranks are gathered over TP and grown whole.

In bf16 the shard read is the optimizer's fp32 master, and growth runs
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
from mgrow.core.plan import Plan, load_plan
from mgrow.core.tolerances import preservation_tol
from mgrow.engine.model import by_global_name, largest_abs
from mgrow.engine.protocols import GrowableJob
from mgrow.ops import carry_moment
from mgrow.ops.plan import free_values, grow_one, steps as bind_steps
from mgrow.parallel import collectives
from mgrow.parallel import layout as layout_table
from mgrow.parallel.optimizer_state import MOMENTS
from mgrow.parallel.shards import gather_tp, move_between_stages, shard_rows, take_shard
from mgrow.parallel.traffic import Traffic
from mgrow.transforms import estimate, moves
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
    # this rank's stage-to-stage bytes per tensor pass and gathered parameters, from the table of moves
    planned_traffic: Optional[dict] = None
    # what this rank's mover sent and received (mgrow.parallel.traffic's report), over every pass
    moved_traffic: Optional[dict] = None


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
                          old_cfg.stage_split(dims.pp).layers, grown.stage_split(dims.pp).layers,
                          mover.table.planned_bytes(), mover.traffic.report())
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
    """Executes the table of moves (:mod:`mgrow.transforms.moves`) for the weights, then for each Adam moment.

    Each pass goes through the table in chunks (the same on every rank): every
    stage reads the old shards of its sources in the chunk in one bulk read
    (one DP collective where the optimizer splits them over DP), sends the ones
    whose layers change stage to their new stage peer to peer, and grows its
    grown shards locally; gathered parameters (:class:`~mgrow.transforms.moves.Move`
    ``local`` False) are all-gathered over TP and grown whole.
    """

    def __init__(self, steps, values, old_cfg, dims, agree: Agreement, masked: bool = False):
        self.steps, self.values, self.dims, self.agree = steps, values, dims, agree
        # masked growth draws the masked new entries from their own stream, after the plan's operators'
        self.mask_values = values.for_stream(len(steps)) if masked else None
        self.old_cfg, self.new_cfg = old_cfg, steps[-1].grown
        self.table = agree.validate("deciding the moves", lambda: moves.build(steps, old_cfg, dims))
        self.masters: dict[str, torch.Tensor] = {}  # bf16: this rank's grown fp32 shards, until set_masters
        # per grown parameter on this rank, from the weights pass: its index map (local, or full for a gathered
        # parameter); the moments follow the same map
        self.maps: dict = {}
        # what the chunk loops send and receive (counted on the wire; the dry run predicts it from the table)
        self.traffic = Traffic()

    def _old_shards(self, chunk, old_params, read):
        """name -> this rank's old shard of each source this stage holds and some destination needs, in one bulk
        read (the transient memory of a phase is one chunk of one tensor kind plus the grown shards)."""
        wanted = estimate.read_moves(chunk, self.dims.stage)
        tensors = read([old_params[m.source] for m in wanted])
        return {m.name: tensor for m, tensor in zip(wanted, tensors)}

    def _source_for(self, move, shards):
        """This rank's input for ``move``: the old shard (local), or the full old tensor (gathered); sent to the
        destination stages that do not hold it. None where this rank's stage is not a destination."""
        dims, stage = self.dims, self.dims.stage
        if move.source is None:
            return None
        tensor = shards.get(move.name)
        if not move.local:  # gathered: the holders all-gather over TP, then the full tensor travels
            full = gather_tp(tensor, layout_table.layout_of(move.source, self.old_cfg), dims) \
                if tensor is not None else None
            return move_between_stages(full, move.old_shape, move.holders, move.destinations, dims)
        for destination in move.sends(stage):
            collectives.send(dims, tensor, dims.stage_peers[destination])
        peer = move.receives(stage)
        if peer is not None:
            return collectives.recv(dims, move.old_shard_shape, torch.float32, dims.stage_peers[peer])
        return tensor if stage in move.destinations else None

    def _real_rows(self, move, shard):
        """The shard's real rows (a padded vocabulary's padding rows dropped)."""
        if move.old_padding and shard is not None:
            return shard.narrow(move.rows.dim, 0, shard.shape[move.rows.dim] - move.old_padding)
        return shard

    def _padded(self, move, shard):
        if not move.new_padding:
            return shard
        pad = list(shard.shape)
        pad[move.rows.dim] = move.new_padding
        return torch.cat([shard, shard.new_zeros(pad)], dim=move.rows.dim)

    def _grow_weight(self, move, source):
        """This rank's grown shard of ``move`` and the map the moments follow."""
        if move.local:
            tensor, tmap = grow_one(self.steps, self.values, move.name, self._real_rows(move, source),
                                    self.dims.device, move.rows)
            if self.mask_values is not None:
                tensor = free_masked_entries(move.name, tensor, tmap, self.mask_values, move.new_shape, move.rows)
            return self._padded(move, tensor), tmap
        tensor, tmap = grow_one(self.steps, self.values, move.name, source, self.dims.device)
        if self.mask_values is not None:
            tensor = free_masked_entries(move.name, tensor, tmap, self.mask_values)
        return self._gathered_shard(move, tensor, tmap), tmap

    def _gathered_shard(self, move, full, tmap):
        """A gathered parameter's shard of its full grown tensor (after the documented permutation)."""
        if move.name not in self.maps:
            self.maps[move.name] = (tmap, *shard_rows(move.name, tmap, move.old_shape, self.new_cfg, self.dims))
        _, layout, rows = self.maps[move.name]
        return take_shard(full, layout, rows, self.dims)

    def weights(self, engine, new_model) -> None:
        old = by_global_name(engine.module)
        state = engine.optimizer_state()
        new = by_global_name(new_model)
        failure = PhaseFailure()
        with self.traffic:
            self._weights(old, new, state, failure)
        self.agree.check_phase(failure, "weights")

    def _weights(self, old, new, state, failure) -> None:
        for chunk in estimate.chunks(self.table):
            shards = self._old_shards(chunk, old, state.read)
            for move in chunk:
                source = self._source_for(move, shards)
                if self.dims.stage not in move.destinations or failure.failed:
                    continue
                try:
                    faults.growth_failure_point("weights", move.name)
                    faults.kill_point("growth", move.name)
                    shard, tmap = self._grow_weight(move, source)
                    if move.local:
                        self.maps[move.name] = tmap
                    with torch.no_grad():
                        new[move.name].copy_(shard)
                    if self.new_cfg.bf16:
                        self.masters[move.name] = shard.clone()
                except Exception as caught:  # noqa: BLE001 (agreed on, then raised on every rank)
                    failure.record(move.name, caught)
            del shards

    def set_masters(self, new_engine) -> None:
        """The new optimizer's fp32 masters from the grown fp32 shards (and the bf16 parameters from them)."""
        state = new_engine.optimizer_state()
        new = by_global_name(new_engine.module)
        for move in self.table:
            if move.name in self.masters:
                state.set_master(new[move.name], self.masters.pop(move.name))

    def moments(self, engine, new_engine) -> None:
        """Adam moments, one moment kind at a time (m and v follow the weight's index map)."""
        old_state, new_state = engine.optimizer_state(), new_engine.optimizer_state()
        step = agreed_step(self.dims, old_state.step())
        if step is None:  # no optimizer step taken yet: the new optimizer starts fresh too
            return
        new_state.init(step)
        old = by_global_name(engine.module)
        new = by_global_name(new_engine.module)

        failure = PhaseFailure()
        with self.traffic:
            self._moments(old, new, old_state, new_state, failure)
        self.agree.check_phase(failure, "optimizer state")

    def _moments(self, old, new, old_state, new_state, failure) -> None:
        for key in MOMENTS:
            power = MOMENTS.index(key) + 1
            for chunk in estimate.chunks(self.table):
                shards = self._old_shards(chunk, old, lambda params: old_state.read(params, key))
                for move in chunk:
                    if move.source is None:
                        continue  # a new tensor: its moments stay 0
                    source = self._source_for(move, shards)
                    if self.dims.stage not in move.destinations or failure.failed:
                        continue
                    try:
                        faults.growth_failure_point("moments", move.name)
                        if move.local:
                            grown = carry_moment(self.maps[move.name], self._real_rows(move, source), power)
                            grown = self._padded(move, grown)
                        else:
                            tmap, layout, rows = self.maps[move.name]
                            grown = take_shard(carry_moment(tmap, source, power), layout, rows, self.dims)
                        new_state.set_moment(new[move.name], key, grown)
                    except Exception as caught:  # noqa: BLE001
                        failure.record(move.name, caught)
                del shards


def _max_abs_diff(dims, before, after) -> float:
    local = 0.0 if before is None else largest_abs(after.float() - before.float())
    return collectives.reduce_scalar(dims, local, "max")
