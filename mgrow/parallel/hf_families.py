"""Hugging Face transformers' layouts of the GPT families mgrow imports and exports, as data: one table per
family, next to megatron's own layout table (:mod:`mgrow.parallel.layout`). Importable without torch (the
command's parent checks a config.json with it before any rank starts).

Each family says how its ``config.json`` keys map to :class:`~mgrow.core.model_config.ModelConfig` keys
(``keys``), which keys must hold one value for mgrow to build the model (``fixed``), which say nothing about the
function (``ignored``), and for every megatron tensor which HF tensors make it and how (``tensors``). A key in a
config that none of these names is refused by name: nothing is silently dropped.

How HF tensors become megatron's (``Rule.kind``):

* ``same``: one tensor, as it is;
* ``transposed``: GPT-2's ``Conv1D`` stores ``[in, out]``;
* ``qkv``: separate q, k, v projections ``[E*d | G*d | G*d, ...]`` interleaved per query group into megatron's
  ``[q heads of group g; k_g; v_g]`` rows (weights and biases alike);
* ``packed_qkv_transposed``: GPT-2's ``c_attn`` (``[h, 3h]``, q | k | v side by side): transposed, then
  interleaved per group as ``qkv`` (GPT-2 is multi-head: one group per head);
* ``gate_up``: SwiGLU's gate and up projections stacked as megatron's ``linear_fc1`` = ``[gate; up]``.

The rotary convention: HF's Llama, Mistral and Qwen2 rotate halves (``rotate_half``), which is megatron's
non-interleaved RoPE; their q and k rows need no permutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mgrow.core.model_config import ModelConfig

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Rule:
    megatron: str  # a global name's suffix after "decoder.layers.{i}." (per layer), or a whole global name
    hf: tuple[str, ...]  # HF tensor names; "{i}" is the layer index
    kind: str = "same"
    when: str = ""  # a ModelConfig attribute that must be true for the tensor to exist ("" = always)


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    keys: dict  # HF config key -> ModelConfig key (read and written as they are)
    fixed: dict  # HF config key -> the only value mgrow builds (None: absent or null also accepted)
    ignored: tuple  # HF config keys that do not change the function
    tensors: tuple[Rule, ...]
    per_layer: tuple[Rule, ...]
    defaults: dict = field(default_factory=dict)  # HF defaults of keys a config.json may leave out
    builds: dict = field(default_factory=dict)  # ModelConfig values every model of the family has


# Keys every transformers config carries that say nothing about the function.
COMMON_IGNORED = (
    "transformers_version", "architectures", "model_type", "dtype", "torch_dtype", "output_hidden_states",
    "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type",
    "id2label", "label2id", "_name_or_path", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
    "initializer_range", "tie_encoder_decoder", "torchscript", "pruned_heads", "add_cross_attention",
)

_LLAMA_KEYS = {"num_hidden_layers": "num_layers", "hidden_size": "hidden_size",
               "num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_query_groups",
               "head_dim": "kv_channels", "intermediate_size": "ffn_hidden_size", "vocab_size": "vocab_size",
               "max_position_embeddings": "max_sequence_length", "rms_norm_eps": "layernorm_epsilon",
               "tie_word_embeddings": "share_embeddings_and_output_weights", "attention_dropout": "attention_dropout"}
_LLAMA_TENSORS = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), when="untied"),
)
_LLAMA_LAYER = (
    Rule("input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",)),
    Rule("self_attention.linear_qkv.weight", ("model.layers.{i}.self_attn.q_proj.weight",
                                              "model.layers.{i}.self_attn.k_proj.weight",
                                              "model.layers.{i}.self_attn.v_proj.weight"), "qkv"),
    Rule("self_attention.linear_qkv.bias", ("model.layers.{i}.self_attn.q_proj.bias",
                                            "model.layers.{i}.self_attn.k_proj.bias",
                                            "model.layers.{i}.self_attn.v_proj.bias"), "qkv", when="add_qkv_bias"),
    Rule("self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",)),
    Rule("pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
    Rule("mlp.linear_fc1.weight", ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
         "gate_up"),
    Rule("mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",)),
)
# What the Llama-like families build: RMSNorm, SwiGLU, RoPE, no biases but (Qwen2) the QKV one.
_LLAMA_MODEL = dict(normalization="RMSNorm", activation="swiglu", position_embedding_type="rope",
                    add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0)

FAMILIES = {
    "llama": Family(
        "llama", "LlamaForCausalLM", _LLAMA_KEYS,
        fixed={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
        ignored=COMMON_IGNORED, tensors=_LLAMA_TENSORS, per_layer=_LLAMA_LAYER,
        defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_dropout": 0.0},
        builds=_LLAMA_MODEL),
    "mistral": Family(
        "mistral", "MistralForCausalLM", _LLAMA_KEYS,
        fixed={"hidden_act": "silu", "sliding_window": None},
        ignored=COMMON_IGNORED, tensors=_LLAMA_TENSORS, per_layer=_LLAMA_LAYER,
        defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_dropout": 0.0},
        builds=_LLAMA_MODEL),
    "qwen2": Family(
        "qwen2", "Qwen2ForCausalLM", _LLAMA_KEYS,
        fixed={"hidden_act": "silu", "use_sliding_window": False},
        ignored=(*COMMON_IGNORED, "sliding_window", "max_window_layers", "layer_types"),
        tensors=_LLAMA_TENSORS, per_layer=_LLAMA_LAYER,
        defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_dropout": 0.0},
        builds={**_LLAMA_MODEL, "add_qkv_bias": True}),
    "gpt2": Family(
        "gpt2", "GPT2LMHeadModel",
        keys={"n_layer": "num_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
              "n_inner": "ffn_hidden_size", "vocab_size": "vocab_size", "n_positions": "max_sequence_length",
              "layer_norm_epsilon": "layernorm_epsilon", "resid_pdrop": "hidden_dropout",
              "attn_pdrop": "attention_dropout"},
        fixed={"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "tie_word_embeddings": True},
        # the sequence-summary head of GPT2DoubleHeadsModel; reorder_and_upcast_attn changes fp16 rounding only
        ignored=(*COMMON_IGNORED, "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
                 "summary_first_dropout", "reorder_and_upcast_attn", "embd_pdrop", "activation_function",
                 "n_ctx"),
        tensors=(
            Rule("embedding.word_embeddings.weight", ("transformer.wte.weight",)),
            Rule("embedding.position_embeddings.weight", ("transformer.wpe.weight",)),
            Rule("decoder.final_layernorm.weight", ("transformer.ln_f.weight",)),
            Rule("decoder.final_layernorm.bias", ("transformer.ln_f.bias",)),
        ),
        per_layer=(
            Rule("input_layernorm.weight", ("transformer.h.{i}.ln_1.weight",)),
            Rule("input_layernorm.bias", ("transformer.h.{i}.ln_1.bias",)),
            Rule("self_attention.linear_qkv.weight", ("transformer.h.{i}.attn.c_attn.weight",), "packed_qkv_transposed"),
            Rule("self_attention.linear_qkv.bias", ("transformer.h.{i}.attn.c_attn.bias",), "packed_qkv_transposed"),
            Rule("self_attention.linear_proj.weight", ("transformer.h.{i}.attn.c_proj.weight",), "transposed"),
            Rule("self_attention.linear_proj.bias", ("transformer.h.{i}.attn.c_proj.bias",)),
            Rule("pre_mlp_layernorm.weight", ("transformer.h.{i}.ln_2.weight",)),
            Rule("pre_mlp_layernorm.bias", ("transformer.h.{i}.ln_2.bias",)),
            Rule("mlp.linear_fc1.weight", ("transformer.h.{i}.mlp.c_fc.weight",), "transposed"),
            Rule("mlp.linear_fc1.bias", ("transformer.h.{i}.mlp.c_fc.bias",)),
            Rule("mlp.linear_fc2.weight", ("transformer.h.{i}.mlp.c_proj.weight",), "transposed"),
            Rule("mlp.linear_fc2.bias", ("transformer.h.{i}.mlp.c_proj.bias",)),
        ),
        defaults={"n_inner": None, "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1, "attn_pdrop": 0.1,
                  "embd_pdrop": 0.1, "activation_function": "gelu_new"},
        builds=dict(normalization="LayerNorm", position_embedding_type="learned_absolute", add_bias_linear=True,
                    share_embeddings_and_output_weights=True)),
}
# GPT-2's activation names and the ModelConfig activation they are
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def rules(family: Family, cfg: ModelConfig) -> dict[str, Rule]:
    """Every global megatron tensor of ``cfg`` -> the rule that makes it, with ``{i}`` filled in."""
    out = {}
    for rule in family.tensors:
        if rule.when == "untied" and cfg.share_embeddings_and_output_weights:
            continue
        out[rule.megatron] = rule
    for index in range(cfg.num_layers):
        for rule in family.per_layer:
            if rule.when and not getattr(cfg, rule.when):
                continue
            out[f"decoder.layers.{index}.{rule.megatron}"] = Rule(
                f"decoder.layers.{index}.{rule.megatron}", tuple(n.format(i=index) for n in rule.hf), rule.kind)
    return out


def to_megatron(kind: str, tensors: list["torch.Tensor"], cfg: ModelConfig) -> "torch.Tensor":
    """The full megatron tensor from its HF tensors."""
    import torch

    if kind == "same":
        return tensors[0]
    if kind == "transposed":
        return tensors[0].t().contiguous()
    if kind == "gate_up":
        return torch.cat(tensors)
    if kind == "qkv":
        return _interleave(*tensors, cfg)
    if kind == "packed_qkv_transposed":
        packed = tensors[0].t() if tensors[0].dim() == 2 else tensors[0]
        return _interleave(*packed.chunk(3), cfg)
    raise KeyError(kind)


def from_megatron(kind: str, tensor: "torch.Tensor", cfg: ModelConfig) -> list["torch.Tensor"]:
    """The HF tensors of a full megatron tensor (the inverse of :func:`to_megatron`)."""
    import torch

    if kind == "same":
        return [tensor]
    if kind == "transposed":
        return [tensor.t().contiguous()]
    if kind == "gate_up":
        return list(tensor.chunk(2))
    q, k, v = _deinterleave(tensor, cfg)
    if kind == "qkv":
        return [q, k, v]
    if kind == "packed_qkv_transposed":
        packed = torch.cat([q, k, v])
        return [packed.t().contiguous() if packed.dim() == 2 else packed]
    raise KeyError(kind)


def _interleave(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", cfg: ModelConfig) -> "torch.Tensor":
    """Megatron's QKV rows, per query group g: [the q rows of g's heads; k_g; v_g] (each head kv_channels rows)."""
    import torch

    G, d, per_group = cfg.num_query_groups, cfg.kv_channels, cfg.heads_per_group
    rest = q.shape[1:]
    groups = torch.cat([q.reshape(G, per_group * d, *rest), k.reshape(G, d, *rest), v.reshape(G, d, *rest)], dim=1)
    return groups.reshape(G * (per_group + 2) * d, *rest).contiguous()


def _deinterleave(qkv: "torch.Tensor", cfg: ModelConfig):
    G, d, per_group = cfg.num_query_groups, cfg.kv_channels, cfg.heads_per_group
    rest = qkv.shape[1:]
    groups = qkv.reshape(G, (per_group + 2) * d, *rest)
    q, k, v = groups.split([per_group * d, d, d], dim=1)
    return (q.reshape(G * per_group * d, *rest).contiguous(), k.reshape(G * d, *rest).contiguous(),
            v.reshape(G * d, *rest).contiguous())
