"""Deep Fusion (issue 8): the reference operator on full state dicts, and `mgrow fuse` on TP2 checkpoints.

Self-fusion F(A, A) must equal A (1e-5, through a real GPTModel forward; `mgrow verify --before A --after F`
checks the fused checkpoint independently at TP1). F(A, B) is only approximately the logit average: its
deviation is reported and its weights and moments must have the block structure of docs/growth_math.md.
"""

import json
import math

import pytest
import torch

from launch_utils import mgrow_job, train_job, write_config
from mgrow.core.model_config import ModelConfig
from mgrow.ops.fusion import fuse_state, fuse_tensor
from mgrow.testing.harness import random_state, random_tokens, reference_logits as logits

TOL = 1e-5
VARIANTS = {
    "gqa-swiglu-rmsnorm-rope-qknorm": dict(normalization="RMSNorm", activation="swiglu", num_query_groups=2,
                                           position_embedding_type="rope", add_bias_linear=False, qk_layernorm=True),
    "layernorm-gelu-bias": dict(normalization="LayerNorm", activation="gelu"),
    "layernorm-tied": dict(normalization="LayerNorm", activation="gelu", share_embeddings_and_output_weights=True),
}


def small(**kw) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64,
                       max_sequence_length=16, **kw)


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_self_fusion_of_a_state_dict_is_exact_and_a_broken_rule_is_not(variant, single_rank):
    cfg = small(**VARIANTS[variant])
    state, tokens = random_state(cfg, 0, single_rank), random_tokens(cfg, 0)
    before = logits(cfg, state, tokens, single_rank)
    fused, fused_cfg = fuse_state(state, state, cfg)
    assert (fused_cfg.hidden_size, fused_cfg.num_attention_heads, fused_cfg.ffn_hidden_size) == (64, 8, 128)
    assert fused_cfg.num_query_groups == 2 * cfg.num_query_groups and fused_cfg.kv_channels == cfg.kv_channels
    assert float(before.abs().max()) > 0.5  # large enough for a wrong rule to show
    assert float((logits(fused_cfg, fused, tokens, single_rank) - before).abs().max()) <= TOL
    # Negative control: the ensemble halving left out (no /2 on the output, or on the tied final norm).
    halved = "decoder.final_layernorm.weight" if cfg.share_embeddings_and_output_weights else "output_layer.weight"
    broken = dict(fused, **{halved: fused[halved] * 2})
    if cfg.share_embeddings_and_output_weights and "decoder.final_layernorm.bias" in broken:
        broken["decoder.final_layernorm.bias"] = fused["decoder.final_layernorm.bias"] * 2
    assert float((logits(fused_cfg, broken, tokens, single_rank) - before).abs().max()) >= 1e-3


