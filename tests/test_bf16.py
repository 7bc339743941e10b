"""bf16 with fp32 master weights in a real job (issue 10): a DistributedOptimizer run grows mid-run, saves
and resumes on another layout. Growth itself on every path and layout: tests/test_growth_sharded.py (bf16)."""

import json

import yaml

from launch_utils import train_job, step_losses, write_config

# Wider MLP and more heads rescale nothing: the old bf16 parameters stay bit for bit and the new ones add
# exact zeros, so the held-out loss is unchanged bit for bit, not just within bf16 rounding.
PLAN = {"ops": [{"mlp": {"ffn_hidden_size": 96}}, {"heads": {"num_attention_heads": 8}}]}


def bf16_config(tmp_path, pp, **checkpoint):
    config = write_config(tmp_path, model={"bf16": True}, parallel={"tp": 1, "pp": pp},
                          optimizer={"type": "megatron"}, train={"steps": 6}, checkpoint=checkpoint)
    raw = yaml.safe_load(config.read_text())
    raw["growth"] = [{"at_step": 3, "plan": PLAN}]
    config.write_text(yaml.safe_dump(raw))
    return config


def test_a_bf16_job_grows_mid_run_and_resumes_on_another_layout(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    root = tmp_path / "a" / "ckpt"
    first = train_job(tmp_path / "a", 2, bf16_config(tmp_path / "a", 2, save=str(root), interval=2))
    reference = step_losses(first)
    (event,) = [r for r in first.metrics if r.get("event") == "growth"]
    assert event["held_loss_after"] == event["held_loss_before"] and event["max_abs_logit_diff"] == 0.0, event
    assert reference[-1] < reference[0] - 0.2, reference
    metadata = json.loads((root / "step_00000004" / "mgrow.json").read_text())
    assert metadata["model"]["bf16"] is True and metadata["model"]["ffn_hidden_size"] == 96

    resumed = step_losses(train_job(tmp_path / "b", 1, bf16_config(tmp_path / "b", 1, load=str(root / "step_00000004"))))
    assert len(resumed) == 2
    assert max(abs(a - b) for a, b in zip(resumed, reference[4:])) <= 1e-5, (resumed, reference)
