"""Checkpoints and resume: atomic checkpoints, and a resumed run ends bit-identical on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memllm.training.checkpointing import complete_checkpoints
from memllm.training.run_config import load_run_config
from memllm.training.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from test_train import ToyTask, toy_config  # noqa: E402


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "final" / "memory.safetensors")


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def logged_steps(run_dir) -> list[int]:
    lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_resume_after_a_crash_is_exact(tmp_path, monkeypatch):
    # dropout and persistent memory make the RNG state and the carried memory part of the run
    sections = {
        "memory": {
            "type": "latent",
            "num_slots": 4,
            "memory_dim": 16,
            "num_heads": 2,
            "dropout": 0.2,
        },
        "train": {"max_steps": 6, "save_every": 2, "persistent_memory": True},
        "eval": {"every": 3},
    }
    reference = train(toy_config(tmp_path / "ref", **sections), task=ToyTask())

    cfg = toy_config(tmp_path / "crash", **sections)
    real_step = Trainer.train_step
    calls = {"n": 0}

    def crash_on_step_5(self, batches):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", crash_on_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, task=ToyTask())
    monkeypatch.undo()
    # the last two (keep_last=2) and the best by validation, here the same step 3
    assert [s for s, _ in complete_checkpoints(cfg.output_dir)] == [3, 4]
    # debris of a crash while writing: neither looks like a checkpoint
    root = Path(cfg.output_dir) / "checkpoints"
    (root / ".tmp-step-00000005").mkdir()
    (root / "step-00000005").mkdir()
    (root / "step-00000005" / "memory.safetensors").write_bytes(b"half")

    resumed = train(cfg, task=ToyTask())
    assert_bit_identical(final_weights(reference.output_dir), final_weights(resumed.output_dir))
    assert logged_steps(cfg.output_dir) == [1, 2, 3, 4, 5, 6]  # the log reads as one run
    assert not (root / ".tmp-step-00000005").exists()


DRIVER = """
import sys, time
import memllm.training.trainer as loop
real = loop.Trainer.train_step
def slow(self, batches):  # slow the run down so that the kill lands mid-training
    time.sleep(0.4)
    return real(self, batches)
loop.Trainer.train_step = slow
from memllm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _overrides(out: Path) -> list[str]:
    return [
        f"output_dir={out}",
        "train.max_steps=8",
        "train.save_every=2",
        "eval.every=4",
        "eval.max_examples=4",
        "data.num_train=32",
        "log.tensorboard=false",
        "log.progress_bar=false",
    ]


def test_sigkill_mid_training_then_resume_is_exact(tmp_path):
    config = str(ROOT / "configs/debug.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = tmp_path / "killed"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(driver), "train", "--config", config, *_overrides(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while not complete_checkpoints(out):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists()  # killed mid-training
    killed_at = complete_checkpoints(out)[-1][0]
    assert killed_at < 8

    # resume in this process (one interpreter start less): the same code path as the CLI's
    resumed = train(load_run_config(config, _overrides(out)), source=config, resume=True)
    assert resumed.summary["steps"] == 8
    reference = train(load_run_config(config, _overrides(tmp_path / "reference")), source=config)
    assert_bit_identical(final_weights(reference.output_dir), final_weights(out))
    assert logged_steps(out) == logged_steps(reference.output_dir)


def test_resume_refuses_a_checkpoint_trained_with_other_settings(tmp_path):
    """A finished run resumed with another learning rate would report a memory its config does
    not describe; training longer or logging differently is a resume."""
    from memllm.errors import ConfigError

    first = train(toy_config(tmp_path, train={"max_steps": 2}), task=ToyTask())
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.01 → 0\.5.*new output_dir") as err:
        train(toy_config(tmp_path, train={"max_steps": 2, "lr": 0.5}), task=ToyTask())
    assert str(first.output_dir) in str(err.value)
    longer = train(
        toy_config(tmp_path, train={"max_steps": 4}, log={"every": 2}, eval={"every": 4}),
        task=ToyTask(),
    )
    assert logged_steps(longer.output_dir)[-1] == 4
