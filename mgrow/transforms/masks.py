"""Masked structural growth (MSG, Yao et al. 2023): new units enter behind a mask m that ramps 0 -> 1.

A growth event with ``mask: {steps: K}`` grows the model as usual, except that
every new entry a mask covers is drawn from the plan's init distribution (no
zero columns, no mean rows), and hooks on megatron-core's modules multiply
each new unit's contribution by m. The training loop sets
m = min(1, (step - grow_step) / K) before every step and removes the hooks
when m reaches 1: from then on the model is the plain grown model, bit for bit.

Notation: c is a per-coordinate factor, 1 on old entries and m on new ones.
Each rule is exact at m = 0 for any values of the new weights, and the
identity at m = 1 (up to rounding in the norms' p + 1 (x - p); the hooks are
gone by then):

* MLP units: linear_fc2's input (the activations of the fc1 units, after the
  bias, activation and gating) times c over the units (a pre-hook on
  linear_fc2). New units' fc1 rows and fc2 columns are then free.
* Heads (and head_dim's new V dims): linear_proj's input, the attention
  output per head and dim before W_O, times c over its columns (a pre-hook on
  linear_proj). head_dim's new K rows stay zero and old K rows rescaled (the
  mask does not reach the scores), so head_dim keeps its own exact rules.
* Layers: a new layer's attention and MLP branch outputs (and their biases,
  added by megatron's bias-dropout-add) times m (forward hooks on
  self_attention and mlp): the layer is the identity at m = 0.
* Hidden h -> h' (zero/mean padding; ``replicate`` adds no new coordinate):
  the embedding output and every old layer's branch outputs times c over the
  hidden coordinates (the writers' new columns / rows times m). Each norm
  (input, pre-MLP, final) reads its input with the new coordinates moved to
  the padding value p + m (x_N - p), p = 0 (RMSNorm) or p = mean of the old
  coordinates (LayerNorm), and its output is times c. The grown norms have
  eps' = eps h/h' and old gains times sqrt(h/h') (the plain hidden rule), so
  at m = 0 the norm sees exactly the zero- / mean-padded residual of
  docs/growth_math.md, section 5: its statistics are functions of the old coordinates
  only (RMSNorm: mean square (h/h') ms_O; LayerNorm: mean mu_O, variance
  (h/h') var_O), its old outputs are the old norm's, its new outputs
  (gain_N, bias_N free) are times 0, and the readers' new columns meet 0.
  Between 0 and 1 the statistics move continuously from the old coordinates'
  to all h' coordinates', and at m = 1 the norm is the plain grown norm.
  Masking the writers too is not needed for m = 0 (the norms no longer see
  x_N), but keeps the new coordinates small while m ramps, as MSG does.

Masks compose by product: a new MLP unit writing a new hidden coordinate of
an old layer contributes m^2 * (its value); a new layer's branch is masked by
m once (its units and coordinates are not masked again). Every factor is 1 at
m = 1 and the product vanishes at m = 0, which is all exactness needs.

Checkpoints: the ramp in progress (start step, K, the plan and the model
before it) is saved in the checkpoint's progress, and a resume mid-ramp
rebuilds the hooks from them (the masked weights are in the checkpoint); the
flags depend on nothing else. Two ramps may not overlap (a growth event due
inside a ramp is refused).

Per TP shard the flags come from the same index maps and shard-local order the
growth transaction uses (:func:`mgrow.ops.plan.grow_one`,
:func:`mgrow.parallel.shards.shard_rows`), so a rank masks the units it holds.
Hooks touch activations only (never parameters), so they work under every
optimizer path (ZeRO-3 included) and in bf16.
"""

from __future__ import annotations

from typing import Optional

import torch

from mgrow.core.parameters import parameter_shapes
from mgrow.ops.common import flat_indices
from mgrow.ops.index_map import Kind, TensorMap
from mgrow.ops.plan import free_values, grow_one, original_source, steps as bind_steps
from mgrow.parallel.shards import shard_rows, take_shard

