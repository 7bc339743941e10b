"""What a growth costs before it runs: each rank's memory and traffic, from the layout and the table of moves.

One memory model serves the dry run (``mgrow plan``) and the check a training
job makes before its first step (:func:`mgrow.train.loop._check_memory`).

**State** of one rank (stage s, TP rank t; DP ranks of one (s, t) hold the same
amounts up to a partition's rounding) with P its elements of parameter shards
(a padded vocabulary's rows included) and D the DP size, in bytes:

===============================  ============  =========  ==============  ==============
path                             weights       grads      fp32 masters    Adam moments
===============================  ============  =========  ==============  ==============
adam (Megatron DDP)              P w           4 P        4 P (bf16)      8 P
megatron (DistributedOptimizer)  P w           4 P        4 P / D (bf16)  8 P / D
zero1, zero2                     P w           P w        4 P / D         8 P / D
zero3                            P w / D       P w / D    4 P / D         8 P / D
===============================  ============  =========  ==============  ==============

w is 2 for bf16 parameters, else 4. Megatron's DDP reduces gradients in an fp32
buffer (``grad_reduce_in_fp32``); with fp32 parameters its DistributedOptimizer
steps the parameters themselves, without copies. DeepSpeed keeps an fp32 copy of
its partition even for fp32 parameters, and ZeRO 1/2 gather a step's gradients
in its contiguous buffer (mgrow's configs make the bucket hold the whole model).
Activations, the allocator's caches and the framework's workspaces are not
counted.

**Growth** keeps the old state while it builds the new one, so a rank's peak is
its old state plus the largest of the three phases' *transient* (each the new
bytes alive at that phase's high point; N grown shard elements, W' G' M' A' the
new state's weights, grads, masters and moments by the table above):

* weights: W' (the built model, written shard by shard), the index maps' kinds
  (N bytes, kept until the moments are carried), one chunk, and with bf16 the
  grown fp32 masters held for the new optimizer (4 N);
* rebuild: W', the maps, the bf16 masters, a second W' where the optimizer
  flattens the built parameters into a buffer of its own (DistributedOptimizer,
  ZeRO 1/2: copied in, then freed), G' where Megatron's DDP zeroes its gradient
  buffer when built (DeepSpeed allocates ZeRO's at the first backward pass), M';
* moments: W', the maps, G', M', A', one chunk.

A chunk is its bulk read of old shards in fp32 where it assembles DP pieces,
twice (the assembly buffer and the all-reduce's own copy of it on gloo), plus
the largest grown shard in fp32.

**Traffic** is what the mover (:mod:`mgrow.transforms.grow`) sends and receives,
per pass (the weights, then each Adam moment when Adam has stepped), read off
the table of moves: per chunk one all-reduce over DP of the chunk's old shards
where the optimizer splits them over DP (ring: 2n(D-1)/D each way), the
stage-to-stage sends of shards whose layer changes stage, and TP all-gathers of
gathered parameters. Engine rebuild traffic (DeepSpeed's broadcast of the new
parameters at ``initialize``) and the agreements (objects) are not part of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from mgrow.core.model_config import ModelConfig
from mgrow.core.parameters import parameter_shapes
from mgrow.parallel import layout as layout_table

FP32 = 4
SHARDED = ("megatron", "zero1", "zero2", "zero3")
MOMENTS = 2
# elements of old tensors one chunk of the mover holds at most (:func:`chunks`, which the mover uses)
CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class JobLayout:
    tp: int
    pp: int
    dp: int
    optimizer: str  # adam | megatron | zero1 | zero2 | zero3
    gpus_per_node: int = 8

    def rank(self, stage: int, dp_rank: int, tp_rank: int) -> int:
        """Megatron's rank order (TP fastest, then DP, then PP)."""
        return tp_rank + self.tp * (dp_rank + self.dp * stage)

    def node(self, rank: int) -> int:
        return rank // self.gpus_per_node

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


