"""A Hugging Face model folder (``config.json`` + safetensors) read into megatron's tensors and written back.

Reading needs only ``safetensors`` and the JSON config (the ``transformers``
package is not imported): the family (``model_type``) picks the table of
:mod:`mgrow.parallel.hf_families`; every key of the config is mapped, checked
against the one value mgrow builds, or known to say nothing about the function;
any other key is refused by name. Tensors are read one at a time from the
(possibly sharded) safetensors files. Writing gives ``config.json`` in the form
transformers 4.x writes (``rope_theta``, ``rope_scaling``), which 5.x reads too,
and one ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from mgrow.core.errors import ConfigError
from mgrow.core.files_in import read_json
from mgrow.core.model_config import ModelConfig
from mgrow.parallel.hf_families import FAMILIES, GPT2_ACTIVATIONS, Family, rules

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# megatron-core's Llama 3.x RoPE scaling (rotary_pos_embedding.py:92-98): the only values it builds
LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def read_config(folder: str, field: str) -> tuple[Family, dict]:
    path = Path(folder) / CONFIG
    if not Path(folder).is_dir():
        raise ConfigError(field, f"{folder} is not a folder: a Hugging Face model is a folder with {CONFIG} and "
                                 "safetensors weights")
    config = read_json(str(path), field, "Hugging Face config")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"{field}: {CONFIG} model_type", f"{model_type!r} is not one mgrow reads "
                                                           f"({' | '.join(FAMILIES)})")
    if not (Path(folder) / WEIGHTS).is_file() and not (Path(folder) / INDEX).is_file():
        raise ConfigError(field, f"{folder} has no {WEIGHTS} or {INDEX} (mgrow reads safetensors weights)")
    return FAMILIES[model_type], config


def model_from_hf(family: Family, config: dict, field: str, bf16: bool = False) -> ModelConfig:
    """The ModelConfig of an HF config of ``family``; a key mgrow cannot represent is refused, naming it."""
    values = {**family.defaults, **config}
    where = lambda key: f"{field}: {CONFIG} {key}"  # noqa: E731
    known = set(family.keys) | set(family.fixed) | set(family.ignored)
    model: dict = dict(family.builds)
    for key, value in values.items():
        if key in family.keys:
            if value is not None:
                model[family.keys[key]] = value
        elif key in family.fixed:
            if value is not None and value != family.fixed[key]:
                raise ConfigError(where(key), f"{value!r} is not supported (mgrow builds {family.fixed[key]!r})")
        elif key in family.ignored:
            continue
        elif key in _ROPE_KEYS and family.model_type != "gpt2":
            continue  # read below
        else:
            raise ConfigError(where(key), f"mgrow cannot represent this key of a {family.model_type} config "
                                          f"(it reads {', '.join(sorted(known | set(_ROPE_KEYS)))})")
    if family.model_type == "gpt2":
        activation = values.get("activation_function")
        if activation not in GPT2_ACTIVATIONS:
            raise ConfigError(where("activation_function"), f"{activation!r} is not supported "
                                                            f"({' | '.join(GPT2_ACTIVATIONS)})")
        model["activation"] = GPT2_ACTIVATIONS[activation]
        if values.get("embd_pdrop") != values.get("resid_pdrop"):
            raise ConfigError(where("embd_pdrop"), "must equal resid_pdrop (megatron drops out the embeddings with "
                                                   "the hidden dropout)")
    else:
        model.update(_rope(values, where))
    try:
        return ModelConfig(**model, bf16=bf16)
    except ConfigError as error:
        raise ConfigError(f"{field}: {CONFIG} ({error.field})", error.rule) from None


_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor")


def _rope(values: dict, where) -> dict:
    """rotary_base and the Llama 3.1 scaling, from transformers 4.x keys (rope_theta, rope_scaling) or 5.x's
    rope_parameters."""
    parameters = dict(values.get("rope_parameters") or {})
    scaling = values.get("rope_scaling") or {k: v for k, v in parameters.items() if k != "rope_theta"}
    theta = values.get("rope_theta", parameters.get("rope_theta", 10000.0))
    if values.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(where("partial_rotary_factor"), "only a rotation of every head dimension is supported")
    if float(theta) != int(theta):
        raise ConfigError(where("rope_theta"), f"{theta!r}: megatron-core takes an integer rotary base")
    out = {"rotary_base": int(theta)}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return out
    if kind != "llama3":
        raise ConfigError(where("rope_scaling"), f"rope_type {kind!r} is not supported (default | llama3)")
    for key, value in LLAMA3_SCALING.items():
        if float(scaling.get(key, value)) != value:
            raise ConfigError(where(f"rope_scaling.{key}"), f"{scaling.get(key)!r}: megatron-core's Llama 3 scaling "
                                                             f"builds {value}")
    return {**out, "rope_scaling": True, "rope_scaling_factor": float(scaling["factor"])}


def hf_config(family: Family, model: ModelConfig) -> dict:
    """The ``config.json`` of ``model`` in ``family``; what the family cannot express is refused by name."""
    def refuse(key, rule):
        raise ConfigError(f"model.{key}", f"{rule}: a {family.model_type} model cannot express it")

    for key, value in family.builds.items():
        if getattr(model, key) != value:
            refuse(key, f"{getattr(model, key)!r} where the family has {value!r}")
    for key, value in (("rotary_percent", 1.0), ("qk_layernorm", False), ("num_moe_experts", None),
                       ("softmax_scale", None), ("apply_query_key_layer_scaling", False)):
        if getattr(model, key) != value:
            refuse(key, f"{getattr(model, key)!r}")
    config = {"architectures": [family.architecture], "model_type": family.model_type,
              "torch_dtype": "bfloat16" if model.bf16 else "float32", "initializer_range": model.init_method_std}
    for hf_key, key in family.keys.items():
        config[hf_key] = getattr(model, key)
    if family.model_type == "gpt2":
        if model.kv_channels * model.num_attention_heads != model.hidden_size:
            refuse("kv_channels", f"{model.kv_channels} x {model.num_attention_heads} heads != hidden_size "
                                  f"{model.hidden_size}")
        if model.num_query_groups != model.num_attention_heads:
            refuse("num_query_groups", "grouped-query attention")
        names = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
        if model.activation not in names:
            refuse("activation", f"{model.activation!r}")
        config["activation_function"] = names[model.activation]
        config["embd_pdrop"] = model.hidden_dropout
        config.update({k: v for k, v in family.fixed.items()})
    else:
        config["hidden_act"] = "silu"
        config["rope_theta"] = float(model.rotary_base)
        if model.rope_scaling:
            config["rope_scaling"] = {"rope_type": "llama3", "factor": model.rope_scaling_factor, **LLAMA3_SCALING}
        config.update({k: v for k, v in family.fixed.items() if v is not None})
        if family.model_type == "mistral":
            config["sliding_window"] = None  # (Mistral's default is a 4096-token window; mgrow attends to all)
    return config


class HFTensors:
    """The tensors of an HF folder, read one at a time (single or sharded safetensors)."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        index = self.folder / INDEX
        self.files = (json.loads(index.read_text())["weight_map"] if index.is_file() else None)

    def get(self, name: str):
        from safetensors import safe_open

        file = self.folder / (self.files[name] if self.files is not None else WEIGHTS)
        with safe_open(str(file), framework="pt") as f:
            if name not in f.keys():
                raise ConfigError("--from", f"{file.name} has no tensor {name!r} (the {CONFIG} describes a model "
                                            "that has it)")
            return f.get_tensor(name)