# Tensors whose every new entry some mask covers (besides whole new tensors: new layers).
_COVERED = ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
            "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
            "mlp.linear_fc2.weight", "mlp.linear_fc2.bias",
            "input_layernorm.weight", "input_layernorm.bias", "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias",
            "final_layernorm.weight", "final_layernorm.bias")



def mask_value(step: int, grow_step: int, steps: int) -> float:
    """m before training step ``step`` (0-based) of a ramp that began at ``grow_step``."""
    return min(1.0, max(0.0, (step - grow_step) / steps))


def free_masked_entries(name: str, tensor: torch.Tensor, tmap: TensorMap, values, shape=None, rows=None
                        ) -> torch.Tensor:
    """``tensor`` (grown, full; or a shard: the full ``shape`` and its :class:`~mgrow.ops.common.Rows`) with
    every must-be-zero or mean-padded entry that a mask covers drawn like a free entry (free entries keep the
    plan's draw)."""
    covered = tmap.old_name is None or name.endswith(_COVERED)
    if not covered:
        return tensor
    new = (tmap.kind == int(Kind.ZERO)) | (tmap.kind == int(Kind.MEAN))
    if not bool(new.any()):
        return tensor
    out = tensor.clone()
    if rows is None:
        index = torch.nonzero(new.reshape(-1)).flatten().cpu()
    else:
        index = flat_indices(shape, (rows.dim, rows.wanted))[new.cpu()]
    drawn = values.draw_at(name, index)
    out[new.to(tensor.device)] = drawn.to(device=tensor.device, dtype=tensor.dtype)
    return out


