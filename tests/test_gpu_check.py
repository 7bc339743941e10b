"""launch/gpu_check.sh cannot rot: its dry run builds every command of the GPU check and validates each with
mgrow's own parser, model, plan and config rules (on this CPU machine, running nothing)."""

import subprocess
import sys

from launch_utils import REPO, clean_env


def test_the_gpu_check_dry_run_validates_every_command():
    done = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), "--dry-run", "--out", "/nonexistent"],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**clean_env(), "PY": sys.executable, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "dry run: 30 checks, every command valid"
    names = [line.split(":", 1)[0] for line in lines[:-1]]
    assert sum(n.startswith("probe/") for n in names) == 14
    assert {f"a/verify_{o}_{p}" for o in ("adam", "megatron", "zero1", "zero2", "zero3") for p in ("fp32", "bf16")} \
        <= set(names)
    assert {"a/train_growth", "a/train_resume", "b/verify_tp2_pp2_dp1_megatron", "b/verify_tp2_pp1_dp2_zero2",
            "c/bench_growth"} <= set(names)
    bench = next(line for line in lines if line.startswith("c/bench_growth"))
    assert "configs/bench/gpu_1b.yaml" in bench and "--device cuda" in bench
