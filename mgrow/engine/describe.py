"""Read a live megatron-core GPTModel stage into a :class:`~mgrow.core.model_config.ModelConfig`.

Growth of a user's job starts from the model itself, never from a retyped
description: the sizes and options come from the stage's ``TransformerConfig``
and ``GPTModel`` attributes, the norm epsilon and the rotary base from the
modules that use them, and every parameter's shape is then checked against the
description. A model mgrow cannot grow (not a GPTModel, another layer spec,
virtual pipeline stages, uneven stages, a config changed after the model was
built) is refused with a :class:`~mgrow.core.errors.ConfigError` naming what
disagrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mgrow.core.errors import ConfigError
from mgrow.core.model_config import TRANSFORMER_FIELDS, ModelConfig
from mgrow.core.parameters import parameter_shapes
from mgrow.engine.model import global_names
from mgrow.parallel import layout as layout_table

SUPPORTED = ("a megatron-core GPTModel built with the local layer spec (get_gpt_layer_local_spec), "
             "plain, in megatron's Float16Module, in megatron's DistributedDataParallel or in a DeepSpeed engine")

# TransformerConfig options whose models mgrow's operators do not cover yet; (field, value that is supported).
_UNSUPPORTED_OPTIONS = (
    ("virtual_pipeline_model_parallel_size", None),
    ("pipeline_model_parallel_layout", None),
    ("account_for_embedding_in_pipeline_split", False),
    ("account_for_loss_in_pipeline_split", False),
    ("sequence_parallel", False),
    ("expert_model_parallel_size", 1),
    ("multi_latent_attention", False),
    ("mtp_num_layers", None),
    ("fp16", False),
)


@dataclass(frozen=True)
class Unwrapped:
    """A model chunk as the user holds it: the GPTModel and the wrappers around it, outermost first."""

    gpt: object
    wrappers: tuple[type, ...]

    @property
    def float16_module(self) -> bool:
        return any(w.__name__ == "Float16Module" for w in self.wrappers)


def unwrap(chunk) -> Unwrapped:
    """The GPTModel inside ``chunk`` (megatron DDP, Float16Module, a DeepSpeed engine's module), or refuse."""
    from megatron.core.models.gpt import GPTModel

    wrappers, module = [], chunk
    while not isinstance(module, GPTModel):
        inner = getattr(module, "module", None)
        if not isinstance(inner, torch.nn.Module):
            held = "" if module is chunk else f"{type(chunk).__name__} holds "
            raise ConfigError("model", f"{held}a {type(module).__name__} is not a megatron-core GPTModel; mgrow grows "
                                       f"{SUPPORTED}")
        wrappers.append(type(module))
        module = inner
    return Unwrapped(module, tuple(wrappers))


def describe(gpt, dims) -> ModelConfig:
    """The ModelConfig of this rank's GPTModel stage (``dims``: this rank's :class:`ParallelDims`)."""
    config = gpt.config
    _check_options(gpt, dims.tp, dims.pp)
    gated = bool(config.gated_linear_unit)
    activation = _activation(config.activation_func, gated)
    dtype = _dtype(gpt)
    live = {name: getattr(config, name) for name in TRANSFORMER_FIELDS}
    live["layernorm_epsilon"] = _norm_epsilon(gpt)  # what the norm modules use
    live["gated_linear_unit"] = gated
    cfg = ModelConfig(
        **live,
        **_vocabulary(gpt),
        max_sequence_length=gpt.max_sequence_length,
        activation=activation,
        position_embedding_type=gpt.position_embedding_type,
        rotary_percent=gpt.rotary_percent,
        rotary_base=_rotary_base(gpt),
        **_rope_scaling(gpt),
        share_embeddings_and_output_weights=gpt.share_embeddings_and_output_weights,
        bf16=dtype == torch.bfloat16,
        num_layers_in_first_pipeline_stage=config.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=config.num_layers_in_last_pipeline_stage,
        **_moe(config),
    )
    _check_shapes(gpt, cfg, dims)
    return cfg


def _vocabulary(gpt) -> dict:
    """The real vocabulary: mgrow's own models mask a padded one (:class:`mgrow.engine.model.VocabMask`); a
    user's model is described as built (its padding, if any, is its vocabulary)."""
    mask = getattr(gpt, "vocab_mask", None)
    if mask is None:
        return {"vocab_size": gpt.vocab_size, "make_vocab_size_divisible_by": 1}
    return {"vocab_size": mask.vocab_size, "make_vocab_size_divisible_by": mask.divisible_by}


def _check_options(gpt, tp: int, pp: int) -> None:
    config = gpt.config
    if config.tensor_model_parallel_size != tp or config.pipeline_model_parallel_size != pp:
        raise ConfigError("model.config.tensor_model_parallel_size",
                          f"the model was built for tp={config.tensor_model_parallel_size}, "
                          f"pp={config.pipeline_model_parallel_size}; megatron's parallel_state has tp={tp}, pp={pp}")
    for field, supported in _UNSUPPORTED_OPTIONS:
        value = getattr(config, field, supported)
        if value != supported:
            raise ConfigError(f"model.config.{field}", f"{value!r} is not supported yet (only {supported!r}); "
                                                       f"mgrow grows {SUPPORTED}")
    if getattr(gpt, "vp_stage", None) is not None:
        raise ConfigError("model", "a model chunk of a virtual pipeline stage (vp_stage set) is not supported yet; "
                                   "pass one model chunk per rank")
    if getattr(gpt, "mtp_process", False):
        raise ConfigError("model", "multi-token prediction layers are not supported")
    if gpt.position_embedding_type not in ("learned_absolute", "rope"):
        raise ConfigError("model.position_embedding_type",
                          f"{gpt.position_embedding_type!r} is not supported (learned_absolute | rope)")
    rotary = getattr(gpt, "rotary_pos_emb", None)
    if getattr(rotary, "seq_len_interpolation_factor", None):
        raise ConfigError("model.seq_len_interpolation_factor", "interpolated rotary positions are not supported yet "
                                                                "(Llama 3.1's rope_scaling is)")


def _activation(function, gated: bool) -> str:
    import torch.nn.functional as F

    from mgrow.core.model_config import gelu_tanh

    if function is F.gelu and not gated:
        return "gelu"
    if function is gelu_tanh and not gated:
        return "gelu_tanh"
    if function is F.silu and gated:
        return "swiglu"
    name = getattr(function, "__name__", repr(function))
    raise ConfigError("model.config.activation_func",
                      f"{name} with gated_linear_unit={gated} is not supported (F.gelu or mgrow's gelu_tanh ungated, "
                      "or F.silu gated: swiglu)")


def _dtype(gpt) -> torch.dtype:
    dtypes = {param.dtype for param in gpt.parameters()}
    if dtypes == {torch.float32} or dtypes == {torch.bfloat16}:
        return dtypes.pop()
    raise ConfigError("model", f"parameters in {sorted(str(d) for d in dtypes)}: mgrow grows fp32 models and bf16 "
                               "models whose every parameter is bf16 (megatron's Float16Module, or model.bfloat16())")


def _norm_epsilon(gpt) -> float:
    """The epsilon the norm modules use (the config's is only what they were built with)."""
    found = {float(module.eps) for module in gpt.modules()
             if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) and module.eps is not None}
    if len(found) > 1:
        raise ConfigError("model.layernorm_epsilon", f"the norms use different epsilons {sorted(found)}")
    eps = found.pop() if found else float(gpt.config.layernorm_epsilon)
    if not math.isclose(eps, gpt.config.layernorm_epsilon, rel_tol=1e-6):
        raise ConfigError("model.config.layernorm_epsilon",
                          f"{gpt.config.layernorm_epsilon:g}, but the model's norms use {eps:g}: the config was "
                          "changed after the model was built, and a grown model built from it would differ")
    return eps


