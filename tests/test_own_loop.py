"""Growth in the user's own training loop (issue 18): the examples' megatron-core and DeepSpeed objects, grown
through ``mgrow.megatron.grow`` and ``mgrow.deepspeed.grow``.

Held-batch logits before and after agree within 1e-5; the grown objects carry the user's settings: the
TransformerConfig, DDP config, optimizer config, param groups (key by key) and LR schedule (step by step) equal
those of the user's own code building the grown size afresh, and the first loss after growth equals the loss
that fresh build gives with the grown weights.
"""

import json

import pytest

from rank_pool import pool

TOL = 1e-5


def _ranks(tmp_path, nproc):
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


def _run(tmp_path, nproc, target, *args):
    out = pool().run(nproc, f"own_loop_worker:{target}", (str(tmp_path), *args), timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return _ranks(tmp_path, nproc)


def _same_schedule(grown_lr, fresh_lr):
    assert len(grown_lr) == len(fresh_lr) == 5
    for step, (mine, theirs) in enumerate(zip(grown_lr, fresh_lr)):
        assert mine == pytest.approx(theirs, rel=1e-12, abs=0), f"step {step}: {mine} vs {theirs}"
    assert len({tuple(lrs) for lrs in grown_lr}) > 1  # the schedule moves over these steps


def test_megatron_example_grows_at_tp2_dp2_with_the_users_settings(tmp_path):
    for rank in _run(tmp_path, 4, "megatron"):
        assert rank["logit_diff"] <= TOL and rank["report_diff"] is None
        assert rank["implements"]
        # the one field growth changes beyond the sizes: hidden growth of an RMSNorm model scales the norm
        # epsilon by h / h' (GROWTH_MATH, "hidden"), 64 -> 96 here
        assert list(rank["config_differs"]) == ["layernorm_epsilon"]
        assert float(rank["config_differs"]["layernorm_epsilon"][0]) == pytest.approx(1e-6 * 64 / 96, rel=1e-12)
        # and the GPTModel's rotary fraction: head_dim growth 16 -> 24 leaves the 8 new dims unrotated
        assert rank["rotary_percent"] == [pytest.approx(16 / 24, rel=1e-12), 1.0]
        assert rank["hooks_rebound"]
        assert rank["ddp_config"][0] == rank["ddp_config"][1] and "grad_reduce_in_fp32=False" in rank["ddp_config"][0]
        assert rank["optimizer_config"][0] == rank["optimizer_config"][1]
        assert rank["scheduler"][0] == rank["scheduler"][1] and "'linear'" in rank["scheduler"][0]["lr_decay_style"]
        assert rank["groups"][0] == rank["groups"][1]
        assert abs(rank["grown_loss_now"] - rank["fresh_loss"]) <= 1e-6
        assert abs(rank["grown_loss_now"] - rank["old_loss"]) <= TOL  # the function was kept
        assert abs(rank["grown_loss"][0] - rank["grown_loss_now"]) <= 1e-6  # training goes on from there
        _same_schedule(rank["grown_lr"], rank["fresh_lr"])


@pytest.mark.parametrize("zero_stage", ["0", "2", "3"])
def test_deepspeed_example_grows_at_dp2_with_the_users_settings(tmp_path, zero_stage):
    for rank in _run(tmp_path, 2, "deepspeed", zero_stage):
        assert rank["logit_diff"] <= TOL and rank["implements"]
        assert rank["optimizer_class"][0] == rank["optimizer_class"][1]
        # hidden growth 64 -> 96 with mean padding scales the LayerNorm epsilon by h / h' (GROWTH_MATH, "hidden")
        assert list(rank["config_differs"]) == ["layernorm_epsilon"]
        assert float(rank["config_differs"]["layernorm_epsilon"][0]) == pytest.approx(1e-5 * 64 / 96, rel=1e-12)
        assert rank["groups"][0] == rank["groups"][1]
        assert [g["weight_decay"] for g in rank["groups"][0]] == [0.1, 0.0]
        assert rank["scheduler"][0] == rank["scheduler"][1]
        assert rank["counters"][0] == rank["counters"][1]
        # DeepSpeed's FusedAdam counts steps in the last parameter of each list it steps together (at ZeRO 0
        # the others stay 0); after growth every parameter's state holds the count, 3
        assert max(rank["adam_steps"][0]) == 3 and rank["adam_steps"][1] == [3]
        assert abs(rank["grown_loss_now"] - rank["fresh_loss"]) <= 1e-6
        assert abs(rank["grown_loss_now"] - rank["old_loss"]) <= TOL
        _same_schedule(rank["grown_lr"], rank["fresh_lr"])


@pytest.mark.parametrize("which, nproc, argv", [
    ("megatron", 4, ["--tp", "2", "--steps", "6", "--grow-at", "3"]),
    ("deepspeed", 2, ["--zero", "2", "--steps", "6", "--grow-at", "3"]),
])
def test_example_scripts_run_and_grow(tmp_path, which, nproc, argv):
    history = _run(tmp_path, nproc, "example_main", which, *argv)[0]
    assert history["growth"]["step"] == 3 and history["growth"]["max_abs_logit_diff"] <= TOL
    assert history["growth"]["params_after"] > history["growth"]["params_before"]
    assert len(history["loss"]) == 6 and all(0 < loss < 10 for loss in history["loss"])


MEGATRON_REFUSALS = {  # case: (error type, words the message must hold)
    "plan_shrinks": ("GrowthRefused", "ffn_hidden_size"),
    "config_ffn_retyped": ("GrowthRefused", "linear_fc1.weight"),
    "config_eps_retyped": ("GrowthRefused", "layernorm_epsilon"),
    "rotary_base_retyped": ("GrowthRefused", "rotary_base"),
    "foreign_optimizer": ("GrowthRefused", "optimizer: the optimizer was not built for this model"),
    "foreign_scheduler": ("GrowthRefused", "scheduler: the scheduler steps another optimizer"),
    "scheduler_kind": ("GrowthRefused", "LambdaLR cannot be rebuilt"),
    "virtual_pipeline": ("GrowthRefused", "virtual pipeline"),
    "config_overrides": ("GrowthError", "pass the config_overrides"),
}
DEEPSPEED_REFUSALS = {
    "not_a_gpt": ("GrowthRefused", "not a megatron-core GPTModel"),
    "scheduler_object": ("GrowthRefused", "lr_scheduler"),
    "split_role": ("GrowthRefused", "optimizer.param_groups"),
    "plan_shrinks": ("GrowthRefused", "hidden_size"),
}


@pytest.mark.parametrize("target, nproc, expected", [
    ("megatron_mismatches", 2, MEGATRON_REFUSALS),
    ("deepspeed_mismatches", 2, DEEPSPEED_REFUSALS),
])
def test_a_plan_config_or_object_that_disagrees_with_the_live_job_is_refused_on_every_rank(
        tmp_path, target, nproc, expected):
    ranks = _run(tmp_path, nproc, target)
    for case, (kind, words) in expected.items():
        seen = [rank[case] for rank in ranks]
        assert all(s["type"] == kind and words in s["message"] for s in seen), (case, seen)
        assert len({s["message"] for s in seen}) == 1, (case, seen)  # the same error on every rank
        assert all(s["kept"] for s in seen), case  # nothing changed
    assert all(0 < rank["trains_after"] < 10 for rank in ranks)


def test_a_float16module_bf16_model_grows_with_its_wrapper_and_fp32_masters(tmp_path):
    for rank in _run(tmp_path, 2, "megatron_float16"):
        assert rank["wrappers"] == ["DistributedDataParallel", "Float16Module", "GPTModel"]
        assert rank["param_dtypes"] == ["torch.bfloat16"]
        assert rank["logit_diff"] == 0.0  # wider MLP and more heads rescale nothing: bit for bit
        assert rank["master_finer_than_bf16"] and rank["master_diff"] == 0.0  # the fp32 master, not its rounding
        assert 0 < rank["loss_after"] < 10
