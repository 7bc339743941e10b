"""Cross-architecture transfer (issue 8): dense -> MoE upcycling, MHA -> GQA, freezing and the unfreeze event.

References are independent of mgrow.transforms.transfer: the dense model's own logits, the source checkpoint's own
tensors, and K/V means written out head by head.
"""

import json

import pytest
import torch

from conftest import one_rank
from launch_utils import REPO, TINY_MODEL, train_job, write_config
from rank_pool import pool

MHA = {**TINY_MODEL, "num_query_groups": 4}
ALL = ["embeddings", "norms", "mlp", "output_layer", "attention", "attention_output"]


def _tokens():
    return torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))


def _logits(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None).float()


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory):
    """A trained dense MHA GPT: 3 AdamW steps on the corpus, one rank."""
    tmp = tmp_path_factory.mktemp("transfer_source")
    config = write_config(tmp, model=MHA, train={"steps": 3}, checkpoint={"save": str(tmp / "ckpt")})
    result = train_job(tmp, 1, config)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "ckpt"


def _load(folder, model: dict):
    from mgrow.engine.model import gather_full_tensors
    from mgrow.core.model_config import ModelConfig
    from mgrow.transforms.transfer.shards import load_source

    from mgrow.checkpoint import files

    cfg = ModelConfig(**model)
    dims = one_rank()
    return gather_full_tensors(load_source(files.resolve(str(folder)), cfg, seed=0, dims=dims), cfg, dims)


@pytest.mark.parametrize("routing, exact", [({}, True), ({"moe_router_score_function": "sigmoid"}, True),
                                            ({"moe_router_pre_softmax": True}, False)])
def test_upcycled_moe_computes_the_dense_models_logits(single_rank, routing, exact):
    from mgrow.engine.model import build_gpt
    from mgrow.core.model_config import ModelConfig
    from mgrow.transforms.transfer import rules, shards

    dense = ModelConfig(**TINY_MODEL)
    moe = dense.replace(num_moe_experts=4, moe_router_topk=2, **routing)
    dense_model, moe_model = build_gpt(dense, single_rank, seed=1), build_gpt(moe, single_rank, seed=2)
    router = moe_model.decoder.layers[0].mlp.router.weight.detach().clone()
    shards.copy_shared(dense_model, dense, moe_model, moe, tuple(rules.COMPONENTS), single_rank)
    tokens = _tokens()
    diff = float((_logits(moe_model, tokens) - _logits(dense_model, tokens)).abs().max())
    assert moe.normalised_routing == exact
    if exact:
        assert diff <= 1e-5, diff
    else:  # softmax over all experts, then top-2: the weights sum to < 1, the MLP output shrinks
        assert diff >= 1e-3, diff
    assert torch.equal(moe_model.decoder.layers[0].mlp.router.weight, router)  # the router is not transferred


def test_gqa_transfer_copies_shared_tensors_and_pools_kv(single_rank):
    from mgrow.engine.model import build_gpt, gather_full_tensors
    from mgrow.core.model_config import ModelConfig
    from mgrow.transforms.transfer import shards

    mha, gqa = ModelConfig(**MHA), ModelConfig(**TINY_MODEL)  # 4 query groups -> 2
    source, target, fresh = (build_gpt(mha, single_rank, seed=1), build_gpt(gqa, single_rank, seed=2),
                             build_gpt(gqa, single_rank, seed=2))
    shards.copy_shared(source, mha, target, gqa, tuple(ALL), single_rank)
    src, tgt = gather_full_tensors(source, mha, single_rank), gather_full_tensors(target, gqa, single_rank)
    k = mha.kv_channels
    for name, tensor in tgt.items():
        if "linear_qkv" not in name:
            assert torch.equal(tensor, src[name]), name  # every other tensor is a bitwise copy
            continue
        heads = src[name].view(4, 3, k, -1)  # MHA: [group, (q, k, v), head dim, hidden]
        for group in range(2):
            block = tensor.view(2, 4, k, -1)[group]  # GQA: [group, (q, q, k, v), ...]
            a, b = heads[2 * group], heads[2 * group + 1]
            assert torch.equal(block[0], a[0]) and torch.equal(block[1], b[0])  # queries copied
            assert torch.allclose(block[2], (a[1] + b[1]) / 2, rtol=0, atol=1e-7)  # K = mean of the group's Ks
            assert torch.allclose(block[3], (a[2] + b[2]) / 2, rtol=0, atol=1e-7)
    tokens = _tokens()
    reference = _logits(source, tokens)
    deviation = float((_logits(target, tokens) - reference).abs().max())
    from_scratch = float((_logits(fresh, tokens) - reference).abs().max())
    print(f"GQA transfer: max-abs logit deviation {deviation:.3e} (random GQA init: {from_scratch:.3e})")
    assert 0 < deviation < from_scratch


