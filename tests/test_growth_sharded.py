"""Sharded growth in memory (issue 4): the invariants on every layout and optimizer path, through `mgrow verify`.

Each run takes tp*pp*dp ranks of the rank pool, trains a random model 2 steps,
grows it by each plan and reports (see mgrow/testing/invariants.py). Checked here:
logits before vs after <= 1e-5; gathered grown weights and Adam moments equal
the reference operators' (after the documented shard-local permutation)
exactly; one more step leaves the old slice within 1e-6 of the same step on
the ungrown model, for every plan that does not rescale old weights.

The bf16 runs (issue 10) check the same on the fp32 masters, plus: every bf16
parameter is the bf16 rounding of its grown master, bit for bit; logits agree
within the derived bf16 tolerance (invariants.bf16_logit_tol) where a plan
rescales old weights, and bit for bit where it does not.
"""

import json

import pytest
import yaml

from launch_utils import mgrow_job

MODEL_A = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
               ffn_hidden_size=64, vocab_size=64, max_sequence_length=16, normalization="LayerNorm",
               activation="gelu", position_embedding_type="learned_absolute")  # untied, biases
MODEL_B = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
               ffn_hidden_size=64, vocab_size=64, max_sequence_length=16, normalization="RMSNorm",
               activation="swiglu", position_embedding_type="rope", share_embeddings_and_output_weights=True,
               add_bias_linear=False, qk_layernorm=True)
MODEL_C = dict(MODEL_A, num_query_groups=4, softmax_scale=0.35)  # MHA; explicit softmax scale: head_dim rescales nothing

EVERY_OP = {"ops": [{"mlp": {"ffn_hidden_size": 96}}, {"heads": {"num_attention_heads": 8}},
                    {"head_dim": {"kv_channels": 12}}, {"hidden": {"hidden_size": 48, "method": "auto"}},
                    {"layers": {"insert_before": [1], "num_layers": 4}}], "init": {"std": 0.02, "seed": 5}}
NEW_GROUPS = {"ops": [{"heads": {"num_attention_heads": 8, "num_query_groups": 4}},
                      {"mlp": {"ffn_hidden_size": 128}}, {"layers": {"insert_before": [0, 2]}}]}
REPLICATE = {"ops": [{"hidden": {"hidden_size": 64, "method": "replicate"}}, {"layers": {"num_layers": 4}}]}
NO_RESCALE = {"ops": [{"head_dim": {"kv_channels": 12}}, {"heads": {"num_attention_heads": 8}},
                      {"mlp": {"ffn_hidden_size": 96}}, {"layers": {"insert_before": [2], "num_layers": 4}}]}

RUNS = [  # (optimizer, tp, pp, dp, model, plans); DeepSpeed at pp = 1
    ("adam", 1, 1, 1, MODEL_A, [EVERY_OP, NEW_GROUPS]),
    ("adam", 2, 2, 1, MODEL_B, [EVERY_OP, NEW_GROUPS, REPLICATE]),
    ("adam", 4, 1, 2, MODEL_C, [NO_RESCALE, REPLICATE]),
    ("adam", 4, 1, 1, MODEL_A, [NEW_GROUPS]),  # 2 groups on 4 TP ranks: old heads move between TP ranks
    ("adam", 1, 2, 2, MODEL_C, [NO_RESCALE, EVERY_OP]),
    ("megatron", 2, 2, 2, MODEL_A, [NEW_GROUPS, EVERY_OP]),
    ("megatron", 2, 1, 2, MODEL_B, [NEW_GROUPS, REPLICATE]),
    ("zero1", 2, 1, 2, MODEL_C, [NO_RESCALE, REPLICATE]),
    ("zero2", 1, 1, 2, MODEL_B, [NEW_GROUPS, EVERY_OP]),
    ("zero3", 2, 1, 2, MODEL_A, [NEW_GROUPS, EVERY_OP]),
    # sizes that 3 ranks do not divide: DeepSpeed 0.19.8's own ZeRO-3 setter fails on the last rank's padding
    ("zero3", 1, 1, 3, MODEL_A, [NEW_GROUPS]),
]


