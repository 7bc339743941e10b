"""A GPT trained with megatron-core in a plain training loop, grown mid-run by mgrow.

The script is what a megatron-core user writes without mgrow (model, DDP,
distributed optimizer, LR schedule, pipeline schedule); the lines marked
``# mgrow`` are all that growing it takes.

    torchrun --nproc-per-node 4 examples/megatron_train.py --tp 2 --steps 20 --grow-at 10

Runs on GPUs (NCCL), or on CPU ranks (gloo) when torch sees no GPU.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

import mgrow.megatron  # mgrow

VOCAB, SEQ, MICRO_BATCH, MICRO_BATCHES = 128, 32, 2, 2
SIZES = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
             ffn_hidden_size=192)
LR, MIN_LR, WARMUP, WEIGHT_DECAY = 3e-3, 3e-4, 4, 0.1
# Every growth operator once: wider MLP, more heads and query groups, wider heads, wider hidden state, a new layer.
PLAN = {"ops": [
    {"mlp": {"ffn_hidden_size": 256}},
    {"heads": {"num_attention_heads": 8, "num_query_groups": 4}},
    {"head_dim": {"kv_channels": 24}},
    {"hidden": {"hidden_size": 96}},
    {"layers": {"insert_before": [1], "num_layers": 3}},
]}


def setup(tp: int, pp: int) -> torch.device:
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        from mgrow.parallel import cpu_shims  # CPU ranks only: megatron-core 0.16 assumes CUDA in a few places

        cpu_shims.apply()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def build(sizes: dict, device: torch.device, train_steps: int):
    """The model chunk (DDP), the distributed optimizer and the LR schedule."""
    config = TransformerConfig(
        **sizes,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
        use_cpu_initialization=device.type == "cpu", bias_activation_fusion=False, apply_rope_fusion=False,
    )
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope", rotary_base=50000,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
    ).to(device)
    model = DistributedDataParallel(
        config=config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=False, use_distributed_optimizer=True),
    )
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=LR, min_lr=MIN_LR, weight_decay=WEIGHT_DECAY, adam_beta2=0.95, clip_grad=1.0,
        use_distributed_optimizer=True,
    ), [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=WARMUP, lr_decay_steps=train_steps,
        lr_decay_style="linear", start_wd=WEIGHT_DECAY, end_wd=WEIGHT_DECAY, wd_incr_steps=train_steps,
        wd_incr_style="constant",
    )
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return model, optimizer, scheduler


def sequences(count: int, generator: torch.Generator) -> torch.Tensor:
    """Synthetic, learnable tokens: arithmetic sequences modulo the vocabulary, random start and stride."""
    start = torch.randint(VOCAB, (count, 1), generator=generator)
    stride = torch.randint(1, 8, (count, 1), generator=generator)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


def batches(step: int, device: torch.device) -> list[torch.Tensor]:
    """This data-parallel rank's micro-batches of step ``step`` (TP ranks see the same)."""
    generator = torch.Generator().manual_seed(step * 1000 + parallel_state.get_data_parallel_rank())
    return [sequences(MICRO_BATCH, generator).to(device) for _ in range(MICRO_BATCHES)]


def positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def loss_func(output: torch.Tensor):
    loss = output.float().mean()
    return loss, {"loss": loss.detach().clone()}  # a copy: the schedule scales the loss in place


def forward_step(data_iterator, model):
    tokens = next(data_iterator)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    return model(inputs, positions(inputs), None, labels=labels), loss_func


def train_step(model, optimizer, scheduler, step: int, device: torch.device, forward_only: bool = False) -> float:
    """One step (or, forward_only, the loss on the step's batch); the mean loss over DP ranks, on every rank."""
    if not forward_only:
        model.zero_grad_buffer()
        optimizer.zero_grad()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches(step, device)), model=[model],
        num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH, forward_only=forward_only,
    )
    if not forward_only:
        optimizer.step()
        scheduler.step(increment=1)
    loss = torch.zeros(1, device=device)
    if parallel_state.is_pipeline_last_stage():
        loss[0] = torch.stack([o["loss"] for o in outputs]).mean()
    dist.all_reduce(loss)  # every rank of the last stage holds the same mean per DP rank
    return float(loss[0]) / (parallel_state.get_data_parallel_world_size() * parallel_state.get_tensor_model_parallel_world_size())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--grow-at", type=int, default=10)
    parser.add_argument("--out", help="write the losses and learning rates to this JSON file (rank 0)")
    args = parser.parse_args(argv)

    device = setup(args.tp, 1)
    model, optimizer, scheduler = build(SIZES, device, args.steps)
    history = {"loss": [], "lr": []}
    for step in range(args.steps):
        if step == args.grow_at:  # mgrow
            model, optimizer, scheduler, report = mgrow.megatron.grow(  # mgrow
                model, optimizer, scheduler, PLAN, check_tokens=batches(step, device)[0][:, :-1])  # mgrow
            history["growth"] = dict(step=step, params_before=report.params_before,
                                     params_after=report.params_after, max_abs_logit_diff=report.max_abs_logit_diff)
            if dist.get_rank() == 0:
                print(f"grew at step {step}: {report.params_before:,} -> {report.params_after:,} parameters, "
                      f"max |logit change| {report.max_abs_logit_diff:.1e} on a held batch", flush=True)
        history["lr"].append(optimizer.param_groups[0]["lr"])
        history["loss"].append(train_step(model, optimizer, scheduler, step, device))
        if dist.get_rank() == 0:
            print(f"step {step + 1:3d} | loss {history['loss'][-1]:.4f} | lr {history['lr'][-1]:.2e}", flush=True)
    if args.out and dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(history, f)
    return history


if __name__ == "__main__":
    main()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
