"""Transfer into a fresh model stage from a trained GPT's checkpoint, collectively."""

from __future__ import annotations

import time

from mgrow.engine import param_groups
from mgrow.engine.model import global_names
from mgrow.parallel import collectives
from mgrow.transforms.transfer import rules, shards
from mgrow.transforms.transfer.config import checkpoint_folder


def apply(model, cfg, check_tokens, dims) -> dict:
    """Collective: fill ``model`` (a fresh stage of ``cfg.model``) from ``cfg.transfer.source``; tag the copied
    parameters for freezing. Returns the metrics record of the transfer."""
    t = cfg.transfer
    start = time.perf_counter()
    folder = checkpoint_folder(t.source)
    source = shards.load_source(folder, t.source_model, seed=cfg.train.seed, dims=dims)
    names = shards.copy_shared(source, t.source_model, model, cfg.model, t.components, dims)
    if t.freeze:
        param_groups.mark(model, names)
    diff = shards.max_logit_diff(source, model, check_tokens, dims)
    model.train()
    del source
    return dict(event="transfer", step=0, source=str(folder), components=list(t.components),
                tensors=_count_all(len(names), dims), frozen=t.freeze, max_abs_logit_diff=diff,
                transfer_seconds=time.perf_counter() - start)


def prepare(model, cfg, resumed: bool, check_tokens, dims):
    """Before the engine is built: on a fresh run transfer (:func:`apply`, its record returned); on a resumed
    run the weights come from the checkpoint, only the transferred parameters are tagged again (the
    optimizer's frozen groups must be rebuilt as they were saved). None without a ``transfer`` section."""
    t = cfg.transfer
    if t is None:
        return None
    if not resumed:
        return apply(model, cfg, check_tokens, dims)
    if t.freeze:
        param_groups.mark(model, [name for _, name, _ in global_names(model)
                            if rules.rule_for(name, t.components, t.source_model, cfg.model) is not None])
    return None


def _count_all(local: int, dims) -> int:
    """Transferred tensors over the pipeline stages (each stage counts its own once)."""
    return int(collectives.reduce_scalar(dims, local, "sum", dims.pp_group))
