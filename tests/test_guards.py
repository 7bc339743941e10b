"""Nothing silently wrong, nothing lost (issue 22, first part): growth checks its own result, training stops
on non-finite weights or loss before saving them, and a checkpoint with any byte changed is refused by name."""

import json
import shutil

import pytest
import yaml

from launch_utils import mgrow_job, train_job, write_config
from rank_pool import pool


@pytest.mark.parametrize("case, words", [
    ("nan", "growth failed its own check: the logits on the held batch moved by nan"),
    ("wrong", "growth failed its own check: the logits on the held batch moved by"),
])
def test_growth_that_does_not_preserve_the_logits_is_rolled_back_on_every_rank(tmp_path, case, words):
    out = pool().run(2, "guard_worker:self_check", (str(tmp_path), case), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["error"] is not None and words in rank["error"], rank
        assert "every rank keeps its old model and optimizer" in rank["error"]
        assert rank["kept"], rank
    assert ranks[0]["error"] == ranks[1]["error"]
    if case == "wrong":
        assert all(0 < rank["loss_after"] < 10 for rank in ranks)


def test_a_diverging_run_stops_before_it_saves_non_finite_weights(tmp_path):
    root = tmp_path / "ckpt"
    config = write_config(tmp_path, optimizer={"lr": 1e6, "min_lr": 0.0, "warmup_steps": 0}, train={"steps": 6},
                          checkpoint={"save": str(root), "interval": 1})
    result = train_job(tmp_path, 2, config)
    assert result.returncode == 3, result.stderr[-3000:]
    for rank in range(2):
        assert "the update made the model's weights non-finite" in result.rank_stderr[rank]
    saved = sorted(p.name for p in root.glob("step_*"))
    stopped = int(result.rank_stderr[0].split("mgrow: error: step ")[1].split(":")[0])
    assert saved and saved[-1] == f"step_{stopped - 1:08d}"
    # what was saved is finite: every tensor of the last checkpoint, read back with torch's own DCP reader
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(root / saved[-1] / "model", tmp_path / "flat.pt")
    tensors = []

    def walk(value):
        if torch.is_tensor(value):
            tensors.append(value)
        elif isinstance(value, dict):
            for each in value.values():
                walk(each)

    walk(torch.load(tmp_path / "flat.pt", weights_only=True))
    floats = [t for t in tensors if t.is_floating_point()]
    assert len(floats) > 10 and all(bool(torch.isfinite(t).all()) for t in floats)


def _flip(path, position=None):
    data = bytearray(path.read_bytes())
    index = len(data) // 2 if position is None else position
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One checkpoint per format: megatron dist_checkpointing (DistributedOptimizer, DP2) and DeepSpeed ZeRO-2."""
    out = {}
    for kind, optimizer in (("megatron", "megatron"), ("deepspeed", "zero2")):
        tmp = tmp_path_factory.mktemp(kind)
        config = write_config(tmp, optimizer={"type": optimizer, "decay_steps": 10}, train={"steps": 2},
                              checkpoint={"save": str(tmp / "ckpt")})
        assert train_job(tmp, 2, config).returncode == 0
        out[kind] = tmp / "ckpt" / "step_00000002"
    return out


KINDS = {"megatron": ["mgrow.json", "rng.pt", "model/.metadata", "model/common.pt", "model/metadata.json",
                      "model/__0_1.distcp"],
         "deepspeed": ["deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                       "zero_to_fp32.py"]}


@pytest.mark.parametrize("kind, name", [(k, n) for k, names in KINDS.items() for n in names])
def test_a_checkpoint_with_a_flipped_byte_is_refused_on_resume_naming_the_file(saved, tmp_path, kind, name):
    copy = tmp_path / "ckpt" / "step_00000002"
    shutil.copytree(saved[kind], copy)
    _flip(copy / name)
    optimizer = "megatron" if kind == "megatron" else "zero2"
    config = write_config(tmp_path, optimizer={"type": optimizer, "decay_steps": 10}, train={"steps": 3},
                          checkpoint={"load": str(copy)})
    result = train_job(tmp_path, 2, config)
    assert result.returncode == 2, result.stderr[-3000:]
    for rank in range(2):
        line = [l for l in result.rank_stderr[rank].splitlines() if l.startswith("mgrow: error:")]
        assert line and str(copy / name) in line[0], result.rank_stderr[rank][-2000:]


@pytest.mark.parametrize("kind, name", [(k, n) for k, names in KINDS.items() for n in names])
def test_grow_checkpoint_and_verify_refuse_a_flipped_byte_naming_the_file(saved, tmp_path, kind, name):
    copy = tmp_path / "ckpt" / "step_00000002"
    shutil.copytree(saved[kind], copy)
    _flip(copy / name)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"ops": [{"mlp": {"ffn_hidden_size": 96}}]}))
    grown = mgrow_job(2, "grow-checkpoint", "--in", copy, "--plan", plan, "--out", tmp_path / "out")
    compared = mgrow_job(1, "verify", "--before", copy, "--after", saved[kind])
    for run in (grown, compared):
        assert run.returncode == 2, run.stderr[-3000:]
        assert str(copy / name) in run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "out").exists()  # nothing written


def _lock(root, pid):
    import socket

    root.mkdir(parents=True)
    (root / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "since": "2026-12-01 00:00:00"}))


def test_a_second_job_on_a_checkpoint_root_is_refused_before_it_starts(tmp_path):
    root = tmp_path / "ckpt"
    _lock(root, 1)  # a live process of this host holds the root
    config = write_config(tmp_path, checkpoint={"save": str(root)})
    result = train_job(tmp_path, 2, config)
    assert result.returncode == 2, result.stderr[-3000:]
    for rank in range(2):
        assert f"{root}/.lock: {root} is in use by the job with pid 1 on" in result.rank_stderr[rank]
    assert sorted(p.name for p in root.iterdir()) == [".lock"]  # nothing written, nothing deleted
    assert not [r for r in result.metrics if "loss" in r]


def test_a_dead_jobs_lock_is_taken_over_and_the_root_released_at_the_end(tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    root = tmp_path / "ckpt"
    _lock(root, dead.pid)
    config = write_config(tmp_path, checkpoint={"save": str(root)})
    result = train_job(tmp_path, 2, config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (root / "latest").exists() and not (root / ".lock").exists()


def test_a_checkpoint_root_that_cannot_be_written_is_refused_before_the_first_step(tmp_path):
    (tmp_path / "a_file").write_text("")
    config = write_config(tmp_path, checkpoint={"save": str(tmp_path / "a_file" / "ckpt")})
    result = train_job(tmp_path, 2, config)
    assert result.returncode == 2
    for rank in range(2):
        assert f"mgrow: error: checkpoint.save: cannot write checkpoints under {tmp_path}/a_file/ckpt" \
               in result.rank_stderr[rank]
    assert not [r for r in result.metrics if "loss" in r]


def test_a_checkpoint_root_without_room_for_a_checkpoint_is_refused(tmp_path, monkeypatch):
    import collections

    from mgrow.checkpoint import files
    from mgrow.core.errors import ConfigError

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(ConfigError) as error:
        files.claim_root(str(tmp_path / "ckpt"), "checkpoint.save", 2**30)
    assert error.value.field == "checkpoint.save"
    assert "has 0.00 GiB free; one checkpoint of this run needs about 1.00 GiB" in error.value.rule
    assert not (tmp_path / "ckpt" / ".lock").exists()


def test_a_growth_that_cannot_fit_in_memory_is_refused_before_training(tmp_path):
    config = write_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["growth"] = [{"at_step": 2, "plan": {"ops": [{"hidden": {"hidden_size": 10_000_000}}]}}]
    config.write_text(yaml.safe_dump(raw))
    result = train_job(tmp_path, 2, config)
    assert result.returncode == 2, result.stderr[-3000:]
    for rank in range(2):
        line = [l for l in result.rank_stderr[rank].splitlines() if l.startswith("mgrow: error:")][0]
        assert line.startswith("mgrow: error: growth[0].plan: growing needs about ")
        assert float(line.split("about ")[1].split(" GiB")[0]) > 100 and line.endswith("GiB available")
    assert not [r for r in result.metrics if "loss" in r]


def test_a_master_port_held_by_another_process_is_named_on_every_rank(tmp_path):
    """Two rank processes as a launcher starts them, MASTER_PORT held by a listener that never answers: both
    exit with one error line within 60 s, none waits out the rendezvous timeout."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from launch_utils import REPO, clean_env

    config = write_config(tmp_path, optimizer={"type": "zero2"})
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        start = time.monotonic()
        ranks = [subprocess.Popen([sys.executable, "-m", "mgrow.cli", "train", "--config", str(config)], cwd=REPO,
                                  env={**clean_env(), "PYTHONWARNINGS": "ignore", "RANK": str(rank),
                                       "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank in range(2)]
        outputs = [rank.communicate(timeout=60) for rank in ranks]
        assert time.monotonic() - start < 60
    for rank, (_, stderr) in zip(ranks, outputs):
        lines = [line for line in stderr.splitlines() if line.startswith("mgrow: error:")]
        assert rank.returncode == 2 and len(lines) == 1, stderr[-2000:]
        assert lines[0].startswith(f"mgrow: error: MASTER_PORT: port {port}")
    assert not os.path.exists(tmp_path / "metrics.jsonl")
