"""The training loop of one rank: data -> engine step -> global loss, logged every N steps."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from mgrow.checkpoint.state import Progress, claimed_root, load, save
from mgrow.core import faults, memory
from mgrow.core.errors import ConfigError, TrainingStopped
from mgrow.core.model_config import ModelConfig
from mgrow.core.plan import load_plan
from mgrow.engine.engines import build_engine, global_mean_loss
from mgrow.engine.model import all_finite, build_gpt
from mgrow.parallel import collectives
from mgrow.parallel.dims import ParallelDims, init_distributed
from mgrow.train.config import TrainConfig, run_models, with_pipeline_split
from mgrow.train.data import TokenWindows, ensure_corpus
from mgrow.train.metrics import RunLog
from mgrow.train.resume import find_resume
from mgrow.train.schedule import with_batch
from mgrow.train.warm_start import explicit_init
from mgrow.transforms import estimate
from mgrow.transforms.grow import grow
from mgrow.transforms.masks import GrowthMasks, MaskRamp
from mgrow.transforms.transfer import apply as transfer
from mgrow.transforms.transfer.freeze import rule_for_run


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_second: float = 0.0


class Batches:
    """This DP rank's micro-batches of global step ``step`` (same global batch on every layout).

    Steps from ``first_step`` on read the stream from sample ``first_sample``: a
    batch-size change at a growth event continues the stream where it was.
    Batches are CPU tensors, pinned on a CUDA rank so the engine's copy to the GPU
    does not block.
    """

    def __init__(self, windows: TokenWindows, cfg: TrainConfig, dims: ParallelDims, first_step: int = 0,
                 first_sample: int = 0):
        t = cfg.train
        self.windows, self.mbs, self.gbs = windows, t.micro_batch_size, t.global_batch_size
        self.per_rank = t.global_batch_size // dims.dp
        self.offset = dims.dp_rank * self.per_rank
        self.first_step, self.first_sample = first_step, first_sample
        self.dims, self.pin = dims, dims.is_cuda

    def start(self, step: int) -> int:
        """The stream position (in samples) of global step ``step``."""
        return self.first_sample + (step - self.first_step) * self.gbs

    def __call__(self, step: int) -> list[torch.Tensor]:
        samples = self.windows.samples(self.start(step) + self.offset, self.per_rank)
        if self.pin:
            samples = samples.pin_memory()
        return list(samples.split(self.mbs))


def train(cfg: TrainConfig, dims: ParallelDims | None = None, log=print) -> TrainResult:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.check_world(world)  # refuse before any process group exists
    resume = find_resume(cfg)  # a bad checkpoint is refused here too, on every rank
    start = cfg if resume is None else resume.cfg
    start = dataclasses.replace(start, model=with_pipeline_split(start.model, start.parallel, resume is not None))
    if cfg.data.sources:
        ensure_corpus(cfg.data.path, cfg.data.sources)
    p = cfg.parallel
    dims = dims or init_distributed(p.tp, p.pp, cfg.train.seed, timeout_s=60 * p.timeout_minutes, device=p.device,
                                    backend=p.backend)
    models = run_models(start, 0 if resume is None else resume.progress.growth_applied)
    _check_memory(start, models, dims)
    if start.checkpoint.save is None:
        return _train(start, dims, resume, log)
    need = max(model.checkpoint_bytes() for model in models)  # room for the run's largest model
    with claimed_root(start.checkpoint.save, "checkpoint.save", need, dims):  # writable, this job's alone
        return _train(start, dims, resume, log)


def _check_memory(cfg: TrainConfig, models: list, dims: ParallelDims) -> None:
    """Before the first step: the model, and each growth event's peak (the old state and the growth's transient,
    :mod:`mgrow.transforms.estimate`, the model ``mgrow plan`` uses), fit in every rank's memory on the rank
    that needs the most; refused on every rank otherwise. ``models``: the model the job starts from, then the
    one after each growth event still to come."""
    local_ranks = 1 if dims.is_cuda else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    least = min(collectives.gather_objects(memory.available_bytes(dims.device, local_ranks)))  # the same on all
    layout = estimate.JobLayout(dims.tp, dims.pp, dims.dp, cfg.optimizer.type)
    applied = len(cfg.growth) - (len(models) - 1)  # events already in the model the job starts from
    first = estimate.shard_elements(models[0], dims.tp, dims.pp).values()
    needs = [("model", "the model needs",
              max(sum(estimate.state_bytes(e, models[0].bf16, layout).values()) for e in first))]
    for index, (old, new) in enumerate(zip(models, models[1:])):
        peak = max(rank.peak_bytes for rank in estimate.memory(old, new, layout).values())
        needs.append((f"growth[{applied + index}].plan", "growing needs", peak))
    for field_name, what, need in needs:
        if need > least:
            during = ", the old model and the growth's transient at once" if field_name != "model" else ""
            raise ConfigError(field_name, f"{what} about {need / 2**30:.1f} GiB on each rank (weights, gradients "
                                          f"and Adam state{during}); a rank has {least / 2**30:.1f} GiB available")


def _train(cfg: TrainConfig, dims: ParallelDims, resume, log) -> TrainResult:
    progress = Progress() if resume is None else resume.progress
    t = cfg.train
    train_batches = Batches(TokenWindows(cfg.data.path, "train", t.seq_length, t.seed), cfg, dims,
                            progress.first_step, progress.first_sample)
    valid_batches = Batches(TokenWindows(cfg.data.path, "valid", t.seq_length, t.seed), cfg, dims)

    leader = dims.rank == 0
    # Before the engine: DeepSpeed's own W&B monitor then logs into this run instead of starting one in cwd.
    metrics = (RunLog(t.metrics_path, cfg.wandb, cfg.to_dict(), append=resume is not None) if leader
               else RunLog(None, None, {}))
    init = None
    if t.init == "explicit" and resume is None:
        init = explicit_init(cfg.model, t.seed, cfg.data.path, dims)
    model = build_gpt(cfg.model, dims, seed=t.seed, init=init)
    transferred = None if cfg.transfer is None else transfer.prepare(
        model, cfg, resume is not None, valid_batches(0)[0][:, :-1].contiguous(), dims)
    engine = build_engine(model, cfg, dims)
    if resume is not None:
        load(engine, resume.folder, resume.metadata)
    unfreeze_rule = rule_for_run(engine, cfg)
    if leader:
        log(
            f"mgrow: {cfg.model.num_parameters():,} parameters | tp={dims.tp} pp={dims.pp} dp={dims.dp} "
            + (f"(stages of {list(cfg.model.stage_split(dims.pp).layers)} layers) " if dims.pp > 1 else "")
            + f"| {dims.device.type} ({dims.backend}) | optimizer {cfg.optimizer.type} "
            f"| global batch {t.global_batch_size} x {t.seq_length} tokens"
        )
        if resume is not None:
            log(f"mgrow: resumed from {resume.folder} at step {progress.step} "
                f"({progress.growth_applied} growth events applied)")
        if transferred is not None:
            log(f"mgrow: transferred {transferred['tensors']} tensors ({', '.join(transferred['components'])}) "
                f"from {transferred['source']}{' (frozen)' if transferred['frozen'] else ''}; max-abs logit "
                f"difference to its model {transferred['max_abs_logit_diff']}")
    if transferred is not None:
        metrics.write(**transferred)
    progress_bar = _progress(t.steps, progress.step) if leader and t.progress else None
    result = TrainResult()
    events = list(cfg.growth)[progress.growth_applied:]
    held = valid_batches(0)  # the held batch every growth event is checked on
    ramp = _resume_mask_ramp(engine, progress.mask_ramp)
    window_start, window_steps = time.perf_counter(), 0
    for step in range(progress.step, t.steps):
        tokens_done = train_batches.start(step) * t.seq_length
        while events and events[0].due(step, tokens_done):
            event = events.pop(0)
            if ramp is not None:
                raise ConfigError(f"growth[{progress.growth_applied}]", f"due at step {step}, inside the mask ramp "
                                  f"of the previous event (steps {ramp.start}..{ramp.start + ramp.steps}); "
                                  "schedule it after the ramp")
            old_model = cfg.model
            engine, cfg, record, masks = grow_at(event, engine, cfg, held, step, tokens_done)
            if masks is not None:
                ramp = MaskRamp(masks, step, event.mask.steps)
                progress.mask_ramp = {"start": step, "steps": event.mask.steps, "plan": record["plan"],
                                      "model": old_model.to_dict()}
            train_batches = Batches(train_batches.windows, cfg, dims, step, train_batches.start(step))
            t = cfg.train
            progress.growth_applied += 1
            progress.first_step, progress.first_sample = train_batches.first_step, train_batches.first_sample
            progress.rewarm = (step, event.lr_warmup_steps) if event.lr_warmup_steps else None
            progress.history.append({"step": step, "plan": record["plan"], "source": "schedule"})
            metrics.write(**record)
            if leader:
                log(f"step {step:>5}/{t.steps} | grew {record['params_before']:,} -> {record['params_after']:,} "
                    f"parameters in {record['growth_seconds']:.2f} s | held-batch loss "
                    f"{record['held_loss_before']:.6f} -> {record['held_loss_after']:.6f}"
                    + (f" | pipeline stages {record['stages_before']} -> {record['stages_after']} layers"
                       if dims.pp > 1 and record["stages_before"] != record["stages_after"] else ""))
        if progress.rewarm is not None:
            since, length = step - progress.rewarm[0], progress.rewarm[1]
            engine.scale_lr(min(1.0, (since + 1) / length))
            progress.rewarm = progress.rewarm if since + 1 < length else None
        mask = None
        if ramp is not None:
            mask = ramp.before_step(step)
            if ramp.done:
                ramp, progress.mask_ramp = None, None
        faults.kill_point("train", step + 1)
        loss = global_mean_loss(engine.train_step(train_batches(step)), dims)  # the same on every rank
        if not math.isfinite(loss):
            raise TrainingStopped(f"step {step + 1}: the training loss is {loss}; stopped before logging or saving "
                                  "it (the last checkpoint, if any, holds the last finite state)")
        if collectives.any_rank(dims, not all_finite(engine.module)):  # what a NaN or infinite gradient leaves
            raise TrainingStopped(f"step {step + 1}: the update made the model's weights non-finite (a NaN or "
                                  "infinite gradient?); stopped before saving them (the last checkpoint, if any, "
                                  "holds the last finite state)")
        progress.step = step + 1
        result.losses.append(loss)
        unfrozen = unfreeze_rule.after_step(engine, step + 1, loss) if unfreeze_rule is not None else None
        if unfrozen is not None:
            unfreeze_rule = None
            metrics.write(**unfrozen)
            if leader:
                log(f"step {step + 1:>5}/{t.steps} | unfroze the transferred weights (mean loss over "
                    f"{unfrozen['window']} steps improved by {unfrozen['loss_improvement']:.4f})")
        window_steps += 1
        if progress_bar:
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{loss:.4f}")
        logged = (step + 1) % t.log_interval == 0 or step + 1 == t.steps
        if logged:
            elapsed = time.perf_counter() - window_start
            result.tokens_per_second = window_steps * t.global_batch_size * t.seq_length / elapsed
        metrics.write(step=step + 1, loss=loss, lr=engine.lr(), tokens=train_batches.start(step + 1) * t.seq_length,
                      params=cfg.model.num_parameters(), **({"mask": mask} if mask is not None else {}),
                      **({"tokens_per_second": result.tokens_per_second} if logged else {}))
        if logged:
            if leader:
                log(
                    f"step {step + 1:>5}/{t.steps} | loss {loss:.4f} | lr {engine.lr():.3e} "
                    f"| {result.tokens_per_second:,.0f} tokens/s"
                )
            window_start, window_steps = time.perf_counter(), 0
        if (t.eval_interval and (step + 1) % t.eval_interval == 0) or step + 1 == t.steps:
            eval_loss = evaluate(engine, valid_batches, t.eval_batches)
            result.eval_losses.append((step + 1, eval_loss))
            metrics.write(step=step + 1, validation_loss=eval_loss)
            if leader:
                log(f"step {step + 1:>5}/{t.steps} | validation loss {eval_loss:.4f}")
        if _save_due(cfg, step + 1):
            folder = save(engine, cfg, progress, cfg.checkpoint.save)
            if leader:
                log(f"step {step + 1:>5}/{t.steps} | saved {folder}")
            window_start = time.perf_counter()
    if progress_bar:
        progress_bar.close()
    metrics.close()
    engine.destroy()  # lets the model, its optimizer and its groups go when the caller goes on in this process
    return result



def _save_due(cfg: TrainConfig, steps_done: int) -> bool:
    c = cfg.checkpoint
    if c.save is None:
        return False
    return steps_done == cfg.train.steps or bool(c.interval and steps_done % c.interval == 0)


def _resume_mask_ramp(engine, saved):
    """The mask ramp a checkpoint was saved in (None: none): its hooks rebuilt from the event's plan and the
    model before it; the masked weights themselves are in the checkpoint."""
    if saved is None:
        return None
    plan, old = load_plan(saved["plan"]), ModelConfig.from_dict(saved["model"])
    masks = GrowthMasks.install(engine.module, plan, old, engine.dims)
    return MaskRamp(masks, saved["start"], saved["steps"])


def grow_at(event, engine, cfg: TrainConfig, held: list[torch.Tensor], step: int, tokens: int):
    """Apply one growth event; (new engine, new config, the event's metrics record, the mask hooks of a
    masked event at m = 0 or None)."""
    dims = engine.dims
    before = global_mean_loss(engine.eval_step(held), dims)
    event_cfg = dataclasses.replace(cfg, train=with_batch(cfg.train, event))
    engine, new_cfg, report = grow(engine, event_cfg, event.plan, check_tokens=held[0][:, :-1].contiguous(),
                                   optimizer_state=event.optimizer_state, masked=event.mask is not None)
    after = global_mean_loss(engine.eval_step(held), dims)
    record = dict(event="growth", step=step, tokens=tokens, plan=report.plan, params_before=report.params_before,
                  params_after=report.params_after, max_abs_logit_diff=report.max_abs_logit_diff,
                  stages_before=list(report.stages_before), stages_after=list(report.stages_after),
                  held_loss_before=before, held_loss_after=after, growth_seconds=report.growth_seconds,
                  peak_rss_bytes=memory.rss_peak_process(), peak_device_bytes=report.peak_device_bytes,
                  optimizer_state=event.optimizer_state,
                  global_batch_size=new_cfg.train.global_batch_size,
                  **({"mask_steps": event.mask.steps} if event.mask is not None else {}))
    return engine, new_cfg, record, report.masks


def evaluate(engine, batches: Batches, count: int) -> float:
    return sum(global_mean_loss(engine.eval_step(batches(i)), engine.dims) for i in range(count)) / count


def _progress(total: int, done: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="train", file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=None)
