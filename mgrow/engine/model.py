"""Build megatron-core GPTModel stages and move whole (global) tensors in and out of them."""

from __future__ import annotations

import math
import zlib
from typing import Iterator, Optional

import torch

from mgrow.core.defaults import DEFAULT_SEED
from mgrow.core.model_config import TRANSFORMER_FIELDS, ModelConfig
from mgrow.core.parameters import layer_index, renumber
from mgrow.parallel import collectives
from mgrow.parallel import layout as layout_table


def build_gpt(cfg: ModelConfig, dims, seed: int = DEFAULT_SEED, init: Optional[dict] = None, initialize: bool = True):
    """This rank's GPTModel stage on ``dims.device`` (megatron's parallel_state must be initialised).

    Megatron builds the weights where Megatron-LM does (on the GPU of a CUDA rank,
    ``use_cpu_initialization`` on a CPU rank), and the whole stage then moves to the
    rank's device, as Megatron-LM's ``get_model`` does (the local spec's torch norms
    are made on the CPU). Weights come from :class:`CanonicalInit` (or from ``init``,
    a dict of global name -> full tensor), so every TP/PP layout of one seed holds
    the same model. ``initialize=False`` leaves megatron's own initialisation (the
    caller fills every weight).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = cfg.transformer_config(dims.tp, dims.pp, use_cpu_initialization=not dims.is_cuda)
    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False,
                                    qk_layernorm=cfg.qk_layernorm, normalization=cfg.normalization)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        pre_process=dims.is_first_stage,
        post_process=dims.is_last_stage,
        **cfg.gpt_model_kwargs(dims.tp),
    )
    model.to(dims.device)
    if cfg.bf16:
        model.bfloat16()  # params_dtype reaches the linear layers only; megatron's Float16Module casts the norms too
    VocabMask.install(model, cfg, dims.tp_rank, dims.tp)
    if initialize:
        load_full_tensors(model, cfg, init if init is not None else CanonicalInit(cfg, seed), dims)
    return model


def grown_transformer_config(config, grown: ModelConfig):
    """A live model's TransformerConfig with the grown model's values (sizes, the norm epsilon a hidden growth
    rescales, the pipeline split); every other field kept. A new object.

    An ``output_layer_init_method`` that megatron derived from the old layer count (std / sqrt(2 L)) is derived
    again from the new one, as a fresh build of the grown size would; one the user set is kept.
    """
    import dataclasses

    values = {name: getattr(grown, name) for name in TRANSFORMER_FIELDS}
    values.update(grown.stage_split(config.pipeline_model_parallel_size).megatron_kwargs())
    if grown.is_moe:
        values["moe_ffn_hidden_size"] = grown.ffn_hidden_size
    if _derived_output_init(config):
        values["output_layer_init_method"] = None
    return dataclasses.replace(config, **values)


def _derived_output_init(config) -> bool:
    import functools

    from megatron.core.utils import scaled_init_method_normal

    method = config.output_layer_init_method
    default = scaled_init_method_normal(config.init_method_std, config.num_layers,
                                        multiplier=1.0 if config.is_hybrid_model else 2.0)
    return (isinstance(method, functools.partial) and method.func is default.func and not method.args
            and method.keywords == default.keywords)


# TransformerConfig fields that megatron's DDP and optimizer set to their own bound methods
HOOK_FIELDS = ("no_sync_func", "grad_sync_func", "param_sync_func", "grad_scale_func", "finalize_model_grads_func")


def build_like(old, grown: ModelConfig):
    """A GPTModel stage of the grown model made as the live stage ``old`` was: its TransformerConfig (grown),
    layer spec and GPTModel arguments (those a ModelConfig holds from ``grown``), on its device, in its dtype.

    Growth writes every weight, so megatron does not initialise them (``perform_initialization`` off while the
    model is built; megatron then leaves the weights' tensor-parallel attributes unset, and they are set here
    from the layout table, as megatron's initialisers set them). The config's hooks (bound to the old DDP and
    optimizer until the job is rebuilt) are left out while the model is built too: megatron deep-copies the
    config where TP exceeds the query groups, and a process group does not copy. The config ends as the
    user's, grown."""
    from megatron.core.models.gpt import GPTModel

    config = grown_transformer_config(old.config, grown)
    kept = {field: getattr(config, field, None) for field in (*HOOK_FIELDS, "perform_initialization")}
    for field in HOOK_FIELDS:
        setattr(config, field, None)
    config.perform_initialization = False
    model = GPTModel(
        config=config,
        transformer_layer_spec=old.transformer_layer_spec,
        pre_process=old.pre_process,
        post_process=old.post_process,
        fp16_lm_cross_entropy=old.fp16_lm_cross_entropy,
        parallel_output=old.parallel_output,
        **grown.gpt_model_kwargs(old.config.tensor_model_parallel_size),
    )
    for field, value in kept.items():
        setattr(config, field, value)
    set_parallel_attributes(model, grown)
    model.to(next(old.parameters()).device)
    if grown.bf16:
        model.bfloat16()
    mask = getattr(old, "vocab_mask", None)
    if mask is not None:
        VocabMask.install(model, grown, mask.tp_rank, mask.tp)
    return model


def set_parallel_attributes(model, cfg: ModelConfig) -> None:
    """The tensor-parallel attributes (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``) that
    megatron's weight initialisers set, on every TP-partitioned parameter that has none."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    for _, name, param in global_names(model):
        layout = layout_table.layout_of(name, cfg)
        if layout.partition_dim is not None and not hasattr(param, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(param, True, layout.partition_dim, layout.stride)


class VocabMask:
    """The real vocabulary of a GPTModel built with a padded one (Megatron-LM's ``make_vocab_size_divisible_by``).

    Megatron-LM lets the padded rows take part in the softmax; mgrow masks their
    logits to -inf (a forward hook on the output layer), so they get no gradient,
    their rows keep the zeros they start with, and the model's function is the
    same at every padding: a TP change that pads differently changes nothing.
    The mask is kept as ``model.vocab_mask`` on every stage, so a live model says
    what its real vocabulary is (:func:`mgrow.engine.describe.describe`).
    """

    def __init__(self, cfg: ModelConfig, tp_rank: int, tp: int):
        self.vocab_size, self.divisible_by, self.tp_rank, self.tp = (cfg.vocab_size, cfg.make_vocab_size_divisible_by,
                                                                     tp_rank, tp)
        # this rank's logits that are real (the output layer's rows)
        self.real_columns = layout_table.real_vocab_rows(layout_table.layout_of("output_layer.weight", cfg), tp_rank, tp)

    @classmethod
    def install(cls, model, cfg: ModelConfig, tp_rank: int, tp: int) -> None:
        """Mask ``model``'s padded logits (``cfg``: the model it was built for), if its vocabulary is padded."""
        if model.vocab_size == cfg.vocab_size:
            return
        mask = cls(cfg, tp_rank, tp)
        model.vocab_mask = mask
        if model.post_process:
            model.output_layer.register_forward_hook(mask)

    def __call__(self, module, args, output):
        logits, bias = output
        if self.real_columns == logits.shape[-1]:
            return output
        padded = torch.arange(logits.shape[-1], device=logits.device) >= self.real_columns
        return logits.masked_fill(padded, float("-inf")), bias


def real_vocab(model, logits: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """This TP rank's logits of the real vocabulary (``model``: the GPTModel that computed them); it may hold
    none."""
    mask = getattr(model, "vocab_mask", None)
    return logits if mask is None or logits is None else logits[..., : mask.real_columns]


def largest_abs(tensor: torch.Tensor) -> float:
    """max |tensor| as a float; 0.0 for an empty tensor (a TP rank that holds only vocabulary padding)."""
    return float(tensor.abs().max()) if tensor.numel() else 0.0


def all_finite(model) -> bool:
    """Whether every parameter of this rank's stage is finite (no NaN, no infinity)."""
    with torch.no_grad():  # a ZeRO-3 parameter's values are its partition, ds_tensor; one device sync in all
        checks = [torch.isfinite(getattr(param, "ds_tensor", param)).all() for param in model.parameters()]
        return bool(torch.stack(checks).all()) if checks else True


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] positions 0..s-1 of a token batch, on its device."""
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def global_names(model) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(local name, global name, parameter) for every parameter of a stage.

    The tied output layer of a last stage (PP>1) is the word embedding.
    """
    for local, param in model.named_parameters():
        index = layer_index(local)
        name = local
        if index is not None:
            name = renumber(local, model.decoder.layers[index].layer_number - 1)
        elif local == "output_layer.weight" and model.share_embeddings_and_output_weights:
            name = "embedding.word_embeddings.weight"
        yield local, name, param


def by_global_name(model) -> dict[str, torch.nn.Parameter]:
    return {name: param for _, name, param in global_names(model)}


def load_full_tensors(model, cfg: ModelConfig, full_by_name, dims) -> None:
    """Copy this rank's TP shard of each full tensor (on any device) into the stage's parameters."""
    tp, tp_rank = dims.tp, dims.tp_rank
    with torch.no_grad():
        for _, name, param in global_names(model):
            layout = layout_table.layout_of(name, cfg)
            full = full_by_name[name] if isinstance(full_by_name, dict) else full_by_name(name, layout_table.full_shape(param.shape, layout, tp))
            expected = layout_table.full_shape(param.shape, layout, tp)
            if tuple(full.shape) != expected:
                raise ValueError(f"{name}: full tensor {tuple(full.shape)} does not fit shape {expected}")
            param.copy_(layout_table.tp_shard(full, layout, tp_rank, tp))


def gather_full_tensors(model, cfg: ModelConfig, dims) -> dict[str, torch.Tensor]:
    """Every global tensor of the model, gathered over TP and PP, on every rank (on the CPU).

    One parameter at a time is held in full on the device; used by tests and `mgrow verify`.
    """
    local: dict[str, torch.Tensor] = {}
    for _, name, param in global_names(model):
        layout = layout_table.layout_of(name, cfg)
        local[name] = layout_table.tp_merge(collectives.all_gather(param.data, dims.tp_group, dims.tp), layout).cpu()
    # Stages hold different names: share them over the pipeline group.
    merged: dict[str, torch.Tensor] = {}
    for stage in collectives.gather_objects(local, group=dims.pp_group):
        merged.update(stage)
    return merged


class CanonicalInit:
    """Megatron's init rules with one generator per global tensor name, drawn on the CPU.

    Linear and embedding weights ~ N(0, std); linear_proj / linear_fc2 weights
    ~ N(0, std / sqrt(2 N)) (megatron's ``output_layer_init_method``); norm
    gains 1, biases 0. Independent of the TP/PP layout and of the device by
    construction: the CPU generator draws the full tensor, the rank copies its shard.
    """

    def __init__(self, cfg: ModelConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    def __call__(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if "layernorm" in name:
            return torch.ones(shape, device="cpu") if name.endswith("weight") else torch.zeros(shape, device="cpu")
        if name.endswith("bias"):
            return torch.zeros(shape, device="cpu")
        std = self.cfg.init_method_std
        if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            std /= math.sqrt(2.0 * self.cfg.num_layers)
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=generator, device="cpu") * std
