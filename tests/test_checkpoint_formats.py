"""Checkpoints other tools wrote (issue 19): Megatron-LM's save folders, plain dist_checkpointing folders and
DeepSpeed checkpoints, detected from the folder, grown offline by `mgrow grow-checkpoint` in their own format,
compared by `mgrow verify --before --after`, and resumed."""

import json

import pytest
import yaml

from checkpoint_formats_worker import MODEL, PLAN, SAVED_AT
from launch_utils import REPO, mgrow_job
from rank_pool import pool

TOL = 1e-5


def _ranks(tmp_path, nproc):
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


def _run(tmp_path, nproc, target, *args):
    out = pool().run(nproc, f"checkpoint_formats_worker:{target}", (str(tmp_path), *args), timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return _ranks(tmp_path, nproc)


def _report(run) -> dict:
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])


def test_a_megatron_lm_checkpoint_grows_offline_and_resumes_on_another_layout(tmp_path):
    """TP2 x PP2, DistributedOptimizer (Megatron-LM's default dp_reshardable format), bf16: grown offline into
    a Megatron-LM folder whose args hold the grown sizes, then resumed at TP2 x PP1 by a megatron-core loop: the
    next losses equal growing in memory. A bf16 model changes its rounding with the TP split, so the layout
    changes the pipeline (which leaves every layer's arithmetic as it was)."""
    source = tmp_path / "megatron_lm"
    reference = _run(tmp_path, 4, "megatron_lm_source", str(source))[0]
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(PLAN))
    grown = tmp_path / "grown"
    report = _report(mgrow_job(4, "grow-checkpoint", "--in", source, "--plan", plan, "--out", grown))
    assert report["format"] == "megatron-lm" and report["step"] == SAVED_AT
    assert report["max_abs_logit_diff"] <= 0.05  # bf16 (the self-check's bf16 tolerance judged it already)
    assert (grown / "latest_checkpointed_iteration.txt").read_text() == str(SAVED_AT)

    from mgrow.checkpoint import megatron_lm

    args = megatron_lm.read_common(grown / f"iter_{SAVED_AT:07d}")["args"]
    assert (args.hidden_size, args.ffn_hidden_size, args.num_layers) == (48, 96, 3)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert args.padded_vocab_size == 512 and args.vocab_size + 1 == MODEL["vocab_size"]  # NullTokenizer: + EOD

    # compared on one rank (TP1, the dp_reshardable optimizer state left out); bf16 logits round at 2^-8 of
    # their size, which the self-check's tolerance allows
    compared = _report(mgrow_job(1, "verify", "--before", source, "--after", grown, "--tol", "0.05"))
    assert compared["ok"] and compared["params_after"] > compared["params_before"] and compared["max_abs_logit"] > 0.1

    resumed = _run(tmp_path, 2, "megatron_lm_resume", str(grown), 2, 1)[0]
    assert resumed["step"] == SAVED_AT and resumed["model"]["hidden_size"] == 48
    worst = max(abs(a - b) for a, b in zip(resumed["after"], reference["after"]))
    assert len(resumed["after"]) == 2 and worst <= TOL, (resumed["after"], reference["after"])


@pytest.mark.parametrize("optimizer, sharding", [("none", None), ("megatron", "fully_reshardable"),
                                                 ("megatron", "dp_zero_gather_scatter"), ("adam", None)])
def test_a_plain_dist_checkpointing_folder_grows_and_keeps_its_logits(tmp_path, optimizer, sharding):
    """A user's `dist_checkpointing.save` folder at TP2 (model only, or with the optimizer in either
    DistributedOptimizer format, or megatron's Adam): described by --model, grown offline into the same kind of
    folder, and `mgrow verify --before --after` finds the logits preserved and the grown folder describing
    itself."""
    source = tmp_path / "plain"
    _run(tmp_path, 2, "plain_source", str(source), 2, optimizer, sharding or "")
    model = tmp_path / "model.yaml"
    model.write_text(yaml.safe_dump(MODEL))
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(PLAN))
    grown = tmp_path / "grown"
    report = _report(mgrow_job(2, "grow-checkpoint", "--in", source, "--model", model, "--plan", plan,
                               "--out", grown, "--tp", 2))
    assert report["format"] == "dist-checkpoint"
    assert report["optimizer_state"] is (optimizer != "none")
    assert report["max_abs_logit_diff"] <= TOL
    compared = _report(mgrow_job(1, "verify", "--before", source, "--after", grown, "--model", model))
    assert compared["ok"] and compared["max_abs_logit_diff"] <= TOL and compared["max_abs_logit"] > 0.1


def test_a_folder_that_is_no_checkpoint_names_what_was_expected(tmp_path):
    run = mgrow_job(1, "grow-checkpoint", "--in", tmp_path, "--plan", "configs/plans/all_ops.yaml",
                    "--out", tmp_path / "out")
    assert run.returncode == 2
    assert "latest_checkpointed_iteration.txt" in run.stderr and "mp_rank_00_model_states.pt" in run.stderr
    half = tmp_path / "mlm"
    (half / "iter_0000004").mkdir(parents=True)
    (half / "latest_checkpointed_iteration.txt").write_text("4")
    run = mgrow_job(1, "grow-checkpoint", "--in", half, "--plan", "configs/plans/all_ops.yaml",
                    "--out", tmp_path / "out")
    assert run.returncode == 2 and "metadata.json" in run.stderr and "half-written" in run.stderr


