"""`mgrow bench growth` runs and reports what it measured (the speed targets are read from its output, not
asserted: benchmarks, not timed tests)."""

import json

from launch_utils import REPO, mgrow_job


def test_bench_growth_reports_growth_roundtrip_floor_and_throughput():
    done = mgrow_job(2, "bench", "growth", "--model", REPO / "configs/models/tiny_gqa_swiglu.yaml",
                     "--plan", REPO / "configs/plans/tiny_gqa_widen.yaml", "--tp", "2", "--optimizer", "megatron",
                     "--throughput-steps", "2", "--device", "cpu", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(line)
    assert result["layout"] == {"tp": 2, "pp": 1, "dp": 1, "device": "cpu", "backend": "gloo", "optimizer": "megatron",
                                "bf16": False}
    assert result["peak_device_bytes"] is None  # CPU ranks: peak_rss_bytes is the memory measure
    assert result["params_after"] > result["params_before"]
    assert len(result["state_bytes_before"]) == len(result["state_bytes_after"]) == len(result["peak_rss_bytes"]) == 2
    # this rank's params + Adam's two moments, all fp32 (megatron AdamW: the parameter is the master), per TP rank
    assert all(after > before for before, after in zip(result["state_bytes_before"], result["state_bytes_after"]))
    assert sum(result["state_bytes_before"]) >= 3 * 4 * result["params_before"]
    parts = result["roundtrip_parts_seconds"]
    assert abs(sum(parts.values()) - result["roundtrip_seconds"]) < 1e-6 and min(parts.values()) > 0
    assert result["growth_seconds"] > 0 and result["memcpy_floor_seconds"] > 0
    assert result["grown_tokens_per_second"] > 0 and result["fresh_tokens_per_second"] > 0
    assert result["throughput_steps"] == 2 and result["throughput_ratio_median_step"] > 0


def test_bench_growth_scaling_reports_each_point_with_its_traffic(tmp_path):
    """--scaling: one job per (model, plan, TP); the table has a row each, TP1 moves no bytes, TP2 does."""
    import subprocess
    import sys

    from launch_utils import clean_env

    study = tmp_path / "study.yaml"
    study.write_text(f"points:\n  - {{model: {REPO}/configs/models/tiny_gqa_swiglu.yaml, "
                     f"plan: {REPO}/configs/plans/tiny_gqa_widen.yaml}}\ntp: [1, 2]\n")
    done = subprocess.run([sys.executable, "-m", "mgrow.cli", "bench", "growth", "--scaling", str(study),
                           "--device", "cpu", "--plot", str(tmp_path / "scaling.png")],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**clean_env(), "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| tiny")]
    assert [row[1].strip() for row in rows] == ["1", "2"]
    sent = [row[-1].strip() for row in rows]
    assert sent[0] == "0 / 0" and sent[1] != "0 / 0"
    assert (tmp_path / "scaling.png").stat().st_size > 1000