def test_transfer_is_exact_at_tp2(tmp_path):
    """The MoE upcycling and the GQA shared-tensor copies on two TP ranks (megatron's MoE layer at TP2)."""
    out = tmp_path / "tp2.json"
    done = pool().run(2, "transfer_worker:main", (str(out),), timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["moe"]["logit_diff"] <= 1e-5, result
    assert result["moe"]["copies_bitwise"] and result["gqa"]["copies_bitwise"], result
    assert result["gqa"]["copies"] > 0 < result["moe"]["copies"]
    assert 0 < result["gqa"]["logit_diff"], result


def test_frozen_weights_do_not_move_until_unfrozen_on_the_adam_path(single_rank, source_checkpoint):
    from mgrow.transforms.transfer import apply as transfer
    from mgrow.engine.model import build_gpt, gather_full_tensors
    from mgrow.train.config import from_dict
    from mgrow.engine.engines import build_engine
    from mgrow.transforms.transfer import freeze

    cfg = from_dict({"model": TINY_MODEL, "optimizer": {"type": "adam", "warmup_steps": 1}, "train": {"steps": 5, "seq_length": 32},
                     "data": {"path": str(REPO / "data" / "cache" / "corpus")},
                     "transfer": {"from": str(source_checkpoint), "components": ["embeddings", "mlp"]}})
    model = build_gpt(cfg.model, single_rank, seed=1234)
    record = transfer.prepare(model, cfg, resumed=False, check_tokens=_tokens(), dims=single_rank)
    engine = build_engine(model, cfg, single_rank)
    batches = [torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    start = gather_full_tensors(engine.module, cfg.model, single_rank)
    engine.train_step([batches[0]])
    engine.train_step([batches[1]])
    frozen = gather_full_tensors(engine.module, cfg.model, single_rank)
    transferred = [n for n in start if n.startswith("embedding.") or ".mlp." in n]
    assert record["tensors"] == len(transferred) == 5  # word embeddings, 2 layers x (fc1, fc2)
    assert freeze.is_frozen(engine)
    for name in start:
        assert torch.equal(frozen[name], start[name]) == (name in transferred), name
    freeze.unfreeze(engine, cfg.optimizer.lr, cfg.optimizer.min_lr)
    engine.train_step([batches[2]])
    after = gather_full_tensors(engine.module, cfg.model, single_rank)
    assert not freeze.is_frozen(engine)
    assert all(not torch.equal(after[name], frozen[name]) for name in transferred)


def test_gqa_transfer_and_freeze_unfreeze_run_end_to_end_on_4_cpu_ranks(single_rank, source_checkpoint, tmp_path):
    """TP2 x DP2, DistributedOptimizer: the transferred tensors hold still until the unfreeze event, then train."""
    components = ["embeddings", "norms", "mlp", "output_layer", "attention"]  # W_O (linear_proj) trains from scratch
    config = write_config(
        tmp_path, parallel={"tp": 2}, optimizer={"type": "megatron"}, train={"steps": 8},
        checkpoint={"save": str(tmp_path / "ckpt"), "interval": 4},
        transfer={"from": str(source_checkpoint), "components": components, "unfreeze_window": 2,
                  "unfreeze_threshold": 100.0})  # any improvement is "too small": unfreeze after 2 windows
    result = train_job(tmp_path, 4, config)
    assert result.returncode == 0, result.stderr[-4000:]
    events = {r["event"]: r for r in result.metrics if "event" in r}
    assert events["unfreeze"]["step"] == 4 and events["unfreeze"]["window"] == 2
    assert events["transfer"]["tensors"] == 13 and 0 < events["transfer"]["max_abs_logit_diff"] < 10
    assert len([r for r in result.metrics if "loss" in r]) == 8

    source = _load(source_checkpoint, MHA)
    at_unfreeze = _load(tmp_path / "ckpt" / "step_00000004", TINY_MODEL)
    later = _load(tmp_path / "ckpt" / "step_00000008", TINY_MODEL)
    for name, tensor in at_unfreeze.items():
        if "linear_proj" in name:
            assert not torch.equal(later[name], tensor), name  # trained all along
            continue
        if "linear_qkv" not in name:
            assert torch.equal(tensor, source[name]), name  # still the source's bits after 4 frozen steps
        else:
            mha = source[name].view(2, 2, 3, 8, -1)  # [GQA group, its 2 MHA groups, (q, k, v), head dim, h]
            gqa = tensor.view(2, 4, 8, -1)
            assert torch.equal(gqa[:, :2], mha[:, :, 0])
            assert torch.allclose(gqa[:, 2:], mha[:, :, 1:].mean(dim=1), rtol=0, atol=1e-7)
        assert not torch.equal(later[name], tensor), name  # and they train after the unfreeze


def test_moe_models_refuse_growth_plans_and_tensor_parallel_training():
    from mgrow.core.errors import ConfigError
    from mgrow.core.model_config import ModelConfig
    from mgrow.core.plan import load_plan
    from mgrow.train.config import from_dict

    moe = {**TINY_MODEL, "num_moe_experts": 4}
    with pytest.raises(ConfigError) as error:
        load_plan({"ops": [{"mlp": {"ffn_hidden_size": 96}}]}).validate(ModelConfig(**moe))
    assert error.value.field == "model.num_moe_experts"
    with pytest.raises(ConfigError) as error:
        from_dict({"model": moe, "parallel": {"tp": 2}, "train": {"seq_length": 32}, "data": {"sources": ["x"]}})
    assert error.value.field == "parallel.tp"
    with pytest.raises(ConfigError) as error:
        ModelConfig(**{**moe, "moe_router_topk": 1})  # megatron-core's rule: top-1 softmax needs pre-softmax
    assert error.value.field == "model.moe_router_topk"
