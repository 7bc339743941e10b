"""A megatron-core training job as the user built it: model chunk, megatron optimizer, OptimizerParamScheduler.

:class:`MegatronJob` is the :class:`~mgrow.engine.protocols.GrowableJob` over
those objects. The grown job is made from the old one's own settings:

* the model: ``GPTModel`` with the user's ``TransformerConfig`` (every field but
  the grown sizes kept), the same layer spec and ``GPTModel`` arguments, the same
  wrappers (``Float16Module``, megatron ``DistributedDataParallel`` with the same
  ``DistributedDataParallelConfig``);
* the optimizer: ``get_megatron_optimizer`` with the user's ``OptimizerConfig``
  (and the ``config_overrides`` the user built it with), checked parameter by
  parameter to give every parameter the param-group settings it had;
* the scheduler: an ``OptimizerParamScheduler`` with the old one's arguments and
  state;
* the config's hooks (``no_sync_func``, ``grad_scale_func``, ...) that were bound
  to the old DDP module or optimizer are bound to the new ones.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from mgrow.core.errors import ConfigError
from mgrow.core.model_config import ModelConfig
from mgrow.engine import group_assignment, schedulers
from mgrow.engine.describe import describe, unwrap
from mgrow.engine.model import HOOK_FIELDS, build_like, by_global_name, real_vocab
from mgrow.engine.steps import logits_step
from mgrow.parallel.dims import ParallelDims
from mgrow.parallel.optimizer_state import for_megatron

# TransformerConfig fields that may hold a function bound to the DDP module or the optimizer.


class MegatronJob:
    """The user's model chunk (one per rank), megatron optimizer and OptimizerParamScheduler (or None)."""

    def __init__(self, model, optimizer, scheduler=None, *, config_overrides=None, dims: Optional[ParallelDims] = None):
        self.chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.as_list = isinstance(model, (list, tuple))
        self.ddp = self.chunks[0] if self.chunks else None
        self.optimizer, self.scheduler = optimizer, scheduler
        self.config_overrides = config_overrides
        self.dims = dims if dims is not None else ParallelDims.of_running_job(_device(self.ddp))

    @functools.cached_property
    def unwrapped(self):
        """The GPTModel and its wrappers (refuses what is not a DDP-wrapped GPTModel chunk)."""
        from megatron.core.distributed import DistributedDataParallel

        if len(self.chunks) != 1:
            raise ConfigError("model", f"{len(self.chunks)} model chunks: virtual pipeline stages are not supported "
                                       "yet; pass the rank's one model chunk")
        if not isinstance(self.ddp, DistributedDataParallel):
            raise ConfigError("model", f"a {type(self.ddp).__name__}: a megatron optimizer's model must be wrapped "
                                       "in megatron.core.distributed.DistributedDataParallel")
        return unwrap(self.ddp)

    @property
    def module(self):
        return self.unwrapped.gpt

    @property
    def model(self):
        """The model in the form the user passed it (a chunk, or a list of one chunk)."""
        return [self.ddp] if self.as_list else self.ddp

    def describe(self) -> ModelConfig:
        cfg = describe(self.module, self.dims)  # self.module: refuses what is not a DDP-wrapped GPTModel
        foreign = _foreign(self.optimizer, self.ddp)
        if foreign:
            raise ConfigError("optimizer", f"the optimizer was not built for this model: {foreign}")
        schedulers.check(self.scheduler, self.optimizer)
        return cfg

    def check_rebuild(self, grown: ModelConfig) -> None:
        config = self.optimizer.config
        if config.optimizer != "adam":
            raise ConfigError("optimizer.config.optimizer", f"{config.optimizer!r}: mgrow carries Adam's state "
                                                            "(optimizer 'adam')")
        chained = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        if len(chained) != 1:
            raise ConfigError("optimizer", f"{len(chained)} chained optimizers (expert-parallel groups?): mgrow "
                                           "grows a model with one megatron optimizer")

    def optimizer_state(self):
        return for_megatron(self.optimizer)

    def logits(self, tokens: torch.Tensor):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        was_training = self.ddp.training
        self.ddp.eval()
        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=functools.partial(logits_step, device=self.dims.device),
                data_iterator=iter([tokens]), model=[self.ddp], num_microbatches=1,
                seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
            )
        self.ddp.train(was_training)
        return real_vocab(self.module, outputs[0]["logits"]) if outputs else None

    def build_model(self, grown: ModelConfig):
        return build_like(self.module, grown)

    def rebuild(self, model, grown: ModelConfig) -> "MegatronJob":
        from megatron.core.distributed import DistributedDataParallel
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        config = model.config
        chunk = Float16Module(config, model) if self.unwrapped.float16_module else model
        ddp = DistributedDataParallel(config=config, ddp_config=dataclasses.replace(self.ddp.ddp_config), module=chunk)
        optimizer = get_megatron_optimizer(self.optimizer.config, [ddp], config_overrides=self.config_overrides)
        try:
            self._check_groups(model, optimizer)
            _rebind_hooks(config, {id(self.ddp): ddp, id(self.optimizer): optimizer})
            scheduler = schedulers.rebuild(self.scheduler, optimizer)
        except BaseException:
            release_megatron_ddp(ddp)
            raise
        return self._assemble(ddp, optimizer, scheduler, grown)

    def _assemble(self, ddp, optimizer, scheduler, grown: ModelConfig) -> "MegatronJob":
        model = [ddp] if self.as_list else ddp
        return MegatronJob(model, optimizer, scheduler, config_overrides=self.config_overrides, dims=self.dims)

    def _check_groups(self, model, optimizer) -> None:
        """Every parameter's param-group settings in the new optimizer are the ones it (or its role) had."""
        old_state, new_state = self.optimizer_state(), for_megatron(optimizer)
        old_groups, old_index = {}, {}
        for name, param in by_global_name(self.module).items():
            group = old_state.group_of(param)
            if group is not None:
                old_index[name] = len(old_groups)
                old_groups[len(old_groups)] = group_assignment.settings(group)
        new = by_global_name(model)
        expected = group_assignment.assign(old_index, new, strict=False)
        for name, param in new.items():
            group = new_state.group_of(param)
            if group is None or expected[name] is None:
                continue
            want, got = old_groups[expected[name]], group_assignment.settings(group)
            if got != want:
                keys = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
                raise ConfigError("config_overrides", f"the rebuilt optimizer gives {name} param-group settings "
                                                      f"{ {k: got.get(k) for k in keys} } where it had "
                                                      f"{ {k: want.get(k) for k in keys} }: pass the config_overrides "
                                                      "the optimizer was built with")

    def destroy(self) -> None:
        release_megatron_ddp(self.ddp)


