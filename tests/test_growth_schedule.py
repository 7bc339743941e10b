"""Mid-run growth in real jobs (issue 5, first part): a growth schedule under torchrun multi-node and the
deepspeed launcher. The loss on the held batch right after each event equals the loss right before it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import free_port
from launch_utils import REPO, clean_env, write_config
from mgrow.core.errors import ConfigError
from mgrow.train import config as train_config

PLAN = {"ops": [{"hidden": {"hidden_size": 48}}, {"heads": {"num_attention_heads": 8}},
                {"mlp": {"ffn_hidden_size": 96}}, {"layers": {"insert_before": [1], "num_layers": 4}}]}


def growth_config(tmp_path, optimizer, tp, wandb=None, **event):
    config = write_config(tmp_path, parallel={"tp": tp, "pp": 1}, optimizer={"type": optimizer},
                          train={"steps": 5})
    raw = yaml.safe_load(config.read_text())
    raw["growth"] = [{"at_step": 3, "plan": PLAN, "lr_warmup_steps": 2, **event}]
    if wandb:
        raw["wandb"] = wandb
    config.write_text(yaml.safe_dump(raw))
    return config


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_run(tmp_path, done, params_after):
    assert all(d.returncode == 0 for d in done), "\n".join(d.stdout[-2000:] + d.stderr[-3000:] for d in done)
    records = read_metrics(tmp_path / "metrics.jsonl")
    events = [r for r in records if r.get("event") == "growth"]
    assert len(events) == 1 and events[0]["step"] == 3, events
    event = events[0]
    assert event["params_after"] == params_after > event["params_before"]
    assert abs(event["held_loss_after"] - event["held_loss_before"]) <= 1e-5, event
    assert event["max_abs_logit_diff"] <= 1e-5, event
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]


def test_two_torchrun_nodes_on_loopback_grow_mid_run(tmp_path):
    """Also logs to an offline W&B run, read back with W&B's own reader (`wandb leet inspect --json`)."""
    config = growth_config(tmp_path, "megatron", tp=2, wandb={"mode": "offline", "dir": str(tmp_path / "wb"),
                                                             "project": "mgrow-test", "tags": ["ci"]})
    port = free_port()
    nodes = [  # launch/torchrun.sh, as on two machines: NNODES, NODE_RANK, MASTER_ADDR/PORT, c10d rendezvous
        subprocess.Popen(
            ["bash", str(REPO / "launch" / "torchrun.sh"), str(config)], cwd=REPO,
            env={**clean_env(), "PYTHONWARNINGS": "ignore", "NNODES": "2", "NODE_RANK": str(node),
                 "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RDZV_ID": "mgrow-test"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in range(2)
    ]
    done = []
    for node in nodes:
        out, err = node.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    check_run(tmp_path, done, params_after=_grown_params())
    assert "tp=2 pp=1 dp=2" in done[0].stdout + done[1].stdout
    history = wandb_history(tmp_path / "wb")
    steps = [row for row in history if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4, 5]
    assert all({"lr", "tokens", "params"} <= set(row) for row in steps)
    (event,) = [row for row in history if "growth/params_after" in row]
    metrics = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "growth"][0]
    for field in ("params_before", "params_after", "max_abs_logit_diff", "held_loss_before", "held_loss_after",
                  "growth_seconds", "peak_rss_bytes", "tokens"):
        assert event[f"growth/{field}"] == pytest.approx(metrics[field], rel=1e-12), field
    assert event["step"] == 3 and json.loads(event["growth/plan"]) == metrics["plan"]


def wandb_history(wandb_dir):
    """History rows of the one offline run under ``wandb_dir``, through W&B's own log reader.

    (DeepSpeed's monitor calling wandb.init gets the active run back, but wandb leaves an empty run folder.)
    """
    (log,) = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    done = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(log)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def test_deepspeed_launcher_with_a_hostfile_grows_zero2_mid_run(tmp_path):
    """DeepSpeed's own W&B monitor section is honoured too: its rows land in the same offline run."""
    config = growth_config(tmp_path, "zero2", tp=1, wandb={"mode": "offline", "dir": str(tmp_path / "wb")})
    raw = yaml.safe_load(config.read_text())
    raw["deepspeed"] = {"wandb": {"enabled": True, "project": "mgrow-test"}}
    config.write_text(yaml.safe_dump(raw))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    done = subprocess.run(  # launch/deepspeed.sh with a hostfile naming localhost only
        ["bash", str(REPO / "launch" / "deepspeed.sh"), str(config)], capture_output=True, text=True, timeout=300,
        cwd=REPO, env={**clean_env(), "PYTHONWARNINGS": "ignore", "HOSTFILE": str(hostfile),
                       "MASTER_PORT": str(free_port())})
    check_run(tmp_path, [done], params_after=_grown_params())
    assert "tp=1 pp=1 dp=2 | cpu (gloo) | optimizer zero2" in done.stdout
    history = wandb_history(tmp_path / "wb")
    assert any("Train/Samples/lr" in row for row in history)  # DeepSpeed's monitor
    assert any("growth/params_after" in row for row in history) and any("loss" in row for row in history)


def test_token_trigger_batch_change_and_reset_continue_the_data_stream(tmp_path):
    """at_tokens fires at the first step at or after it; the global batch doubles from the event on."""
    config = write_config(tmp_path, parallel={"tp": 1, "pp": 2}, train={"steps": 6})
    raw = yaml.safe_load(config.read_text())
    raw["growth"] = [{"at_tokens": 600, "plan": {"ops": [{"mlp": {"ffn_hidden_size": 96}}]},
                      "optimizer_state": "reset", "global_batch_size": 16}]
    config.write_text(yaml.safe_dump(raw))
    from launch_utils import train_job

    result = train_job(tmp_path, 2, config)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in result.metrics if "loss" in r]
    (event,) = [r for r in result.metrics if r.get("event") == "growth"]
    # 8 samples x 32 tokens a step: 512 tokens after step 2, 768 after step 3 -> grows before step 4
    assert event["step"] == 3 and event["tokens"] == 768 and event["global_batch_size"] == 16
    assert event["optimizer_state"] == "reset"
    assert abs(event["held_loss_after"] - event["held_loss_before"]) <= 1e-5
    assert [r["tokens"] for r in steps] == [256, 512, 768, 1280, 1792, 2304]


