"""Reading a live GPTModel back into its description (mgrow.engine.describe): what growth of a user's model
starts from. Every supported variant reads back as the config that built it; a model whose config no longer
describes it, or that mgrow cannot grow, is refused naming what disagrees."""

import pytest
import torch

from mgrow.core.errors import ConfigError
from mgrow.core.model_config import ModelConfig

BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, max_sequence_length=16)
VARIANTS = [
    {},
    {"activation": "swiglu", "normalization": "RMSNorm", "num_query_groups": 2, "qk_layernorm": True,
     "add_bias_linear": False, "share_embeddings_and_output_weights": True, "position_embedding_type": "rope",
     "rotary_base": 500000, "rotary_percent": 0.5, "layernorm_epsilon": 1e-6},
    {"kv_channels": 12, "ffn_hidden_size": 80, "softmax_scale": 0.3, "init_method_std": 0.01, "bf16": True},
    {"num_moe_experts": 4, "moe_router_topk": 2, "moe_aux_loss_coeff": 0.01, "add_bias_linear": False},
    # a head dim of 128 (a base read back from one float32 frequency was off by 2e-6 there), Llama 3.1's scaling,
    # a QKV-only bias, GPT-2's tanh GELU
    {"hidden_size": 256, "num_attention_heads": 2, "position_embedding_type": "rope", "rotary_base": 10000,
     "rope_scaling": True, "rope_scaling_factor": 8.0, "add_bias_linear": False, "add_qkv_bias": True},
    {"activation": "gelu_tanh", "vocab_size": 300},
]


@pytest.mark.parametrize("options", VARIANTS)
def test_a_built_model_reads_back_as_its_config(single_rank, options):
    from mgrow.engine.describe import describe
    from mgrow.engine.model import build_gpt

    cfg = ModelConfig(**{**BASE, **options})
    assert describe(build_gpt(cfg, single_rank), single_rank) == cfg


@pytest.mark.parametrize("change, field", [
    (lambda m: setattr(m.config, "ffn_hidden_size", 96), "model"),
    (lambda m: setattr(m.config, "num_attention_heads", 8), "model"),
    (lambda m: setattr(m.config, "layernorm_epsilon", 1e-3), "model.config.layernorm_epsilon"),
    (lambda m: setattr(m.config, "activation_func", torch.tanh), "model.config.activation_func"),
    (lambda m: setattr(m.config, "sequence_parallel", True), "model.config.sequence_parallel"),
    (lambda m: setattr(m.config, "tensor_model_parallel_size", 2), "model.config.tensor_model_parallel_size"),
    (lambda m: setattr(m, "vp_stage", 0), "model"),
    (lambda m: setattr(m, "rotary_base", 20000), "model.rotary_base"),
])
def test_a_model_its_config_no_longer_describes_is_refused(single_rank, change, field):
    from mgrow.engine.describe import describe
    from mgrow.engine.model import build_gpt

    model = build_gpt(ModelConfig(**BASE, position_embedding_type="rope"), single_rank)
    change(model)
    with pytest.raises(ConfigError) as error:
        describe(model, single_rank)
    assert error.value.field == field


def test_a_model_with_mixed_dtypes_or_another_layer_spec_is_refused(single_rank):
    from mgrow.engine.describe import describe, unwrap
    from mgrow.engine.model import build_gpt

    model = build_gpt(ModelConfig(**BASE), single_rank)
    model.embedding.word_embeddings.weight.data = model.embedding.word_embeddings.weight.data.bfloat16()
    with pytest.raises(ConfigError, match="mix|parameters in"):
        describe(model, single_rank)
    model = build_gpt(ModelConfig(**BASE), single_rank)
    model.decoder.layers[0].register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ConfigError, match="decoder.layers.0.extra is not one of a GPTModel"):
        describe(model, single_rank)
    with pytest.raises(ConfigError, match="a Linear is not a megatron-core GPTModel"):
        unwrap(torch.nn.Linear(2, 2))
