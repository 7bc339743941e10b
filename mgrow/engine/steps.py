"""Forward steps for megatron's pipeline schedules: the loss, or the logits of a held batch."""

from __future__ import annotations

from typing import Iterator

import torch

from mgrow.engine.model import position_ids


def lm_loss(output_tensor: torch.Tensor):
    """Mean of GPTModel's per-token losses (megatron's schedules divide it by the micro-batch count)."""
    loss = output_tensor.float().mean()
    return loss, {"lm loss": loss.detach().clone()}


def on_device(tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tokens.to(device, non_blocking=True)


def forward_step(data_iterator: Iterator, model, device: torch.device):
    tokens = on_device(next(data_iterator), device)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    output = model(inputs, position_ids(inputs), None, labels=labels)
    return output, lm_loss


def _keep_logits(output_tensor: torch.Tensor):
    return output_tensor.float().sum() * 0.0, {"logits": output_tensor.detach().clone()}


def logits_step(data_iterator: Iterator, model, device: torch.device):
    """Logits (this TP rank's vocab slice, [b, s, V/tp]) instead of the loss."""
    tokens = on_device(next(data_iterator), device)
    return model(tokens, position_ids(tokens), None), _keep_logits