def shard_elements(cfg: ModelConfig, tp: int, pp: int) -> dict[tuple[int, int], int]:
    """(stage, TP rank) -> elements of the parameter shards that rank holds."""
    out = {(stage, rank): 0 for stage in range(pp) for rank in range(tp)}
    for name, shape in parameter_shapes(cfg).items():
        layout = layout_table.layout_of(name, cfg)
        for stage in layout_table.stages_of(name, cfg, pp):
            for rank in range(tp):
                out[(stage, rank)] += _shard_numel(shape, layout, rank, tp)
    return out


def _shard_numel(shape, layout, rank: int, tp: int) -> int:
    if layout.partition_dim is None:
        return math.prod(shape)
    rows = len(layout_table.shard_indices(shape[layout.partition_dim], layout, rank, tp))
    return math.prod(shape) // shape[layout.partition_dim] * rows


def state_bytes(elements: int, bf16: bool, layout: JobLayout) -> dict[str, int]:
    """One rank's training state by kind (the table of the module docstring)."""
    w = 2 if bf16 else FP32
    opt = layout.optimizer
    part = math.ceil(elements / layout.dp) if opt in SHARDED else elements
    zero = opt.startswith("zero")
    state = {
        "weights": (part if opt == "zero3" else elements) * w,
        "grads": ((part if opt == "zero3" else elements) * w) if zero else elements * FP32,
        "masters": part * FP32 if (zero or bf16) else 0,
        "moments": MOMENTS * part * FP32,
    }
    return state


@dataclass
class RankEstimate:
    stage: int
    tp_rank: int
    before: dict[str, int]
    after: dict[str, int]
    phases: dict[str, int]  # the new bytes alive at each growth phase's high point

    @property
    def before_bytes(self) -> int:
        return sum(self.before.values())

    @property
    def after_bytes(self) -> int:
        return sum(self.after.values())

    @property
    def transient_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def peak_bytes(self) -> int:
        return self.before_bytes + self.transient_bytes


def memory(old: ModelConfig, new: ModelConfig, layout: JobLayout, largest_chunk: Optional[dict] = None
           ) -> dict[tuple[int, int], RankEstimate]:
    """Every (stage, TP rank)'s state before and after growing ``old`` into ``new``, and its growth phases.
    ``largest_chunk``: (stage, TP rank) -> (bulk-read elements, largest grown shard) of its largest chunk,
    from the table of moves; without it, bounded by the chunk size and the largest grown shard."""
    before_elements = shard_elements(old, layout.tp, layout.pp)
    after_elements = shard_elements(new, layout.tp, layout.pp)
    largest_shard = None if largest_chunk else _largest_shard(new, layout.tp)
    out = {}
    for key, grown in after_elements.items():
        read, largest = (largest_chunk or {}).get(key) or (min(CHUNK_ELEMENTS, before_elements[key]), largest_shard)
        after = state_bytes(grown, new.bf16, layout)
        weights, maps = after["weights"], grown
        grads = after["grads"] if _grads_at_build(layout) else 0
        held_masters = grown * FP32 if new.bf16 else 0

        def chunk(masters_pass: bool) -> int:
            bulk = read * FP32 if _read_assembles(layout.optimizer, old.bf16, masters_pass) else 0
            return 2 * bulk + largest * FP32

        phases = {
            "weights": weights + maps + held_masters + chunk(True),
            "rebuild": weights + maps + held_masters + (weights if _flattens(layout) else 0) + grads
            + after["masters"],
            "moments": weights + maps + grads + after["masters"] + after["moments"] + chunk(False),
        }
        out[key] = RankEstimate(key[0], key[1], state_bytes(before_elements[key], old.bf16, layout), after, phases)
    return out


def _grads_at_build(layout: JobLayout) -> bool:
    """Megatron's DDP zeroes its gradient buffer when it is built; DeepSpeed allocates ZeRO's gradient buffers
    at the first backward pass."""
    return not layout.optimizer.startswith("zero")