GROWN_EXAMPLE = dict(num_layers=3, hidden_size=96, num_attention_heads=6, ffn_hidden_size=384)  # the example's plan


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_a_users_deepspeed_checkpoint_grows_and_the_users_engine_loads_it(tmp_path, zero):
    """examples/deepspeed_train.py's engine saves a ZeRO checkpoint at DP2; grow-checkpoint (the model described
    by --model) grows it into a DeepSpeed checkpoint with the same tag; the user's own code builds the grown size
    with `deepspeed.initialize` and `load_checkpoint`s it: the next losses equal growing in memory."""
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    import deepspeed_train as example

    source = tmp_path / "ds"
    reference = _run(tmp_path, 2, "deepspeed_source", str(source), zero)[0]
    model = tmp_path / "model.yaml"
    model.write_text(yaml.safe_dump({**example.SIZES, "vocab_size": example.VOCAB,
                                     "max_sequence_length": example.SEQ, "share_embeddings_and_output_weights": True,
                                     "make_vocab_size_divisible_by": 1}))
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(example.PLAN))
    grown = tmp_path / "grown"
    report = _report(mgrow_job(2, "grow-checkpoint", "--in", source, "--model", model, "--plan", plan,
                               "--out", grown))
    assert report["format"] == "deepspeed" and report["step"] == SAVED_AT
    assert report["max_abs_logit_diff"] <= TOL
    assert (grown / "latest").read_text().strip() == f"global_step{SAVED_AT}"
    from mgrow.checkpoint.deepspeed_format import load_plain

    states = "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero == 3 else "mp_rank_00_model_states.pt"
    described = load_plain(grown / f"global_step{SAVED_AT}" / states)["mgrow_model"]
    assert {k: described[k] for k in GROWN_EXAMPLE} == GROWN_EXAMPLE
    # hidden growth rescales the norm epsilon by h / h' (docs/growth_math.md): the user builds the grown model
    # with the epsilon the checkpoint describes
    assert described["layernorm_epsilon"] == pytest.approx(1e-5 * 64 / 96, rel=1e-12)
    sizes = {**GROWN_EXAMPLE, "layernorm_epsilon": described["layernorm_epsilon"]}
    resumed = _run(tmp_path, 2, "deepspeed_user_resume", str(grown), zero, sizes)[0]
    assert resumed["global_steps"] == SAVED_AT + 2
    worst = max(abs(a - b) for a, b in zip(resumed["after"], reference["after"]))
    assert worst <= TOL, (resumed["after"], reference["after"])
    compared = _report(mgrow_job(2, "verify", "--before", source, "--after", grown, "--model", model))
    assert compared["ok"] and compared["max_abs_logit_diff"] <= TOL and compared["max_abs_logit"] > 0.1


def test_megatron_lm_args_describe_the_model_and_what_mgrow_cannot_build_is_refused_by_name():
    import argparse

    from mgrow.checkpoint.megatron_lm import model_from_args
    from mgrow.core.errors import ConfigError

    args = dict(num_layers=4, hidden_size=64, ffn_hidden_size=172, num_attention_heads=8, group_query_attention=True,
                num_query_groups=2, kv_channels=8, max_position_embeddings=128, position_embedding_type="rope",
                rotary_base=500000, normalization="RMSNorm", layernorm_epsilon=1e-6, swiglu=True,
                untie_embeddings_and_output_weights=True, add_bias_linear=False, add_qkv_bias=False,
                padded_vocab_size=50304, make_vocab_size_divisible_by=128, bf16=True, hidden_dropout=0.0,
                attention_dropout=0.0, decoder_first_pipeline_num_layers=1)
    model = model_from_args(argparse.Namespace(**args), "--in")
    assert (model.num_query_groups, model.ffn_hidden_size, model.rotary_base, model.layernorm_epsilon) == \
        (2, 172, 500000, 1e-6)
    assert (model.activation, model.share_embeddings_and_output_weights, model.bf16) == ("swiglu", False, True)
    # without the tokenizer's size in args, the padded vocabulary is the vocabulary (as Megatron-LM trains it)
    assert (model.vocab_size, model.padded_vocab_size(4)) == (50304, 50304)
    assert model.num_layers_in_first_pipeline_stage == 1
    with_vocab = model_from_args(argparse.Namespace(**args, tokenizer_type="NullTokenizer", vocab_size=50256), "--in")
    assert (with_vocab.vocab_size, with_vocab.padded_vocab_size(1)) == (50257, 50304)
    for change, field in [({"squared_relu": True}, "args.squared_relu"), ({"add_qkv_bias": True}, "args.add_qkv_bias"),
                          ({"fp16": True}, "args.fp16"), ({"position_embedding_type": "alibi"},
                                                          "args.position_embedding_type"),
                          ({"num_experts": 8}, "args.num_experts")]:
        with pytest.raises(ConfigError) as caught:
            model_from_args(argparse.Namespace(**{**args, **change}), "--in")
        assert caught.value.field == f"--in: {field}", caught.value


def test_a_dist_checkpointing_folder_without_a_model_file_asks_for_one(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    import torch

    torch.save({}, folder / "common.pt")
    run = mgrow_job(1, "grow-checkpoint", "--in", folder, "--plan", "configs/plans/all_ops.yaml",
                    "--out", tmp_path / "out")
    assert run.returncode == 2 and "--model" in run.stderr and "does not say what model it holds" in run.stderr