def _device(chunk) -> torch.device:
    """The device of a model chunk's parameters (where there are none yet to read, the default device)."""
    if isinstance(chunk, torch.nn.Module):
        for param in chunk.parameters():
            return param.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _foreign(optimizer, ddp) -> str:
    """Why ``optimizer`` is not the one built over ``ddp`` ('' when it is)."""
    ours = {id(param) for param in ddp.parameters()}
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "model_chunks"):  # DistributedOptimizer: each rank's groups hold only its own ranges
            if not any(chunk is ddp for chunk in inner.model_chunks):
                return "its model chunks are other modules"
            continue
        groups = [inner.float16_groups, inner.fp32_from_fp32_groups] if hasattr(inner, "float16_groups") else \
            [[group["params"] for group in inner.param_groups]]
        stepped = {id(param) for kind in groups for group in kind for param in group}
        if stepped != ours:
            return f"{len(stepped - ours)} of its parameters are not the model's, {len(ours - stepped)} missing"
    return ""


def _rebind_hooks(config, replaced: dict) -> None:
    """Hooks on ``config`` bound to a replaced object are bound to its replacement (same method name)."""

    def rebound(hook):
        if isinstance(hook, (list, tuple)):
            return type(hook)(rebound(each) for each in hook)
        owner = getattr(hook, "__self__", None)
        if owner is not None and id(owner) in replaced:
            return getattr(replaced[id(owner)], hook.__name__)
        return hook

    for field in HOOK_FIELDS:
        if getattr(config, field, None) is not None:
            setattr(config, field, rebound(getattr(config, field)))


def release_megatron_ddp(ddp) -> None:
    """Cut the reference cycle that keeps a megatron DDP model alive after its last user lets go.

    Megatron's DDP hooks each parameter's grad accumulator (a C++ autograd node) with a closure over the DDP
    module, whose config holds the optimizer (``grad_scale_func``), whose state holds views of the parameters
    whose autograd graph leads back to those nodes: a cycle through C++ that Python's collector cannot see. It
    would keep a replaced model, its optimizer and its process groups for the rest of the job.
    """
    ddp.grad_accs.clear()
    ddp.config.grad_scale_func = None
    ddp.config.no_sync_func = None