def test_fusion_of_two_state_dicts_is_block_diagonal_and_near_the_logit_average(single_rank):
    cfg = small(**VARIANTS["layernorm-gelu-bias"])
    a, b = random_state(cfg, 0, single_rank), random_state(cfg, 1, single_rank)
    fused, fused_cfg = fuse_state(a, b, cfg)
    h, p = cfg.hidden_size, cfg.ffn_hidden_size
    fc1 = fused["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:p, :h], a["decoder.layers.0.mlp.linear_fc1.weight"])
    assert torch.equal(fc1[p:, h:], b["decoder.layers.0.mlp.linear_fc1.weight"])
    assert not fc1[:p, h:].any() and not fc1[p:, :h].any()
    tokens = random_tokens(cfg, 0)
    average = (logits(cfg, a, tokens, single_rank) + logits(cfg, b, tokens, single_rank)) / 2
    deviation = float((logits(fused_cfg, fused, tokens, single_rank) - average).abs().max())
    print(f"reference F(A, B): max |z_F - (z_A + z_B)/2| = {deviation:.4g} (max |average| "
          f"{float(average.abs().max()):.4g})")
    assert math.isfinite(deviation) and deviation > TOL  # one norm over 2h: approximate, as documented


# ----------------------------------------------------------------------------- `mgrow fuse` on TP2 checkpoints


def fuse(*args: str):
    """``mgrow fuse`` on the two ranks of the checkpoints' layout (TP2), from the rank pool."""
    return mgrow_job(2, "fuse", *args, timeout=180)


def report(run) -> dict:
    assert run.returncode == 0, run.stderr[-4000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, run.stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Steps 1 and 2 of one TP2 DistributedOptimizer run of the tiny GQA/SwiGLU/RoPE model (A and B)."""
    tmp = tmp_path_factory.mktemp("fusion")
    config = write_config(tmp, parallel={"tp": 2}, train={"steps": 2}, optimizer={"type": "megatron", "warmup_steps": 1},
                          checkpoint={"save": str(tmp / "ckpt"), "interval": 1})
    done = train_job(tmp, 2, config)
    assert done.returncode == 0, done.stderr[-4000:]
    return tmp, tmp / "ckpt" / "step_00000001", tmp / "ckpt" / "step_00000002"


def test_fuse_a_checkpoint_with_itself_at_tp2_keeps_its_logits(checkpoints):
    tmp, a, _ = checkpoints
    result = report(fuse("--a", str(a), "--b", str(a), "--out", str(tmp / "fused_aa")))
    assert result["max_abs_logit_diff_vs_average"] <= TOL
    assert result["model"]["hidden_size"] == 64 and result["params_fused"] > 2 * result["params_a"]
    checked = report(mgrow_job(1, "verify", "--before", a, "--after", tmp / "fused_aa", "--tol", TOL, timeout=180))
    assert checked["ok"] and checked["max_abs_logit_diff"] <= TOL and checked["max_abs_logit"] > 0.1


def test_fuse_two_checkpoints_reports_the_deviation_and_has_the_block_structure(checkpoints, single_rank):
    from mgrow.checkpoint.files import open_checkpoint as read
    from mgrow.train.restore import restored_engine
    from mgrow.testing.harness import gather_state

    tmp, a, b = checkpoints
    result = report(fuse("--a", str(a), "--b", str(b), "--out", str(tmp / "fused_ab")))
    print("mgrow fuse, A = step 1, B = step 2:", {k: v for k, v in result.items() if k != "model"})
    assert math.isfinite(result["max_abs_logit_diff_vs_average"]) and result["max_abs_logit_diff_a_b"] > 1e-3

    states = {}
    for key, path in (("a", a), ("b", b), ("f", tmp / "fused_ab")):
        folder, metadata, model = read(str(path), key)
        engine, cfg, _ = restored_engine(folder, metadata, single_rank)  # loaded at TP1 as `mgrow train` would
        states[key] = gather_state(engine, model)
        engine.destroy()
    cfg = ModelConfig.from_dict(read(str(a), "a")[1]["model"])
    h, p = cfg.hidden_size, cfg.ffn_hidden_size
    for kind in ("weight", "exp_avg", "exp_avg_sq"):
        fused, sa, sb = states["f"][kind], states["a"][kind], states["b"][kind]
        assert fused.keys() == sa.keys()
        fc2 = fused["decoder.layers.1.mlp.linear_fc2.weight"]  # [2h, 2p]
        assert torch.equal(fc2[:h, :p], sa["decoder.layers.1.mlp.linear_fc2.weight"])
        assert torch.equal(fc2[h:, p:], sb["decoder.layers.1.mlp.linear_fc2.weight"])
        assert not fc2[:h, p:].any() and not fc2[h:, :p].any()
        power = {"weight": -1, "exp_avg": 1, "exp_avg_sq": 2}[kind]  # the output layer is halved: m x2, v x4
        out = fused["output_layer.weight"]
        assert torch.equal(out[:, :h], sa["output_layer.weight"] * 2.0 ** power)
        assert torch.equal(out[:, h:], sb["output_layer.weight"] * 2.0 ** power)
    for name, tensor in states["f"]["weight"].items():  # the sharded job = the reference op on the gathered A, B
        assert torch.equal(tensor, fuse_tensor(name, states["a"]["weight"][name], states["b"]["weight"][name], cfg)), name


# ----------------------------------------------------------------------------- fusion as a transaction


def fusion_with_a_failure(optimizer: str, out_dir: str) -> None:
    """On each rank of a TP2 job: two trained engines, a fusion that fails on one rank (the environment's
    MGROW_INJECT_GROWTH_FAILURE), then A and B as they were and a training step of A."""
    import json
    from pathlib import Path

    import torch.distributed as dist

    from launch_utils import TINY_MODEL
    from mgrow.core.errors import GrowthError
    from mgrow.engine.engines import build_engine, global_mean_loss
    from mgrow.engine.model import build_gpt
    from mgrow.parallel.dims import init_distributed, shutdown
    from mgrow.testing.harness import RandomBatches, check_config, gather_state
    from mgrow.transforms.fuse import fuse as fuse_engines

    model = ModelConfig(**TINY_MODEL)
    dims = init_distributed(2, 1, 1234, device="cpu")
    cfg = check_config(model, dims, optimizer, 16)
    batches = RandomBatches(cfg, 1234, dims)
    engines = [build_engine(build_gpt(model, dims, seed=seed), cfg, dims) for seed in (1, 2)]
    for engine in engines:
        engine.train_step(batches(0))
    before = [gather_state(engine, model) for engine in engines]
    try:
        fuse_engines(*engines, cfg)
        error = None
    except GrowthError as caught:
        error = str(caught)
    after = [gather_state(engine, model) for engine in engines]
    compared = sum(len(tensors) for state in before for tensors in state.values())
    unchanged = all(torch.equal(b[kind][name], a[kind][name])
                    for b, a in zip(before, after) for kind in b for name in b[kind])
    next_loss = global_mean_loss(engines[0].train_step(batches(1)), dims)
    Path(out_dir, f"rank{dims.rank}.json").write_text(json.dumps(
        {"error": error, "unchanged": unchanged, "compared": compared, "next_loss": next_loss}))
    for engine in engines:
        engine.destroy()
    dist.barrier()
    shutdown()


@pytest.mark.parametrize("optimizer, phase", [("megatron", "moments"), ("zero2", "weights")])
def test_a_fusion_that_fails_on_one_rank_leaves_both_models_as_they_were(tmp_path, optimizer, phase):
    from rank_pool import pool

    name = "decoder.layers.1.mlp.linear_fc1.weight"
    done = pool().run(2, "test_fusion:fusion_with_a_failure", (optimizer, str(tmp_path)),
                      env={"MGROW_INJECT_GROWTH_FAILURE": f"1:{phase}:{name}"}, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    what = "optimizer state" if phase == "moments" else "weights"
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["error"] is not None and result["error"].startswith(
            f"fusion failed at {what} of {name} (rank 1: RuntimeError: injected failure"), result
        assert result["error"].endswith("every rank keeps its old model and optimizer"), result
        assert result["unchanged"] and result["compared"] > 0, result
        assert 0 < result["next_loss"] < 10, result
