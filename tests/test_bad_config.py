"""Bad configs fail on every rank, before any model is built, naming the field; nobody hangs."""

import time

import pytest

from launch_utils import REPO, spawn_ranks, torchrun, write_config

CASES = [
    # (sections, overrides, ranks, field named in the error)
    ({"model": {"num_layerz": 2}}, [], 2, "model.num_layerz"),
    ({"parallel": {"tp": 2}, "model": {"num_attention_heads": 3, "num_query_groups": 3, "kv_channels": 8}}, [], 2,
     "model.num_attention_heads"),
    ({"parallel": {"tp": 4}, "model": {"num_attention_heads": 12, "num_query_groups": 6, "kv_channels": 8}}, [], 4,
     "model.num_query_groups"),
    ({"parallel": {"tp": 2, "pp": 1}}, [], 3, "parallel"),
    ({"data": {"path": "/nonexistent/corpus", "sources": []}}, [], 2, "data.path"),
    ({}, ["train.stepz=3"], 2, "train.stepz"),
    ({"optimizer": {"type": "zero2"}, "parallel": {"pp": 2}}, [], 2, "parallel.pp"),
]


@pytest.mark.parametrize("sections, overrides, ranks, field", CASES, ids=[c[3] for c in CASES])
def test_bad_config_fails_on_every_rank(tmp_path, sections, overrides, ranks, field):
    config = write_config(tmp_path, **sections)
    start = time.monotonic()
    result = spawn_ranks(ranks, config, *overrides, timeout=120)
    assert time.monotonic() - start < 120
    assert sorted(result.rank_stderr) == list(range(ranks))
    for rank, stderr in result.rank_stderr.items():
        assert f"mgrow: error: {field}:" in stderr, f"rank {rank}: {stderr[-2000:]}"
    assert result.returncode == 2
    assert "parameters |" not in result.stdout  # no model was built


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
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert done.returncode == 2
    assert "mgrow: error: parallel: tp*pp = 2*2 = 4 must divide the world size 6" in done.stderr
