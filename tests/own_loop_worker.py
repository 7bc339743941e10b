"""Ranks of tests/test_own_loop.py: the examples' own training objects, grown through mgrow's public API.

Each job writes OUT_DIR/rank<R>.json; the test reads and judges them. Reference values come from the
examples' own code (a fresh build of the grown size with the example's ``build``), never from mgrow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

GROW_AT, STEPS = 3, 8
# The grown sizes the examples' plans give, written out by hand (not computed by mgrow).
MEGATRON_GROWN = dict(num_layers=3, hidden_size=96, num_attention_heads=8, num_query_groups=4, kv_channels=24,
                      ffn_hidden_size=256)
DEEPSPEED_GROWN = dict(num_layers=3, hidden_size=96, num_attention_heads=6, ffn_hidden_size=384)


def _write(out_dir: str, result: dict) -> None:
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


def _max_over_ranks(value: float) -> float:
    box = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return float(box[0])


def _positions(tokens):
    return torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)


def _settings(groups) -> list[dict]:
    """Param groups key by key, with the parameters replaced by their count."""
    return [{k: (len(v) if k == "params" else v) for k, v in g.items()} for g in groups]


def _config_fields(config) -> dict:
    """A TransformerConfig's fields as comparable values (functions by name, partials by their arguments)."""
    import dataclasses
    import functools

    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, functools.partial):
            value = (value.func.__name__, value.args, tuple(sorted(value.keywords.items())))
        elif callable(value):
            value = getattr(value, "__qualname__", repr(value))
        out[field.name] = repr(value)
    return out


def megatron(out_dir: str) -> None:
    """TP2 x DP2, DistributedOptimizer: the example's objects, trained, grown, compared with a fresh build."""
    import megatron_train as example

    import mgrow.megatron
    from mgrow.engine.megatron_job import release_megatron_ddp

    device = example.setup(2, 1)
    model, optimizer, scheduler = example.build(example.SIZES, device, STEPS)
    for step in range(GROW_AT):
        example.train_step(model, optimizer, scheduler, step, device)
    held = example.batches(GROW_AT, device)[0][:, :-1]

    def logits(chunk):
        chunk.eval()
        with torch.no_grad():
            out = chunk(held, _positions(held), None)
        chunk.train()
        return out

    before = logits(model)
    old_loss = example.train_step(model, optimizer, scheduler, GROW_AT, device, forward_only=True)
    grown_model, grown_optimizer, grown_scheduler, report = mgrow.megatron.grow(
        model, optimizer, scheduler, example.PLAN, keep_old=True)
    after = logits(grown_model)
    result = {"logit_diff": _max_over_ranks(float((after - before).abs().max())),
              "report_diff": report.max_abs_logit_diff, "implements": _implements_protocols(grown_model,
                                                                                          grown_optimizer)}

    fresh_model, fresh_optimizer, fresh_scheduler = example.build(MEGATRON_GROWN, device, STEPS)
    grown_config, fresh_config = _config_fields(grown_model.config), _config_fields(fresh_model.config)
    hooks = ("no_sync_func", "grad_scale_func", "finalize_model_grads_func")
    result["config_differs"] = {k: (grown_config[k], fresh_config[k]) for k in grown_config
                                if grown_config[k] != fresh_config[k] and k not in hooks}
    result["hooks_rebound"] = (grown_model.config.no_sync_func == grown_model.no_sync
                               and grown_model.config.grad_scale_func == grown_optimizer.scale_loss
                               and grown_model.config.finalize_model_grads_func
                               is fresh_model.config.finalize_model_grads_func)
    result["ddp_config"] = [repr(grown_model.ddp_config), repr(fresh_model.ddp_config)]
    result["optimizer_config"] = [repr(grown_optimizer.config), repr(fresh_optimizer.config)]
    result["scheduler"] = [{k: repr(v) for k, v in vars(s).items() if k != "optimizer"}
                           for s in (grown_scheduler, _advanced(fresh_scheduler, GROW_AT))]
    result["groups"] = [_settings(grown_optimizer.param_groups), _settings(fresh_optimizer.param_groups)]

    grown_gpt, fresh_gpt = grown_model.module, fresh_model.module
    result["rotary_percent"] = [grown_gpt.rotary_percent, fresh_gpt.rotary_percent]
    # the fresh model with the grown weights and the two settings growth changes by design (the RMSNorm epsilon,
    # scaled by h / h'; the rotary fraction, which keeps the new head dims unrotated): the loss the user's
    # objects give
    for module in fresh_model.modules():
        if isinstance(module, torch.nn.RMSNorm):
            module.eps = grown_model.config.layernorm_epsilon
    fresh_gpt.rotary_pos_emb = grown_gpt.rotary_pos_emb  # no parameters; shared
    with torch.no_grad():
        for (name, mine), (fresh_name, theirs) in zip(grown_model.named_parameters(), fresh_model.named_parameters()):
            assert name == fresh_name, (name, fresh_name)
            theirs.copy_(mine)
    fresh_loss = example.train_step(fresh_model, fresh_optimizer, fresh_scheduler, GROW_AT, device, forward_only=True)
    grown_loss = example.train_step(grown_model, grown_optimizer, grown_scheduler, GROW_AT, device, forward_only=True)
    result.update(old_loss=old_loss, fresh_loss=fresh_loss, grown_loss_now=grown_loss, grown_lr=[], fresh_lr=[],
                  grown_loss=[])
    for step in range(GROW_AT, STEPS):
        result["grown_lr"].append([g["lr"] for g in grown_optimizer.param_groups])
        result["fresh_lr"].append([g["lr"] for g in fresh_optimizer.param_groups])
        result["grown_loss"].append(example.train_step(grown_model, grown_optimizer, grown_scheduler, step, device))
        fresh_scheduler.step(increment=1)
    for chunk in (model, fresh_model, grown_model):
        release_megatron_ddp(chunk)
    _write(out_dir, result)


