"""train.distill: KL to the full-context teacher; zero where the student sees what the teacher
sees, cached teacher outputs after the first pass."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import wake_memory

import memllm
from memllm.core.segments import forward_segments
from memllm.errors import ConfigError
from memllm.training.data import Batch
from memllm.training.distill import DistillPlugin, DistillSettings
from memllm.training.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import SMALL_MEMORY, ToyTask, toy_config


def _loss(model, plugin, ids, segment):
    mask = torch.ones_like(ids)
    batch = Batch([f"x{i}" for i in range(len(ids))], ids, mask, ids, [])
    with torch.no_grad():
        out = forward_segments(model, ids, mask, segment_length=segment, keep_logits=True)
        return plugin.loss(batch, out.logits)


@pytest.mark.parametrize("top_k", [None, 8])
def test_zero_when_the_student_sees_what_the_teacher_sees(tiny, top_k):
    model, tok = tiny("llama")
    memllm.inject_memory(model, {**SMALL_MEMORY, "layer_ids": [0]})
    plugin = DistillPlugin(model, DistillSettings(top_k=top_k, temperature=2.0), segment_length=8)
    ids = torch.randint(3, len(tok), (2, 24), generator=torch.Generator().manual_seed(0))
    # an untrained memory is the identity and the input fits one segment: student == teacher
    assert float(_loss(model, plugin, ids, segment=24)) == pytest.approx(0.0, abs=1e-6)
    # three segments: the student lacks the first two
    plugin.cache.clear()
    assert float(_loss(model, plugin, ids, segment=8)) > 1e-3
    wake_memory(model)  # a memory that changes outputs is not the teacher either
    plugin.cache.clear()
    assert float(_loss(model, plugin, ids, segment=24)) > 1e-3


def test_teacher_outputs_are_cached_after_the_first_epoch(tmp_path, monkeypatch):
    rows = []
    real = DistillPlugin._teacher_logits

    def counted(self, ids, mask, width):
        rows.append(ids.shape[0])
        return real(self, ids, mask, width)

    monkeypatch.setattr(DistillPlugin, "_teacher_logits", counted)
    cfg = toy_config(
        tmp_path,
        train={"max_steps": 4, "save_every": 0, "distill": {"weight": 0.5, "top_k": 16}},
        eval={"every": 2},
    )
    result = train(cfg, task=ToyTask(n_train=8))  # 2 steps per epoch: epoch 2 is cached
    assert sum(rows) == 8 + 4  # each train and validation example once
    log = [r for r in map(__import__("json").loads, (result.output_dir / "log.jsonl").open())]
    losses = [r["distill_loss"] for r in log if r["kind"] == "train"]
    assert len(losses) == 4 and all(x > 0 for x in losses)


def test_bad_distill_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"train.distill.temperature: must be > 0"):
        toy_config(tmp_path, train={"distill": {"temperature": 0}})
    with pytest.raises(ConfigError, match=r"train.distill.teacher: .* neither base nor a folder"):
        train(toy_config(tmp_path, train={"distill": {"teacher": "nowhere"}}), task=ToyTask())
