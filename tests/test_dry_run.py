"""`mgrow plan` (issue 25) against the growth it dry-runs.

The same model, plan and layout go through `mgrow bench growth` (a real growth
on CPU ranks, its mover's bytes counted on the wire by
mgrow.parallel.traffic, its resident memory read from /proc) and through
`mgrow plan` (the table of moves and the memory model, nothing allocated):

* every rank's mover bytes, by op, equal the dry run's for that rank's
  (stage, TP rank), byte for byte;
* every rank's transient in the dry run (the memory growth adds on top of the
  old state) is within 10 % of its measured peak resident growth (VmHWM reset
  just before growth, minus VmRSS then). The ranks run with glibc's
  ``MALLOC_MMAP_THRESHOLD_`` pinned at 128 KiB: every tensor of a page or more
  is then its own mapping, returned when freed, so the resident set follows the
  live tensors the model counts (glibc's default raises the threshold up to
  32 MiB as blocks are freed and keeps later ones in its heap).

The model is the 25M-parameter bench model (configs/bench/gqa_25m.yaml): the
state must dwarf what an interpreter allocates on its own. The plan widens
every dimension and inserts four layers at the bottom, so two old layers move
from stage 0 to stage 1 at PP 2.
"""

import json
import statistics
import subprocess
import sys

import pytest
import yaml

from launch_utils import REPO, clean_env


