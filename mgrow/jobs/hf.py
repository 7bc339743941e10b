"""`mgrow import-hf` and `mgrow export-hf`: a Hugging Face model folder into an mgrow checkpoint and back.

``import-hf --from HF_DIR --out CKPT [--tp T --pp P] [--config C] [--bf16]`` reads the folder's
``config.json`` (checked before torch is imported: :mod:`mgrow.checkpoint.huggingface`) and, on tp x pp ranks,
builds the model with each rank's shard of every tensor read from the safetensors one tensor at a time, then
saves it as an mgrow checkpoint at step 0 (a fresh optimizer; the training config ``C`` with its model
replaced, or mgrow's defaults) and writes ``CKPT/model.yaml``, the model's keys for a training config.

``export-hf --in CKPT --out HF_DIR [--family F]`` loads any checkpoint mgrow reads on one rank and writes the
model as an HF folder (``config.json`` of the model's sizes, ``model.safetensors``) that
``AutoModelForCausalLM.from_pretrained`` loads. The family is the model's own (GPT-2: LayerNorm, learned
positions, tanh GELU; Qwen2: a QKV-only bias; Llama otherwise) unless ``--family`` names another one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from mgrow.checkpoint.huggingface import model_from_hf, read_config
from mgrow.checkpoint.sources import open_source
from mgrow.core.errors import ConfigError
from mgrow.core.files_in import read_yaml
from mgrow.core.model_config import ModelConfig
from mgrow.jobs.launch import RankJob, check_job_flags, execute
from mgrow.parallel.hf_families import FAMILIES

MODEL_FILE = "model.yaml"


@dataclass(frozen=True)
class ImportHF:
    source: str
    family: str
    config: dict  # the training config (a dict) the checkpoint is saved with
    out: str
    tp: int
    pp: int
    device: str
    backend: str


def import_main(args) -> int:
    from mgrow.train import config as train_config

    family, hf = read_config(args.source, "--from")
    model = model_from_hf(family, hf, "--from", bf16=args.bf16)
    check_job_flags(args.tp, args.pp, 1)
    try:
        model.check_layout(args.tp, args.pp)
    except ConfigError as error:
        raise ConfigError(f"--from ({error.field})", f"{error.rule} (--tp {args.tp}, --pp {args.pp})") from None
    # the training config as written, its model replaced before it is checked (it may name the model file this
    # import writes)
    raw = read_yaml(args.config, "--config", "config file") if args.config else {}
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"must be a mapping of config sections, got {type(raw).__name__}")
    raw.update(model=model.to_dict(), parallel={"tp": args.tp, "pp": args.pp, "device": args.device,
                                                 "backend": args.backend},
               growth=[], checkpoint={}, wandb=None, transfer=None)
    train = raw.setdefault("train", {})
    train["seq_length"] = min(train.get("seq_length", 64), model.max_sequence_length)
    config = train_config.from_dict(raw).to_dict()
    job = ImportHF(args.source, family.model_type, config, args.out, args.tp, args.pp, args.device, args.backend)
    return execute(RankJob(args.tp * args.pp, run_import, job))


def run_import(job: ImportHF) -> int:
    """One rank: its stage of the model, each tensor's shard read from the HF folder; saved as step 0."""
    from mgrow.checkpoint.files import Progress
    from mgrow.checkpoint.huggingface import MegatronTensors
    from mgrow.checkpoint.state import claimed_root, save
    from mgrow.engine.engines import build_engine
    from mgrow.engine.model import build_gpt
    from mgrow.parallel.dims import init_distributed, shutdown
    from mgrow.train.config import from_dict

    try:
        cfg = from_dict(job.config)
        dims = init_distributed(job.tp, job.pp, cfg.train.seed, device=job.device, backend=job.backend)
        model = build_gpt(cfg.model, dims, init=MegatronTensors(job.source, FAMILIES[job.family], cfg.model))
        engine = build_engine(model, cfg, dims)
        with claimed_root(job.out, "--out", cfg.model.checkpoint_bytes(), dims):
            written = save(engine, cfg, Progress(), job.out)  # (the optimizer has not stepped: no state saved)
            if dims.rank == 0:
                (Path(job.out) / MODEL_FILE).write_text(yaml.safe_dump(cfg.model.to_dict(), sort_keys=False))
        if dims.rank == 0:
            print(json.dumps({"from": job.source, "family": job.family, "out": str(written),
                              "model_file": str(Path(job.out) / MODEL_FILE), "params": cfg.model.num_parameters(),
                              "layout": {"tp": dims.tp, "pp": dims.pp}}), flush=True)
        engine.destroy()
    finally:
        shutdown()
    return 0


def export_main(args) -> int:
    folder, metadata, model = open_source(args.source, "--in", args.model)
    family = FAMILIES[args.family or family_of(model)]
    from mgrow.checkpoint.huggingface import hf_config

    try:
        hf_config(family, model)  # refuse what the family cannot express before loading anything
    except ConfigError as error:
        raise ConfigError(f"--in ({error.field})", f"{error.rule}; export it as another --family, or grow it by "
                                                   "operators the family can express") from None
    from mgrow.checkpoint.huggingface import write
    from mgrow.checkpoint.sources import on_any_layout
    from mgrow.engine.model import gather_full_tensors
    from mgrow.parallel.dims import init_single_process
    from mgrow.train.restore import restored_engine

    dims = init_single_process(device=args.device, backend=args.backend)
    engine, _, _ = restored_engine(folder, on_any_layout(metadata), dims)
    full = gather_full_tensors(engine.module, model, dims)
    engine.destroy()
    write(args.out, family, model, full)
    print(json.dumps({"in": str(folder), "family": family.model_type, "out": args.out,
                      "params": model.num_parameters()}), flush=True)
    return 0


def family_of(model: ModelConfig) -> str:
    """The family whose architecture ``model`` has."""
    if model.normalization == "LayerNorm" and model.position_embedding_type == "learned_absolute":
        return "gpt2"
    return "qwen2" if model.add_qkv_bias and not model.add_bias_linear else "llama"
