"""The training-efficiency study: its FLOPs count, its reading of the loss curves, and one small run end to end."""

import json
import subprocess
import sys

import pytest
import yaml

from launch_utils import REPO, clean_env
from mgrow.jobs.bench.efficiency import SCRATCH, Curve, best_lr, curve, summarize, summarize_seeds, sweep_table, trial_name
from mgrow.jobs.bench.flops import forward_flops_per_token, training_flops_per_token
from mgrow.core.model_config import ModelConfig

GPT2_LIKE = dict(num_layers=3, hidden_size=48, num_attention_heads=4, vocab_size=256, max_sequence_length=64)


def test_flops_equal_megatron_formula_for_mha():
    """Narayanan et al. 2021: 72 B s L h^2 (1 + s/6h + V/12Lh) per iteration, for MHA with ffn = 4h."""
    model = ModelConfig(**GPT2_LIKE)
    L, h, V, s = 3, 48, 256, 64
    per_iteration = 72 * 1 * s * L * h**2 * (1 + s / (6 * h) + V / (12 * L * h))
    assert training_flops_per_token(model, s) * s == pytest.approx(per_iteration, rel=1e-12)


@pytest.mark.parametrize("options", [
    dict(num_query_groups=2, kv_channels=16, ffn_hidden_size=80, activation="swiglu", add_bias_linear=False,
         normalization="RMSNorm", position_embedding_type="rope"),
    dict(share_embeddings_and_output_weights=True),
])
def test_flops_are_two_per_weight_of_every_matmul(single_rank, options):
    """Independent of the formula: 2 FLOPs per multiply-add of every linear weight of a real GPTModel
    (output layer included, embedding lookups not), plus QK^T and attention x V."""
    from mgrow.engine.model import build_gpt

    model = ModelConfig(**{**GPT2_LIKE, **options})
    s = 32
    gpt = build_gpt(model, single_rank)
    matmul_weights = sum(p.numel() for name, p in gpt.named_parameters()
                         if p.dim() == 2 and "embedding" not in name)
    if model.share_embeddings_and_output_weights:
        matmul_weights += model.vocab_size * model.hidden_size  # the output layer reads the word embedding
    attention = model.num_layers * 4 * s * model.num_attention_heads * model.kv_channels
    assert forward_flops_per_token(model, s) == 2 * matmul_weights + attention


def test_curve_reading():
    run = Curve(flops=[1.0, 2.0, 4.0], losses=[3.0, 2.0, 1.0])
    assert run.flops_to_reach(1.5) == 3.0  # half-way between the 2nd and 3rd evaluations
    assert run.flops_to_reach(3.5) == 1.0
    assert run.flops_to_reach(0.5) is None
    assert run.loss_at(1.5) == 2.5 and run.loss_at(5.0) is None
    # the scratch run first reaches its final loss 1.5 before its end, at 2 + 1.5/1.6 * 2 FLOPs
    scratch = Curve(flops=[2.0, 4.0, 8.0], losses=[3.0, 1.4, 1.5])
    rows = summarize({"scratch": scratch, "grown": run})
    assert rows["scratch"]["flops_to_target"] == pytest.approx(3.875) and rows["scratch"]["flops_saved"] == 0.0
    assert rows["grown"]["flops_to_target"] == 3.0
    assert rows["grown"]["flops_saved"] == pytest.approx(1 - 3.0 / 3.875)
    assert rows["grown"]["scratch_loss_at_equal_flops"] == 1.4


