"""Foundation: the same model trains identically on every layout and optimizer path."""

import pytest

from launch_utils import train_job, step_losses, write_config

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def test_same_loss_on_every_tp_pp_layout(tmp_path):
    """Same initial weights and global batch: 3 AdamW steps agree to 1e-5 on TP1/PP1, TP2/PP1, TP1/PP2, TP2/PP2."""
    losses = {}
    for tp, pp in LAYOUTS:
        config = write_config(tmp_path, parallel={"tp": tp, "pp": pp}, train={"steps": 3})
        losses[(tp, pp)] = step_losses(train_job(tmp_path, tp * pp, config))
    reference = losses[(1, 1)]
    assert len(reference) == 3
    assert reference[2] < reference[0]  # the steps really update the model
    for layout, values in losses.items():
        diff = max(abs(a - b) for a, b in zip(values, reference))
        assert diff <= 1e-5, f"TP{layout[0]}/PP{layout[1]} differs from TP1/PP1 by {diff}: {values} vs {reference}"


@pytest.fixture(scope="module")
def adam_dp1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adam_dp1")
    return step_losses(train_job(tmp, 1, write_config(tmp, train={"steps": 20})))


@pytest.mark.parametrize("optimizer", ["megatron", "zero1", "zero2", "zero3"])
def test_dp2_optimizer_paths_follow_adam(tmp_path, adam_dp1, optimizer):
    """Each path trains 20 steps (loss falls) and, at DP=2, follows the DP=1 AdamW loss within 1e-4 for 5 steps."""
    config = write_config(tmp_path, optimizer={"type": optimizer}, train={"steps": 20})
    losses = step_losses(train_job(tmp_path, 2, config))
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    diff = max(abs(a - b) for a, b in zip(losses[:5], adam_dp1[:5]))
    assert diff <= 1e-4, f"{optimizer} DP=2 vs AdamW DP=1: {diff}\n{losses[:5]}\n{adam_dp1[:5]}"


def test_adam_path_trains(adam_dp1):
    assert len(adam_dp1) == 20
    assert sum(adam_dp1[-3:]) / 3 < sum(adam_dp1[:3]) / 3 - 0.5, adam_dp1


def test_layernorm_gelu_tied_learned_positions_on_tp2_pp2(tmp_path):
    """The other model options (LayerNorm, GELU, learned positions, tied output, biases, MHA) across layouts."""
    model = dict(normalization="LayerNorm", activation="gelu", position_embedding_type="learned_absolute",
                 share_embeddings_and_output_weights=True, add_bias_linear=True, num_query_groups=4)
    losses = {}
    for tp, pp in [(1, 1), (2, 2)]:
        config = write_config(tmp_path, model=model, parallel={"tp": tp, "pp": pp}, train={"steps": 3})
        losses[(tp, pp)] = step_losses(train_job(tmp_path, tp * pp, config))
    diff = max(abs(a - b) for a, b in zip(losses[(2, 2)], losses[(1, 1)]))
    assert diff <= 1e-5, losses


def test_runs_as_one_rank_under_the_deepspeed_launcher(tmp_path):
    import subprocess
    import sys

    from conftest import free_port
    from launch_utils import REPO

    config = write_config(tmp_path, optimizer={"type": "zero1"}, train={"steps": 3})
    done = subprocess.run(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
         "--module", "mgrow.cli", "train", "--config", str(config)],
        capture_output=True, text=True, timeout=240, cwd=REPO, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tp=1 pp=1 dp=2 | cpu (gloo) | optimizer zero1" in done.stdout
    assert "step     3/3" in done.stdout
