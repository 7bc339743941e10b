"""Hugging Face in and out (issue 20): small randomly initialised transformers models of each family (built from
their config classes, saved with save_pretrained; nothing downloaded), imported at TP1 and at TP2 x PP2, grown,
exported, and loaded back by transformers. Every comparison is against transformers' own forward."""

import json
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed (pip install -e '.[hf]')")

from launch_utils import mgrow_job  # noqa: E402
from rank_pool import pool  # noqa: E402

TOL = 1e-4
VOCAB = 300
_LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
_HEADS = {"heads": {"num_attention_heads": 8, "num_query_groups": 2}}
_BLOCK = {"layers": {"insert_before": [1], "num_layers": 3}}  # LLaMA-Pro's block expansion
CASES = {
    # Llama 3.1's RoPE scaling (500000 base: the lowest frequency of an 8-dim head is scaled), untied
    "llama": (lambda: transformers.LlamaConfig(
        **_LLAMA, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        [{"mlp": {"ffn_hidden_size": 96}}, _HEADS, {"hidden": {"hidden_size": 48}}, _BLOCK]),
    "mistral": (lambda: transformers.MistralConfig(**_LLAMA, sliding_window=None, tie_word_embeddings=True),
                [{"mlp": {"ffn_hidden_size": 96}}, _HEADS, _BLOCK]),
    # Qwen2: biases on q, k and v only; tied
    "qwen2": (lambda: transformers.Qwen2Config(**_LLAMA, tie_word_embeddings=True),
              [{"mlp": {"ffn_hidden_size": 96}}, _HEADS, _BLOCK]),
    # GPT-2: Conv1D weights, packed q|k|v, tanh GELU, LayerNorm with biases, learned positions, tied
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
             [{"heads": {"num_attention_heads": 8, "num_query_groups": 8}},
              {"hidden": {"hidden_size": 64, "method": "replicate"}}, {"mlp": {"ffn_hidden_size": 256}}, _BLOCK]),
}


def save_random_model(family: str, folder: Path):
    """A transformers model of ``family`` with weights large enough for a wrong mapping to show, saved."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CASES[family][0]()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.copy_(0.3 * torch.randn_like(param) / param.shape[-1] ** 0.5)
            elif name.endswith("weight"):  # norm gains
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def mgrow_logits(tmp_path: Path, checkpoint: Path, tp: int, pp: int, tokens: torch.Tensor) -> torch.Tensor:
    out = pool().run(tp * pp, "hf_worker:logits", (str(tmp_path), str(checkpoint), tp, pp, tokens.tolist()),
                     timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return torch.load(tmp_path / "logits.pt")


def run(nproc: int, *args) -> dict:
    done = mgrow_job(nproc, *args)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def tokens_for(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(CASES))
def test_import_grow_export_round_trip(tmp_path, family):
    """Imported at TP1 and TP2 x PP2, mgrow's logits equal transformers'; exporting the ungrown import gives the
    same tensors bit for bit; grown (a function-preserving plan) and exported, transformers' forward of the
    exported folder equals mgrow's grown logits and the ungrown model's."""
    source = tmp_path / "hf"
    save_random_model(family, source)
    tokens = tokens_for()
    expected = hf_logits(source, tokens)
    assert expected.abs().max() > 0.5  # logits large enough for a wrong mapping to show

    for tp, pp in ((1, 1), (2, 2)):
        checkpoint = tmp_path / f"ckpt_tp{tp}_pp{pp}"
        report = run(tp * pp, "import-hf", "--from", source, "--out", checkpoint, "--tp", tp, "--pp", pp)
        assert report["family"] == family
        mine = mgrow_logits(tmp_path, checkpoint, tp, pp, tokens)
        assert mine.shape == expected.shape
        assert (mine - expected).abs().max() <= TOL, (tp, pp, float((mine - expected).abs().max()))

    from safetensors.torch import load_file

    run(1, "export-hf", "--in", tmp_path / "ckpt_tp2_pp2", "--out", tmp_path / "exported", "--family", family)
    original, exported = load_file(source / "model.safetensors"), load_file(tmp_path / "exported/model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original), [k for k in original
                                                                            if not torch.equal(exported[k], original[k])]

    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"ops": CASES[family][1]}))
    run(1, "grow-checkpoint", "--in", tmp_path / "ckpt_tp1_pp1", "--plan", plan, "--out", tmp_path / "grown")
    grown = mgrow_logits(tmp_path, tmp_path / "grown", 1, 1, tokens)
    # (the default family is the model's architecture: Mistral without a sliding window is Llama's, so it is named)
    run(1, "export-hf", "--in", tmp_path / "grown", "--out", tmp_path / "grown_hf",
        *(("--family", family) if family == "mistral" else ()))
    theirs = hf_logits(tmp_path / "grown_hf", tokens)
    assert (theirs - grown).abs().max() <= TOL, float((theirs - grown).abs().max())
    assert (theirs - expected).abs().max() <= TOL, float((theirs - expected).abs().max())
    config = json.loads((tmp_path / "grown_hf/config.json").read_text())
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    assert layers == 3 and transformers.AutoConfig.from_pretrained(tmp_path / "grown_hf").model_type == family


# ------------------------------------------------------------------------------------------- wrong mappings


def _rotate_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The q/k rows of every head reordered from rotate-half pairs (i, i + d/2) to interleaved pairs (2i, 2i+1):
    Meta's original Llama layout, the other rotary convention."""
    d = weight.shape[0] // heads
    order = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).flatten()
    return weight.view(heads, d, -1)[:, order].reshape(weight.shape)