def test_curve_counts_each_phase_at_its_model_size():
    small = dict(GPT2_LIKE, num_layers=1)
    cfg = {"model": small, "train": {"seq_length": 16, "global_batch_size": 2, "micro_batch_size": 2},
           "growth": [{"at_step": 2, "plan": {"ops": [{"layers": {"num_layers": 3}}]}}]}
    tokens = 2 * 16
    metrics = [{"step": 1, "loss": 5.0, "tokens": tokens}, {"step": 2, "loss": 4.0, "tokens": 2 * tokens},
               {"step": 2, "validation_loss": 4.5}, {"event": "growth", "step": 2, "tokens": 2 * tokens},
               {"step": 3, "loss": 3.0, "tokens": 3 * tokens}, {"step": 3, "validation_loss": 3.5}]
    per_token = [training_flops_per_token(ModelConfig(**m), 16) for m in (small, GPT2_LIKE)]
    assert per_token[0] < per_token[1]
    run = curve(cfg, metrics)
    assert run.flops == [2 * tokens * per_token[0], 2 * tokens * per_token[0] + tokens * per_token[1]]
    assert run.losses == [4.5, 3.5]


def test_bench_efficiency_runs_a_small_study(tmp_path):
    study = yaml.safe_load((REPO / "bench/efficiency.yaml").read_text())
    study["final_model"].update(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                                max_sequence_length=32)
    study["training"]["train"].update(seq_length=32, global_batch_size=4, micro_batch_size=4, eval_batches=2)
    study["training"]["optimizer"]["warmup_steps"] = 2
    study["sizes"] = {"tiny": {"steps": 8, "eval_interval": 2}}
    study["runs"] = {"scratch": {}, "depth": {"model": {"num_layers": 1},
                                              "growth": [{"at": 0.5, "plan": {"ops": [{"layers": {"num_layers": 2}}]}}]}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    done = subprocess.run(
        [sys.executable, "-m", "mgrow.cli", "bench", "efficiency", "--study", str(path), "--size", "tiny",
         "--out", str(tmp_path / "out"), "--plot", str(tmp_path / "plot.png")],
        capture_output=True, text=True, timeout=240, cwd=REPO, env={**clean_env(), "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("{")]
    runs = json.loads(line)["runs"]
    assert set(runs) == {"scratch", "depth"} and (tmp_path / "plot.png").stat().st_size > 0
    # 4 steps at 1 layer, 4 at 2 layers, against 8 at 2 layers
    per_token = [training_flops_per_token(ModelConfig(**{**study["final_model"], "num_layers": n}), 32) for n in (1, 2)]
    assert runs["scratch"]["total_flops"] == 8 * 128 * per_token[1]
    assert runs["depth"]["total_flops"] == 4 * 128 * (per_token[0] + per_token[1])
    growth = [json.loads(l) for l in (tmp_path / "out/depth.jsonl").read_text().splitlines() if "event" in l]
    assert [g["step"] for g in growth] == [4] and growth[0]["max_abs_logit_diff"] < 1e-5


def test_a_swept_study_picks_each_runs_best_lr_and_reruns_to_the_same_curve(tmp_path):
    """Each run at each peak LR with the first seed, then at its own best LR with the second; the results file
    holds every trial, and --rerun trains one again from its recorded config to the same curve, bit for bit."""
    study = yaml.safe_load((REPO / "bench/efficiency.yaml").read_text())
    study["final_model"].update(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                                max_sequence_length=32)
    study["training"]["train"].update(seq_length=32, global_batch_size=4, micro_batch_size=4, eval_batches=2)
    study["training"]["optimizer"].update(warmup_steps=2, lr=1e-3, min_lr=1e-4)
    study["sizes"] = {"tiny": {"steps": 6, "eval_interval": 2, "lrs": [1e-3, 8e-3], "seeds": [7, 8]}}
    study["runs"] = {"scratch": {}, "depth": {"model": {"num_layers": 1},
                                              "growth": [{"at": 0.5, "plan": {"ops": [{"layers": {"num_layers": 2}}]}}]}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    command = [sys.executable, "-m", "mgrow.cli", "bench", "efficiency", "--study", str(path), "--size", "tiny",
               "--out", str(tmp_path / "out"), "--jobs", "2"]
    env = {**clean_env(), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results/study_tiny.json").read_text())
    trials = results["trials"]
    for run in ("scratch", "depth"):
        finals = {lr: [r for r in trials[trial_name(run, lr, 7)]["metrics"] if "validation_loss" in r][-1]
                  ["validation_loss"] for lr in (1e-3, 8e-3)}
        best = min(finals, key=finals.get)
        assert results["runs"][run]["lr"] == best and results["runs"][run]["lr_at_edge"]
        assert set(t for t in trials if t.startswith(f"{run}-")) == {
            trial_name(run, 1e-3, 7), trial_name(run, 8e-3, 7), trial_name(run, best, 8)}
        second = trials[trial_name(run, best, 8)]["config"]
        assert second["optimizer"]["lr"] == best and second["train"]["seed"] == 8
        assert second["optimizer"]["min_lr"] == pytest.approx(best / 10)
    assert "is at the edge of the sweep" in done.stderr
    rerun = subprocess.run(command + ["--rerun", trial_name("depth", 1e-3, 7)], capture_output=True, text=True,
                           timeout=200, cwd=REPO, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (line,) = [line for line in rerun.stdout.splitlines() if line.startswith("{")]
    report = json.loads(line)
    assert report["same_to_printed_digits"] and report["max_abs_diff"] == 0.0 and report["evaluations"] == 3


def test_bench_efficiency_refuses_an_unknown_run(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mgrow.cli", "bench", "efficiency", "--runs", "widht", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=clean_env())
    assert done.returncode == 2
    assert "mgrow: error: --runs: 'widht' is not a run of bench/efficiency.yaml" in done.stderr


def test_the_published_study_recomputes_from_its_curves():
    """bench/results/efficiency_full.json holds every trial's config and metrics: the curves, the best LR of each
    run, the table of the README and every number in it are recomputed from them here."""
    results = json.loads((REPO / "bench/results/efficiency_full.json").read_text())
    seeds, trials = results["seeds"], results["trials"]
    assert len(seeds) >= 2 and results["reference"] == SCRATCH
    curves = {}
    for run, row in results["runs"].items():
        lrs = results["lrs"][run]
        assert len(lrs) >= 3 and all(b / a == pytest.approx(2.0) for a, b in zip(lrs, lrs[1:]))
        finals = {lr: curve(**_trial(trials, run, lr, seeds[0])).losses[-1] for lr in lrs}
        assert best_lr(finals) == row["lr"] and lrs[0] < row["lr"] < lrs[-1], (run, finals)  # inside the sweep
        assert row["sweep"] == {str(lr): loss for lr, loss in finals.items()}
        curves[run] = [curve(**_trial(trials, run, row["lr"], seed)) for seed in seeds]
        assert [{"flops": c.flops, "validation_loss": c.losses} for c in curves[run]] == results["curves"][run]
        # every trial trained 1,200 steps at its own peak LR and seed (min_lr = lr / 10)
        for lr in lrs:
            config = trials[trial_name(run, lr, seeds[0])]["config"]
            assert config["optimizer"]["lr"] == lr and config["optimizer"]["min_lr"] == pytest.approx(lr / 10)
            assert config["optimizer"]["warmup_steps"] == (120 if run == SCRATCH else 20)
        tokens = [r["tokens"] for r in trials[trial_name(run, row["lr"], seeds[0])]["metrics"] if "tokens" in r]
        assert tokens[-1] == 1200 * 16 * 128
    rows = summarize_seeds(curves, SCRATCH)
    assert list(rows) == list(results["runs"]) and rows[SCRATCH]["flops_verdict"] == "reference"
    for run, row in rows.items():
        for key, value in row.items():
            assert results["runs"][run][key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float)
                                                 else value), (run, key)
    readme = (REPO / "README.md").read_text()
    assert sweep_table(results["runs"]) in readme


def _trial(trials: dict, run: str, lr: float, seed: int) -> dict:
    trial = trials[trial_name(run, lr, seed)]
    return {"cfg": trial["config"], "metrics": trial["metrics"]}
