"""Run config: strict loading, one-line errors naming key and file, round trip, config show."""

from __future__ import annotations

from pathlib import Path

import pytest

from memllm.cli import main
from memllm.core.config import from_dict
from memllm.errors import ConfigError
from memllm.training.run_config import (
    RunConfig,
    check_against_model,
    dump_yaml,
    load_run_config,
    render_with_help,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["configs/debug.yaml", "configs/smollm2_latent_babilong.yaml"]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    cfg = load_run_config(ROOT / name)
    assert isinstance(cfg, RunConfig)
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_run_config(path) == cfg


def test_debug_config_accepts_the_documented_overrides(tmp_path):
    cfg = load_run_config(
        ROOT / "configs/debug.yaml", [f"output_dir={tmp_path}", "train.max_steps=7"]
    )
    assert cfg.output_dir == str(tmp_path) and cfg.train.max_steps == 7


def _error(tmp_path, text: str, overrides=()) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_run_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    return message


BASE = "model: {name: tiny-llama}\ndata: {task: babilong}\n"


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        (BASE + "train: {lr_rate: 1}\n", (), "unknown key train.lr_rate"),
        (BASE + "traine: {}\n", (), "unknown key traine"),
        (BASE, ("train.max_stepz=3",), "unknown key train.max_stepz"),
        (BASE + "memory: {num_slotz: 3}\n", (), "unknown key memory.num_slotz"),
        (BASE + "lora: {rank: 4, alfa: 2}\n", (), "unknown key lora.alfa"),
        (BASE + "log: {wandb: {projekt: x}}\n", (), "unknown key log.wandb.projekt"),
        (BASE + "train: {batch_size: four}\n", (), "train.batch_size: expected an integer"),
        (BASE + "train: {lr: fast}\n", (), "train.lr: expected a number"),
        (BASE, ("train.shuffle=maybe",), "train.shuffle: expected true/false"),
        (BASE + "train: {scheduler: step}\n", (), "train.scheduler: must be one of"),
        (BASE + "memory: {num_slots: 1.5}\n", (), "memory.num_slots: expected an integer"),
        (BASE + "train: {segment_length: 0}\n", (), "train.segment_length: must be > 0"),
        (BASE, ("train.segment_length=-4",), "train.segment_length: must be > 0"),
        (BASE + "train: {keep_last: 0}\n", (), "train.keep_last: must be >= 1"),
        (BASE + "eval: {patience: 0}\n", (), "eval.patience: must be > 0"),
        (BASE + "memory: {memory_dim: 10, num_heads: 3}\n", (), "memory.memory_dim"),
        (BASE + "lora: {rank: 0}\n", (), "lora.rank: must be > 0"),
        (BASE + "memory: null\n", (), "memory: nothing to train"),
        ("model: {name: tiny-llama}\ndata: {}\n", (), "data.task"),
        (
            BASE + "memory: null\nlora: {rank: 2}\ntrain: {feature_cache: true}\n",
            (),
            "train.feature_cache",
        ),
    ],
)
def test_config_errors_are_one_line_naming_key_and_file(tmp_path, text, overrides, expected):
    assert expected in _error(tmp_path, text, overrides)


def test_model_dependent_checks_name_key_and_file(tmp_path, tiny):
    model, _ = tiny("llama")  # 2 decoder layers, context 256
    source = tmp_path / "run.yaml"
    cfg = from_dict(RunConfig, {"memory": {"layer_ids": [5]}, "model": {"name": "tiny-llama"}})
    with pytest.raises(ConfigError, match=rf"^{source}: memory.layer_ids: layer 5 is out of range"):
        check_against_model(cfg, model, source)
    cfg = from_dict(RunConfig, {"model": {"name": "tiny-llama"}, "train": {"segment_length": 1000}})
    with pytest.raises(ConfigError, match=r"train.segment_length: 1000 exceeds"):
        check_against_model(cfg, model, source)
    check_against_model(
        from_dict(
            RunConfig,
            {"memory": {"layer_ids": [-1, 0]}, "train": {"segment_length": 256}},
        ),
        model,
        source,
    )


def test_config_show_prints_resolved_values_with_help(capsys):
    assert main(["config", "show", str(ROOT / "configs/debug.yaml"), "train.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "  lr: 0.5  # peak learning rate (AdamW)" in out
    assert "  num_slots: 4  # number of memory slots" in out
    assert "patience: null  # stop after" in out


def test_config_show_reports_errors_in_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE + "train: {segment_length: 0}\n")
    assert main(["config", "show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"memllm config: error: {path}: train.segment_length: must be > 0, got 0"


def test_render_with_help_is_valid_yaml():
    import yaml

    from memllm.core.config import to_dict

    cfg = load_run_config(ROOT / "configs/smollm2_latent_babilong.yaml")
    assert yaml.safe_load(render_with_help(cfg)) == to_dict(cfg)