def _implements_protocols(model, optimizer) -> bool:
    """The shipped adapters provide what mgrow/engine/protocols.py says an adapter must."""
    from mgrow.engine.megatron_job import MegatronJob
    from mgrow.engine.protocols import GrowableJob, OptimizerState
    from mgrow.parallel.optimizer_state import DistributedOptimizerState, TorchAdamState, ZeroState, for_megatron

    job = MegatronJob(model, optimizer)
    return (isinstance(job, GrowableJob) and isinstance(for_megatron(optimizer), OptimizerState)
            and all(issubclass(cls, OptimizerState) for cls in (TorchAdamState, DistributedOptimizerState, ZeroState)))


def _advanced(scheduler, steps: int):
    scheduler.step(increment=steps)
    return scheduler


def deepspeed(out_dir: str, zero_stage: str) -> None:
    """DP2, ZeRO-2 or ZeRO-3: the example's engine, trained, grown, compared with a fresh build."""
    import deepspeed_train as example
    from deepspeed.runtime.zero import GatheredParameters

    import mgrow.deepspeed

    device = example.setup()
    engine = example.build(example.SIZES, device, int(zero_stage), STEPS)
    for step in range(GROW_AT):
        example.train_step(engine, step, device)
    held = example.batch(GROW_AT, 0, device)[:, :-1]

    def logits(e):
        e.eval()
        with torch.no_grad():
            out = e(held, _positions(held), None).detach().clone()
        e.train()
        return out

    def loss(e):
        with torch.no_grad():
            return float(example.loss_of(e, example.batch(GROW_AT, 0, device)))

    before, old_loss = logits(engine), loss(engine)
    grown, _, _, report = mgrow.deepspeed.grow(engine, example.PLAN, keep_old=True)
    after = logits(grown)
    from mgrow.engine.deepspeed_job import DeepSpeedJob
    from mgrow.engine.protocols import GrowableJob

    result = {"logit_diff": _max_over_ranks(float((after - before).abs().max())), "old_loss": old_loss,
              "optimizer_class": [type(grown.basic_optimizer).__name__],
              "implements": isinstance(DeepSpeedJob(grown), GrowableJob)}

    fresh = example.build(DEEPSPEED_GROWN, device, int(zero_stage), STEPS)
    for _ in range(GROW_AT):
        fresh.lr_scheduler.step()
    result["optimizer_class"].append(type(fresh.basic_optimizer).__name__)
    grown_config, fresh_config = _config_fields(grown.module.config), _config_fields(fresh.module.config)
    result["config_differs"] = {k: (grown_config[k], fresh_config[k]) for k in grown_config
                                if grown_config[k] != fresh_config[k]}
    for module in fresh.module.modules():  # the one setting growth changes by design, as in megatron()
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = grown.module.config.layernorm_epsilon
    result["groups"] = [_settings(grown.optimizer.param_groups), _settings(fresh.optimizer.param_groups)]
    result["scheduler"] = [grown.lr_scheduler.state_dict(), fresh.lr_scheduler.state_dict()]
    result["counters"] = [[getattr(e, c) for c in ("global_steps", "global_samples")] for e in (engine, grown)]
    result["adam_steps"] = [sorted({int(s["step"]) for s in getattr(e.optimizer, "optimizer", e.optimizer).state.values()
                                    if "step" in s}) for e in (engine, grown)]
    gathered = GatheredParameters(list(grown.module.parameters()))
    into = GatheredParameters(list(fresh.module.parameters()), modifier_rank=0)
    with gathered, into, torch.no_grad():
        for (name, mine), (fresh_name, theirs) in zip(grown.module.named_parameters(), fresh.module.named_parameters()):
            assert name == fresh_name, (name, fresh_name)
            theirs.copy_(mine)
    result.update(grown_loss_now=loss(grown), fresh_loss=loss(fresh), grown_lr=[], fresh_lr=[], grown_loss=[])
    for step in range(GROW_AT, STEPS):
        result["grown_lr"].append([g["lr"] for g in grown.optimizer.param_groups])
        result["fresh_lr"].append([g["lr"] for g in fresh.optimizer.param_groups])
        result["grown_loss"].append(example.train_step(grown, step, device))
        fresh.lr_scheduler.step()
    for e in (engine, fresh, grown):
        e.destroy()
    _write(out_dir, result)


