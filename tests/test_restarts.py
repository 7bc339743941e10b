"""Killed ranks and restarts (issue 9): torchrun --max-restarts brings a job back from its last complete
checkpoint, applies every growth event once, and ends with the weights and Adam moments of a run that was
never interrupted, bit for bit (the data order is deterministic).

The job: TP2 x DP1, DistributedOptimizer, 7 steps, grows after step 3, saves at steps 2, 4, 6 and 7 into the
root it also loads from (restartable). Rank 1 dies by SIGKILL (mgrow.core.faults) during training, during the
growth event and during a checkpoint save; each time the newest complete checkpoint is step 2's, from before
the growth, so the restarted job grows again from there.
"""

import json
import subprocess
import sys

import yaml

from conftest import free_port
from launch_utils import REPO, clean_env, write_config
from mgrow.checkpoint import files
from mgrow.core.faults import KILL_ENV

STEPS = 7
PLAN = {"ops": [{"mlp": {"ffn_hidden_size": 96}}, {"heads": {"num_attention_heads": 8}}]}


def restartable_job(tmp_path, kill=None, restarts=0, timeout=300):
    tmp_path.mkdir()
    root = tmp_path / "ckpt"
    config = write_config(tmp_path, parallel={"tp": 2, "pp": 1}, optimizer={"type": "megatron"},
                          train={"steps": STEPS}, checkpoint={"save": str(root), "load": str(root), "interval": 2})
    raw = yaml.safe_load(config.read_text())
    raw["growth"] = [{"at_step": 3, "plan": PLAN}]
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--max-restarts={restarts}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
               "-m", "mgrow.cli", "train", "--config", str(config)]
    env = {**clean_env(), "PYTHONWARNINGS": "ignore", **({KILL_ENV: kill} if kill else {})}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return root, records, done


def test_a_job_killed_three_ways_restarts_and_ends_bitwise_equal(tmp_path):
    """One torchrun job with --max-restarts=3 whose rank 1 dies on its first three attempts: before step 4's
    update (after growing in memory), in the middle of the growth (moving an MLP weight), and while writing
    step 4's checkpoint. Each restart resumes from step 2's checkpoint (so the save cut short never became
    `latest`, and its temporary folder is cleaned up by the next save); the fourth attempt finishes."""
    kills = ["train:4", "growth:decoder.layers.1.mlp.linear_fc1.weight", "save:4"]
    root, records, done = restartable_job(tmp_path / "killed", kill=",".join(kills), restarts=3)
    reference_root, reference_records, _ = restartable_job(tmp_path / "reference")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] + [3] + [3, 4] + [3, 4, 5, 6, 7]
    assert done.stderr.count("(exitcode: -9)") == 3  # the agent saw rank 1 die by SIGKILL three times
    final = files.read_metadata(root / "step_00000007")
    assert final["progress"]["growth_applied"] == 1
    assert [entry["step"] for entry in final["progress"]["history"]] == [3]  # grown once, at step 3
    assert final["model"] == files.read_metadata(reference_root / "step_00000007")["model"]
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())
    compare = subprocess.run([sys.executable, "-m", "mgrow.cli", "verify", "--before",
                              str(reference_root / "step_00000007"), "--after", str(root / "step_00000007")],
                             capture_output=True, text=True, timeout=120, cwd=REPO,
                             env={**clean_env(), "PYTHONWARNINGS": "ignore"})
    assert compare.returncode == 0, compare.stderr[-3000:]
    report = json.loads(compare.stdout.strip().splitlines()[-1])
    assert report["max_abs_weight_diff"] == 0.0 and report["max_abs_moments_diff"] == 0.0, report
    assert report["max_abs_logit_diff"] == 0.0
    reference_losses = [r["loss"] for r in reference_records if "loss" in r]
    assert [r["loss"] for r in records if "loss" in r][-5:] == reference_losses[-5:]
