"""Every shipped training config loads and validates (paths resolve from the repository root)."""

import glob
import os

import pytest

from mgrow.errors import ConfigError
from mgrow.train import config as train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


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
