"""A DeepSpeed training job as the user built it: the engine ``deepspeed.initialize`` returned.

:class:`DeepSpeedJob` is the :class:`~mgrow.engine.protocols.GrowableJob` over
it. The grown engine is made by ``deepspeed.initialize`` again, from the user's
own pieces:

* the DeepSpeed config the engine was made from (ZeRO stage, precision, batch
  sizes, the ``optimizer`` and ``scheduler`` sections), or one the caller passes;
* the optimizer: from the config's ``optimizer`` section, or a new instance of
  the client optimizer's class with its ``defaults`` (or the client's callable);
  either way over param groups with the old groups' settings, each parameter in
  the group it (or its role, :mod:`mgrow.engine.group_assignment`) was in;
* the LR scheduler: from the config's ``scheduler`` section, or the client's
  callable (or the ``lr_scheduler`` callable given here), its ``state_dict``
  carried; the engine's step and sample counters carried;
* the same ``mpu``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
from typing import Callable, Optional

import torch

from mgrow.core.errors import ConfigError
from mgrow.core.model_config import ModelConfig
from mgrow.core.parameters import parameter_shapes
from mgrow.engine import group_assignment
from mgrow.engine.describe import describe, unwrap
from mgrow.engine.model import build_like, by_global_name, position_ids, real_vocab
from mgrow.engine.steps import on_device
from mgrow.parallel.dims import ParallelDims
from mgrow.parallel.optimizer_state import TorchAdamState, ZeroState

# DeepSpeedEngine counters that go on where the old engine was.
COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
# Group keys the optimizer itself keeps (Adam's step in FusedAdam's groups); growth sets them separately.
_NOT_SETTINGS = ("params", "step")


class DeepSpeedJob:
    """The user's DeepSpeed engine around a megatron-core GPTModel (ZeRO 0-3, fp32 or bf16).

    ``lr_scheduler``: a callable ``optimizer -> scheduler``, needed only when the engine's LR scheduler
    was handed to ``deepspeed.initialize`` as an object. ``config``: the DeepSpeed config of the new engine
    (default: the one the engine was made from).
    """

    def __init__(self, engine, *, lr_scheduler: Optional[Callable] = None, config: Optional[dict] = None,
                 dims: Optional[ParallelDims] = None):
        self.engine = engine
        self.lr_scheduler_factory = lr_scheduler
        self._config = config
        device = getattr(engine, "device", None) or torch.device("cpu")
        self.dims = dims if dims is not None else ParallelDims.of_running_job(torch.device(device))

    @functools.cached_property
    def unwrapped(self):
        from deepspeed.runtime.engine import DeepSpeedEngine

        if not isinstance(self.engine, DeepSpeedEngine):
            raise ConfigError("engine", f"a {type(self.engine).__name__}: pass the engine deepspeed.initialize "
                                        "returned")
        return unwrap(self.engine.module)

    @property
    def module(self):
        return self.unwrapped.gpt

    @property
    def optimizer(self):
        return self.engine.optimizer

    @property
    def config(self) -> dict:
        """The DeepSpeed config the new engine is made from."""
        if self._config is not None:
            return copy.deepcopy(self._config)
        given = self.engine.config
        return copy.deepcopy(given if isinstance(given, dict) else self.engine._config._param_dict)

    def describe(self) -> ModelConfig:
        if self.unwrapped.wrappers:
            names = ", ".join(w.__name__ for w in self.unwrapped.wrappers)
            raise ConfigError("model", f"the engine's module wraps the GPTModel in {names}: pass the GPTModel "
                                       "itself to deepspeed.initialize")
        return describe(self.module, self.dims)

    def check_rebuild(self, grown: ModelConfig) -> None:
        client = self.engine.client_optimizer
        if client is not None and not isinstance(client, torch.optim.Optimizer) and not callable(client):
            raise ConfigError("optimizer", f"a client optimizer {type(client).__name__} cannot be rebuilt")
        if "Adam" not in type(self.engine.basic_optimizer).__name__:
            raise ConfigError("optimizer", f"{type(self.engine.basic_optimizer).__name__}: mgrow carries Adam's "
                                           "state (Adam, AdamW, FusedAdam)")
        scheduler = self.engine.client_lr_scheduler
        if scheduler is not None and not callable(scheduler) and self.lr_scheduler_factory is None:
            raise ConfigError("lr_scheduler", f"the engine's {type(scheduler).__name__} was passed to "
                                              "deepspeed.initialize as an object, which cannot be rebuilt on a new "
                                              "optimizer: pass lr_scheduler=<callable: optimizer -> scheduler>, or "
                                              "put the scheduler in the DeepSpeed config")
        group_assignment.assign(self._old_groups()[1], parameter_shapes(grown))  # refuses a role the groups split

    def optimizer_state(self):
        if self.engine.zero_optimization_stage() == 0 and not self.engine.bfloat16_enabled():
            return TorchAdamState(self.engine.optimizer)  # the parameters are the masters
        return ZeroState(self.engine.optimizer)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        was_training = self.engine.training
        self.engine.eval()
        tokens = on_device(tokens, self.dims.device)
        with torch.no_grad():
            logits = real_vocab(self.module, self.engine(tokens, position_ids(tokens), None)).detach().clone()
        self.engine.train(was_training)
        return logits

    def build_model(self, grown: ModelConfig):
        return build_like(self.module, grown)

    def _old_groups(self) -> tuple[list[dict], dict[str, int]]:
        """(each old param group's settings, global name -> group index)."""
        groups = self.engine.optimizer.param_groups
        state = self.optimizer_state()
        index: dict[str, int] = {}
        for name, param in by_global_name(self.module).items():
            group = state.group_of(param)
            found = next((i for i, g in enumerate(groups) if g is group), None)
            if found is not None:
                index[name] = found
        return [{k: v for k, v in g.items() if k not in _NOT_SETTINGS} for g in groups], index


    def rebuild(self, model, grown: ModelConfig) -> "DeepSpeedJob":
        import deepspeed

        settings, index = self._old_groups()
        assigned = group_assignment.assign(index, parameter_shapes(grown))
        params = by_global_name(model)
        groups = [{**group, "params": [params[name] for name in params if assigned[name] == i]}
                  for i, group in enumerate(settings)]
        kept = [i for i, group in enumerate(groups) if group["params"]]
        groups = [groups[i] for i in kept]
        client = self.engine.client_optimizer
        optimizer = None
        if isinstance(client, torch.optim.Optimizer):
            optimizer = _same_kind(client, groups)
        elif callable(client):
            optimizer = client
        scheduler = self.lr_scheduler_factory or (self.engine.client_lr_scheduler
                                                   if callable(self.engine.client_lr_scheduler) else None)
        device = self.engine.device
        args = argparse.Namespace(device_rank=device.index) if device.type == "cuda" else None
        engine, _, _, _ = deepspeed.initialize(
            args=args, model=model, optimizer=optimizer,
            model_parameters=None if isinstance(optimizer, torch.optim.Optimizer) else groups,
            lr_scheduler=scheduler, config=self.config, mpu=self.engine.mpu,
        )
        if engine.lr_scheduler is not None and self.engine.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(self.engine.lr_scheduler.state_dict())
        # DeepSpeed's schedulers set the LR of iteration 0 when made and take only their counter from a state
        # dict: the next step's LR is the one the old optimizer holds.
        old_groups = self.engine.optimizer.param_groups
        for new_group, index in zip(engine.optimizer.param_groups, kept):
            new_group["lr"] = old_groups[index]["lr"]
        for counter in COUNTERS:
            if hasattr(self.engine, counter):
                setattr(engine, counter, getattr(self.engine, counter))
        return self._assemble(engine, grown)

    def _assemble(self, engine, grown: ModelConfig) -> "DeepSpeedJob":
        return DeepSpeedJob(engine, lr_scheduler=self.lr_scheduler_factory, config=self._config, dims=self.dims)

    def destroy(self) -> None:
        self.engine.destroy()
        if self.engine.zero_optimization_stage() == 3:
            release_zero3_references(self.engine.module)


def _same_kind(optimizer: torch.optim.Optimizer, groups: list[dict]) -> torch.optim.Optimizer:
    """A new optimizer of ``optimizer``'s class and defaults over ``groups`` (the defaults its constructor
    takes: torch's AdamW keeps Adam's ``decoupled_weight_decay`` among them but does not accept it)."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    return type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})


def release_zero3_references(module) -> None:
    """Drop the process-wide references to a ZeRO-3 model that DeepSpeed's ``engine.destroy()`` leaves
    (docs/library_facts.md): the top module pushed on ``parameter_offload.FWD_MODULE_STACK`` at setup, the
    ``lru_cache`` on ``PartitionedParameterCoordinator.__params_to_release``, keyed by coordinator and submodule,
    and megatron's ``lru_cache`` on ``RotaryEmbedding.forward``, keyed by the rotary module, which ZeRO-3's hooks
    tie to the whole model. Without this, a job that replaces its engine (growth, fusion) keeps every old model
    and its process groups alive."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    ours = {id(each) for each in module.modules()}
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in ours]
    # The cache only memoizes a pure function of its arguments: clearing it costs a recomputation, nothing else.
    # It sits under DeepSpeed's NVTX wrapper, which keeps the cached function in its closure.
    wrapper = PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release
    for cell in wrapper.__closure__ or ():
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()
    RotaryEmbedding.forward.cache_clear()