def example_main(out_dir: str, which: str, *argv: str) -> None:
    """The example script's own main(), as its command line runs it."""
    import deepspeed_train
    import megatron_train

    history = (megatron_train if which == "megatron" else deepspeed_train).main(list(argv))
    _write(out_dir, history)


def _refusal(grow, objects_of) -> dict:
    """Run ``grow()``, which must refuse; (error type, message, whether every parameter is bit for bit as
    before, whether the objects still train)."""
    before = [p.detach().clone() for p in objects_of()]
    try:
        grow()
    except Exception as error:  # noqa: BLE001 (recorded for the test)
        kind, message = type(error).__name__, str(error)
    else:
        kind, message = None, "growth was not refused"
    kept = all(torch.equal(a, b.detach()) for a, b in zip(before, objects_of()))
    return {"type": kind, "message": message, "kept": kept}


def megatron_mismatches(out_dir: str) -> None:
    """TP2: plans, configs and objects that disagree with the live megatron-core model."""
    import megatron_train as example

    import mgrow.megatron
    from mgrow.engine.megatron_job import release_megatron_ddp

    device = example.setup(2, 1)
    model, optimizer, scheduler = example.build(example.SIZES, device, STEPS)
    other_model, other_optimizer, other_scheduler = example.build(example.SIZES, device, STEPS)
    example.train_step(model, optimizer, scheduler, 0, device)
    gpt = model.module
    params = lambda: list(model.parameters())  # noqa: E731

    def attempt(plan=example.PLAN, chunk=None, opt=None, sched=None, **kwargs):
        return lambda: mgrow.megatron.grow(model if chunk is None else chunk, optimizer if opt is None else opt,
                                           scheduler if sched is None else sched, plan, **kwargs)

    def with_changed(obj, field, value, grow):
        def run():
            saved = getattr(obj, field)
            setattr(obj, field, value)
            try:
                grow()
            finally:
                setattr(obj, field, saved)
        return run

    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer_config import ParamKey

    def overridden_optimizer():
        """An optimizer made with a weight-decay override for the output layer, and growth not told of it."""
        config = OptimizerConfig(optimizer="adam", lr=example.LR, weight_decay=example.WEIGHT_DECAY,
                                 use_distributed_optimizer=True)
        custom = get_megatron_optimizer(config, [other_model],
                                        config_overrides={ParamKey(name="*output_layer*"): {"wd_mult": 0.5}})
        mgrow.megatron.grow(other_model, custom, None, example.PLAN, keep_old=True)

    cases = {
        "plan_shrinks": attempt({"ops": [{"mlp": {"ffn_hidden_size": 128}}]}),
        "config_ffn_retyped": with_changed(gpt.config, "ffn_hidden_size", 96, attempt()),
        "config_eps_retyped": with_changed(gpt.config, "layernorm_epsilon", 1e-5, attempt()),
        "rotary_base_retyped": with_changed(gpt, "rotary_base", 10000, attempt()),
        "foreign_optimizer": attempt(opt=other_optimizer, sched=other_scheduler),
        "foreign_scheduler": attempt(sched=other_scheduler),
        "scheduler_kind": attempt(sched=torch.optim.lr_scheduler.LambdaLR(
            optimizer.chained_optimizers[0].optimizer, lambda step: 1.0)),
        "virtual_pipeline": attempt(chunk=[model, other_model]),
        "config_overrides": overridden_optimizer,
    }
    result = {name: _refusal(grow, params) for name, grow in cases.items()}
    result["trains_after"] = example.train_step(model, optimizer, scheduler, 1, device)
    for chunk in (model, other_model):
        release_megatron_ddp(chunk)
    _write(out_dir, result)


