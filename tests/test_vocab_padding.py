"""A vocabulary that the TP size does not divide (issue 19): padded as Megatron-LM pads it
(`model.make_vocab_size_divisible_by`), with the padded rows kept out of the model's function, so verify, training
and a resume on a TP size that pads differently all see the same model."""

import json

import pytest
import torch
import yaml

from launch_utils import REPO, TINY_MODEL, mgrow_job, train_job, write_config
from mgrow.core.model_config import ModelConfig, padded_vocab_size
from mgrow.parallel import layout as table

GPT2_VOCAB = 50257
TOL = 1e-5


def test_padding_is_megatron_lms_rule():
    # Megatron-LM's _vocab_size_with_padding with its default 128: GPT-2's 50257 at TP 1, 2, 4 and 8
    assert [padded_vocab_size(GPT2_VOCAB, 128, tp) for tp in (1, 2, 4, 8)] == [50304, 50432, 50688, 51200]
    assert padded_vocab_size(256, 128, 2) == 256 and padded_vocab_size(256, 1, 3) == 258


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_shards_are_padded_with_zero_rows_and_merge_back(tp):
    cfg = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=50, max_sequence_length=8,
                      make_vocab_size_divisible_by=8)
    layout = table.layout_of("output_layer.weight", cfg)
    full = torch.randn(50, 8)
    shards = table.tp_chunks(full, layout, tp)
    padded = {1: 56, 2: 64, 4: 64}[tp]
    assert [s.shape[0] for s in shards] == [padded // tp] * tp
    assert torch.equal(torch.cat(shards)[:50], full) and not torch.cat(shards)[50:].any()
    assert torch.equal(table.tp_merge(shards, layout), full)
    assert [table.real_vocab_rows(layout, r, tp) for r in range(tp)] == \
        [min(padded // tp, max(0, 50 - r * padded // tp)) for r in range(tp)]


def test_padded_logits_take_no_part_in_the_loss(single_rank):
    """The loss equals the cross entropy over the real vocabulary alone, and the padded rows get no gradient."""
    from mgrow.engine.model import build_gpt, position_ids, real_vocab

    cfg = ModelConfig(**{**TINY_MODEL, "vocab_size": 300})
    model = build_gpt(cfg, single_rank)
    assert model.vocab_size == 384
    tokens, labels = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    logits = real_vocab(model, model(tokens, position_ids(tokens), None))
    assert logits.shape[-1] == 300
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 300).float(), labels.reshape(-1))
    loss = model(tokens, position_ids(tokens), None, labels=labels).mean()
    assert abs(loss.item() - expected.item()) <= 1e-6
    loss.backward()
    for param in (model.embedding.word_embeddings.weight, model.output_layer.weight):
        assert not param.data[300:].any() and not param.grad[300:].any()
        assert param.grad[:300].abs().max() > 0


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_verify_grows_a_gpt2_vocabulary_on_any_tp(tmp_path, tp):
    model = tmp_path / "model.yaml"
    raw = yaml.safe_load((REPO / "configs/models/tiny.yaml").read_text())
    model.write_text(yaml.safe_dump({**raw, "vocab_size": GPT2_VOCAB}))
    run = mgrow_job(tp, "verify", "--model", model, "--plan", REPO / "configs/plans/all_ops.yaml", "--tp", tp,
                    "--optimizer", "megatron")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][0])
    assert report["ok"] and report["max_abs_logit_diff"] <= TOL, report


def _losses(result) -> dict:
    assert result.returncode == 0, result.stderr[-3000:] + "".join(result.rank_stderr.values())[-3000:]
    return {r["step"]: r["loss"] for r in result.metrics if "loss" in r}


def _config(tmp_path, tp, optimizer="megatron", **checkpoint):
    return write_config(tmp_path, model={"vocab_size": GPT2_VOCAB}, parallel={"tp": tp},
                        optimizer={"type": optimizer, "decay_steps": 4}, train={"steps": 4}, checkpoint=checkpoint)


def test_training_and_a_resume_from_tp2_to_tp4_see_one_model(tmp_path):
    """GPT-2's vocabulary pads to 50304 rows at TP 1, 50432 at TP 2, 50688 at TP 4: the losses are the same at
    every TP (padded logits that took part in the softmax would change them at once), and a checkpoint saved at
    TP 2 resumes at TP 4 (embedding, output layer and their Adam moments re-padded) with the uninterrupted
    run's losses."""
    reference = _losses(train_job(tmp_path, 2, _config(tmp_path, 2, save=str(tmp_path / "ckpt"), interval=2)))
    single = _losses(train_job(tmp_path, 1, _config(tmp_path, 1)))
    assert sorted(reference) == [1, 2, 3, 4]
    assert max(abs(single[s] - reference[s]) for s in reference) <= TOL, (single, reference)
    resumed = _losses(train_job(tmp_path, 4, _config(tmp_path, 4, load=str(tmp_path / "ckpt" / "step_00000002"))))
    assert sorted(resumed) == [3, 4]
    assert max(abs(resumed[s] - reference[s]) for s in resumed) <= TOL, (resumed, reference)


def test_a_zero2_checkpoint_resumes_on_a_tp_size_that_pads_differently(tmp_path):
    """DP2 ZeRO-2 at TP 1 (50304 rows) resumed at TP 2 (50432 rows) through DeepSpeed's universal checkpoint,
    which strips the padding to the real vocabulary and pads again for the new TP."""
    reference = _losses(train_job(tmp_path, 2, _config(tmp_path, 1, "zero2", save=str(tmp_path / "ckpt"), interval=2)))
    resumed = _losses(train_job(tmp_path, 2, _config(tmp_path, 2, "zero2",
                                                      load=str(tmp_path / "ckpt" / "step_00000002"))))
    assert sorted(resumed) == [3, 4]
    assert max(abs(resumed[s] - reference[s]) for s in resumed) <= TOL, (resumed, reference)