TRAPS = {
    "q|k|v concatenated, not interleaved per query group":
        ("self_attention.linear_qkv.weight", lambda t, cfg: torch.cat(t)),
    "[up; gate] instead of [gate; up]": ("mlp.linear_fc1.weight", lambda t, cfg: torch.cat([t[1], t[0]])),
    "rotary convention switched": ("self_attention.linear_qkv.weight", lambda t, cfg: _qkv(
        [_rotate_interleaved(t[0], cfg.num_attention_heads), _rotate_interleaved(t[1], cfg.num_query_groups), t[2]],
        cfg)),
}


def _qkv(tensors, cfg):
    from mgrow.parallel.hf_families import to_megatron

    return to_megatron("qkv", tensors, cfg)


@pytest.mark.parametrize("trap", sorted(TRAPS))
def test_a_wrong_mapping_moves_the_logits(single_rank, tmp_path, trap):
    """The right table matches transformers within 1e-4; each trap, put in its place, misses by more than 1e-2."""
    from mgrow.checkpoint.huggingface import HFTensors, model_from_hf, read_config
    from mgrow.engine.model import build_gpt, position_ids, real_vocab
    from mgrow.parallel.hf_families import rules, to_megatron

    save_random_model("llama", tmp_path)
    family, config = read_config(str(tmp_path), "--from")
    cfg = model_from_hf(family, config, "--from")
    tensors, table = HFTensors(str(tmp_path)), rules(family, cfg)
    target, wrong = TRAPS[trap]

    def logits(mapping):
        def init(name, shape):
            rule = table[name]
            return mapping(name, rule, [tensors.get(n) for n in rule.hf])
        model = build_gpt(cfg, single_rank, init=init)
        model.eval()
        tokens = tokens_for()
        with torch.no_grad():
            return real_vocab(model, model(tokens, position_ids(tokens), None))

    right = logits(lambda name, rule, t: to_megatron(rule.kind, t, cfg))
    trapped = logits(lambda name, rule, t: wrong(t, cfg) if name.endswith(target) else to_megatron(rule.kind, t, cfg))
    expected = hf_logits(tmp_path, tokens_for())
    assert (right - expected).abs().max() <= TOL
    assert (trapped - expected).abs().max() > 1e-2, float((trapped - expected).abs().max())


def test_llama3_rope_scaling_gives_transformers_frequencies(single_rank, tmp_path):
    from mgrow.checkpoint.huggingface import MegatronTensors, model_from_hf, read_config
    from mgrow.engine.model import build_gpt

    hf = save_random_model("llama", tmp_path)
    family, config = read_config(str(tmp_path), "--from")
    cfg = model_from_hf(family, config, "--from")
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rotary_base) == (True, 8.0, 500000)
    model = build_gpt(cfg, single_rank, init=MegatronTensors(str(tmp_path), family, cfg))
    theirs = hf.model.rotary_emb.inv_freq.double()
    mine = model.rotary_pos_emb.inv_freq.double()
    assert torch.allclose(mine, theirs, rtol=1e-6, atol=0)
    unscaled = 1.0 / 500000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    assert not torch.allclose(theirs, unscaled, rtol=1e-3)  # the scaling changes a frequency of this head size


@pytest.mark.parametrize("change, field", [
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"some_new_key": 1}, "some_new_key"),
])
def test_a_config_key_mgrow_cannot_represent_is_refused_by_name(tmp_path, change, field):
    save_random_model("llama", tmp_path / "hf")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    config.pop("rope_parameters", None)
    (tmp_path / "hf/config.json").write_text(json.dumps({**config, **change}))
    done = mgrow_job(1, "import-hf", "--from", tmp_path / "hf", "--out", tmp_path / "ckpt")
    assert done.returncode == 2 and f"config.json {field}" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "ckpt").exists()


def test_a_model_the_family_cannot_express_is_refused_at_export(tmp_path):
    """Head-dim growth leaves the new dimensions unrotated (rotary_percent < 1), which Llama cannot express."""
    save_random_model("llama", tmp_path / "hf")
    run(1, "import-hf", "--from", tmp_path / "hf", "--out", tmp_path / "ckpt")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"ops": [{"head_dim": {"kv_channels": 12}}]}))
    run(1, "grow-checkpoint", "--in", tmp_path / "ckpt", "--plan", plan, "--out", tmp_path / "grown")
    done = mgrow_job(1, "export-hf", "--in", tmp_path / "grown", "--out", tmp_path / "out")
    assert done.returncode == 2 and "model.rotary_percent" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_an_imported_model_trains_on_any_layout(tmp_path):
    """`mgrow train` resumes an import (its config's model: the CKPT/model.yaml import-hf wrote) at TP1 and at
    TP2 x PP2 with the same losses."""
    from launch_utils import train_job, write_config

    save_random_model("qwen2", tmp_path / "hf")
    losses = {}
    for tp, pp in ((1, 1), (2, 2)):
        run_dir = tmp_path / f"tp{tp}_pp{pp}"
        run_dir.mkdir()
        config = write_config(run_dir, parallel={"tp": tp, "pp": pp},
                              optimizer={"type": "megatron", "decay_steps": 3}, train={"steps": 3},
                              checkpoint={"load": str(tmp_path / "ckpt")})
        raw = yaml.safe_load(config.read_text())
        raw["model"] = str(tmp_path / "ckpt" / "model.yaml")
        config.write_text(yaml.safe_dump(raw))
        if tp == 1:
            run(1, "import-hf", "--from", tmp_path / "hf", "--out", tmp_path / "ckpt", "--config", config)
        result = train_job(run_dir, tp * pp, config)
        assert result.returncode == 0, result.stderr[-3000:] + "".join(result.rank_stderr.values())[-3000:]
        losses[tp] = [r["loss"] for r in result.metrics if "loss" in r]
    assert len(losses[1]) == 3 and max(abs(a - b) for a, b in zip(losses[1], losses[2])) <= 1e-5, losses
