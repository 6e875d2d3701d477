"""Trainer plug-ins: the trainer calls them generically; the supporting-fact head is one."""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from memllm.core.config import from_dict
from memllm.errors import CheckpointError
from memllm.training.plugins import TrainerPlugin
from memllm.training.run_config import RunConfig
from memllm.training.sp_head import SP_HEAD_FILE
from memllm.training.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import ToyTask, memory_weights, records, toy_config


class Pull:
    """A plug-in with one scalar pulled towards 3: its loss never touches the memory."""

    name = "pull"
    reads_all_positions = False
    file = "pull.safetensors"

    def __init__(self, weight: float = 0.5) -> None:
        self.weight = weight
        self.value = nn.Parameter(torch.zeros(()))
        self.prepared: list[int] = []

    def parameters(self) -> list[nn.Parameter]:
        return [self.value]

    def prepare(self, items, examples) -> None:
        self.prepared.append(len(items))
        for item in items:
            item.extras["pull"] = 1.0

    def observe(self, model):
        return contextlib.nullcontext("seen")

    def loss(self, batch, observed):
        assert observed == "seen" and all(it.extras["pull"] == 1.0 for it in batch.items)
        return (self.value - 3.0) ** 2

    def save(self, directory: Path) -> None:
        save_file({"value": self.value.detach().reshape(1)}, Path(directory) / self.file)

    def load(self, directory: Path) -> None:
        path = Path(directory) / self.file
        if not path.is_file():
            raise CheckpointError(f"{directory}: {self.file} is missing")
        with torch.no_grad():
            self.value.copy_(load_file(path)["value"][0])


def _config(tmp_path: Path, name: str, **train_settings) -> RunConfig:
    # no gradient clipping: the clip's global norm would couple the plug-in to the memory
    settings = {"max_steps": 3, "save_every": 0, "max_grad_norm": None, **train_settings}
    return toy_config(tmp_path / name, train=settings, eval={"every": 0})


def test_a_plugin_adds_its_loss_and_leaves_the_memory_training_as_before(tmp_path):
    plain = train(_config(tmp_path, "plain"), task=ToyTask())
    pull = Pull()
    assert isinstance(pull, TrainerPlugin)
    with_plugin = train(_config(tmp_path, "pull"), task=ToyTask(), plugins=[pull])

    assert pull.prepared == [16, 4]  # the train and the validation items
    a, b = memory_weights(plain.output_dir), memory_weights(with_plugin.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the memory trained exactly as before
    first, second = records(plain.output_dir), records(with_plugin.output_dir)
    assert [r["task_loss"] for r in first] == [r["task_loss"] for r in second]
    assert "pull_loss" not in first[0]
    for r in second:
        assert r["loss"] == pytest.approx(r["task_loss"] + r["aux_loss"] + 0.5 * r["pull_loss"])
    assert second[0]["pull_loss"] == pytest.approx(9.0)  # (0 - 3)² before the first update
    assert second[-1]["pull_loss"] < second[0]["pull_loss"]  # its parameter trains
    assert "pull_loss" in records(with_plugin.output_dir, "eval")[-1]
    assert with_plugin.plugins == {"pull": pull}
    final = load_file(with_plugin.output_dir / "final" / Pull.file)["value"]
    assert float(final[0]) == float(pull.value.detach())


def test_a_plugin_resumes_from_its_checkpoint_and_is_strict(tmp_path):
    reference = Pull()
    train(_config(tmp_path, "reference"), task=ToyTask(), plugins=[reference])
    cfg = _config(tmp_path, "run", save_every=1, keep_last=3)
    train(cfg, task=ToyTask(), plugins=[Pull()])
    checkpoints = Path(cfg.output_dir) / "checkpoints"
    shutil.rmtree(checkpoints / "step-00000003")  # as if the run had stopped after step 2
    resumed = Pull()
    train(cfg, task=ToyTask(), plugins=[resumed])
    # step 3 started from the value saved at step 2
    assert float(resumed.value.detach()) == float(reference.value.detach())
    (checkpoints / "step-00000003" / Pull.file).unlink()
    # listed in the manifest, a missing file is damage: the resume falls back to step 2 (tested
    # in test_disk_safety); a checkpoint that never held it (its manifest agrees) is refused
    from memllm.core.integrity import write_manifest

    write_manifest(checkpoints / "step-00000003")
    with pytest.raises(CheckpointError, match=Pull.file):
        train(cfg, task=ToyTask(), plugins=[Pull()])


HOTPOT = {
    "task": "hotpotqa",
    "num_paragraphs": 2,
    "instruction": False,
    "num_train": 4,
    "num_validation": 2,
    "num_test": 1,
}


def _hotpot_config(tmp_path: Path, name: str) -> RunConfig:
    return from_dict(
        RunConfig,
        {
            "model": {"name": "tiny-llama"},
            "memory": {"type": "latent", "num_slots": 4, "memory_dim": 16, "num_heads": 2},
            "data": HOTPOT,
            "train": {
                "max_steps": 1,
                "batch_size": 4,
                "save_every": 0,
                "mixed_precision": "no",
                "segment_length": 160,
                "supporting_facts_weight": 1.0,
            },
            "eval": {"every": 0, "max_examples": 2, "generate": False},
            "log": {"every": 1, "tensorboard": False, "progress_bar": False},
            "output_dir": str(tmp_path / name),
        },
    )


def test_the_supporting_fact_head_is_a_plugin(tmp_path):
    with_sp = train(_hotpot_config(tmp_path, "sp"))  # built from train.supporting_facts_weight
    without = train(_hotpot_config(tmp_path, "none"), plugins=[])
    assert set(with_sp.plugins) == {"sp"} and without.plugins == {}
    (sp,), (plain,) = records(with_sp.output_dir), records(without.output_dir)
    assert "sp_loss" in sp and "sp_loss" not in plain
    assert sp["task_loss"] == plain["task_loss"]  # the same model before the first update
    assert sp["loss"] == pytest.approx(sp["task_loss"] + sp["aux_loss"] + sp["sp_loss"])
    assert "sp_loss" in records(with_sp.output_dir, "eval")[-1]
    assert (with_sp.output_dir / "final" / SP_HEAD_FILE).is_file()
    assert not (without.output_dir / "final" / SP_HEAD_FILE).exists()
