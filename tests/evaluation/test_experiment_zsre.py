"""ZsRE in experiments: teacher-forced accuracies per arm, read the way each arm reads inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import memllm
from memllm.cli import main
from memllm.data import build_task
from memllm.data.zsre import teacher_forced_metrics
from memllm.evaluation.experiment import load_experiment_config
from memllm.evaluation.teacher_forcing import teacher_forced_argmax

CONFIGS = Path(__file__).parents[2] / "configs" / "experiments"
LATENT = {"type": "latent", "num_slots": 4, "memory_dim": 16, "num_heads": 2}
ZSRE_METRICS = {
    "exact_match",
    "token_acc",
    "seq_acc",
    "rephrase_token_acc",
    "rephrase_seq_acc",
    "loc_token_acc",
    "loc_seq_acc",
    "loc_unchanged",
}


@pytest.fixture(scope="module")
def examples():
    task = build_task("zsre", {"num_train": 0, "num_validation": 0, "num_test": 5})
    return task.examples("test")


def _with_memory(model, gate: float | None = None, seed: int = 0):
    """``model`` with a latent memory; ``gate`` set: its read-out is mixed in (not identity)."""
    memllm.inject_memory(model, {**LATENT, "layer_ids": [0]})
    if gate is not None:
        generator = torch.Generator().manual_seed(seed)
        for p in memllm.memory_parameters(model):
            p.data = torch.randn(p.shape, generator=generator) * gate
    return model


def test_experiment_reports_zsre_accuracies_per_arm(tmp_path, one_thread, monkeypatch):
    # plots are tested in test_report and take most of this test's time on a small CPU
    monkeypatch.setattr("memllm.evaluation.plots.draw_plots", lambda *_args, **_kw: [])
    config = {
        "name": "tiny zsre",
        "model": {"name": "tiny-llama"},
        "data": {"task": "zsre", "num_train": 8, "num_validation": 4, "num_test": 6},
        "segment_length": 16,  # shorter than every question: the memory arm reads segments
        "train": {"max_steps": 1, "batch_size": 4, "save_every": 0, "mixed_precision": "no"},
        "validation": {"every": 0, "generate": False},
        "log": {"every": 1, "tensorboard": False, "progress_bar": False},
        "eval": {"max_new_tokens": 2, "batch_size": 4},
        "arms": {
            "base": {"kind": "base"},
            "window": {"kind": "window"},
            "latent": {"kind": "memory", "memory": LATENT},
        },
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["experiment", "--config", str(path)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for arm in results["arms"].values():
        assert set(arm["metrics"]) == ZSRE_METRICS
        for metric in arm["metrics"].values():
            assert metric["n"] == 6 and len(metric["ci95"]) == 2
            assert metric["ci95"][0] <= metric["value"] <= metric["ci95"][1]
            assert metric["description"]
    base = results["arms"]["base"]["metrics"]
    assert base["token_acc"]["description"].startswith("ROME/MEMIT")
    assert "MEND" in base["seq_acc"]["description"]
    # interval by definition: a mean of token fractions is bootstrapped, 0/1 values get Wilson
    assert base["token_acc"]["method"] == "bootstrap" and base["seq_acc"]["method"] == "wilson"
    assert base["loc_unchanged"]["value"] == 1.0  # base is the bare backbone
    assert results["arms"]["latent"]["extra"]["segment_length"] == 16
    assert "vs_base" in results["arms"]["latent"]["comparisons"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## Metrics" in md and "| `token_acc` | ROME/MEMIT" in md
    row = json.loads((tmp_path / "out" / "arms" / "latent" / "predictions.jsonl").open().readline())
    assert {"token_acc", "seq_acc", "exact_match"} <= set(row)


def test_untrained_memory_equals_the_bare_model(tiny, examples, one_thread):
    bare, tok = tiny("llama")
    memory, _ = tiny("llama")
    _with_memory(memory)
    for segment in (None, 12):
        options = {"segment_length": segment, "add_special_tokens": False, "batch_size": 3}
        expected = teacher_forced_metrics(bare, tok, examples, **options)
        assert teacher_forced_metrics(memory, tok, examples, **options) == expected


def test_batched_equals_one_at_a_time_with_memory(tiny, examples, one_thread):
    model, tok = tiny("llama")
    _with_memory(model, gate=0.5)
    # different lengths: short prompts get fully padded early segments in a batch
    prompts = [ex.prompt for ex in examples] + ["Capital?"]
    targets = [ex.target for ex in examples] + [" Paris, or so"]
    options = {"segment_length": 8, "add_special_tokens": False}
    batched = teacher_forced_argmax(model, tok, prompts, targets, batch_size=4, **options)
    single = [
        teacher_forced_argmax(model, tok, [p], [t], batch_size=1, **options)[0]
        for p, t in zip(prompts, targets, strict=True)
    ]
    assert batched == single
    assert [len(gold) for gold, _ in batched] == [len(t) for t in targets]  # byte tokens


def _calls(model) -> list[int]:
    """Records the length of every forward call of ``model``."""
    widths: list[int] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    return widths


def test_memory_reads_segment_by_segment_and_window_sees_only_the_window(tiny, one_thread):
    prompt = "In which country was Marie Curie born?"  # 38 byte tokens
    target = " Poland"
    model, tok = tiny("llama")
    widths = _calls(model)
    window = teacher_forced_argmax(model, tok, [prompt], [target], segment_length=16)
    assert widths == [16 + len(target)]  # the last 16 prompt tokens and the target, nothing else
    # the window arm's view equals the model given only the prompt's last 16 tokens
    assert window == teacher_forced_argmax(model, tok, [prompt[-16:]], [target])

    memory, _ = tiny("llama")
    _with_memory(memory, gate=0.5)
    widths = _calls(memory)
    teacher_forced_argmax(memory, tok, [prompt, prompt[-20:]], [target, target], segment_length=16)
    # segments aligned to the end (the shorter prompt padded on the left), then the last
    # segment and the answer with the memory read-only
    assert widths == [6, 16, 16 + len(target)]


@pytest.mark.parametrize("name", ["gmemllm_llama31_8b_zsre.yaml", "smollm2_zsre.yaml"])
def test_zsre_configs_load(name):
    cfg = load_experiment_config(CONFIGS / name)
    assert cfg.data["task"] == "zsre" and "latent" in cfg.arms and "base" in cfg.arms
