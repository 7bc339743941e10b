"""The canonical description of a GPT's dimensions.

Keys are megatron-core ``TransformerConfig`` / ``GPTModel`` argument names, so a
model YAML reads like the arguments a Megatron user already writes. A
``ModelConfig`` converts to the ``TransformerConfig`` plus ``GPTModel`` keyword
arguments that build it, at a given tensor/pipeline layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from mgrow.core.errors import ConfigError

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")  # gelu_tanh: GELU's tanh approximation (GPT-2's gelu_new)
POSITION_EMBEDDINGS = ("learned_absolute", "rope")
MOE_SCORE_FUNCTIONS = ("softmax", "sigmoid")
# ModelConfig fields that are TransformerConfig fields of the same name and meaning.
TRANSFORMER_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                      "ffn_hidden_size", "normalization", "layernorm_epsilon", "gated_linear_unit", "add_bias_linear",
                      "add_qkv_bias", "qk_layernorm", "softmax_scale", "apply_query_key_layer_scaling", "init_method_std",
                      "hidden_dropout", "attention_dropout")
# Keys that say how the model is laid out, not what it computes (left out of ==).
LAYOUT_KEYS = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
               "make_vocab_size_divisible_by")


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's ``_vocab_size_with_padding``: the vocabulary rounded up to a multiple of
    ``divisible_by * tp``, so every TP rank holds an equal slice of the embedding and output layer."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_sequence_length: int
    num_query_groups: Optional[int] = None  # None: MHA (= num_attention_heads)
    kv_channels: Optional[int] = None  # None: hidden_size // num_attention_heads
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden_size
    normalization: str = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"  # swiglu implies gated_linear_unit
    gated_linear_unit: Optional[bool] = None  # None: True for swiglu, else False
    position_embedding_type: str = "learned_absolute"
    rotary_percent: float = 1.0
    rotary_base: int = 10000
    # Llama 3.1's RoPE scaling as megatron-core implements it (low / high frequency factors 1 / 4 over an
    # original context of 8192): wavelengths beyond 8192 divided by rope_scaling_factor, those under 2048 kept,
    # a smooth blend between
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    share_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = True
    add_qkv_bias: bool = False  # a bias on the QKV projection alone (Qwen2); implied by add_bias_linear
    qk_layernorm: bool = False
    softmax_scale: Optional[float] = None
    apply_query_key_layer_scaling: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    bf16: bool = False  # bf16 parameters and activations; the optimizers keep fp32 master weights
    # Mixture of experts (megatron-core names). None: a dense MLP. Every expert has ffn_hidden_size units.
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_router_score_function: str = "softmax"  # softmax | sigmoid
    moe_router_pre_softmax: bool = False  # False: softmax over the top-k logits, so the k weights sum to 1
    moe_aux_loss_coeff: float = 0.0  # > 0: megatron's "aux_loss" load balancing with this coefficient
    # The pipeline split (mgrow.core.stages): layers on the first / last stage, as megatron-core takes them.
    # None: even, or the most balanced split when pp does not divide the layers. Layout, not function: two
    # configs that differ only here describe the same model (a checkpoint resumes at any split).
    num_layers_in_first_pipeline_stage: Optional[int] = field(default=None, compare=False)
    num_layers_in_last_pipeline_stage: Optional[int] = field(default=None, compare=False)
    # Megatron-LM's --make-vocab-size-divisible-by: the model is built with the vocabulary padded to a multiple
    # of this times TP (padded_vocab_size). The padded rows stay zero and their logits are masked out of the
    # loss and every comparison, so the padding is layout, not function: a checkpoint resumes at a TP size
    # whose padding differs.
    make_vocab_size_divisible_by: int = field(default=128, compare=False)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length",
                     "make_vocab_size_divisible_by"):
            _positive_int(f"model.{name}", getattr(self, name))
        if self.num_query_groups is None:
            set_("num_query_groups", self.num_attention_heads)
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    "model.kv_channels",
                    f"must be set when hidden_size ({self.hidden_size}) is not divisible by "
                    f"num_attention_heads ({self.num_attention_heads})",
                )
            set_("kv_channels", self.hidden_size // self.num_attention_heads)
        if self.ffn_hidden_size is None:
            set_("ffn_hidden_size", 4 * self.hidden_size)
        for name in ("num_query_groups", "kv_channels", "ffn_hidden_size"):
            _positive_int(f"model.{name}", getattr(self, name))
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                "model.num_query_groups",
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_query_groups ({self.num_query_groups})",
            )
        _one_of("model.normalization", self.normalization, NORMALIZATIONS)
        _one_of("model.activation", self.activation, ACTIVATIONS)
        _one_of("model.position_embedding_type", self.position_embedding_type, POSITION_EMBEDDINGS)
        if self.gated_linear_unit is None:
            set_("gated_linear_unit", self.activation == "swiglu")
        if self.activation == "swiglu" and not self.gated_linear_unit:
            raise ConfigError("model.gated_linear_unit", "activation swiglu needs gated_linear_unit: true")
        if not (self.layernorm_epsilon > 0):
            raise ConfigError("model.layernorm_epsilon", "must be > 0")
        if not (0 < self.rotary_percent <= 1):
            raise ConfigError("model.rotary_percent", "must be in (0, 1]")
        if self.position_embedding_type == "rope":
            rotary_dim = self.kv_channels * self.rotary_percent
            if abs(rotary_dim - round(rotary_dim)) > 1e-6 or round(rotary_dim) % 2:
                raise ConfigError(
                    "model.rotary_percent",
                    f"kv_channels * rotary_percent = {rotary_dim:g} must be an even integer",
                )
        for name in ("add_qkv_bias", "rope_scaling"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name}", f"must be true or false, got {getattr(self, name)!r}")
        if self.rope_scaling and not (self.rope_scaling_factor > 0):
            raise ConfigError("model.rope_scaling_factor", f"must be > 0, got {self.rope_scaling_factor!r}")
        if self.rope_scaling and self.position_embedding_type != "rope":
            raise ConfigError("model.rope_scaling", "scales rotary embeddings: needs position_embedding_type rope")
        if not isinstance(self.bf16, bool):
            raise ConfigError("model.bf16", f"must be true or false, got {self.bf16!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"model.{name}", "must be in [0, 1)")
        if self.num_moe_experts is not None:
            self._check_moe()

    def _check_moe(self) -> None:
        _positive_int("model.num_moe_experts", self.num_moe_experts)
        _positive_int("model.moe_router_topk", self.moe_router_topk)
        if self.moe_router_topk > self.num_moe_experts:
            raise ConfigError("model.moe_router_topk",
                              f"{self.moe_router_topk} exceeds num_moe_experts {self.num_moe_experts}")
        _one_of("model.moe_router_score_function", self.moe_router_score_function, MOE_SCORE_FUNCTIONS)
        if not isinstance(self.moe_router_pre_softmax, bool):
            raise ConfigError("model.moe_router_pre_softmax", f"must be true or false, got {self.moe_router_pre_softmax!r}")
        if (self.moe_router_topk == 1 and self.moe_router_score_function == "softmax"
                and not self.moe_router_pre_softmax):
            # megatron-core refuses it: a softmax over one logit is 1 and has no gradient for the router
            raise ConfigError("model.moe_router_topk", "1 with the softmax score function needs "
                                                       "moe_router_pre_softmax: true")
        if isinstance(self.moe_aux_loss_coeff, bool) or not isinstance(self.moe_aux_loss_coeff, (int, float)) \
                or self.moe_aux_loss_coeff < 0:
            raise ConfigError("model.moe_aux_loss_coeff", f"must be a number >= 0, got {self.moe_aux_loss_coeff!r}")

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    @property
    def normalised_routing(self) -> bool:
        """Whether the top-k routing weights of every token sum to 1 (then identical experts act as one MLP)."""
        if self.moe_router_score_function == "sigmoid":
            return self.moe_router_topk > 1  # megatron divides the k sigmoid scores by their sum
        return not self.moe_router_pre_softmax or self.moe_router_topk == self.num_moe_experts

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, values: dict, where: str = "model") -> "ModelConfig":
        if not isinstance(values, dict):
            raise ConfigError(where, f"must be a mapping of model keys, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls) }
        for key in values:
            if key not in known:
                raise ConfigError(f"{where}.{key}", f"unknown model key; known keys: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def load(cls, path: str, field: str = "--model") -> "ModelConfig":
        """A model YAML file (``field`` names the flag or key that gave its path in errors)."""
        from mgrow.core.files_in import read_yaml

        return cls.from_dict(read_yaml(path, field, "model file"))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------- derived sizes
    @property
    def dtype(self):
        """The dtype of the model's parameters (the optimizers' master weights are fp32 either way)."""
        import torch

        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def rotary_dim(self) -> int:
        return int(round(self.kv_channels * self.rotary_percent))

    def num_parameters(self) -> int:
        h, k, E, G, p, V = (self.hidden_size, self.kv_channels, self.num_attention_heads,
                            self.num_query_groups, self.ffn_hidden_size, self.vocab_size)
        b = 1 if self.add_bias_linear else 0
        b_qkv = 1 if self.add_bias_linear or self.add_qkv_bias else 0
        norm = 2 * h if self.normalization == "LayerNorm" else h
        qk_norm = (2 * k if self.normalization == "LayerNorm" else k) * 2 if self.qk_layernorm else 0
        fc1_out = 2 * p if self.gated_linear_unit else p
        attn = (E + 2 * G) * k * (h + b_qkv) + E * k * h + b * h
        mlp = fc1_out * (h + b) + p * h + b * h
        if self.is_moe:
            mlp = self.num_moe_experts * (mlp + h + b)  # experts, and the router's [E, h] weight (and bias)
        layer = norm + attn + qk_norm + norm + mlp
        embed = V * h + (self.max_sequence_length * h if self.position_embedding_type == "learned_absolute" else 0)
        output = 0 if self.share_embeddings_and_output_weights else V * h
        return self.num_layers * layer + embed + norm + output

    def checkpoint_bytes(self) -> int:
        """About the size of one checkpoint of this model: per parameter its weight (fp32, or bf16 plus the fp32
        master) and Adam's two fp32 moments."""
        return self.num_parameters() * ((2 + 4 if self.bf16 else 4) + 8)

    # -------------------------------------------------------------- layouts
    def check_layout(self, tp: int, pp: int) -> None:
        """Refuse a tensor/pipeline layout this model cannot be split into."""
        if self.num_attention_heads % tp:
            raise ConfigError(
                "model.num_attention_heads",
                f"{self.num_attention_heads} heads must be divisible by tensor parallel size {tp}",
            )
        G = self.num_query_groups
        if G % tp and tp % G:
            raise ConfigError(
                "model.num_query_groups",
                f"{G} query groups and tensor parallel size {tp}: one must divide the other",
            )
        if self.ffn_hidden_size % tp:
            raise ConfigError(
                "model.ffn_hidden_size", f"{self.ffn_hidden_size} must be divisible by tensor parallel size {tp}"
            )
        self.stage_split(pp)
        if self.is_moe and self.add_bias_linear and tp > 1:
            raise ConfigError("model.add_bias_linear", "megatron-core's MoE experts have biases only when the "
                                                       f"experts are not tensor parallel; tp = {tp}")

    def stage_split(self, pp: int):
        """This model's layers over ``pp`` pipeline stages (:mod:`mgrow.core.stages`); refuses a split megatron-core
        would refuse, naming the key."""
        from mgrow.core.stages import split

        first, last = self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage
        if pp == 1:
            first = last = None  # a stage split means nothing at pp = 1 (a checkpoint split at pp > 1 resumes there)
        return split(self.num_layers, pp, first, last)

    def at_pipeline(self, pp: int) -> "ModelConfig":
        """This model at pipeline size ``pp``: with its own split where it fits, else with none (even or most
        balanced). A checkpoint's split is its layout's; a job on another layout picks its own."""
        try:
            self.stage_split(pp)
            return self
        except ConfigError:
            return self.replace(num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None)

    def transformer_config(self, tp: int = 1, pp: int = 1, **overrides):
        """The megatron-core ``TransformerConfig`` for this model at TP=tp, PP=pp (CPU friendly)."""
        import torch.nn.functional as F
        from megatron.core.transformer import TransformerConfig

        self.check_layout(tp, pp)
        activation = {"swiglu": F.silu, "gelu": F.gelu, "gelu_tanh": gelu_tanh}[self.activation]
        values = dict(
            **{name: getattr(self, name) for name in TRANSFORMER_FIELDS},
            activation_func=activation,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            **self.stage_split(pp).megatron_kwargs(),
            bf16=self.bf16,
            params_dtype=self.dtype,
            pipeline_dtype=self.dtype,
            use_cpu_initialization=True,
            # Fused kernels need CUDA / Apex; the unfused paths are the reference math.
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
        )
        if self.is_moe:
            values.update(self._moe_keys())
        values.update(overrides)
        return TransformerConfig(**values)

    def _moe_keys(self) -> dict:
        """megatron-core MoE settings: expert parallel 1, experts as wide as ffn_hidden_size, no token
        dropping (no capacity factor), no z-loss, no input jitter; load balancing by megatron's aux loss
        only when moe_aux_loss_coeff > 0 (it changes the router's gradients, never the forward output)."""
        return dict(
            num_moe_experts=self.num_moe_experts,
            moe_ffn_hidden_size=self.ffn_hidden_size,
            moe_router_topk=self.moe_router_topk,
            moe_router_score_function=self.moe_router_score_function,
            moe_router_pre_softmax=self.moe_router_pre_softmax,
            moe_router_load_balancing_type="aux_loss" if self.moe_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=float(self.moe_aux_loss_coeff),
            moe_z_loss_coeff=None,
            moe_input_jitter_eps=None,
            moe_expert_capacity_factor=None,
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
        )

    def padded_vocab_size(self, tp: int) -> int:
        """The vocabulary megatron-core's GPTModel is built with at tensor parallel size ``tp``."""
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tp)

    def gpt_model_kwargs(self, tp: int) -> dict:
        return dict(
            vocab_size=self.padded_vocab_size(tp),
            max_sequence_length=self.max_sequence_length,
            share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
            position_embedding_type=self.position_embedding_type,
            rotary_percent=self.rotary_percent,
            rotary_base=self.rotary_base,
            rope_scaling=self.rope_scaling,
            rope_scaling_factor=self.rope_scaling_factor,
        )


def gelu_tanh(x):
    """GELU with the tanh approximation (GPT-2's ``gelu_new``), as megatron's ``activation_func``."""
    import torch.nn.functional as F

    return F.gelu(x, approximate="tanh")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(name, f"must be a positive integer, got {value!r}")


def _one_of(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(name, f"must be one of {' | '.join(choices)}, got {value!r}")
