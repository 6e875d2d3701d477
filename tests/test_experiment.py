"""The experiment runner end to end on a tiny model, and chat-template prompts."""

from __future__ import annotations

import json

import pytest
import yaml

from memllm.cli import main
from memllm.prompting import format_example
from memllm.tiny import byte_tokenizer

CONFIG = {
    "name": "tiny experiment",
    "model": {"name": "tiny-llama"},
    "data": {
        "task": "babilong",
        "tasks": ["qa1"],
        "lengths": ["0k"],
        "prompt": "plain",
        "num_train": 8,
        "num_validation": 4,
        "num_test": 6,
        "tokenizer": "tiny-llama",
    },
    "segment_length": 64,
    "train": {"max_steps": 2, "batch_size": 4, "save_every": 0, "mixed_precision": "no"},
    "validation": {"every": 0, "max_examples": 4, "generate": False},
    "log": {"every": 1, "tensorboard": False, "progress_bar": False},
    "eval": {"max_new_tokens": 3, "batch_size": 4},
    "arms": {
        "base": {"kind": "base"},
        "window": {"kind": "window"},
        "latent": {
            "kind": "memory",
            "memory": {"type": "latent", "num_slots": 4, "memory_dim": 16, "num_heads": 2},
        },
    },
}


def test_experiment_writes_results_with_intervals(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump({**CONFIG, "output_dir": str(tmp_path / "out")}, sort_keys=False)
    )
    assert main(["experiment", "--config", str(path)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["arms"]) == ["base", "window", "latent"]
    for arm in results["arms"].values():
        acc = arm["metrics"]["accuracy"]
        assert acc["n"] == 6 and len(acc["ci95"]) == 2
        assert acc["ci95"][0] <= acc["value"] <= acc["ci95"][1]
    assert results["arms"]["latent"]["trainable_params"] > 0
    assert "vs_window" in results["arms"]["latent"]["comparisons"]
    assert (tmp_path / "out" / "results.md").is_file()
    rows = (tmp_path / "out" / "arms" / "latent" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 6
    assert "report:" in capsys.readouterr().out


def test_unknown_arm_is_one_line(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump({**CONFIG, "output_dir": str(tmp_path / "out")}, sort_keys=False)
    )
    assert main(["experiment", "--config", str(path), "--arms", "magic"]) == 2
    assert "no arm named 'magic'" in capsys.readouterr().err


def test_bad_arm_config_names_the_key(tmp_path, capsys):
    bad = {**CONFIG, "arms": {"ft": {"kind": "finetuned"}}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["experiment", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "exp.yaml" in err and "arms.ft.lora" in err


def test_chat_template_wraps_prompt_and_target():
    tokenizer = byte_tokenizer()
    assert format_example(tokenizer, "Q?", " A", chat=False) == ("Q?", " A")
    with pytest.raises(ValueError, match="no chat template"):
        format_example(tokenizer, "Q?", " A", chat=True)
    tokenizer.chat_template = (
        "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}"
    )
    assert format_example(tokenizer, "Q?", " A", chat=True) == ("<u>Q?</u><a>", "A")
