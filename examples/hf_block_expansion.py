"""Block expansion (LLaMA-Pro) of a Hugging Face Llama with mgrow: import, grow, train, export, load in transformers.

    .venv/bin/python examples/hf_block_expansion.py

A small Llama 3.1-style model (GQA, RMSNorm, SwiGLU, RoPE with Llama 3.1 scaling) built with random weights by
transformers stands in for a pretrained checkpoint (nothing is downloaded). The script runs the mgrow commands it
prints, then measures with transformers' own forward: the import (mgrow's logits vs the original's), the growth
(the exported grown model vs the original: block expansion preserves the function) and the export after training
(transformers' forward of the exported folder vs mgrow's logits of the trained checkpoint). Needs the hf extra.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers

ROOT = Path("runs/hf")
VOCAB = 256  # the training corpus is bytes


def mgrow(*args) -> None:
    command = [sys.executable, "-m", "mgrow.cli", *map(str, args)]
    print("$ mgrow " + " ".join(map(str, args)), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={"PYTHONWARNINGS": "ignore",
                                                                       **__import__("os").environ})


def stand_in_llama(folder: Path) -> None:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # weights of a trained model's scale, so the logits are of order 1
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.copy_(0.3 * torch.randn_like(param) / param.shape[-1] ** 0.5)
    model.save_pretrained(folder)


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def mgrow_logits(checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    """The checkpoint's logits on one rank of this process (megatron-core's GPTModel)."""
    from mgrow.checkpoint.sources import open_source
    from mgrow.parallel.dims import init_single_process
    from mgrow.train.restore import restored_engine

    folder, metadata, _ = open_source(str(checkpoint), "--in")
    dims = init_single_process(device="cpu", backend="gloo")
    engine, _, _ = restored_engine(folder, metadata, dims)
    logits = engine.logits(tokens).float()
    engine.destroy()
    return logits


def main() -> None:
    stand_in_llama(ROOT / "llama")
    mgrow("import-hf", "--from", ROOT / "llama", "--out", ROOT / "ckpt", "--config", "configs/hf/llama_train.yaml")
    mgrow("grow-checkpoint", "--in", ROOT / "ckpt", "--plan", "configs/plans/llama_pro.yaml", "--out", ROOT / "grown")
    mgrow("export-hf", "--in", ROOT / "grown", "--out", ROOT / "llama_pro")
    mgrow("train", "--config", "configs/hf/llama_train.yaml", "--nproc", "2",
          f"checkpoint.load={ROOT / 'grown'}", f"checkpoint.save={ROOT / 'trained'}",
          f"train.metrics_path={ROOT / 'metrics.jsonl'}", "train.progress=false")
    mgrow("export-hf", "--in", ROOT / "trained", "--out", ROOT / "llama_pro_trained")

    tokens = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(1))
    original = hf_logits(ROOT / "llama", tokens)
    losses = [json.loads(line) for line in (ROOT / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in losses if "loss" in r]
    report = {
        "params": {"original": sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(
            ROOT / "llama").parameters()), "grown": sum(p.numel() for p in transformers.AutoModelForCausalLM
                                                        .from_pretrained(ROOT / "llama_pro").parameters())},
        "max_abs_logit": float(original.abs().max()),
        "import: mgrow vs transformers": float((mgrow_logits(ROOT / "ckpt", tokens) - original).abs().max()),
        "grown, exported: transformers vs the original": float((hf_logits(ROOT / "llama_pro", tokens)
                                                                - original).abs().max()),
        "trained, exported: transformers vs mgrow": float((hf_logits(ROOT / "llama_pro_trained", tokens)
                                                           - mgrow_logits(ROOT / "trained", tokens)).abs().max()),
        "training loss first / last": [losses[0], losses[-1]],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
