"""The three optimizer paths, each wrapping a GPTModel stage behind one small interface.

* ``adam``: megatron DDP + torch AdamW (megatron's ``get_megatron_optimizer``);
* ``megatron``: megatron DDP + Megatron's DistributedOptimizer (ZeRO-1 style);
* ``zero1|zero2|zero3``: a DeepSpeed engine with megatron's parallel_state as mpu
  (through the small adapter in ``ds_mpu``).

All three step the same megatron ``OptimizerParamScheduler`` (linear warmup,
cosine decay), so their learning rates agree step for step. The engines are the
growable jobs a user's objects make (:class:`~mgrow.engine.megatron_job.MegatronJob`,
:class:`~mgrow.engine.deepspeed_job.DeepSpeedJob`) built from mgrow's config, so
``mgrow train`` grows through the same code as ``mgrow.megatron.grow`` and
``mgrow.deepspeed.grow``. ``cfg`` is a
training config (:class:`mgrow.train.config.TrainConfig`): the engines read its
model, optimizer, train, deepspeed and transfer sections. Each engine keeps
the rank's :class:`~mgrow.parallel.ParallelDims` (``engine.dims``); token
batches arrive on the CPU (pinned on a CUDA rank) and move to the device in the
forward step.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os

import torch
import torch.distributed as dist

from mgrow.core.errors import ConfigError
from mgrow.engine import ds_mpu, param_groups, schedulers
from mgrow.engine.deepspeed_job import DeepSpeedJob
from mgrow.engine.megatron_job import MegatronJob
from mgrow.engine.steps import forward_step


def _scheduler(optimizer, cfg):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optimizer
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=o.decay_steps or cfg.train.steps,
        lr_decay_style="cosine",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )


class MegatronEngine(MegatronJob):
    """Megatron DDP + AdamW or DistributedOptimizer, stepped through megatron's schedules.

    ``parts``: (ddp, optimizer, scheduler) already made (by growth) instead of made from ``cfg``.
    """

    def __init__(self, model, cfg, dims, parts=None):
        self.cfg = cfg
        if parts is None:
            parts = self._make(model, cfg)
        ddp, optimizer, scheduler = parts
        super().__init__(ddp, optimizer, scheduler, config_overrides=_frozen_overrides(cfg, optimizer.config),
                         dims=dims)

    @staticmethod
    def _make(model, cfg):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        distributed = cfg.optimizer.type == "megatron"
        tconfig = model.config
        ddp = DistributedDataParallel(
            config=tconfig,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=distributed
            ),
            module=model,
        )
        o = cfg.optimizer
        optimizer_config = OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.beta1,
            adam_beta2=o.beta2,
            adam_eps=o.eps,
            clip_grad=o.clip_grad,
            use_distributed_optimizer=distributed,
            bf16=cfg.model.bf16,  # fp32 main params: Float16OptimizerWithFloat16Params / DistributedOptimizer
            params_dtype=cfg.model.dtype,
        )
        optimizer = get_megatron_optimizer(optimizer_config, [ddp],
                                           config_overrides=_frozen_overrides(cfg, optimizer_config))
        scheduler = _scheduler(optimizer, cfg)
        tconfig.finalize_model_grads_func = finalize_model_grads
        tconfig.no_sync_func = ddp.no_sync
        tconfig.grad_scale_func = optimizer.scale_loss
        return ddp, optimizer, scheduler

    def describe(self):
        return _as_configured(super().describe(), self.cfg)

    def _assemble(self, ddp, optimizer, scheduler, grown):
        return MegatronEngine(None, dataclasses.replace(self.cfg, model=grown), self.dims,
                              parts=(ddp, optimizer, scheduler))

    def _run(self, microbatches: list[torch.Tensor], forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=functools.partial(forward_step, device=self.dims.device),
            data_iterator=iter(microbatches),
            model=[self.ddp],
            num_microbatches=len(microbatches),
            seq_length=microbatches[0].shape[1] - 1,
            micro_batch_size=microbatches[0].shape[0],
            forward_only=forward_only,
        )

    def train_step(self, microbatches: list[torch.Tensor]) -> list[dict]:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.ddp.train()
        outputs = self._run(microbatches, forward_only=False)
        self.optimizer.step()
        self.scheduler.step(increment=1)
        return outputs

    def eval_step(self, microbatches: list[torch.Tensor]) -> list[dict]:
        self.ddp.eval()
        with torch.no_grad():
            return self._run(microbatches, forward_only=True)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def scale_lr(self, factor: float) -> None:
        _scale_lr(self, factor)


def _as_configured(live, cfg):
    """The live model's description, refused when the training config's model is another one."""
    if live != cfg.model:
        differ = {k: (v, getattr(live, k)) for k, v in cfg.model.to_dict().items() if getattr(live, k) != v}
        raise ConfigError("model", f"the training config's model disagrees with the live model: {differ}")
    return live


def _freezing(cfg) -> bool:
    return getattr(cfg, "transfer", None) is not None and cfg.transfer.freeze


def _frozen_overrides(cfg, optimizer_config):
    """None (megatron's standard param groups) unless transferred parameters are to be frozen."""
    if not _freezing(cfg):
        return None
    return param_groups.megatron_overrides(optimizer_config)


def _frozen_groups(cfg, groups: list[dict]) -> list[dict]:
    if not _freezing(cfg):
        return groups
    return param_groups.split_groups(groups)


def _scale_lr(engine, factor: float) -> None:
    """The scheduled LR of the coming step times ``factor`` (re-warming after a growth event)."""
    engine.scheduler.step(increment=0)
    for group in engine.optimizer.param_groups:
        group["lr"] *= factor


def deepspeed_config(cfg, dp: int) -> dict:
    """The DeepSpeed JSON for a ZeRO optimizer path (user keys in ``deepspeed:`` win)."""
    t, o = cfg.train, cfg.optimizer
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        "train_batch_size": t.global_batch_size,
        "zero_optimization": {"stage": o.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.model.bf16},
        "gradient_clipping": o.clip_grad,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for key, value in cfg.deepspeed.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def _decay_groups(model) -> list[dict]:
    """megatron's default split: no weight decay on biases and 1-D (norm) parameters."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.endswith(".bias") or param.ndim == 1 else decay).append(param)
    return [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]


class DeepSpeedEngine(DeepSpeedJob):
    """A DeepSpeed ZeRO engine around the GPTModel (PP = 1), with megatron's LR schedule.

    ``parts``: (DeepSpeed engine, scheduler) already made (by growth) instead of made from ``cfg``.
    """

    def __init__(self, model, cfg, dims, parts=None):
        import deepspeed

        self.cfg = cfg
        if (cfg.deepspeed.get("wandb") or {}).get("enabled"):
            # DeepSpeed's own W&B monitor calls wandb.init without a mode: offline unless the user says online.
            os.environ.setdefault("WANDB_MODE", cfg.wandb.mode if cfg.wandb is not None else "offline")
        if parts is None:
            o = cfg.optimizer
            optimizer = torch.optim.AdamW(
                _frozen_groups(cfg, _decay_groups(model)), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                weight_decay=o.weight_decay,
            )
            # device_rank: the engine's device is this rank's, not cuda:LOCAL_RANK (ranks may share one GPU)
            args = argparse.Namespace(device_rank=dims.device.index if dims.is_cuda
                                      else int(os.environ.get("LOCAL_RANK", 0)))
            engine, _, _, _ = deepspeed.initialize(
                args=args, model=model, optimizer=optimizer, config=deepspeed_config(cfg, dims.dp), mpu=ds_mpu
            )
            parts = engine, _scheduler(engine.optimizer, cfg)
        engine, self.scheduler = parts
        super().__init__(engine, dims=dims)

    @property
    def config(self) -> dict:
        """The DeepSpeed JSON of this engine's training config (at growth: the config with the new batch sizes)."""
        return deepspeed_config(self.cfg, self.dims.dp)

    def describe(self):
        return _as_configured(super().describe(), self.cfg)

    def _assemble(self, engine, grown):
        return DeepSpeedEngine(None, dataclasses.replace(self.cfg, model=grown), self.dims,
                               parts=(engine, schedulers.rebuild(self.scheduler, engine.optimizer)))

    def _loss(self, tokens: torch.Tensor) -> torch.Tensor:
        output, loss_fn = forward_step(iter([tokens]), self.engine, self.dims.device)
        return loss_fn(output)[0]

    def train_step(self, microbatches: list[torch.Tensor]) -> list[dict]:
        self.engine.train()
        outputs = []
        for tokens in microbatches:
            loss = self._loss(tokens)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            outputs.append({"lm loss": loss.detach()})
        self.scheduler.step(increment=1)
        return outputs

    def eval_step(self, microbatches: list[torch.Tensor]) -> list[dict]:
        self.engine.eval()
        with torch.no_grad():
            return [{"lm loss": self._loss(tokens).detach()} for tokens in microbatches]

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def scale_lr(self, factor: float) -> None:
        _scale_lr(self, factor)


def build_engine(model, cfg, dims):
    if cfg.optimizer.zero_stage is not None:
        return DeepSpeedEngine(model, cfg, dims)
    return MegatronEngine(model, cfg, dims)


def global_mean_loss(outputs: list[dict], dims) -> float:
    """Mean 'lm loss' over micro-batches and DP ranks, from the last stage, on every rank."""
    value = torch.zeros(1, dtype=torch.float64, device=dims.comm_device)
    if dims.is_last_stage and outputs:
        value[0] = torch.stack([o["lm loss"].double() for o in outputs]).mean().to(dims.comm_device)
        dist.all_reduce(value, group=dims.dp_group)
        value /= dims.dp
    dist.broadcast(value, src=dims.stage_peers[-1], group=dims.pp_group)
    return float(value[0])
