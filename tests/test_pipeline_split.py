"""Layer growth on any pipeline layout (issue 24): uneven stages as megatron-core splits them
(``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage``), the split after a growth
(stated by the ``layers`` op, or the most balanced one), and layers moved between stages in memory."""

import json

import pytest
import yaml

from launch_utils import TINY_MODEL, mgrow_job, train_job, write_config
from mgrow.core.errors import ConfigError
from mgrow.core.model_config import ModelConfig
from mgrow.core.stages import split
from mgrow.train import config as train_config

TOL = 1e-5


@pytest.mark.parametrize("layers, pp, first, last, expected", [
    (4, 2, None, None, (2, 2)),
    (3, 2, None, None, (2, 1)),  # most balanced; the last stage (output layer, loss) gets fewer
    (6, 4, None, None, (1, 2, 2, 1)),
    (5, 2, 1, None, (1, 4)),
    (8, 4, 1, 3, (1, 2, 2, 3)),
    (7, 3, None, 1, (3, 3, 1)),
])
def test_the_split_is_megatrons(layers, pp, first, last, expected):
    assert split(layers, pp, first, last).layers == expected


@pytest.mark.parametrize("layers, pp, first, last, field", [
    (3, 2, 1, 1, "model.num_layers_in_first_pipeline_stage"),  # 1 + 1 is not all 3 layers
    (7, 4, 1, 1, "model.num_layers_in_first_pipeline_stage"),  # 5 middle layers over 2 stages
    (3, 4, None, None, "model.num_layers"),  # a stage without a layer
    (4, 2, 0, None, "model.num_layers_in_first_pipeline_stage"),
])
def test_a_split_megatron_refuses_is_refused_naming_the_key(layers, pp, first, last, field):
    cfg = ModelConfig(**{**TINY_MODEL, "num_layers": layers, "num_layers_in_first_pipeline_stage": first,
                         "num_layers_in_last_pipeline_stage": last})
    with pytest.raises(ConfigError) as error:
        cfg.check_layout(1, pp)
    assert error.value.field == field


def test_the_split_is_layout_not_function():
    a = ModelConfig(**{**TINY_MODEL, "num_layers": 3})
    b = a.replace(num_layers_in_first_pipeline_stage=1)
    assert a == b and b.to_dict()["num_layers_in_first_pipeline_stage"] == 1


def _report(run) -> list:
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("optimizer", ["megatron", "adam"])
def test_verify_grows_layers_across_uneven_stages(tmp_path, optimizer):
    """A 3-layer model at PP 2 ([2, 1]) grown to 4 layers ([2, 2]) and to 5 with the split the op states
    ([1, 4]); a 6-layer model at PP 4 ([1, 2, 2, 1]) grown by a layer in the middle and one on top."""
    three = tmp_path / "three.yaml"
    three.write_text(yaml.safe_dump({**TINY_MODEL, "num_layers": 3}))
    six = tmp_path / "six.yaml"
    six.write_text(yaml.safe_dump({**TINY_MODEL, "num_layers": 6}))
    plans = {}
    for name, op in (("to4", {"insert_before": [1], "num_layers": 4}),
                     ("to5", {"num_layers": 5, "num_layers_in_first_pipeline_stage": 1}),
                     ("6to8", {"insert_before": [3], "num_layers": 8})):
        plans[name] = tmp_path / f"{name}.yaml"
        plans[name].write_text(yaml.safe_dump({"ops": [{"layers": op}]}))
    runs = [
        (2, ["--model", three, "--plan", plans["to4"], "--plan", plans["to5"], "--pp", "2"],
         [[[2, 1], [2, 2]], [[2, 1], [1, 4]]]),
        (4, ["--model", six, "--plan", plans["6to8"], "--pp", "4"], [[[1, 2, 2, 1], [2, 2, 2, 2]]]),
    ]
    for nproc, args, stages in runs:
        reports = _report(mgrow_job(nproc, "verify", *args, "--optimizer", optimizer))
        assert [r["stages"] for r in reports] == stages
        for r in reports:
            assert r["ok"] and r["max_abs_logit_diff"] <= TOL, r
            assert r["max_abs_vs_reference"] == 0.0 and r["max_abs_moments_vs_reference"] == 0.0, r
            assert r["max_abs_step_equivalence"] is not None and r["max_abs_step_equivalence"] <= 1e-6, r


