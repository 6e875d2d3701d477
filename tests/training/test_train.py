"""The training loop on the tiny model: objective, determinism, what trains, outputs, failures."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import memllm
from memllm.data.base import Example
from memllm.errors import ConfigError, MemllmError
from memllm.training.checkpointing import complete_checkpoints
from memllm.training.data import encode_examples, micro_batches
from memllm.training.run_config import RunConfig, load_run_config
from memllm.training.schedule import lr_factor
from memllm.training.trainer import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[2]
SMALL_MEMORY = {"type": "latent", "num_slots": 4, "memory_dim": 16, "num_heads": 2}


class ToyTask:
    """Key-value facts, then a question about one key: answering needs earlier segments."""

    name = "toy"
    max_new_tokens = 2

    def __init__(self, n_train: int = 16, n_validation: int = 4) -> None:
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_validation}

    def examples(self, split: str) -> list[Example]:
        rng = random.Random(split)
        out = []
        for i in range(self.sizes[split]):
            keys = rng.sample("abcdefghij", rng.randint(3, 8))  # lengths differ: padding
            values = {k: str(rng.randrange(10)) for k in keys}
            asked = rng.choice(keys)
            prompt = " ".join(f"{k}={v}." for k, v in values.items()) + f" {asked}?"
            out.append(Example(f"toy/{split}/{i}", prompt, f" {values[asked]}", {}))
        return out

    def score(self, examples, outputs):
        return {
            "accuracy": [
                float(o.strip()[:1] == e.target.strip())
                for e, o in zip(examples, outputs, strict=True)
            ]
        }


def toy_config(tmp_path: Path, **sections) -> RunConfig:
    data = {
        "model": {"name": "tiny-llama"},
        "memory": dict(SMALL_MEMORY),
        "data": {"task": "toy"},
        "train": {
            "max_steps": 4,
            "batch_size": 4,
            "lr": 1e-2,
            "segment_length": 16,
            "save_every": 2,
            "warmup_steps": 1,
            "mixed_precision": "no",
        },
        "eval": {"every": 2, "max_examples": 4, "generate": False},
        "log": {"every": 1, "tensorboard": False, "progress_bar": False},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    from memllm.core.config import from_dict

    return from_dict(RunConfig, data)


def memory_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "final" / "memory.safetensors")


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_labels_mask_the_prompt_and_keep_eos(tiny):
    _, tok = tiny("llama")
    ex = Example("x", "abcdef", " gh", {})
    (item,) = encode_examples([ex], tok, max_length=None)
    target = tok(" gh", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert item.ids[-len(target) :] == target
    assert item.labels == [-100] * item.prompt_len + target
    (cut,) = encode_examples([ex], tok, max_length=6)  # the prompt loses its beginning
    assert len(cut.ids) == 6 and cut.ids[-4:] == target and cut.ids[:2] == item.ids[4:6]


def test_lr_schedules_and_global_batch_split():
    assert lr_factor(0, "cosine", 2, 10) == 0.5 and lr_factor(1, "constant", 2, 10) == 1.0
    assert lr_factor(2, "cosine", 2, 10) == 1.0 and lr_factor(10, "cosine", 2, 10) == 0.0
    assert lr_factor(6, "linear", 2, 10) == 0.5 and lr_factor(5, "constant", 0, 10) == 1.0
    order = list(range(100))
    # step 1 of a global batch of 2 × 2 accumulation × 2 processes = examples 8..15
    assert micro_batches(order, 1, 2, 2, 2, 0) == [[8, 9], [12, 13]]
    assert micro_batches(order, 1, 2, 2, 2, 1) == [[10, 11], [14, 15]]


def _baseline_config(root: Path) -> RunConfig:
    return toy_config(
        root, train={"max_steps": 6, "keep_last": 1}, eval={"every": 3, "generate": True}
    )


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One run shared by the tests below (training is the slow part)."""
    cfg = _baseline_config(tmp_path_factory.mktemp("baseline"))
    return cfg, train(cfg, task=ToyTask())


