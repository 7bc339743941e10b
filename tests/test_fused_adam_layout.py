"""Growth and resume with an optimizer that keeps Adam's step in its param groups, as FusedAdam does.

On GPU clusters megatron-core builds Apex's or Transformer Engine's ``FusedAdam`` when
either is installed: moments per parameter, ``step`` in each param group. Neither
installs here, so :class:`FusedAdam` below stores its state that way and megatron-core
is pointed at it as it would be with Apex installed (its module flags and class names).
Growth must carry the moments and the group step; a checkpoint must bring both back.
"""

import pytest
import torch

from mgrow.checkpoint import files
from mgrow.checkpoint.state import Progress, save
from mgrow.train.restore import restored_engine
from mgrow.transforms.grow import grow
from mgrow.testing.harness import RandomBatches, check_config as train_config, gather_state
from mgrow.engine.model import build_gpt
from mgrow.core.model_config import ModelConfig
from mgrow.ops import apply_to_optimizer_state
from mgrow.ops.plan import apply_plan
from mgrow.engine.engines import build_engine
from mgrow.testing.harness import random_state

MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
             vocab_size=256, max_sequence_length=16, normalization="RMSNorm", activation="swiglu",
             position_embedding_type="rope", add_bias_linear=False)
PLAN = {"ops": [{"mlp": {"ffn_hidden_size": 96}}, {"heads": {"num_attention_heads": 8}},
                {"layers": {"insert_before": [1]}}]}


class FusedAdam(torch.optim.Optimizer):
    """AdamW with the state layout of apex.optimizers.FusedAdam: ``group["step"]`` (an int), moments per parameter."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True, **_):
        assert adam_w_mode
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            t, (beta1, beta2) = group["step"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))


@pytest.fixture
def fused_adam(monkeypatch):
    """megatron-core as it is where Apex is installed: its optimizer factory and checks take FusedAdam."""
    from megatron.core import optimizer as mc_optimizer
    from megatron.core.optimizer import distrib_optimizer

    monkeypatch.setattr(mc_optimizer, "Adam", FusedAdam)
    monkeypatch.setattr(mc_optimizer, "USING_PYTORCH_OPTIMIZER", False)
    monkeypatch.setattr(distrib_optimizer, "Adam", FusedAdam)
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    monkeypatch.setattr(distrib_optimizer, "USING_APEX_OPTIMIZER", True, raising=False)


def _inner(engine):
    optimizer = engine.optimizer.chained_optimizers[0] if hasattr(engine.optimizer, "chained_optimizers") \
        else engine.optimizer
    return optimizer.optimizer


def _group_steps(engine) -> set:
    inner = _inner(engine)
    assert isinstance(inner, FusedAdam) and not any("step" in s for s in inner.state.values())
    return {group.get("step") for group in inner.param_groups if group["params"]}


@pytest.mark.parametrize("optimizer", ["adam", "megatron"])
def test_growth_and_resume_carry_the_group_step_and_the_moments(single_rank, fused_adam, optimizer, tmp_path):
    dims, model = single_rank, ModelConfig(**MODEL)
    cfg = train_config(model, dims, optimizer, 16)
    engine = build_engine(build_gpt(model, dims, init=random_state(model, 0, dims)), cfg, dims)
    batches = RandomBatches(cfg, 0, dims)
    for step in range(2):
        engine.train_step(batches(step))
    assert _group_steps(engine) == {2}
    before = gather_state(engine, model)

    grown, grown_cfg, _ = grow(engine, cfg, PLAN)
    assert _group_steps(grown) == {2}
    after = gather_state(grown, grown_cfg.model)
    reference = apply_plan(before["weight"], model, PLAN)
    for name, tmap in reference.maps.items():
        assert torch.equal(after["weight"][name], reference.state[name]), name
        if tmap.old_name is not None:
            m, v = apply_to_optimizer_state(tmap, before["exp_avg"][tmap.old_name], before["exp_avg_sq"][tmap.old_name])
            assert torch.equal(after["exp_avg"][name], m) and torch.equal(after["exp_avg_sq"][name], v), name

    folder = save(grown, grown_cfg, Progress(step=2), str(tmp_path / "ckpt"))
    resumed, _, _ = restored_engine(folder, files.read_metadata(folder), dims)
    assert _group_steps(resumed) == {2}
    loaded = gather_state(resumed, grown_cfg.model)
    for key in ("weight", "exp_avg", "exp_avg_sq"):
        for name in after[key]:
            assert torch.equal(loaded[key][name], after[key][name]), (key, name)
    losses = [float(e.train_step(batches(2))[0]["lm loss"]) for e in (grown, resumed)]
    assert losses[0] == losses[1] and _group_steps(resumed) == {3}
