"""Growth's collectives do not grow with the number of parameters (issue 21).

`mgrow bench growth` on TP2 x PP2 x DP2 with Megatron's DistributedOptimizer
counts every torch.distributed call each rank makes during growth
(mgrow.parallel.traffic). Every parameter grows shard-local (old units stay on
their TP rank), the DistributedOptimizer's DP pieces are read in one bulk
collective per tensor kind, and each phase is agreed on once: a model with
three times the layers (2.6 times the parameters) makes exactly the same calls
on every rank, none of them a TP all-gather. A plan that moves layers between
stages adds the stage-to-stage sends: one per moved tensor per pass (weights,
exp_avg, exp_avg_sq).
"""

import json

import yaml

from launch_utils import REPO, mgrow_job

WIDEN = {"ops": [{"mlp": {"ffn_hidden_size": 256}}, {"heads": {"num_attention_heads": 8}},
                 {"hidden": {"hidden_size": 96}}], "init": {"std": 0.02, "seed": 3}}


def bench(tmp_path, num_layers: int, plan: dict, tag: str) -> dict:
    model = yaml.safe_load((REPO / "configs/models/tiny_gqa_swiglu.yaml").read_text())
    model["num_layers"] = num_layers
    model_path, plan_path = tmp_path / f"model_{tag}.yaml", tmp_path / f"plan_{tag}.yaml"
    model_path.write_text(yaml.safe_dump(model))
    plan_path.write_text(yaml.safe_dump(plan))
    done = mgrow_job(8, "bench", "growth", "--model", model_path, "--plan", plan_path, "--tp", "2", "--pp", "2",
                     "--dp", "2", "--optimizer", "megatron", "--no-roundtrip", "--throughput-steps", "0", "--device", "cpu",
                     timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(line)


def test_collectives_during_growth_do_not_grow_with_the_parameters(tmp_path):
    small, large = bench(tmp_path, 2, WIDEN, "small"), bench(tmp_path, 6, WIDEN, "large")
    assert large["params_before"] > 2 * small["params_before"]
    assert small["calls_by_rank"] == large["calls_by_rank"], (small["calls_by_rank"], large["calls_by_rank"])
    for calls, planned in zip(small["calls_by_rank"], small["planned_by_rank"]):
        assert planned["gathered_parameters"] == 0
        assert not {"all_gather", "send", "recv"} & set(calls), calls  # no TP gather, no stage move
        assert sum(calls.values()) <= 40, calls  # a constant: agreements, the Adam step, one read per tensor kind


# 2 layers on PP2 ([1, 1]) -> 4 layers ([2, 2]). Inserting two layers before layer 0 gives [new, new, 0, 1]: old
# layer 0 moves from stage 0 to stage 1 (its 6 tensors: two norms, qkv, proj, fc1, fc2), sent once per pass
# (weights, exp_avg, exp_avg_sq) by each stage-0 rank to its stage-1 peer. Inserting them before 1 and at the end
# ([0, new, 1, new]) moves nothing.
MOVES_LAYER_0 = {"ops": [{"layers": {"insert_before": [0, 0]}}], "init": {"std": 0.02, "seed": 3}}
MOVES_NOTHING = {"ops": [{"layers": {"insert_before": [1, 2]}}], "init": {"std": 0.02, "seed": 3}}


def test_pipeline_moves_send_each_moved_shard_once_per_pass(tmp_path):
    moved, still = bench(tmp_path, 2, MOVES_LAYER_0, "moved"), bench(tmp_path, 2, MOVES_NOTHING, "still")
    for rank, (with_moves, without) in enumerate(zip(moved["calls_by_rank"], still["calls_by_rank"])):
        stage = rank // 4  # ranks 0-3 on stage 0 (tp x dp = 4), 4-7 on stage 1
        p2p = "send" if stage == 0 else "recv"
        assert with_moves.pop(p2p) == 6 * 3, (rank, with_moves)
        assert with_moves == without, (rank, with_moves, without)
    # the bytes counted on the wire are the bytes the table of moves planned, per pass (x 3 passes)
    for counted, planned in zip(moved["p2p_bytes_by_rank"], moved["planned_by_rank"]):
        assert counted["sent"] == 3 * planned["stage_sent_bytes"]
        assert counted["received"] == 3 * planned["stage_received_bytes"]
    assert sum(p["stage_sent_bytes"] for p in moved["planned_by_rank"]) > 0