def deepspeed_mismatches(out_dir: str) -> None:
    """DP2, ZeRO-2: DeepSpeed engines mgrow cannot grow as asked."""
    import deepspeed
    import deepspeed_train as example

    import mgrow.deepspeed

    device = example.setup()
    config = example.ds_config(2, STEPS)
    engines = []

    def initialize(model, **kwargs):
        engine = deepspeed.initialize(model=model, config=kwargs.pop("config", config), **kwargs)[0]
        engines.append(engine)
        return engine

    plain = initialize(torch.nn.Sequential(torch.nn.Linear(8, 8)).to(device))
    gpt = example.build(example.SIZES, device, 2, STEPS)
    engines.append(gpt)
    client_config = {k: v for k, v in config.items() if k not in ("optimizer", "scheduler")}
    model = gpt.module.__class__(config=gpt.module.config, transformer_layer_spec=gpt.module.transformer_layer_spec,
                                 vocab_size=example.VOCAB, max_sequence_length=example.SEQ,
                                 share_embeddings_and_output_weights=True).to(device)
    client = torch.optim.AdamW(example.param_groups(model), lr=example.LR)
    with_object_scheduler = initialize(model, optimizer=client, config=client_config,
                                       lr_scheduler=torch.optim.lr_scheduler.LambdaLR(client, lambda step: 1.0))
    split = example.build(example.SIZES, device, 2, STEPS)  # rebuilt below with groups that split a role
    layer0 = [p for n, p in split.module.named_parameters() if n.startswith("decoder.layers.0.")]
    rest = [p for n, p in split.module.named_parameters() if not n.startswith("decoder.layers.0.")]
    split_model = split.module
    split.destroy()
    split_role = initialize(split_model, model_parameters=[{"params": layer0}, {"params": rest}])

    cases = {
        "not_a_gpt": (plain, lambda: mgrow.deepspeed.grow(plain, example.PLAN)),
        "scheduler_object": (with_object_scheduler, lambda: mgrow.deepspeed.grow(with_object_scheduler, example.PLAN)),
        "split_role": (split_role, lambda: mgrow.deepspeed.grow(split_role, example.PLAN)),
        "plan_shrinks": (gpt, lambda: mgrow.deepspeed.grow(gpt, {"ops": [{"hidden": {"hidden_size": 32}}]})),
    }
    result = {name: _refusal(grow, lambda e=engine: list(e.module.parameters())) for name, (engine, grow)
              in cases.items()}
    result["trains_after"] = example.train_step(gpt, 0, device)
    for engine in engines:
        engine.destroy()
    _write(out_dir, result)


def megatron_float16(out_dir: str) -> None:
    """TP2, bf16 under megatron's Float16Module with Float16OptimizerWithFloat16Params (fp32 masters as each
    parameter's ``main_param``), grown by a plan that rescales nothing: the logits stay bit for bit."""
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    import megatron_train as example
    import mgrow.megatron
    from mgrow.engine.megatron_job import release_megatron_ddp

    device = example.setup(2, 1)
    config = TransformerConfig(
        **example.SIZES, tensor_model_parallel_size=2, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
    )
    gpt = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                   vocab_size=example.VOCAB, max_sequence_length=example.SEQ, position_embedding_type="rope")
    model = DistributedDataParallel(config=config, module=Float16Module(config, gpt.to(device)),
                                    ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=example.LR, min_lr=0.0, bf16=True,
                                                       params_dtype=torch.bfloat16), [model])
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=example.LR, min_lr=0.0, lr_warmup_steps=2,
                                        lr_decay_steps=STEPS, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
                                        wd_incr_steps=STEPS, wd_incr_style="constant")
    config.no_sync_func, config.grad_scale_func = model.no_sync, optimizer.scale_loss
    for step in range(2):
        example.train_step(model, optimizer, scheduler, step, device)
    held = example.batches(2, device)[0][:, :-1]

    def logits(chunk):
        with torch.no_grad():
            return chunk(held, _positions(held), None)

    before = logits(model)
    old_master = gpt.decoder.final_layernorm.weight.main_param.detach().clone()
    plan = {"ops": [{"mlp": {"ffn_hidden_size": 256}}, {"heads": {"num_attention_heads": 8}}]}
    grown, grown_optimizer, grown_scheduler, _ = mgrow.megatron.grow(model, optimizer, scheduler, plan)
    new_gpt = grown.module.module
    result = {
        "wrappers": [type(grown).__name__, type(grown.module).__name__, type(new_gpt).__name__],
        "param_dtypes": sorted({str(p.dtype) for p in new_gpt.parameters()}),
        "logit_diff": _max_over_ranks(float((logits(grown) - before).abs().max())),
        "master_diff": float((new_gpt.decoder.final_layernorm.weight.main_param - old_master).abs().max()),
        "master_finer_than_bf16": bool((old_master != old_master.bfloat16().float()).any()),
        "loss_after": example.train_step(grown, grown_optimizer, grown_scheduler, 2, device),
    }
    release_megatron_ddp(grown)
    _write(out_dir, result)