class MegatronTensors:
    """The full megatron tensors of model ``cfg`` made from an HF folder's tensors, one at a time, in the model's
    dtype: an ``init`` for :func:`mgrow.engine.model.build_gpt` (called with a global name and its shape)."""

    def __init__(self, folder: str, family: Family, cfg: ModelConfig):
        self.tensors, self.rules, self.cfg = HFTensors(folder), rules(family, cfg), cfg

    def __call__(self, name: str, shape=None):
        from mgrow.parallel.hf_families import to_megatron

        rule = self.rules[name]
        return to_megatron(rule.kind, [self.tensors.get(n) for n in rule.hf], self.cfg).to(self.cfg.dtype)


def write(folder: str, family: Family, model: ModelConfig, full: dict) -> None:
    """An HF folder of ``model`` from its full megatron tensors (``full``: global name -> tensor)."""
    from safetensors.torch import save_file

    from mgrow.parallel.hf_families import from_megatron

    out = {}
    for name, rule in rules(family, model).items():
        for hf_name, tensor in zip(rule.hf, from_megatron(rule.kind, full[name], model)):
            out[hf_name] = tensor.contiguous()
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file(out, str(Path(folder) / WEIGHTS), metadata={"format": "pt"})
    (Path(folder) / CONFIG).write_text(json.dumps(hf_config(family, model), indent=2) + "\n")
