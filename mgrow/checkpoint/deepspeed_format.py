"""Model and optimizer of the ZeRO paths in DeepSpeed's own checkpoint format.

``engine.save_checkpoint`` writes ``<step folder>/deepspeed/`` (the module per
TP rank and every DP rank's flat ZeRO partition, docs/library_facts.md, "DeepSpeed ZeRO") with
megatron's TP layout declared as DeepSpeed's ``universal_checkpoint_info``.
Resuming on the layout that saved it is DeepSpeed's plain ``load_checkpoint``.
On another TP/DP layout the checkpoint is first converted to DeepSpeed's
universal format (``ds_to_universal``, rank 0, into a scratch folder beside the
checkpoint) and loaded with ``load_universal``; the flat partitions are then
rebuilt for the new layout by DeepSpeed itself. DeepSpeed 0.19.8's ZeRO-3
universal load has two faults that are repaired after it runs
(:func:`_repair_stage3_universal_load`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from mgrow.parallel import layout as layout_table

TAG = "deepspeed"
UNIVERSAL = "universal"


def universal_checkpoint_info(engine) -> dict:
    """megatron's TP layout of this model's parameters, as DeepSpeed's universal checkpoint patterns."""
    names = [name for name, _ in engine.module.named_parameters()]
    kinds: dict[str, list] = {"tp_replicated_parameter_patterns": [], "parameter_with_row_parallelism_patterns": [],
                              "parameter_with_2_sub_params_cat_dim_0": [], "vocabulary_parameter_patterns": []}
    for name in names:
        layout = layout_table.layout_of(name, engine.cfg.model)
        if layout.partition_dim is None:
            kind = "tp_replicated_parameter_patterns"
        elif layout.partition_dim == 1:
            kind = "parameter_with_row_parallelism_patterns"
        elif layout.stride == 2:
            kind = "parameter_with_2_sub_params_cat_dim_0"  # the gated fc1: each rank holds [gate_r; up_r]
        elif "word_embeddings" in name or "output_layer" in name:
            kind = "vocabulary_parameter_patterns"
        else:
            continue  # column-parallel: DeepSpeed's default concatenation on dim 0
        kinds[kind].append(re.escape(name) + "$")
    return {"universal_checkpoint_version": 0.4, "original_vocab_size": engine.cfg.model.vocab_size,
            **{kind: patterns for kind, patterns in kinds.items() if patterns}}


def save(engine, folder: str, optimizer_state: bool = True) -> None:
    """DeepSpeed's save_checkpoint (always with the optimizer: its ZeRO partitions hold the fp32 masters)."""
    engine.engine.save_checkpoint(folder, tag=TAG, save_latest=False,
                                  client_state={"universal_checkpoint_info": universal_checkpoint_info(engine)})


def load(engine, folder: str, metadata: dict) -> None:
    dims = engine.dims
    if metadata["layout"] == {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp}:
        engine.engine.load_checkpoint(folder, tag=TAG)
        return
    scratch = Path(folder).parent / f".universal.{Path(folder).name}"
    if dims.rank == 0:
        _to_universal(Path(folder) / TAG, scratch)
    dist.barrier()
    config = engine.engine._config
    config.load_universal_checkpoint = True
    try:
        engine.engine.load_checkpoint(str(scratch), tag=UNIVERSAL)
        if engine.engine.zero_optimization_stage() == 3:
            _repair_stage3_universal_load(engine.optimizer, scratch / UNIVERSAL)
    finally:
        config.load_universal_checkpoint = False
        dist.barrier()
        if dims.rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)


def _repair_stage3_universal_load(zero, universal: Path) -> None:
    """Undo two faults of DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py:3664-3691).

    It gives every sub-group one shared ``step`` tensor, which torch's AdamW then
    advances once per sub-group at each step, and it copies param group 0's
    hyper-parameters (``wd_mult``, ``weight_decay``) into every group, so the
    no-decay group would decay. Each sub-group gets its own step; each group
    gets its saved hyper-parameters back (``zero/optimizer_state.pt``,
    written by ds_to_universal in the saved group order).
    """
    from deepspeed.checkpoint.constants import PARAM_GROUPS

    for flat in zero.fp32_partitioned_groups_flat:
        state = zero.optimizer.state.get(flat)
        if state is not None and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    saved = load_plain(universal / "zero" / "optimizer_state.pt")[PARAM_GROUPS]
    groups = zero.optimizer.param_groups
    if len(saved) != len(groups):
        raise RuntimeError(f"ZeRO-3 universal load: {len(saved)} saved param groups, {len(groups)} in the optimizer")
    for group, old in zip(groups, saved):
        group.update({k: v for k, v in old.items() if k != "params"})


def load_plain(path: Path):
    """A DeepSpeed file as tensors and plain data (``weights_only``): the DeepSpeed classes its files hold
    (the ZeRO stage enum, the loss scaler's plain attributes, the (start, numel) fragment addresses of a ZeRO
    partition) are allowed by name; anything else is refused instead of run."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _to_universal(source: Path, scratch: Path) -> None:
    """``ds_to_universal`` in this process (one worker: no process pools).

    megatron's linear layers put ``<name>._extra_state: None`` in the module
    state, on which the converter calls ``.float()`` (ds_to_universal.py:1226);
    it converts a staging copy whose module states keep only tensors.
    """
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(scratch, ignore_errors=True)
    staging = scratch / "source"
    staging.mkdir(parents=True)
    for path in source.iterdir():
        if path.name.startswith("mp_rank_"):
            state = load_plain(path)
            state["module"] = {k: v for k, v in state["module"].items() if torch.is_tensor(v)}
            torch.save(state, staging / path.name)
        else:
            os.symlink(path.resolve(), staging / path.name)
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(staging), output_folder=str(scratch / UNIVERSAL), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False))
    shutil.rmtree(staging)