class GrowthMasks:
    """The mask hooks of one masked growth on this rank's GPTModel stage; :meth:`set` moves m."""

    def __init__(self, m: float = 0.0):
        self.m = float(m)
        self._handles: list = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def set(self, m: float) -> None:
        self.m = float(m)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @classmethod
    def install(cls, model, plan, old_cfg, dims, m: float = 0.0) -> "GrowthMasks":
        """Hooks on ``model`` (a stage on ``dims.device`` of the model ``plan`` grows ``old_cfg`` into). The
        flags are worked out on the CPU and kept on the activations' device."""
        masks = cls(m)
        steps = bind_steps(plan, old_cfg)
        flags = _Flags(steps, old_cfg, free_values(plan, old_cfg), dims)
        hidden_new = flags.hidden().to(dims.device)
        has_hidden = bool(hidden_new.any())
        if has_hidden:
            if getattr(model, "pre_process", False):
                masks._hook(model.embedding, masks._output_hook(hidden_new))
            norms = [getattr(model.decoder, "final_layernorm", None)]
            for layer in model.decoder.layers:
                norms += [layer.input_layernorm, layer.pre_mlp_layernorm]
            padding = "mean" if steps[-1].grown.normalization == "LayerNorm" else "zero"
            for norm in norms:
                if norm is not None:
                    masks._pre_hook(norm, masks._norm_input_hook(hidden_new, padding))
                    masks._hook(norm, masks._output_hook(hidden_new))
        for layer in model.decoder.layers:
            prefix = f"decoder.layers.{layer.layer_number - 1}."
            if flags.is_new_layer(prefix + "self_attention.linear_proj.weight"):
                everything = torch.ones(1, dtype=torch.bool, device=dims.device)  # a new layer: its whole branch is behind m
                masks._hook(layer.self_attention, masks._branch_hook(everything))
                masks._hook(layer.mlp, masks._branch_hook(everything))
                continue
            if has_hidden:
                masks._hook(layer.self_attention, masks._branch_hook(hidden_new))
                masks._hook(layer.mlp, masks._branch_hook(hidden_new))
            for module, name in ((layer.self_attention.linear_proj, "self_attention.linear_proj.weight"),
                                 (layer.mlp.linear_fc2, "mlp.linear_fc2.weight")):
                columns = flags.local_columns(prefix + name).to(dims.device)
                if bool(columns.any()):
                    masks._pre_hook(module, masks._input_hook(columns))
        return masks

    # ------------------------------------------------------------------ hooks
    def _factor(self, new: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """1 on old coordinates, m on new ones, in ``like``'s dtype (a [n] vector or a [1] scalar)."""
        m = torch.tensor(self.m, dtype=like.dtype, device=like.device)
        return torch.where(new, m, torch.ones((), dtype=like.dtype, device=like.device))

    def _hook(self, module, fn) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def _pre_hook(self, module, fn) -> None:
        self._handles.append(module.register_forward_pre_hook(fn))

    def _output_hook(self, new: torch.Tensor):
        def hook(module, args, output):
            return output * self._factor(new, output)
        return hook

    def _branch_hook(self, new: torch.Tensor):
        """self_attention / mlp return (output, bias or None); megatron's bias-dropout-add sums them later."""
        def hook(module, args, output):
            out, bias = output
            factor = self._factor(new, out)
            return out * factor, None if bias is None else bias * factor
        return hook

    def _input_hook(self, new: torch.Tensor):
        def hook(module, args):
            return (args[0] * self._factor(new, args[0]), *args[1:])
        return hook

    def _norm_input_hook(self, new: torch.Tensor, padding: str):
        """The new coordinates moved to the padding value p + m (x_N - p) (p: 0, or the old coordinates' mean)."""
        def hook(module, args):
            x = args[0]
            pad = (x[..., ~new].mean(dim=-1, keepdim=True) if padding == "mean"
                   else torch.zeros((), dtype=x.dtype, device=x.device))
            return (torch.where(new, pad + self.m * (x - pad), x), *args[1:])
        return hook


class MaskRamp:
    """A ramp in progress: before each training step m = min(1, (step - start) / steps); at m = 1 the hooks go."""

    def __init__(self, masks: GrowthMasks, start: int, steps: int):
        self.masks, self.start, self.steps = masks, start, steps

    @property
    def done(self) -> bool:
        return not self.masks.active

    def before_step(self, step: int) -> float:
        m = mask_value(step, self.start, self.steps)
        if m >= 1.0:
            self.masks.remove()  # the plain grown model from here on, bit for bit
        else:
            self.masks.set(m)
        return m


class _Flags:
    """Which coordinates, units and layers are new, from the growth's index maps, as this rank holds them."""

    def __init__(self, steps, old_cfg, values, dims):
        self.steps, self.values, self.dims = steps, values, dims
        self.old_cfg, self.new_cfg = old_cfg, steps[-1].grown
        self.old_shapes = parameter_shapes(old_cfg)

    def _map(self, name: str) -> Optional[TensorMap]:
        """The index map of grown tensor ``name`` (None: a new tensor), from a zero stand-in of the original
        (on the CPU: only the map is used)."""
        source = original_source(self.steps, name)
        if source is None:
            return None
        return grow_one(self.steps, self.values, name, torch.zeros(self.old_shapes[source], device="cpu"))[1]

    def is_new_layer(self, name: str) -> bool:
        return original_source(self.steps, name) is None

    def hidden(self) -> torch.Tensor:
        """[h'] bool: the new residual coordinates (every hidden axis follows the same map)."""
        return self._map("decoder.final_layernorm.weight").axes[0].is_new

    def local_columns(self, name: str) -> torch.Tensor:
        """[columns on this TP rank] bool: the new input columns of linear_proj / linear_fc2 here."""
        tmap = self._map(name)
        new = tmap.axes[1].is_new
        layout, rows = shard_rows(name, tmap, self.old_shapes[tmap.old_name], self.new_cfg, self.dims)
        return take_shard(new.view(1, -1), layout, rows, self.dims).view(-1)
