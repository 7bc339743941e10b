"""How far growth may move a model's logits: the bounds growth checks its own result against."""

from __future__ import annotations

BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits
# fp32: a thousand times the preservation errors measured on the test models (up to 4e-6 on logits of size ~4)
# and far below what a wrong rule gives (a wrong ffn_hidden_size moved them by 0.089).
FP32_RELATIVE_TOL = 1e-3


def bf16_logit_tol(max_abs_logit: float, num_layers: int) -> float:
    """How far bf16 logits may move when growth rescales old weights (hidden width, head dim, epsilon).

    The grown model's bf16 parameters are the roundings of the grown fp32 masters, so a rescaled
    weight differs from the rescaled old bf16 weight by one rounding, relative u = 2^-8. First-order,
    each of the bf16 values written along the residual path (embedding, then the attention and MLP
    outputs of each of the ``num_layers`` layers, the final norm, the output layer) then moves the
    logits by at most u times their scale: tol = (2 * num_layers + 3) * u * max|logit|.
    Plans that rescale nothing leave every old bf16 parameter bit for bit and add exact zeros: their
    logits are checked against the fp32 tolerance instead.
    """
    return (2 * num_layers + 3) * BF16_UNIT_ROUNDOFF * max_abs_logit


def preservation_tol(max_abs_logit: float, num_layers: int, bf16: bool) -> float:
    """The largest logit change a function-preserving growth may show on a held batch (``max_abs_logit``: the
    largest logit before): fp32 ``FP32_RELATIVE_TOL`` relative to the logits' scale (at least 1), bf16 the
    rounding bound :func:`bf16_logit_tol` on top."""
    tol = FP32_RELATIVE_TOL * max(1.0, max_abs_logit)
    return tol + bf16_logit_tol(max_abs_logit, num_layers) if bf16 else tol