BF16_RUNS = [  # the acceptance layouts of issue 10, and the third optimizer path
    ("megatron", 2, 2, 2, MODEL_C, [NO_RESCALE, EVERY_OP]),
    ("zero2", 2, 1, 2, MODEL_B, [NEW_GROUPS, EVERY_OP]),
    ("adam", 1, 2, 1, MODEL_A, [NEW_GROUPS, REPLICATE]),
    ("zero3", 1, 1, 2, MODEL_C, [NO_RESCALE]),
]


def run_verify(tmp_path, optimizer, tp, pp, dp, model, plans, bf16=False):
    """``mgrow verify`` on tp x pp x dp ranks of the rank pool."""
    model_path = tmp_path / "model.yaml"
    model_path.write_text(yaml.safe_dump(model))
    args = ["verify", "--model", model_path, "--tp", tp, "--pp", pp, "--dp", dp, "--optimizer", optimizer,
            *(["--bf16"] * bf16), "--device", "cpu"]
    for index, plan in enumerate(plans):
        path = tmp_path / f"plan{index}.yaml"
        path.write_text(yaml.safe_dump(plan))
        args += ["--plan", path]
    done = mgrow_job(tp * pp * dp, *args)
    return done, [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("optimizer, tp, pp, dp, model, plans", RUNS,
                         ids=[f"{r[0]}-tp{r[1]}-pp{r[2]}-dp{r[3]}" for r in RUNS])
def test_growth_invariants(tmp_path, optimizer, tp, pp, dp, model, plans):
    check_invariants(tmp_path, optimizer, tp, pp, dp, model, plans, bf16=False)


@pytest.mark.parametrize("optimizer, tp, pp, dp, model, plans", BF16_RUNS,
                         ids=[f"{r[0]}-tp{r[1]}-pp{r[2]}-dp{r[3]}" for r in BF16_RUNS])
def test_bf16_growth_acts_on_the_fp32_masters(tmp_path, optimizer, tp, pp, dp, model, plans):
    check_invariants(tmp_path, optimizer, tp, pp, dp, model, plans, bf16=True)


def bf16_logit_tol(max_abs_logit, num_layers):
    """verify_job's formula, restated: (2 N + 3) bf16 roundings of relative 2^-8 at the logits' scale."""
    return (2 * num_layers + 3) * 2.0**-8 * max_abs_logit


def check_invariants(tmp_path, optimizer, tp, pp, dp, model, plans, bf16):
    done, reports = run_verify(tmp_path, optimizer, tp, pp, dp, model, plans, bf16=bf16)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(reports) == len(plans)
    for plan, report in zip(plans, reports):
        assert report["layout"] == {"tp": tp, "pp": pp, "dp": dp, "device": "cpu", "backend": "gloo",
                                    "optimizer": optimizer}
        assert report["bf16"] is bf16
        assert report["params_after"] > report["params_before"]
        rescaling = plan is EVERY_OP or plan is REPLICATE  # hidden growth rescales norm gains / readers
        if bf16 and rescaling:  # both plans end at 4 layers
            assert report["max_abs_logit_diff"] <= bf16_logit_tol(report["max_abs_logit"], 4), report
        else:
            assert report["max_abs_logit_diff"] <= 1e-5, report
        assert report["max_abs_vs_reference"] == 0.0, report  # the masters, bit for bit
        assert report["masters_finer_than_bf16"], report  # ... which a grown-then-upcast bf16 copy would not be
        assert report["max_abs_moments_vs_reference"] == 0.0, report
        assert report["max_abs_params_vs_masters"] == 0.0, report  # bf16: the masters' rounding, bit for bit
        if rescaling:
            assert report["max_abs_step_equivalence"] is None, report
        else:
            assert report["max_abs_step_equivalence"] is not None and report["max_abs_step_equivalence"] <= 1e-6, report
        assert report["growth_seconds"] > 0 and report["peak_rss_bytes"] > 0
