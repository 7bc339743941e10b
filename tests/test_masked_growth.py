"""Masked structural growth (issue 8): new units behind a mask m that ramps 0 -> 1 (mgrow/growth/masks.py).

Reference path (one process, TP=1): the reference operators grow a random model, every must-be-zero or
mean-padded entry a mask covers is drawn at random instead, a megatron-core GPTModel is built from the
result with the mask hooks at m = 0: its logits equal the ungrown model's within 1e-5, for each unit kind.
Without the hooks the same weights move the logits by >= 1e-3 (the masks carry the preservation).
Sharded path (tests/masked_worker.py through mgrow's local launcher): the same on TP2 with the
DistributedOptimizer and on PP2 with inserted layers, through `grow(..., masked=True)`.
"""

import json

import pytest
import torch
import yaml

from rank_pool import pool
from conftest import one_rank
from mgrow.transforms.masks import GrowthMasks, MaskRamp, free_masked_entries, mask_value
from mgrow.engine.model import VocabMask, build_gpt, gather_full_tensors, position_ids, real_vocab
from mgrow.core.model_config import ModelConfig
from mgrow.ops import Kind
from mgrow.core.plan import load_plan
from mgrow.ops.plan import apply_plan, free_values
from mgrow.testing.harness import random_state, random_tokens

TOL = 1e-5
MISSING_MASK_MOVES = 1e-3
LN_GELU = dict(num_layers=2, hidden_size=24, num_attention_heads=4, kv_channels=8, ffn_hidden_size=32,
               vocab_size=48, max_sequence_length=8, layernorm_epsilon=0.05)  # MHA, learned positions, biases
RMS_SWIGLU = dict(LN_GELU, normalization="RMSNorm", activation="swiglu", num_query_groups=2,
                  position_embedding_type="rope", share_embeddings_and_output_weights=True, add_bias_linear=False,
                  qk_layernorm=True)
PLANS = {
    "mlp": [{"mlp": {"ffn_hidden_size": 48}}],
    "heads": [{"heads": {"num_attention_heads": 8}}],
    "heads-new-groups": [{"heads": {"num_attention_heads": 8, "num_query_groups": 4}}],
    "layers": [{"layers": {"insert_before": [0, 2], "num_layers": 5}}],
    "hidden": [{"hidden": {"hidden_size": 40}}],
    "all": [{"mlp": {"ffn_hidden_size": 48}}, {"heads": {"num_attention_heads": 8}},
            {"head_dim": {"kv_channels": 12}}, {"hidden": {"hidden_size": 40}},
            {"layers": {"insert_before": [1], "num_layers": 4}}],
}
MODELS = {"ln-gelu": LN_GELU, "rms-swiglu": RMS_SWIGLU}


def forward(model, tokens):
    model.eval()
    with torch.no_grad():
        return real_vocab(model, model(tokens, position_ids(tokens), None))  # (padded columns are -inf)


def masked_growth(cfg, ops, seed=0):
    """(logits before, the grown model with random masked entries, its GrowthMasks at m = 0, tokens)."""
    plan = load_plan({"ops": ops, "init": {"std": 0.5, "seed": 11}})  # large new weights: a leak shows
    state = random_state(cfg, seed, one_rank())
    tokens = random_tokens(cfg, seed, batch=2, seq=8)
    before = forward(build_gpt(cfg, one_rank(), init=state), tokens)
    result = apply_plan(state, cfg, plan)
    values = free_values(plan, cfg).for_stream(len(plan.ops))
    grown = {name: free_masked_entries(name, t, result.maps[name], values) for name, t in result.state.items()}
    refilled = sum(int(((grown[n] != t) & (result.maps[n].kind != Kind.FREE)).sum()) for n, t in result.state.items())
    model = build_gpt(result.cfg, one_rank(), init=grown)
    masks = GrowthMasks.install(model, plan, cfg, one_rank())
    return before, model, masks, tokens, refilled, result.cfg


