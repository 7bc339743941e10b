"""Explicit warm start (issue 8): at step 0 the model already predicts the corpus's bigram statistics."""

import pytest
import torch

from launch_utils import REPO
from mgrow.core.model_config import ModelConfig

CORPUS = str(REPO / "data" / "cache" / "corpus")


@pytest.mark.parametrize("kw", [dict(normalization="RMSNorm", activation="swiglu", position_embedding_type="rope"),
                                dict(normalization="LayerNorm", activation="gelu")], ids=["rmsnorm", "layernorm"])
def test_explicit_init_starts_near_the_bigram_entropy(kw, single_rank):
    from mgrow.train.data import TokenWindows, ensure_corpus
    from mgrow.engine.model import build_gpt
    from mgrow.train.warm_start import bigram_entropy, explicit_init

    ensure_corpus(CORPUS)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, max_sequence_length=64, **kw)
    valid = TokenWindows(CORPUS, "valid", 64, 0)
    batch = valid.samples(0, 16)
    x, y = batch[:, :-1], batch[:, 1:]

    def loss(model) -> float:
        model.eval()
        with torch.no_grad():
            return float(model(x, torch.arange(x.shape[1]).expand_as(x), None, labels=y).mean())

    random = loss(build_gpt(cfg, single_rank, seed=1))
    explicit = loss(build_gpt(cfg, single_rank, seed=1, init=explicit_init(cfg, 1, CORPUS, single_rank)))
    entropy = bigram_entropy(valid.tokens.numpy(), 256)
    print(f"{kw['normalization']}: step-0 loss random {random:.4f}, explicit {explicit:.4f}, bigram entropy {entropy:.4f}")
    assert random > 5.0  # about log 256 = 5.55
    assert explicit < entropy + 0.3  # a rank-h factorisation of the bigram table, through a random network
