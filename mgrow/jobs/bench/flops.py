"""Training FLOPs of a GPT, counted analytically (the matmuls only).

Per token and layer, the forward pass multiplies (q = heads * kv_channels,
g = query groups * kv_channels, f = ffn_hidden_size, s = sequence length):

    QKV projection     2 h (q + 2 g)
    scores and values  4 s q            (every query against all s keys, as Megatron-LM counts it)
    output projection  2 q h
    MLP                2 h f (2 if gated) + 2 f h

and the output layer 2 h V once per token. Training is forward + backward =
3 x forward, without activation recomputation. For MHA with f = 4h this is
Megatron-LM's 72 B s L h^2 (1 + s/6h + V/12Lh) per iteration (Narayanan et al.
2021, appendix). Norms, softmax, embeddings lookups and the optimizer are left out.
"""

from __future__ import annotations

from mgrow.core.model_config import ModelConfig


def forward_flops_per_token(model: ModelConfig, seq_length: int) -> int:
    h, f = model.hidden_size, model.ffn_hidden_size
    q = model.num_attention_heads * model.kv_channels
    g = model.num_query_groups * model.kv_channels
    fc1_outputs = 2 * f if model.gated_linear_unit else f
    layer = 2 * h * (q + 2 * g) + 4 * seq_length * q + 2 * q * h + 2 * h * fc1_outputs + 2 * f * h
    return model.num_layers * layer + 2 * h * model.vocab_size


def training_flops_per_token(model: ModelConfig, seq_length: int) -> int:
    return 3 * forward_flops_per_token(model, seq_length)