def test_training_is_deterministic_and_only_memory_changes(baseline, tmp_path, tiny):
    _, result = baseline
    model = result.model
    reference, _ = tiny("llama")  # the same backbone, untouched
    trained_backbone = {  # the wrapped layer's keys without memllm's wrapper segment
        k.replace(".layer.", ".", 1): v
        for k, v in model.state_dict().items()
        if ".memory." not in k
    }
    for key, value in reference.state_dict().items():
        assert torch.equal(trained_backbone[key], value), key
    assert {id(p) for p in model.parameters() if p.requires_grad} == {
        id(p) for p in memllm.memory_parameters(model)
    }
    again = train(_baseline_config(tmp_path), task=ToyTask())
    first, second = memory_weights(result.output_dir), memory_weights(again.output_dir)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert [r["loss"] for r in records(result.output_dir)] == [
        r["loss"] for r in records(again.output_dir)
    ]
    assert first["layers.1.out_gate"].abs().sum() > 0  # the zero-initialised gate trained


def test_outputs_logs_and_checkpoints(baseline):
    cfg, result = baseline
    out = result.output_dir
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    assert load_run_config(out / "config.yaml") == cfg
    steps = [s for s, _ in complete_checkpoints(out)]
    best = result.summary["best_step"]
    assert steps == sorted({6, best})  # the last one plus the best by validation
    for _, path in complete_checkpoints(out):
        assert {p.name for p in path.iterdir()} == {
            "memory.safetensors",
            "memory_config.json",
            "trainer.pt",
            "rng",
            "state.json",
            "manifest.json",
        }
    train_log = records(out)
    assert [r["step"] for r in train_log] == [1, 2, 3, 4, 5, 6]
    for key in (
        "task_loss",
        "aux_loss",
        "sparsity_loss",
        "entropy_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "memory/layer1/sparsity",
        "memory/layer1/entropy",
    ):
        assert key in train_log[0], key
    first = train_log[0]
    assert first["loss"] == pytest.approx(first["task_loss"] + first["aux_loss"])
    assert first["aux_loss"] == pytest.approx(first["sparsity_loss"] + first["entropy_loss"])
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [3, 6] and "accuracy" in evals[0]
    model, _ = memllm.load_backbone("tiny-llama")
    memllm.load_memory(model, out / "final")  # a normal memory checkpoint


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    # The loss is the mean over the global batch's target tokens however the batch is split.
    # (No regulariser here: it is averaged over segments, and padding adds segments.)
    memory = {**SMALL_MEMORY, "sparsity_weight": 0.0, "entropy_weight": 0.0}
    full = train(
        toy_config(tmp_path / "full", memory=memory, train={"max_steps": 3}), task=ToyTask()
    )
    split = train(
        toy_config(
            tmp_path / "split",
            memory=memory,
            train={"max_steps": 3, "batch_size": 2, "grad_accum_steps": 2},
        ),
        task=ToyTask(),
    )
    for a, b in zip(records(full.output_dir), records(split.output_dir), strict=True):
        assert a["task_loss"] == pytest.approx(b["task_loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    a, b = memory_weights(full.output_dir), memory_weights(split.output_dir)
    for key in a:  # Adam divides by |g|: float noise on tiny gradients moves weights ~1e-5
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


LORA = {"rank": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def test_lora_with_memory_trains_both(tmp_path):
    both = train(toy_config(tmp_path, lora=LORA, train={"max_steps": 2}), task=ToyTask())
    trainable = {id(p) for p in both.model.parameters() if p.requires_grad}
    expected = memllm.memory_parameters(both.model) + memllm.lora_parameters(both.model)
    assert trainable == {id(p) for p in expected}
    adapter = load_file(both.output_dir / "final" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())


def test_lora_only_baseline_trains_and_saves_its_adapter(tmp_path):
    base = train(
        toy_config(tmp_path, memory=None, lora=LORA, train={"max_steps": 2}), task=ToyTask()
    )
    adapter = load_file(base.output_dir / "final" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import memllm.training.forward as loop

    calls = {"n": 0}
    real = loop.forward_segments

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 3:  # step 4 of 1 micro-batch per step (no eval forward before)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "forward_segments", poisoned)
    cfg = toy_config(tmp_path, train={"max_steps": 6, "save_every": 3}, eval={"every": 0})
    with pytest.raises(TrainingDiverged, match=r"step 4: the task loss is nan; stopped") as info:
        train(cfg, task=ToyTask())
    assert "step-00000003" in str(info.value) and "\n" not in str(info.value)
    assert [s for s, _ in complete_checkpoints(cfg.output_dir)] == [3]
    assert not (Path(cfg.output_dir) / "final").exists()


def test_early_stopping(tmp_path):
    cfg = toy_config(
        tmp_path,
        train={"max_steps": 40, "save_every": 0},
        eval={"every": 1, "patience": 2, "min_delta": 100.0},
    )
    result = train(cfg, task=ToyTask())
    assert result.summary["stopped_early"] and result.summary["steps"] == 3
    assert result.summary["best_step"] == 1


def test_max_minutes_stops_training_and_still_saves_a_validated_final(tmp_path, monkeypatch):
    import memllm.training.trainer as loop

    clock = {"now": 1000.0}

    def fake_time():  # every call of the loop's clock is one more minute
        clock["now"] += 60.0
        return clock["now"]

    monkeypatch.setattr(loop.time, "time", fake_time)
    cfg = toy_config(
        tmp_path, train={"max_steps": 40, "save_every": 0, "max_minutes": 2.5}, eval={"every": 0}
    )
    result = train(cfg, task=ToyTask())
    summary = result.summary
    assert summary["stopped_at_time_limit"] and 0 < summary["steps"] < 40
    assert (Path(cfg.output_dir) / "final").is_dir()
    assert [s for s, _ in complete_checkpoints(cfg.output_dir)] == [summary["steps"]]
    evals = [
        json.loads(line) for line in (Path(cfg.output_dir) / "log.jsonl").read_text().splitlines()
    ]
    assert any(r.get("kind") == "eval" and r["step"] == summary["steps"] for r in evals)


def test_data_errors_name_the_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {name: tiny-llama}\n"
        "data: {task: babilong, lenghts: [0k]}\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    cfg = load_run_config(path)
    with pytest.raises(ConfigError, match=rf"^{path}: .*lenghts"):
        train(cfg, source=path)
    with pytest.raises(ConfigError, match="global batch is 64"):
        train(toy_config(tmp_path, train={"batch_size": 64}), source=path, task=ToyTask())


def test_resume_flag_needs_a_checkpoint(tmp_path):
    with pytest.raises(MemllmError, match="--resume: no complete checkpoint"):
        train(toy_config(tmp_path), resume=True, task=ToyTask())


def test_debug_config_end_to_end_through_the_cli(tmp_path, capsys):
    from memllm.cli import main

    out = tmp_path / "debug"
    args = [
        "train",
        "--config",
        str(ROOT / "configs/debug.yaml"),
        f"output_dir={out}",
        "train.max_steps=4",
        "train.save_every=2",
        "eval.every=2",
        "eval.max_examples=4",
        "data.num_train=8",
        "log.progress_bar=false",
    ]
    assert main(args) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    assert (out / "final" / "memory.safetensors").is_file()
    assert list((out / "tensorboard").iterdir())
    assert [s for s, _ in complete_checkpoints(out)] == [2, 4]
    assert main([*args, "--resume"]) == 0  # a finished run resumes to nothing left to do
    assert "trained 4 steps" in capsys.readouterr().out


def test_wandb_is_optional_and_named_when_missing(tmp_path, monkeypatch):
    from memllm.training.logging_utils import RunLogger
    from memllm.training.run_config import LogSettings, WandbSettings

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    settings = LogSettings(tensorboard=False, wandb=WandbSettings(project="p"))
    with pytest.raises(ConfigError, match=r"log\.wandb is set but wandb is not installed"):
        RunLogger(tmp_path, settings, {})
    logger = RunLogger(tmp_path, LogSettings(tensorboard=False), {})  # no wandb: fine
    logger.log(1, {"loss": float("nan"), "lr": 0.1})
    logger.close()
    record = json.loads((tmp_path / "log.jsonl").read_text())
    assert record["loss"] == "nan" and record["lr"] == 0.1  # still valid JSON


def test_kv_retrieval_with_lora_trains_the_adapter_alone(tmp_path):
    """The training-free retrieval plus a LoRA that learns the answer's format: the backbone's
    attention reads retrieved past blocks while its adapter trains, and the checkpoint holds
    the retrieval config and the adapter."""
    kv = {"type": "kv_retrieval", "block_size": 8, "repr_keys": 2, "top_k": 2, "init_tokens": 4}
    cfg = toy_config(tmp_path, memory=None, lora=LORA, train={"max_steps": 2})
    run = train(dataclasses.replace(cfg, memory=kv), task=ToyTask())
    trainable = {id(p) for p in run.model.parameters() if p.requires_grad}
    assert memllm.memory_parameters(run.model) == []
    assert trainable == {id(p) for p in memllm.lora_parameters(run.model)}
    final = run.output_dir / "final"
    adapter = load_file(final / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    assert (
        json.loads((final / "memory_config.json").read_text())["memory"]["type"] == "kv_retrieval"
    )
    assert all(math.isfinite(r["loss"]) for r in records(run.output_dir))
