"""Every shipped config loads and validates offline (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from memllm.commands import memory_config_from_file
from memllm.config import load_yaml
from memllm.experiment import load_experiment_config, quickstart_config
from memllm.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [*sorted((ROOT / "configs").glob("*.yaml")), quickstart_config()]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    data = load_yaml(path)
    if "arms" in data:
        cfg = load_experiment_config(path)
        assert cfg.arms
    elif set(data) == {"memory"}:
        assert memory_config_from_file(path).type in ("latent", "neural")
    else:
        cfg = load_run_config(path)
        assert cfg.output_dir


def test_there_are_configs_for_both_memories():
    kinds = {
        load_yaml(p).get("memory", {}).get("type") for p in CONFIGS if "memory" in load_yaml(p)
    }
    assert {"latent", "neural"} <= kinds
