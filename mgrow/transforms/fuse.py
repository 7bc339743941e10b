"""Deep Fusion of two running jobs' engines into one twice-as-wide engine, on the shards, all or nothing.

Engines A and B hold two models of one config on one TP x PP x DP layout (each
with its own optimizer path). :func:`fuse` builds F's GPTModel stage on the same
layout and fills it one parameter at a time: this stage's TP ranks gather A's
and B's fp32 masters of that parameter (every stage already holds A's and B's
copies of the parameters it owns, so nothing crosses stages),
:func:`mgrow.ops.fusion.fuse_tensor` makes F's full tensor, and each rank keeps
its shard. Adam's moments are fused like the weights (the operators' moment rule)
and its step is A's. As in :mod:`mgrow.transforms.grow`, every rank agrees after
each unit of local work: if any rank fails, every rank raises
:class:`~mgrow.core.errors.GrowthError` and A and B are left as they were.
"""

from __future__ import annotations

import dataclasses

import torch

from mgrow.core import faults
from mgrow.core.plan import fused_config
from mgrow.engine.engines import build_engine
from mgrow.engine.model import build_gpt, by_global_name, largest_abs
from mgrow.ops.fusion import fuse_moment, fuse_tensor
from mgrow.parallel import collectives
from mgrow.parallel import layout as layout_table
from mgrow.parallel.optimizer_state import MOMENTS
from mgrow.parallel.shards import gather_tp, split_tp
from mgrow.transforms.agreement import Agreement, RngState, agreed_step


def fuse(engine_a, engine_b, cfg):
    """Collective: (a new engine holding F(A, B), its training config) from two engines of training config ``cfg``.

    Weights from A's and B's fp32 masters; Adam moments by the same rules with A's step (none when A
    has taken no step yet). The new engine starts from ``cfg`` with F's model.
    """
    dims, model_cfg = engine_a.dims, cfg.model
    fused_cfg = dataclasses.replace(cfg, model=fused_config(model_cfg, model_cfg))
    sources = [(by_global_name(e.module), e.optimizer_state()) for e in (engine_a, engine_b)]
    agree, rng_state = Agreement(dims, "fusion"), RngState(dims)

    def full_of(name: str, read) -> list[torch.Tensor]:
        """A's and B's full tensor ``read(state, param)`` of parameter ``name`` (collective over TP)."""
        layout = layout_table.layout_of(name, model_cfg)
        return [gather_tp(read(state, params[name]), layout, dims) for params, state in sources]

    def fused_shard(name: str, fused: torch.Tensor) -> torch.Tensor:
        return split_tp(fused, layout_table.layout_of(name, model_cfg), dims)

    engine = None
    try:
        model = agree.run("build", lambda: build_gpt(fused_cfg.model, dims, initialize=False))
        params = by_global_name(model)
        masters: dict[str, torch.Tensor] = {}
        for name, param in params.items():
            full = full_of(name, lambda source, p: source.master(p))
            agree.run(f"weights of {name}", lambda: _set_weight(name, param, full, model_cfg, fused_shard, masters,
                                                                fused_cfg.model.bf16))
        rng_state.restore()  # building consumed random numbers; training continues on the same stream
        engine = agree.run("engine", lambda: build_engine(model, fused_cfg, dims))
        state = engine.optimizer_state()
        fused_params = by_global_name(engine.module)
        if fused_cfg.model.bf16:  # the parameters hold the bf16 rounding; the fp32 masters get the fused values
            agree.run("fp32 masters", lambda: [state.set_master(fused_params[n], masters.pop(n)) for n in fused_params])
        step = agreed_step(dims, sources[0][1].step())
        if step is not None:
            agree.run("optimizer step", lambda: state.init(step))
            for name, param in fused_params.items():
                for power, key in enumerate(MOMENTS, start=1):
                    full = full_of(name, lambda source, p: source.moment(p, key))
                    agree.run(f"optimizer state of {name}", lambda: _set_moment(
                        state, name, param, key, power, full, model_cfg, fused_shard))
    except BaseException:
        if engine is not None:
            engine.destroy()
        rng_state.restore()
        raise
    return engine, fused_cfg


def _set_weight(name, param, full, model_cfg, fused_shard, masters, bf16: bool) -> None:
    faults.growth_failure_point("weights", name)
    shard = fused_shard(name, fuse_tensor(name, *full, model_cfg))
    with torch.no_grad():
        param.copy_(shard)
    if bf16:
        masters[name] = shard


def _set_moment(state, name, param, key, power, full, model_cfg, fused_shard) -> None:
    faults.growth_failure_point("moments", name)
    state.set_moment(param, key, fused_shard(name, fuse_moment(name, *full, model_cfg, power)))


def logit_deviation(engine_a, engine_b, engine, tokens: torch.Tensor) -> dict:
    """max |z_F - (z_A + z_B) / 2|, max |(z_A + z_B) / 2| and max |z_A - z_B| over every rank's logits."""
    z_a, z_b, z_f = (e.logits(tokens) for e in (engine_a, engine_b, engine))
    values = [0.0, 0.0, 0.0]
    if z_f is not None:
        average = (z_a.float() + z_b.float()) / 2
        values = [largest_abs(z_f.float() - average), largest_abs(average), largest_abs(z_a.float() - z_b.float())]
    dims = engine.dims
    return {"max_abs_logit_diff_vs_average": collectives.reduce_scalar(dims, values[0], "max"),
            "max_abs_logit_average": collectives.reduce_scalar(dims, values[1], "max"),
            "max_abs_logit_diff_a_b": collectives.reduce_scalar(dims, values[2], "max")}
