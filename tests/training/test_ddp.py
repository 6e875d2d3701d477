"""Data parallel: 2 CPU processes (gloo) take the same steps as 1 process with the same global
batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memllm.training.run_config import load_run_config
from memllm.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/debug.yaml")


def _overrides(out: Path, batch_size: int) -> list[str]:
    return [
        f"output_dir={out}",
        f"train.batch_size={batch_size}",
        "train.max_steps=4",
        # every bAbI prompt is longer than 64 tokens: cutting them to one length means no padding,
        # so both runs see identical segments and only the summation order differs
        "train.max_length=64",
        "train.segment_length=32",
        "train.save_every=2",
        "eval.every=2",
        "eval.max_examples=8",
        "data.num_train=16",
        "log.tensorboard=false",
        "log.progress_bar=false",
    ]


def _train_log(run_dir: Path) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] in ("train", "eval")]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    two = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    # `accelerate launch`: --multi_gpu selects its torchrun launcher, ACCELERATE_USE_CPU makes
    # the processes use gloo on the CPU
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "memllm", "train", "--config", CONFIG, *_overrides(two, batch_size=2),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 4
    assert (two / "checkpoints" / "step-00000004" / "rng" / "rank1.pt").is_file()

    one = train(load_run_config(CONFIG, _overrides(tmp_path / "one", batch_size=4)))
    assert one.summary["processes"] == 1 and one.summary["global_batch"] == 4

    for a, b in zip(_train_log(one.output_dir), _train_log(two), strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    ref = load_file(one.output_dir / "final" / "memory.safetensors")
    got = load_file(two / "final" / "memory.safetensors")
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5)
