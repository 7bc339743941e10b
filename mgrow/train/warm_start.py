"""Explicit warm start (Williams & Zhao 2023): the first model's embedding and output layer from bigram statistics.

With ``train.init: explicit`` a fresh run (not a resume) sets, from the
training split's tokens:

* L[c, n] = log P(next = n | current = c), add-``alpha`` smoothed counts, each
  row centred (softmax ignores a per-row constant). Megatron's GPT output layer
  has no bias, so the log-unigram is not a separate bias: it stays inside L and
  the factorisation carries it;
* L ~ U_r S_r V_r^T (SVD, rank r = h, or h - 1 under LayerNorm, whose output
  has mean 0 and so spans only h - 1 directions);
* embedding rows E[c] = U_r[c] S_r^(1/2), put in the mean-zero subspace
  (LayerNorm) and scaled to RMS 1, so the first norm, and at step 0 the final
  norm (the random layers add little: their outputs are init_method_std-small),
  pass them on nearly unchanged;
* output layer W = argmin ||E W^T - L|| (least squares), so W n(E[c]) ~ L[c].
  Tied embeddings cannot hold both: the embedding is E and the final norm's gain
  is the scalar a fitting a E E^T ~ L (a weaker start, measured in the README).

Every other weight keeps the canonical random init. Rank 0 computes in float64
and broadcasts, so every rank of every layout holds the same model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from mgrow.core.model_config import ModelConfig
from mgrow.engine.model import CanonicalInit
from mgrow.parallel import collectives
from mgrow.train.data import TokenWindows

SMOOTHING = 0.1  # add-alpha on the bigram counts


def bigram_log_probs(tokens: np.ndarray, vocab: int, alpha: float = SMOOTHING) -> torch.Tensor:
    counts = np.zeros((vocab, vocab), dtype=np.float64)
    np.add.at(counts, (tokens[:-1], tokens[1:]), 1.0)
    counts += alpha
    return torch.from_numpy(np.log(counts / counts.sum(axis=1, keepdims=True)))


def bigram_entropy(tokens: np.ndarray, vocab: int, alpha: float = SMOOTHING) -> float:
    """Cross-entropy (nats/token) of the smoothed bigram model on ``tokens``: the loss a perfect warm start reaches."""
    log_p = bigram_log_probs(tokens, vocab, alpha).numpy()
    return float(-log_p[tokens[:-1], tokens[1:]].mean())


def factorise(log_p: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full tensors (global names) of the embedding and output layer (or tied final-norm gain)."""
    h = cfg.hidden_size
    layer_norm = cfg.normalization == "LayerNorm"
    centred = log_p - log_p.mean(dim=1, keepdim=True)
    u, s, _ = torch.linalg.svd(centred)
    rank = min(h - 1 if layer_norm else h, s.numel())
    factor = u[:, :rank] * s[:rank].sqrt()
    basis = torch.eye(h, dtype=torch.float64, device="cpu")
    if layer_norm:  # an orthonormal basis of {x : mean(x) = 0}
        basis = torch.linalg.qr(torch.eye(h, dtype=torch.float64, device="cpu") - 1.0 / h)[0][:, : h - 1].T
    embedding = factor @ basis[:rank]
    embedding = embedding / embedding.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    full = {"embedding.word_embeddings.weight": embedding}
    if cfg.share_embeddings_and_output_weights:
        gram = embedding @ embedding.T
        full["decoder.final_layernorm.weight"] = torch.full((h,), float((gram * centred).sum() / (gram * gram).sum()), device="cpu")
    else:
        full["output_layer.weight"] = torch.linalg.lstsq(embedding, centred).solution.T
    return {name: tensor.float() for name, tensor in full.items()}


def explicit_init(cfg: ModelConfig, seed: int, corpus: str, dims):
    """``build_gpt``'s ``init``: the canonical init with the warm-start tensors (collective: rank 0 computes on
    the CPU in float64; the CPU tensors are broadcast over ``dims.comm_device``)."""
    names = ["embedding.word_embeddings.weight",
             "decoder.final_layernorm.weight" if cfg.share_embeddings_and_output_weights else "output_layer.weight"]
    shapes = {"embedding.word_embeddings.weight": (cfg.vocab_size, cfg.hidden_size),
              "output_layer.weight": (cfg.vocab_size, cfg.hidden_size),
              "decoder.final_layernorm.weight": (cfg.hidden_size,)}
    warm = None
    if dist.get_rank() == 0:
        tokens = TokenWindows(corpus, "train", 1, seed).tokens.numpy()
        warm = factorise(bigram_log_probs(tokens, cfg.vocab_size), cfg)
    warm = {name: collectives.broadcast_tensor(None if warm is None else warm[name], shapes[name], torch.float32, dims)
            for name in names}
    canonical = CanonicalInit(cfg, seed)
    return lambda name, shape: warm[name] if name in warm else canonical(name, shape)
