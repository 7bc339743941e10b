"""The index maps' gradient factors are the real ones, so Adam moments carried by them stay consistent.

At the growth point the gradient of every old entry of the grown model must be
``grad_scale`` times the old gradient (``apply_to_optimizer_state`` applies the
same factors to m, and their squares to v). This holds exactly for every rule
except LayerNorm mean padding (hidden ``mean`` and head_dim with a LayerNorm
qk-norm), whose padded coordinates do not move with the old ones under a
gradient: those are left out here, and their moments follow 1/scale.
"""

import pytest
import torch

from conftest import one_rank
from mgrow.engine.model import build_gpt, global_names, position_ids, real_vocab
from mgrow.parallel import layout as layouts
from mgrow.core.model_config import ModelConfig
from mgrow.ops import apply_to_optimizer_state
from mgrow.ops.plan import apply_plan
from mgrow.testing.harness import random_state, random_tokens

RMS = dict(num_layers=2, hidden_size=16, num_attention_heads=4, num_query_groups=2, kv_channels=4,
           ffn_hidden_size=24, vocab_size=40, max_sequence_length=8, normalization="RMSNorm",
           layernorm_epsilon=0.05, activation="swiglu", position_embedding_type="rope")
LN = dict(RMS, normalization="LayerNorm", activation="gelu", position_embedding_type="learned_absolute")
CASES = {
    "mlp": (LN, {"mlp": {"ffn_hidden_size": 40}}),
    "heads-per-group": (RMS, {"heads": {"num_attention_heads": 6}}),
    "heads-new-groups": (LN, {"heads": {"num_attention_heads": 8, "num_query_groups": 4}}),
    "head_dim": (LN, {"head_dim": {"kv_channels": 7}}),
    "head_dim-rms-qk-norm": (dict(RMS, qk_layernorm=True), {"head_dim": {"kv_channels": 8}}),
    "hidden-zero": (dict(RMS, share_embeddings_and_output_weights=True), {"hidden": {"hidden_size": 28}}),
    "hidden-zero-qk-norm": (dict(RMS, qk_layernorm=True), {"hidden": {"hidden_size": 28}}),
    "hidden-replicate-ln": (LN, {"hidden": {"hidden_size": 32, "method": "replicate"}}),
    "hidden-replicate-ln-tied": (dict(LN, share_embeddings_and_output_weights=True),
                                 {"hidden": {"hidden_size": 48, "method": "replicate"}}),
    "hidden-replicate-rms-tied": (dict(RMS, share_embeddings_and_output_weights=True),
                                  {"hidden": {"hidden_size": 32, "method": "replicate"}}),
    "layers": (LN, {"layers": {"insert_before": [1], "num_layers": 4}}),
}


def gradients(cfg: ModelConfig, state: dict, tokens: torch.Tensor, labels: torch.Tensor) -> dict:
    model = build_gpt(cfg, one_rank(), init=state)
    model.eval()
    logits = real_vocab(model, model(tokens, position_ids(tokens), None))
    torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels.reshape(-1)).backward()
    # full tensors, as the operators see them (a padded vocabulary's rows dropped)
    return {name: layouts.tp_merge([param.grad.detach().clone()], layouts.layout_of(name, cfg))
            for _, name, param in global_names(model)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_of_old_entries_follow_grad_scale(single_rank, case):
    model, op = CASES[case]
    cfg = ModelConfig(**model)
    state = random_state(cfg, 5, one_rank())
    tokens = random_tokens(cfg, 5, batch=2, seq=8)
    labels = torch.randint(0, cfg.vocab_size, tokens.shape, generator=torch.Generator().manual_seed(6))
    before = gradients(cfg, state, tokens, labels)
    result = apply_plan(state, cfg, {"ops": [op]})
    after = gradients(result.cfg, result.state, tokens, labels)

    compared = 0
    for name, tmap in result.maps.items():
        if tmap.old_name is None:
            continue
        old = before[tmap.old_name]
        expected, _ = apply_to_optimizer_state(tmap, old, old * old)
        kept = ~tmap.new_mask()
        error = float((after[name][kept] - expected[kept]).abs().max()) if kept.any() else 0.0
        scale = float(old.abs().max())
        assert error <= 1e-5 * max(scale, 1e-2), f"{name}: gradient off by {error} (max |grad| {scale})"
        compared += int(kept.sum())
    assert compared > 0
