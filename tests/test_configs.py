"""Every shipped training config loads and validates (paths resolve from the repository root)."""

import glob
import os

import pytest

from mgrow.core.errors import ConfigError
from mgrow.train import config as train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")) +
                 glob.glob(os.path.join(REPO, "configs", "gpt", "*_to_*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_shipped_config_loads(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = train_config.load(path)
    cfg.check_world(cfg.parallel.tp * cfg.parallel.pp * 2)


def test_overrides_are_typed_and_checked(monkeypatch):
    monkeypatch.chdir(REPO)
    path = os.path.join(REPO, "configs", "tiny_tp2_pp2.yaml")
    cfg = train_config.load(path, ["train.steps=7", "optimizer.type=megatron", "optimizer.warmup_steps=2"])
    assert (cfg.train.steps, cfg.optimizer.type) == (7, "megatron")
    with pytest.raises(ConfigError, match="train.steps: must be of type int"):
        train_config.load(path, ["train.steps=many"])
    with pytest.raises(ConfigError, match="optimizer.warmup_steps"):
        train_config.load(path, ["train.steps=5"])  # warmup 10 >= 5 decay steps
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        train_config.load(path, ["train.global_batch_size=6"]).check_world(8)


LADDER = [("125m_to_350m", "350m"), ("350m_to_760m", "760m"), ("760m_to_1.3b", "1.3b")]


@pytest.mark.parametrize("config, target", LADDER)
def test_the_gpt_ladder_grows_into_the_next_size(config, target, monkeypatch):
    """Each ladder config's growth schedule ends at the next size's model (epsilon up to rounding)."""
    import dataclasses

    import yaml

    from mgrow.core.model_config import ModelConfig
    from mgrow.train.schedule import final_model

    monkeypatch.chdir(REPO)
    cfg = train_config.load(os.path.join(REPO, "configs", "gpt", f"{config}.yaml"))
    grown = final_model(cfg.model, cfg.growth)
    with open(os.path.join(REPO, "configs", "gpt", f"{target}.yaml")) as f:
        expected = ModelConfig.from_dict(yaml.safe_load(f))
    assert grown.layernorm_epsilon == pytest.approx(expected.layernorm_epsilon, rel=1e-12)
    assert dataclasses.replace(grown, layernorm_epsilon=expected.layernorm_epsilon) == expected


def test_deepspeed_json_path_and_a_contradicting_stage(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    cfg = train_config.load(os.path.join(REPO, "configs", "tiny_growth_zero2_dp2.yaml"))
    assert cfg.deepspeed["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match="deepspeed.zero_optimization.stage: 2 contradicts optimizer.type zero3"):
        train_config.load(os.path.join(REPO, "configs", "tiny_growth_zero2_dp2.yaml"), ["optimizer.type=zero3"])
    with pytest.raises(ConfigError, match="deepspeed: DeepSpeed config file .*missing.json does not exist"):
        train_config.from_dict({"model": "configs/models/tiny.yaml", "deepspeed": "missing.json"})