def run_mgrow(*args, timeout: float = 120, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "mgrow.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**clean_env(), "PYTHONWARNINGS": "ignore", **(env or {})})

PLAN = {"ops": [{"mlp": {"ffn_hidden_size": 2048}}, {"heads": {"num_attention_heads": 16, "num_query_groups": 8}},
                {"hidden": {"hidden_size": 768}}, {"layers": {"insert_before": [0, 0, 0, 0]}}],
        "init": {"std": 0.02, "seed": 1234}}
MODEL = REPO / "configs/bench/gqa_25m.yaml"
JOBS = {"distopt_tp2_pp2_dp2": dict(tp=2, pp=2, dp=2, optimizer="megatron"),
        "zero2_tp2_dp2": dict(tp=2, pp=1, dp=2, optimizer="zero2")}


def _json_line(stdout: str) -> dict:
    (line,) = [line for line in stdout.splitlines() if line.startswith("{")]
    return json.loads(line)


@pytest.fixture(scope="module", params=sorted(JOBS))
def measured_and_planned(request, tmp_path_factory):
    job = JOBS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    plan = folder / "plan.yaml"
    plan.write_text(yaml.safe_dump(PLAN))
    flags = [f"--{k}={v}" for k, v in job.items()]
    done = run_mgrow("bench", "growth", "--model", MODEL, "--plan", plan, *flags, "--no-roundtrip",
                     "--throughput-steps", "0", "--device", "cpu", timeout=600,
                     env={"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
    assert done.returncode == 0, done.stderr[-3000:]
    dry = run_mgrow("plan", "--model", MODEL, "--plan", plan, *flags, "--local-bytes-per-second", "1GB/s", "--ranks")
    assert dry.returncode == 0, dry.stderr[-3000:]
    return job, _json_line(done.stdout), _json_line(dry.stdout)


def test_the_dry_run_predicts_every_byte_the_mover_sends(measured_and_planned):
    job, bench, dry = measured_and_planned
    moved_somewhere = set()
    for rank, counted in enumerate(bench["moved_by_rank"]):
        tp_rank, stage = rank % job["tp"], rank // (job["tp"] * job["dp"])
        planned = dry["moved_bytes_by_op"][f"{stage},{tp_rank}"]
        sent, received = counted["sent_bytes_by_op"], counted["received_bytes_by_op"]
        assert planned == {"all_reduce": sent.get("all_reduce", 0), "send": sent.get("send", 0),
                           "recv": received.get("recv", 0), "all_gather": sent.get("all_gather", 0)}, rank
        assert received.get("all_reduce", 0) == sent.get("all_reduce", 0)
        moved_somewhere |= {op for op, n in planned.items() if n}
    # the DP reads happen on both layouts; the stage moves only where there are stages
    assert moved_somewhere == ({"all_reduce", "send", "recv"} if job["pp"] > 1 else {"all_reduce"})


def test_the_memory_estimate_is_within_10_percent_of_the_measured_growth(measured_and_planned):
    job, bench, dry = measured_and_planned
    for entry in dry["ranks"]:
        measured = bench["rss_growth_bytes"][entry["rank"]]
        assert entry["transient_bytes"] == pytest.approx(measured, rel=0.10), (entry["rank"], entry, measured)
    # the state before and after, counted from the live engines (weights, separate fp32 masters, Adam moments)
    for which in ("before", "after"):
        state, counted = dry[f"state_bytes_{which}"], bench[f"state_bytes_{which}"]
        for stat, pick in (("max", max), ("median", statistics.median)):
            exact = sum(state[kind][stat] for kind in ("weights", "masters", "moments"))
            assert exact == pytest.approx(pick(counted), rel=1e-3), (which, stat)


def test_a_70b_class_dry_run_finishes_in_under_a_minute():
    done = run_mgrow("plan", "--model", REPO / "configs/llama/34b.yaml", "--plan", REPO / "configs/llama/34b_to_70b.yaml",
                     "--tp", "8", "--pp", "8", "--dp", "16", "--bf16", "--local-bytes-per-second", "1GB/s",
                     timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = _json_line(done.stdout)
    assert result["dry_run_seconds"] < 60
    assert result["model"]["params_after"] > 70e9 and result["layout"]["world"] == 1024
    # one rank by hand: 35.3B parameters over TP 8 x PP 8; the median stage holds 6 layers of
    # 2 x 8192 + 8192 x (8192 + 2 x 1024) + 8192 x 8192 + 3 x 8192 x 22016 entries, TP-split 8 ways
    # (the norms are replicated), in bf16 (2 bytes each)
    layer = 8192 * (8192 + 2 * 1024) + 8192 * 8192 + 3 * 8192 * 22016
    middle_stage = 6 * (layer // 8 + 2 * 8192)
    assert result["state_bytes_before"]["weights"]["median"] == 2 * middle_stage
    assert result["state_bytes_before"]["moments"]["median"] == 8 * -(-middle_stage // 16)


def test_a_plan_that_cannot_fit_says_so():
    done = run_mgrow("plan", "--model", REPO / "configs/llama/34b.yaml", "--plan", REPO / "configs/llama/34b_to_70b.yaml",
                     "--tp", "8", "--pp", "1", "--dp", "1", "--optimizer", "adam", "--bf16",
                     "--local-bytes-per-second", "1GB/s", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = _json_line(done.stdout)
    assert not result["fits_after"] and not result["fits_during_growth"]
    assert "after growth NO, during growth NO" in done.stderr


def test_bad_input_is_named_before_anything_is_built():
    plan = REPO / "configs/plans/llama_pro.yaml"
    for flags, message in (
        (["--tp", "3"], "model.num_attention_heads: 8 heads must be divisible by tensor parallel size 3"),
        (["--bandwidth", "intra=300GB/s"], "--bandwidth: needs both intra= and inter="),
        (["--device-memory", "lots"], "--device-memory: expected a size such as 80GiB or 25GB/s, got 'lots'"),
        (["--optimizer", "sgd"], "--optimizer: must be one of adam | megatron | zero1 | zero2 | zero3"),
        (["--dp", "0"], "--dp: must be >= 1, got 0"),
    ):
        done = run_mgrow("plan", "--model", MODEL, "--plan", plan, *flags)
        assert done.returncode == 2 and f"mgrow: error: {message}" in done.stderr, (flags, done.stderr[-2000:])


def test_the_llama_ladder_plans_reach_the_shipped_models():
    import dataclasses

    from mgrow.core.model_config import ModelConfig
    from mgrow.core.plan import load_plan
    from mgrow.ops.plan import steps

    for small, plan, large in (("8b", "8b_to_13b", "13b"), ("34b", "34b_to_70b", "70b")):
        grown = steps(load_plan(REPO / f"configs/llama/{plan}.yaml"), ModelConfig.load(REPO / f"configs/llama/{small}.yaml"))
        target = ModelConfig.load(REPO / f"configs/llama/{large}.yaml")
        # growing the hidden size scales RMSNorm's epsilon with it (the function is kept): 1e-5 x 4096 / 5120
        assert grown[-1].grown == dataclasses.replace(target, layernorm_epsilon=grown[-1].grown.layernorm_epsilon)
        assert grown[-1].grown.layernorm_epsilon == pytest.approx(
            target.layernorm_epsilon * (1 if small == "34b" else 4096 / 5120), rel=1e-12)
