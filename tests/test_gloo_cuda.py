"""The staging that lets ranks share one GPU over gloo changes nothing but where the bytes pass.

tests/staging_worker.py trains TP1 x PP2 x DP2 (DistributedOptimizer) on CPU ranks with and
without :mod:`mgrow.parallel.gloo_cuda` applied; the pipeline's sends and receives then go
through the proxies' CPU buffers and megatron's bucket collectives run one by one. Losses and
weights must be equal bit for bit. (On a GPU, launch/gpu_check.sh runs the same staging with
CUDA tensors.)
"""

import json
import subprocess
import sys

from launch_utils import REPO, clean_env


def test_staged_p2p_and_one_by_one_collectives_train_bit_for_bit_alike(tmp_path):
    out = tmp_path / "result.json"
    launch = ("import sys; sys.path.insert(0, 'tests'); import staging_worker; "
              "from mgrow.jobs.launch import launch_local; "
              f"sys.exit(launch_local(4, staging_worker.main, [{str(out)!r}]))")
    done = subprocess.run([sys.executable, "-c", launch], capture_output=True, text=True, timeout=240, cwd=REPO,
                          env={**clean_env(), "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["plain"] == result["staged"] and len(set(result["plain"])) == 3, result
    assert result["weights_equal"] and result["deepspeed_stages_cuda"], result