def _flattens(layout: JobLayout) -> bool:
    """Megatron's DistributedOptimizer (its DDP's contiguous parameter buffer) and ZeRO 1/2 (flat bit16
    groups) copy the built parameters into a buffer of their own: for a moment both are alive."""
    return layout.optimizer in ("megatron", "zero1", "zero2")


def _largest_shard(cfg: ModelConfig, tp: int) -> int:
    return max(_shard_numel(shape, layout_table.layout_of(name, cfg), 0, tp)
               for name, shape in parameter_shapes(cfg).items())


def _read_assembles(optimizer: str, bf16: bool, masters: bool) -> bool:
    """Whether a bulk read assembles DP pieces (one all-reduce): the masters of a DistributedOptimizer with
    fp32 parameters are the parameters themselves; Megatron DDP's Adam holds everything on every DP rank."""
    if optimizer == "adam":
        return False
    if optimizer == "megatron" and masters:
        return bf16
    return True


def chunks(table) -> list[list]:
    """The mover's chunks: the table in order, at most CHUNK_ELEMENTS old elements each (all ranks alike)."""
    out, chunk, size = [], [], 0
    for move in table:
        elements = 0 if move.old_shape is None else math.prod(move.old_shape)
        if chunk and size + elements > CHUNK_ELEMENTS:
            out.append(chunk)
            chunk, size = [], 0
        chunk.append(move)
        size += elements
    if chunk:
        out.append(chunk)
    return out


def read_moves(chunk, stage: int) -> list:
    """The moves of ``chunk`` whose old shard this stage reads: it holds the source and a destination needs it."""
    return [m for m in chunk if m.source is not None and stage in m.holders
            and (stage in m.destinations or m.sends(stage))]


TRAFFIC_OPS = ("all_reduce", "send", "recv", "all_gather")


def traffic(table, layout: JobLayout, bf16: bool, moments: bool = True) -> dict:
    """Bytes this rank's mover sends and receives, by torch.distributed op (mgrow.parallel.traffic's byte
    model), over the weights pass and (with ``moments``) the two moment passes; the sends and receives also
    by peer stage (``send_to_stage``, ``recv_from_stage``)."""
    stage, dp, tp = table.stage, layout.dp, layout.tp
    out = dict.fromkeys(TRAFFIC_OPS, 0)
    to_stage: dict[int, int] = {}
    from_stage: dict[int, int] = {}
    passes = [True] + ([False] * MOMENTS if moments else [])
    for masters in passes:
        for chunk in chunks(table):
            read = read_moves(chunk, stage)
            if read and _read_assembles(layout.optimizer, bf16, masters):
                n = sum(_old_shard_elements(m) for m in read) * FP32
                out["all_reduce"] += 2 * n * (dp - 1) // dp
            for move in chunk:
                if move.source is None:
                    continue
                if not move.local and stage in move.holders:  # gathered: all-gathered over TP, then sent whole
                    out["all_gather"] += (tp - 1) * _old_shard_elements(move) * FP32
                nbytes = move.moved_elements() * FP32  # this rank's old shard, or the whole old tensor if gathered
                for destination in move.sends(stage):
                    to_stage[destination] = to_stage.get(destination, 0) + nbytes
                    out["send"] += nbytes
                peer = move.receives(stage)
                if peer is not None:
                    from_stage[peer] = from_stage.get(peer, 0) + nbytes
                    out["recv"] += nbytes
    return {**out, "send_to_stage": to_stage, "recv_from_stage": from_stage}


def _old_shard_elements(move) -> int:
    return math.prod(move.old_shard_shape)


def largest_chunk(table, stage: int) -> tuple[int, int]:
    """(old elements of a bulk read, the largest grown shard's elements) of this rank's largest chunk."""
    best = (0, 0)
    for chunk in chunks(table):
        read = sum(_old_shard_elements(m) for m in read_moves(chunk, stage))
        grown = max((math.prod(m.new_shard_shape) for m in chunk if stage in m.destinations), default=0)
        best = max(best, (read, grown), key=sum)
    return best
