"""`mgrow verify` with the example model and plan files: as one rank of the rank pool, and the refusal of an
impossible plan as a user's subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from launch_utils import mgrow_job

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "configs" / "models" / "tiny.yaml"
PLAN = REPO / "configs" / "plans" / "all_ops.yaml"


def verify(*args: str):
    return mgrow_job(1, "verify", *args)


def report(run) -> dict:
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, run.stdout + run.stderr
    return json.loads(lines[0])


def test_verify_grows_the_example_model_by_every_op_and_preserves_logits():
    run = verify("--model", str(MODEL), "--plan", str(PLAN))
    assert run.returncode == 0, run.stderr[-3000:]
    result = report(run)
    assert result["params_before"] == 19648  # tiny.yaml by ModelConfig.num_parameters
    assert result["params_after"] > result["params_before"]
    assert result["max_abs_logit_diff"] <= 1e-5
    assert result["max_abs_logit"] > 0.5  # logits large enough for a wrong rule to show
    assert result["model_after"] == {"num_layers": 4, "hidden_size": 48, "num_attention_heads": 8,
                                     "num_query_groups": 2, "kv_channels": 12, "ffn_hidden_size": 96}


def test_verify_exits_non_zero_beyond_the_tolerance():
    run = verify("--model", str(MODEL), "--plan", str(PLAN), "--tol", "1e-12")
    result = report(run)
    assert result["max_abs_logit_diff"] > 1e-12  # fp32 rounding is never exactly zero here
    assert run.returncode == 1 and result["ok"] is False


def test_verify_refuses_an_impossible_plan_naming_the_field(tmp_path):
    plan = tmp_path / "bad.yaml"
    ops = [{"mlp": {"ffn_hidden_size": 96}}, {"hidden": {"hidden_size": 40, "method": "replicate"}}]
    plan.write_text(yaml.safe_dump({"ops": ops}))
    run = subprocess.run([sys.executable, "-m", "mgrow.cli", "verify", "--model", str(MODEL), "--plan", str(plan)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "ops[1].hidden.hidden_size" in run.stderr and "integer multiple" in run.stderr
