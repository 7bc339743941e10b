"""A GPT (megatron-core's GPTModel) trained with DeepSpeed ZeRO in a plain training loop, grown mid-run by mgrow.

The script is what a DeepSpeed user writes without mgrow (the model, weight-decay
param groups, a DeepSpeed config with its optimizer and LR scheduler, the
engine's backward and step); the lines marked ``# mgrow`` are all that growing
it takes.

    deepspeed --num_gpus 2 examples/deepspeed_train.py --zero 2 --steps 20 --grow-at 10

Runs on GPUs (NCCL), or on CPU ranks (gloo) when torch sees no GPU.
"""

from __future__ import annotations

import argparse
import json
import os

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

import mgrow.deepspeed  # mgrow

VOCAB, SEQ, MICRO_BATCH, ACCUMULATION = 128, 32, 2, 2
# GPT-2 style: LayerNorm, GELU, biases, learned positions, output layer tied to the embedding.
SIZES = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256)
LR, WARMUP, WEIGHT_DECAY = 3e-3, 4, 0.1
PLAN = {"ops": [
    {"mlp": {"ffn_hidden_size": 384}},
    {"heads": {"num_attention_heads": 6}},
    {"hidden": {"hidden_size": 96}},
    {"layers": {"insert_before": [1], "num_layers": 3}},
]}


def setup() -> torch.device:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        from mgrow.parallel import cpu_shims  # CPU ranks only: megatron-core 0.16 assumes CUDA in a few places

        cpu_shims.apply()
    deepspeed.init_distributed("nccl" if cuda else "gloo")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()  # TP = PP = 1: megatron-core's layers need its groups
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def ds_config(zero_stage: int, train_steps: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": ACCUMULATION,
        "zero_optimization": {"stage": zero_stage},
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": WEIGHT_DECAY}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR,
                                                          "warmup_num_steps": WARMUP,
                                                          "total_num_steps": train_steps}},
        "steps_per_print": 10**9,
    }


def param_groups(model) -> list[dict]:
    """No weight decay on biases and norms."""
    decay = [p for name, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for name, p in model.named_parameters() if p.ndim == 1]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build(sizes: dict, device: torch.device, zero_stage: int, train_steps: int):
    config = TransformerConfig(
        **sizes, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
        use_cpu_initialization=device.type == "cpu", bias_activation_fusion=False,
    )
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                     max_sequence_length=SEQ, share_embeddings_and_output_weights=True).to(device)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model),
                                           config=ds_config(zero_stage, train_steps))
    return engine


def batch(step: int, micro: int, device: torch.device) -> torch.Tensor:
    """Synthetic, learnable tokens: arithmetic sequences modulo the vocabulary, random start and stride."""
    generator = torch.Generator().manual_seed((step * ACCUMULATION + micro) * 1000 + dist.get_rank())
    start = torch.randint(VOCAB, (MICRO_BATCH, 1), generator=generator)
    stride = torch.randint(1, 8, (MICRO_BATCH, 1), generator=generator)
    return ((start + stride * torch.arange(SEQ + 1)) % VOCAB).to(device)


def loss_of(engine, tokens: torch.Tensor) -> torch.Tensor:
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)
    return engine(inputs, positions, None, labels=labels).float().mean()


def train_step(engine, step: int, device: torch.device) -> float:
    losses = []
    for micro in range(ACCUMULATION):
        loss = loss_of(engine, batch(step, micro, device))
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    mean = torch.stack(losses).mean()
    dist.all_reduce(mean)
    return float(mean) / dist.get_world_size()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--grow-at", type=int, default=10)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("--out", help="write the losses and learning rates to this JSON file (rank 0)")
    args = parser.parse_args(argv)

    device = setup()
    engine = build(SIZES, device, args.zero, args.steps)
    history = {"loss": [], "lr": []}
    for step in range(args.steps):
        if step == args.grow_at:  # mgrow
            held = batch(step, 0, device)[:, :-1]  # mgrow: logits on it are compared before and after
            engine, _, _, report = mgrow.deepspeed.grow(engine, PLAN, check_tokens=held)  # mgrow
            history["growth"] = dict(step=step, params_before=report.params_before,
                                     params_after=report.params_after, max_abs_logit_diff=report.max_abs_logit_diff)
            if dist.get_rank() == 0:
                print(f"grew at step {step}: {report.params_before:,} -> {report.params_after:,} parameters, "
                      f"max |logit change| {report.max_abs_logit_diff:.1e} on a held batch", flush=True)
        history["lr"].append(engine.get_lr()[0])
        history["loss"].append(train_step(engine, step, device))
        if dist.get_rank() == 0:
            print(f"step {step + 1:3d} | loss {history['loss'][-1]:.4f} | lr {history['lr'][-1]:.2e}", flush=True)
    if args.out and dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(history, f)
    engine.destroy()
    return history


if __name__ == "__main__":
    main()
