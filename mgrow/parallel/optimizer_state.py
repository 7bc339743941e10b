"""Where each optimizer path keeps a parameter's fp32 master weight and Adam moments.

One adapter per path, one question each: give me this TP rank's whole shard of
parameter P's fp32 master, or of one Adam moment (exp_avg or exp_avg_sq,
assembled over the DP ranks that split it), or store such a shard back so that
every DP rank keeps its part. Storing a master also sets the model parameter to
it: in bf16, to its rounding (never the other way round: a master rebuilt from
the bf16 parameter has lost its low bits).
The growth mover asks these and nothing else, so it never sees a flat buffer.

* ``TorchAdamState``: torch AdamW under Megatron DDP (megatron's FP32Optimizer,
  or in bf16 Float16OptimizerWithFloat16Params, whose fp32 master of P is
  ``P.main_param``, optimizer.py:674-683); every DP rank holds everything,
  state keyed by the master.
* ``DistributedOptimizerState``: Megatron's DistributedOptimizer; each DP rank
  owns a contiguous range of every bucket, so of each parameter a range
  ``param_range`` (distrib_optimizer.py:112-171) kept as a 1-D main parameter
  (a view of the fp32 model parameter, or in bf16 an fp32 copy, l.395-411).
* ``ZeroState``: DeepSpeed ZeRO 1/2/3 through DeepSpeed's own
  ``safe_get/set_full_*`` (utils/tensor_fragment.py:135-206).

Adam's ``step`` lives where the inner optimizer keeps it: per parameter (torch's
Adam/AdamW, a CPU tensor) or in the param group (Apex's and Transformer Engine's
``FusedAdam``, which megatron-core picks when either is installed); both are read
and written here.

All reads are collective over the DP group: every DP rank calls them for the
same parameters in the same order. Writes are local: each rank stores its part.
Tensors stay on the device the optimizer keeps them on.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

MOMENTS = ("exp_avg", "exp_avg_sq")


def step_layout(inner: torch.optim.Optimizer) -> str:
    """Where an Adam keeps its step count.

    * ``group``: ``group["step"]``, an int (apex.optimizers.FusedAdam, transformer_engine's FusedAdam);
    * ``state_int``: ``state[p]["step"]``, an int (deepspeed.ops.adam.FusedAdam, fused_adam.py:147-190; its
      ``group["step"]`` only seeds the state of a parameter seen for the first time);
    * ``state``: ``state[p]["step"]``, a CPU tensor (torch's Adam and AdamW).
    """
    cls = type(inner)
    if cls.__name__ != "FusedAdam":
        return "state"
    return "state_int" if cls.__module__.startswith("deepspeed.") else "group"


def steps_in_group(inner: torch.optim.Optimizer) -> bool:
    return step_layout(inner) == "group"


def _adam_state(inner: torch.optim.Optimizer, key, step: torch.Tensor, like: torch.Tensor) -> None:
    state = {
        "exp_avg": torch.zeros_like(like, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(like, memory_format=torch.preserve_format),
    }
    layout = step_layout(inner)
    if layout == "state":
        state["step"] = step.clone()
    elif layout == "state_int":
        state["step"] = int(step)
    inner.state[key] = state


def _init_adam(inner: torch.optim.Optimizer, step: torch.Tensor, keys_and_likes) -> None:
    """Zero moments for every (state key, tensor like it) and Adam's step, wherever the optimizer keeps it."""
    for key, like in keys_and_likes:
        _adam_state(inner, key, step, like)
    if steps_in_group(inner):
        for group in inner.param_groups:
            group["step"] = int(step)


def _adam_step(inner: torch.optim.Optimizer) -> Optional[torch.Tensor]:
    """Adam's step count: the largest per-parameter step, else the group's.

    The largest, not the first: DeepSpeed's FusedAdam increments only the state of the last parameter of each
    dtype list it steps together (fused_adam.py:178-190) and passes that count to the kernel for all of them;
    with many parameters per group (ZeRO stage 0) the others keep the count they started with.
    """
    steps = [float(state["step"]) for state in inner.state.values() if "step" in state]
    if steps:
        return torch.tensor(max(steps), dtype=torch.float32, device="cpu")
    for group in inner.param_groups:
        if "step" in group:
            return torch.tensor(float(group["step"]), dtype=torch.float32, device="cpu")
    return None


def _assembled(params: list, fragments: list, group) -> list[torch.Tensor]:
    """The full fp32 tensors of ``params`` from the disjoint pieces the DP ranks of ``group`` hold, in ONE
    all-reduce (the pieces do not overlap: the sum assembles them). ``fragments``: per parameter, this rank's
    (flat start, values) or None."""
    sizes = [param.numel() for param in params]
    buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=params[0].device)
    offset = 0
    for size, fragment in zip(sizes, fragments):
        if fragment is not None:
            start, values = fragment
            buffer[offset + start : offset + start + values.numel()] = values.reshape(-1)
        offset += size
    dist.all_reduce(buffer, group=group)
    return [piece.view(param.shape) for piece, param in zip(buffer.split(sizes), params)]


class TorchAdamState:
    def __init__(self, inner: torch.optim.Optimizer):
        self.inner = inner

    def read(self, params: list, key: Optional[str] = None) -> list[torch.Tensor]:
        """This TP rank's whole shards of ``params``' fp32 masters (``key`` None) or of Adam moment ``key``, in
        as few collectives as the path allows (here none: every DP rank holds everything)."""
        return [self.master(param) if key is None else self.moment(param, key) for param in params]

    @staticmethod
    def _main(param) -> torch.Tensor:
        """The fp32 tensor Adam steps for ``param``: the parameter itself, or its bf16 master."""
        main = getattr(param, "main_param", None)
        return param if main is None else main

    def master(self, param) -> torch.Tensor:
        return self._main(param).detach()

    def set_master(self, param, value: torch.Tensor) -> None:
        main = self._main(param)
        with torch.no_grad():
            main.copy_(value)
            if main is not param:
                param.copy_(value)

    def moment(self, param, key: str) -> torch.Tensor:
        return self.inner.state[self._main(param)][key]

    def step(self) -> Optional[torch.Tensor]:
        return _adam_step(self.inner)

    def init(self, step: torch.Tensor) -> None:
        _init_adam(self.inner, step, [(param, param) for group in self.inner.param_groups for param in group["params"]])

    def set_moment(self, param, key: str, value: torch.Tensor) -> None:
        self.inner.state[self._main(param)][key].copy_(value)

    def group_of(self, param) -> Optional[dict]:
        main = self._main(param)
        return next((group for group in self.inner.param_groups if any(p is main for p in group["params"])), None)


class DistributedOptimizerState(TorchAdamState):
    """Megatron DistributedOptimizer: this DP rank's range of each parameter, as a 1-D main parameter.

    Adam's own state (step, init) is the inner torch optimizer's, keyed by the 1-D main parameters.
    """

    def __init__(self, optimizer):
        super().__init__(optimizer.optimizer)
        self.optimizer = optimizer
        self.group = optimizer.data_parallel_group

    def _main(self, param):
        """(this rank's 1-D main parameter of ``param``, its range in the flattened parameter), or None."""
        if param not in self.optimizer.model_param_group_index_map:
            return None
        group_index, order = self.optimizer.model_param_group_index_map[param]
        main = self.inner.param_groups[group_index]["params"][order]
        return main, self.optimizer._get_model_param_range_map(param)["param"]

    def _fragment(self, param, key: Optional[str]):
        owned = self._main(param)
        if owned is None:
            return None
        main, span = owned
        return span.start, main.detach() if key is None else self.inner.state[main][key]

    def read(self, params: list, key: Optional[str] = None) -> list[torch.Tensor]:
        """One all-reduce over the DP group for all of ``params`` (none for fp32 masters: the model parameter is
        the master, all-gathered after each step)."""
        if not params:
            return []
        if key is None and all(param.dtype == torch.float32 for param in params):
            return [param.detach() for param in params]
        return _assembled(params, [self._fragment(param, key) for param in params], self.group)

    def master(self, param) -> torch.Tensor:
        return self.read([param])[0]

    def set_master(self, param, value: torch.Tensor) -> None:
        owned = self._main(param)
        with torch.no_grad():
            if owned is not None:
                main, span = owned
                main.copy_(value.reshape(-1)[span.start : span.end])
            param.copy_(value)  # on every DP rank: what the all-gather after a step would bring

    def moment(self, param, key: str) -> torch.Tensor:
        return self.read([param], key)[0]

    def set_moment(self, param, key: str, value: torch.Tensor) -> None:
        owned = self._main(param)
        if owned is not None:
            main, span = owned
            self.inner.state[main][key].copy_(value.reshape(-1)[span.start : span.end])

    def group_of(self, param) -> Optional[dict]:
        if param not in self.optimizer.model_param_group_index_map:
            return None  # no range of it on this DP rank
        return self.inner.param_groups[self.optimizer.model_param_group_index_map[param][0]]


class ZeroState:
    """DeepSpeed ZeRO stage 1, 2 or 3: flat fp32 partitions behind DeepSpeed's per-parameter accessors."""

    def __init__(self, zero_optimizer):
        self.optimizer = zero_optimizer
        self.inner = zero_optimizer.optimizer
        self._link_moments()

    def _flats(self) -> list:
        """The flat fp32 partitions Adam steps: one per param group (1/2, bf16 1) or per sub-group (3).

        Stage 3 leaves only the last sub-group in the inner optimizer's param_groups between steps
        (stage3.py:1252), so its list comes from the ZeRO optimizer, not from the inner optimizer.
        """
        for name in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat"):
            if hasattr(self.optimizer, name):
                return list(getattr(self.optimizer, name))
        raise NotImplementedError(f"no flat fp32 partitions found on {type(self.optimizer).__name__}")

    def _link_moments(self) -> None:
        """Point every parameter's fragment at the current Adam state (stages 1 and 2).

        DeepSpeed 0.19.8 links them once, right after the first param group's first
        ``step`` (stage_1_and_2.py:2987), before the other groups have state, so with
        two param groups (decay / no decay) the second group's moments are unreachable
        through ``safe_get_full_optimizer_state``. Relinking only re-takes views.
        """
        if hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state") and self.inner.state:
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def read(self, params: list, key: Optional[str] = None) -> list[torch.Tensor]:
        """Stages 1 and 2 (and bf16 without ZeRO): one all-reduce over the DP group for all of ``params``, from
        the fragments DeepSpeed maps each parameter to (``_hp_mapping``, as its ``get_full_hp_param`` reads one
        at a time). Stage 3 partitions differently: one DeepSpeed call (a collective) per parameter."""
        if not params:
            return []
        if any(hasattr(param, "ds_id") for param in params):
            return [self.master(param) if key is None else self.moment(param, key) for param in params]
        fragments = []
        for param in params:
            mapping = getattr(param, "_hp_mapping", None)
            fragments.append(None if mapping is None else
                             (mapping.lp_fragment_address.start, mapping.get_hp_fragment(key)))
        return _assembled(params, fragments, params[0]._dp_group)

    def master(self, param) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)

    def set_master(self, param, value: torch.Tensor) -> None:
        """The fp32 partition, then the low-precision parameter (DeepSpeed's setter leaves it alone)."""
        from deepspeed.utils import safe_set_full_fp32_param

        if hasattr(param, "ds_tensor"):
            self._set_stage3(param, value, None)
            return
        safe_set_full_fp32_param(param, value)
        with torch.no_grad():
            param.copy_(value)  # stages 1 and 2 keep the whole parameter on every DP rank

    def moment(self, param, key: str) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_optimizer_state

        return safe_get_full_optimizer_state(param, key)

    def step(self) -> Optional[torch.Tensor]:
        return _adam_step(self.inner)

    def init(self, step: torch.Tensor) -> None:
        _init_adam(self.inner, step, [(flat, flat) for flat in self._flats()])
        self._link_moments()

    def set_moment(self, param, key: str, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        if hasattr(param, "ds_tensor"):
            self._set_stage3(param, value, key)
            return
        safe_set_full_optimizer_state(param, value, key)

    def group_of(self, param) -> Optional[dict]:
        """The param group of ``param``: DeepSpeed keeps the model's parameters of group i in its list
        ``bit16_groups`` (stages 1, 2), ``fp16_groups`` (3) or ``bf16_groups`` (bf16 without ZeRO)."""
        for name in ("bit16_groups", "fp16_groups", "bf16_groups"):
            for index, params in enumerate(getattr(self.optimizer, name, ())):
                if any(p is param for p in params):
                    return self.optimizer.param_groups[index]
        return None

    def _set_stage3(self, param, value: torch.Tensor, key: Optional[str]) -> None:
        """This rank's ZeRO-3 partition of the master (key None, and the parameter's own partition) or a moment.

        DeepSpeed 0.19.8's ``set_full_hp_param`` narrows the unpadded value to the
        last rank's padded partition (stage3.py:3194-3199), which fails whenever the
        parameter's size is not a multiple of the DP size; the value is padded here.
        """
        zero = self.optimizer
        partition, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
        size = partition.numel()
        ranks = dist.get_world_size(group=zero.dp_process_group)
        padded = torch.zeros(size * ranks, dtype=torch.float32, device=partition.device)
        padded[: value.numel()] = value.reshape(-1).to(partition.device)
        start = zero._get_param_partition_rank(param) * size
        with torch.no_grad():
            partition.copy_(padded[start : start + size])
            if key is None:
                param.ds_tensor.copy_(padded[start : start + size])


def for_megatron(optimizer):
    """The adapter of a megatron optimizer (one model chunk)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(chained) != 1:
        raise NotImplementedError(f"growth needs one megatron optimizer per model chunk, got {len(chained)}")
    inner = chained[0]
    if isinstance(inner, DistributedOptimizer):
        return DistributedOptimizerState(inner)
    return TorchAdamState(inner.optimizer)