def _rotary_base(gpt) -> int:
    """``GPTModel.rotary_base``, checked against the frequencies its rotary embedding uses (those Llama 3.1's
    scaling leaves alone where it is on). Checked, not inferred: a base recovered from one float32 frequency
    is off by up to dim/2 times its rounding (2e-6 at a head dim of 128)."""
    if gpt.position_embedding_type != "rope":
        return int(gpt.rotary_base)
    inv_freq, expected = _frequencies(gpt)
    kept = (2 * math.pi / expected < 2048) if getattr(gpt, "rotary_scaling", False) else expected > 0
    if not torch.allclose(inv_freq[kept], expected[kept], rtol=1e-5, atol=0):
        raise ConfigError("model.rotary_base", f"GPTModel.rotary_base is {gpt.rotary_base}, but its rotary "
                                               "embedding's frequencies are not that base's")
    return int(gpt.rotary_base)


def _frequencies(gpt) -> tuple[torch.Tensor, torch.Tensor]:
    """(the rotary frequencies the model uses, those of ``GPTModel.rotary_base`` unscaled), float64 on the CPU."""
    inv_freq = gpt.rotary_pos_emb.inv_freq.double().cpu()
    dim = 2 * inv_freq.numel()
    return inv_freq, 1.0 / float(gpt.rotary_base) ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)


