"""Bad configs and failing ranks under the launchers: torchrun ends the job fast, the local launcher refuses
before starting and ends a job whose rank fails with that rank's exit code."""

import time

from launch_utils import REPO, clean_env, torchrun, write_config

# Bad configs on every rank of a plain multi-process job: tests/test_bad_inputs.py (the catalog).


def test_bad_config_under_torchrun_fails_fast(tmp_path):
    """Under torchrun the first failing rank ends the job (the agent stops the others): no hang, field named."""
    config = write_config(tmp_path, parallel={"tp": 2}, model={"num_attention_heads": 3, "num_query_groups": 3,
                                                                 "kv_channels": 8})
    start = time.monotonic()
    result = torchrun(tmp_path, 2, config, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - start < 120
    assert any("mgrow: error: model.num_attention_heads:" in e for e in result.rank_stderr.values())


def test_local_launcher_refuses_before_starting_ranks(tmp_path):
    import subprocess
    import sys

    config = write_config(tmp_path, parallel={"tp": 2, "pp": 2})
    done = subprocess.run(
        [sys.executable, "-m", "mgrow.cli", "train", "--config", str(config), "--nproc", "6"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=clean_env(),
    )
    assert done.returncode == 2
    assert "mgrow: error: parallel: tp*pp = 2*2 = 4 must divide the world size 6" in done.stderr


def test_local_launcher_ends_the_job_with_a_failing_rank_and_its_exit_code():
    """A rank that fails after the local launcher started the job ends it: the rank's message, its exit code
    (1 for a growth failure, 2 for bad input), no hang."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "mgrow.cli", "verify", "--model", str(REPO / "configs/models/tiny.yaml"),
               "--plan", str(REPO / "configs/plans/all_ops.yaml"), "--dp", "2", "--optimizer", "adam"]
    env = {**clean_env(), "PYTHONWARNINGS": "ignore",
           "MGROW_INJECT_GROWTH_FAILURE": "1:weights:decoder.layers.0.mlp.linear_fc1.weight"}
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert time.monotonic() - start < 120
    assert done.returncode == 1, done.stderr[-3000:]
    assert "mgrow: error: growth failed at weights of decoder.layers.0.mlp.linear_fc1.weight (rank 1:" in done.stderr