STEPS = 9


def _config(tmp_path, pp, **extra):
    config = write_config(tmp_path, parallel={"tp": 1, "pp": pp, **extra.pop("parallel", {})},
                          train={"steps": STEPS}, optimizer={"type": "megatron", "decay_steps": STEPS}, **extra)
    raw = yaml.safe_load(config.read_text())
    raw["growth"] = [{"at_step": 2, "plan": {"ops": [{"layers": {"insert_before": [1], "num_layers": 3}}]}}]
    config.write_text(yaml.safe_dump(raw))
    return config


def _losses(result):
    assert result.returncode == 0, result.stderr[-3000:] + "".join(result.rank_stderr.values())[-4000:]
    return {r["step"]: r["loss"] for r in result.metrics if "loss" in r}


@pytest.fixture(scope="module")
def uneven_run(tmp_path_factory):
    """PP 2, DistributedOptimizer: 2 layers ([1, 1]) grow to 3 after step 2 ([2, 1]); saves every 2 steps."""
    tmp = tmp_path_factory.mktemp("uneven")
    result = train_job(tmp, 2, _config(tmp, 2, checkpoint={"save": str(tmp / "ckpt"), "interval": 2}))
    return tmp, result


def test_growth_turns_an_even_split_uneven_in_memory(uneven_run):
    _, result = uneven_run
    (event,) = [r for r in result.metrics if r.get("event") == "growth"]
    assert event["stages_before"] == [1, 1] and event["stages_after"] == [2, 1]
    assert abs(event["held_loss_after"] - event["held_loss_before"]) <= TOL
    assert "pipeline stages [1, 1] -> [2, 1] layers" in result.stdout


@pytest.mark.parametrize("pp, nproc, parallel, stages", [
    (1, 1, {}, None),
    (2, 2, {"num_layers_in_first_pipeline_stage": 1}, "[1, 2]"),  # another split of the 3 layers
])
def test_an_uneven_checkpoint_resumes_at_pp1_and_at_another_split(uneven_run, tmp_path, pp, nproc, parallel, stages):
    tmp, reference = uneven_run
    config = _config(tmp_path, pp, parallel=parallel, checkpoint={"load": str(tmp / "ckpt" / "step_00000004")})
    result = train_job(tmp_path, nproc, config)
    resumed, expected = _losses(result), _losses(reference)
    assert sorted(resumed) == list(range(5, STEPS + 1))
    assert max(abs(resumed[s] - expected[s]) for s in resumed) <= TOL, (resumed, expected)
    if stages:
        assert f"(stages of {stages} layers)" in result.stdout


def test_a_split_that_does_not_fit_the_checkpoint_is_refused_naming_the_key(uneven_run, tmp_path):
    tmp, _ = uneven_run
    config = _config(tmp_path, 2, parallel={"num_layers_in_first_pipeline_stage": 3},
                     checkpoint={"load": str(tmp / "ckpt" / "step_00000004")})
    result = train_job(tmp_path, 2, config)
    assert result.returncode != 0
    assert "parallel.num_layers_in_first_pipeline_stage" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("section", ["model", "parallel"])
def test_split_keys_at_pp1_are_refused(tmp_path, section):
    config = write_config(tmp_path, **{section: {"num_layers_in_first_pipeline_stage": 1}})
    with pytest.raises(ConfigError) as error:
        train_config.load(str(config))
    assert error.value.field == f"{section}.num_layers_in_first_pipeline_stage"