def _rope_scaling(gpt) -> dict:
    """Llama 3.1's RoPE scaling and its factor, read from the frequencies (wavelengths beyond megatron's
    original context of 8192 are divided by the factor; with none there, the factor changes nothing)."""
    if not getattr(gpt, "rotary_scaling", False):
        return {}
    inv_freq, unscaled = _frequencies(gpt)
    factor = float(unscaled[-1] / inv_freq[-1]) if 2 * math.pi / float(unscaled[-1]) > 8192 else 8.0
    return {"rope_scaling": True, "rope_scaling_factor": round(factor, 4)}


def _moe(config) -> dict:
    if not config.num_moe_experts:
        return {}
    if config.moe_ffn_hidden_size != config.ffn_hidden_size:
        raise ConfigError("model.config.moe_ffn_hidden_size",
                          f"{config.moe_ffn_hidden_size} must equal ffn_hidden_size {config.ffn_hidden_size}")
    if config.moe_grouped_gemm:
        raise ConfigError("model.config.moe_grouped_gemm", "grouped GEMM experts are not supported")
    balancing = config.moe_router_load_balancing_type
    if balancing not in ("none", "aux_loss"):
        raise ConfigError("model.config.moe_router_load_balancing_type", f"{balancing!r} is not supported")
    return dict(
        num_moe_experts=config.num_moe_experts,
        moe_router_topk=config.moe_router_topk,
        moe_router_score_function=config.moe_router_score_function,
        moe_router_pre_softmax=config.moe_router_pre_softmax,
        moe_aux_loss_coeff=float(config.moe_aux_loss_coeff) if balancing == "aux_loss" else 0.0,
    )


def _check_shapes(gpt, cfg: ModelConfig, dims) -> None:
    """Every parameter of the stage is one the description names, with the shape it gives, and none is missing."""
    tp = dims.tp
    cfg.check_layout(tp, dims.pp)
    shapes = parameter_shapes(cfg)
    seen = set()
    for local, name, param in global_names(gpt):
        if name not in shapes:
            raise ConfigError("model", f"parameter {local} is not one of a GPTModel with this config; mgrow grows "
                                       f"{SUPPORTED}")
        layout = layout_table.layout_of(name, cfg)
        live = layout_table.full_shape(param.shape, layout, tp)
        if live != shapes[name]:
            raise ConfigError("model", f"{local} has full shape {live}, but the model's config gives "
                                       f"{shapes[name]}: the config does not describe the weights it holds")
        seen.add(name)
    expected = {name for name in shapes if dims.pp_rank in layout_table.stages_of(name, cfg, dims.pp)}
    missing = sorted(expected - seen)
    if missing:
        raise ConfigError("model", f"this stage lacks {missing[0]} (and {len(missing) - 1} more) that the config "
                                   "gives it")