def _grown_params():
    from launch_utils import TINY_MODEL
    from mgrow.core.model_config import ModelConfig
    from mgrow.core.plan import load_plan

    return load_plan(PLAN).validate(ModelConfig(**TINY_MODEL))[-1].num_parameters()


@pytest.mark.parametrize("event, field", [
    ({"plan": PLAN}, "growth[0].at_step"),
    ({"at_step": 3, "at_tokens": 9, "plan": PLAN}, "growth[0].at_step"),
    ({"at_step": 0, "plan": PLAN}, "growth[0].at_step"),
    ({"at_step": 3}, "growth[0].plan"),
    ({"at_step": 3, "plan": {"ops": [{"mlp": {"ffn_hidden_size": 8}}]}}, "growth[0].plan.ops[0].mlp.ffn_hidden_size"),
    ({"at_step": 3, "plan": {"ops": [{"layers": {"num_layers": 3, "num_layers_in_first_pipeline_stage": 3}}]}},
     "growth[0].plan"),  # a split megatron-core refuses at pp = 2 (no layer left for the last stage)
    ({"at_step": 3, "plan": PLAN, "optimizer_state": "zero"}, "growth[0].optimizer_state"),
    ({"at_step": 3, "plan": PLAN, "global_batch_size": 6}, "growth[0].global_batch_size"),
    ({"at_step": 3, "plan": PLAN, "when": 4}, "growth[0].when"),
])
def test_bad_growth_events_name_the_field(tmp_path, event, field):
    config = write_config(tmp_path, parallel={"tp": 1, "pp": 2})
    raw = yaml.safe_load(config.read_text())
    raw["growth"] = [event]
    with pytest.raises(ConfigError) as caught:
        train_config.from_dict(raw).check_world(4)
    assert caught.value.field == field, caught.value


def test_events_must_come_in_order(tmp_path):
    raw = yaml.safe_load(write_config(tmp_path).read_text())
    raw["growth"] = [{"at_step": 5, "plan": {"ops": [{"mlp": {"ffn_hidden_size": 96}}]}},
                     {"at_step": 5, "plan": {"ops": [{"mlp": {"ffn_hidden_size": 128}}]}}]
    with pytest.raises(ConfigError, match="growth\\[1\\].at_step: events must come in order"):
        train_config.from_dict(raw)


def test_plot_draws_the_loss_curve_with_growth_events(tmp_path):
    from mgrow.train.plot import plot_loss

    metrics = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 5.0 - 0.1 * s} for s in range(1, 11)]
    records.insert(5, {"event": "growth", "step": 5, "params_before": 1000, "params_after": 4000,
                       "held_loss_before": 4.5, "held_loss_after": 4.5})
    metrics.write_text("\n".join(json.dumps(r) for r in records))
    out = plot_loss(str(metrics), str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.endswith("loss.png")
    with pytest.raises(ConfigError, match="--metrics: metrics file .* does not exist"):
        plot_loss(str(tmp_path / "none.jsonl"), str(tmp_path / "x.png"))