@pytest.mark.parametrize("ops", sorted(PLANS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_exact_at_mask_zero_with_random_new_weights(single_rank, model, ops):
    cfg = ModelConfig(**MODELS[model])
    before, grown, masks, tokens, refilled, _ = masked_growth(cfg, PLANS[ops])
    assert refilled > 0  # must-be-zero / mean entries really were drawn at random
    at_zero = float((forward(grown, tokens) - before).abs().max())
    assert at_zero <= TOL, at_zero
    masks.set(1.0)
    at_one = forward(grown, tokens)
    masks.remove()
    assert not masks.active
    plain = forward(grown, tokens)
    missing = float((plain - before).abs().max())
    assert missing >= MISSING_MASK_MOVES, f"without the masks the logits moved only {missing}: the test proves nothing"
    # m = 1 with hooks is the plain grown model up to fp32 rounding, relative to the logits' size (~8 here)
    assert float((at_one - plain).abs().max()) <= TOL * max(1.0, float(plain.abs().max()))


def test_the_ramp_reaches_one_on_schedule_and_leaves_the_plain_model(single_rank):
    cfg = ModelConfig(**LN_GELU)
    _, grown, masks, tokens, _, grown_cfg = masked_growth(cfg, PLANS["all"])
    ramp = MaskRamp(masks, start=7, steps=4)
    seen = [ramp.before_step(step) for step in range(7, 12)]
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0] and ramp.done
    hooks = [h for m in grown.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert all(isinstance(h, VocabMask) for h in hooks)  # only the padded vocabulary's mask is left
    fresh = build_gpt(grown_cfg, one_rank(), init=gather_full_tensors(grown, grown_cfg, one_rank()))
    assert torch.equal(forward(grown, tokens), forward(fresh, tokens))  # bit for bit the unmasked grown model
    assert mask_value(3, 7, 4) == 0.0 and mask_value(100, 7, 4) == 1.0



SHARDED = [  # (optimizer, tp, pp, dp, model, plan)
    ("megatron", 2, 1, 2, RMS_SWIGLU, PLANS["all"]),  # TP shards and the DistributedOptimizer over DP 2
    ("adam", 1, 2, 1, LN_GELU, [{"hidden": {"hidden_size": 40}}, {"mlp": {"ffn_hidden_size": 48}},
                             {"layers": {"insert_before": [1], "num_layers": 4}}]),
]


@pytest.mark.parametrize("optimizer, tp, pp, dp, model, ops", SHARDED,
                         ids=[f"{r[0]}-tp{r[1]}-pp{r[2]}-dp{r[3]}" for r in SHARDED])
def test_masked_growth_on_shards(tmp_path, optimizer, tp, pp, dp, model, ops):
    plan = {"ops": ops, "init": {"std": 0.5, "seed": 11}}
    argv = [str(tmp_path), json.dumps(model), json.dumps(plan), optimizer, str(tp), str(pp), "3"]
    done = pool().run(tp * pp * dp, "masked_worker:main", (argv,), timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["at_zero"] <= TOL, result  # grow()'s own check, masks at m = 0, random masked entries
    assert result["without_masks"] >= MISSING_MASK_MOVES, result
    assert result["rebuilt_at_zero"] <= TOL, result  # hooks rebuilt from the plan alone (a resume mid-ramp)
    assert result["mask_per_step"] == [0.0, 1 / 3, 2 / 3, 1.0], result
    assert result["hooks_left"] == 0, result
    assert all(0 < loss < 10 for loss in result["losses"]), result
    print(json.dumps(result))


def test_a_masked_event_in_mgrow_train_ramps_and_resumes_mid_ramp(tmp_path):
    """`growth: [{at_step: 3, plan, mask: {steps: 3}}]`: m 0, 1/3, 2/3 at steps 3-5, hooks gone from step 6; a
    checkpoint saved at step 4 (mid-ramp) resumes with the ramp's hooks rebuilt: the same losses as going on."""
    from launch_utils import train_job, step_losses, write_config

    event = {"at_step": 3, "plan": {"ops": [{"hidden": {"hidden_size": 48}}, {"mlp": {"ffn_hidden_size": 128}}]},
             "mask": {"steps": 3}}
    config = write_config(tmp_path, train={"steps": 7}, checkpoint={"save": str(tmp_path / "ckpt"), "interval": 4})
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "growth": [event]}))
    whole = train_job(tmp_path, 1, config)
    losses = step_losses(whole)
    grew = next(r for r in whole.metrics if r.get("event") == "growth")
    assert grew["max_abs_logit_diff"] <= TOL and grew["mask_steps"] == 3, grew
    assert abs(grew["held_loss_after"] - grew["held_loss_before"]) <= TOL, grew
    masks = {r["step"]: r.get("mask") for r in whole.metrics if "loss" in r}
    assert masks == {1: None, 2: None, 3: None, 4: 0.0, 5: 1 / 3, 6: 2 / 3, 7: 1.0}, masks
    resumed = train_job(tmp_path, 1, config, f"checkpoint.load={tmp_path / 'ckpt' / 'step_00000004'}",
                        "checkpoint.save=null")
    assert step_losses(resumed) == losses[4:], (step_losses(resumed), losses)


@pytest.mark.parametrize("events, field, rule", [
    ([{"at_step": 2, "plan": {"ops": PLANS["mlp"]}, "mask": {"steps": 0}}], "growth[0].mask.steps",
     "must be an integer >= 1, got 0"),
    ([{"at_step": 2, "plan": {"ops": PLANS["mlp"]}, "mask": 5}], "growth[0].mask", "must be a mapping"),
    ([{"at_step": 2, "plan": {"ops": PLANS["mlp"]}, "mask": {"steps": 10}},
      {"at_step": 8, "plan": {"ops": [{"mlp": {"ffn_hidden_size": 64}}]}}], "growth[1].at_step",
     "8 is inside the mask ramp of growth[0] (steps 2..12)"),
])
def test_bad_mask_settings_name_the_field(events, field, rule):
    from mgrow.core.errors import ConfigError
    from mgrow.train import schedule

    with pytest.raises(ConfigError) as caught:
        schedule.parse(events, ModelConfig(**LN_GELU), 1, 1)
    assert caught.value.field == field and caught.value.rule.startswith(rule), caught.value
