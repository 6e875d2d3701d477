"""train.curriculum: stages advance at the right step, rebuild the data, and resume exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from memllm.errors import ConfigError
from memllm.training.trainer import Trainer, train

sys.path.insert(0, str(Path(__file__).parent))
from test_resume import assert_bit_identical, final_weights
from test_train import ToyTask, records, toy_config


class StagedToy(ToyTask):
    """The toy task whose ``n_train`` a curriculum stage can change."""

    def with_options(self, options: dict) -> StagedToy:
        return StagedToy(n_train=options.get("n_train", self.sizes["train"]))


STAGES = [
    {"steps": 2, "segments": 1},  # the question's segment only
    {"steps": 2, "data": {"n_train": 8}},
    {"data": {"n_train": 12}},
]


def test_stages_advance_at_their_steps(tmp_path):
    cfg = toy_config(tmp_path, train={"max_steps": 6, "curriculum": STAGES, "save_every": 0})
    result = train(cfg, task=StagedToy())
    stages = records(result.output_dir, "curriculum")
    assert [(r["step"], r["stage"], r["train_examples"]) for r in stages] == [(2, 1, 8), (4, 2, 12)]
    assert result.summary["steps"] == 6


def test_a_validation_threshold_advances_the_stage(tmp_path):
    stages = [{"until": {"metric": "loss", "value": 1e9}}, {"data": {"n_train": 8}}]
    cfg = toy_config(tmp_path, train={"max_steps": 4, "curriculum": stages}, eval={"every": 2})
    result = train(cfg, task=StagedToy())
    assert [(r["step"], r["stage"]) for r in records(result.output_dir, "curriculum")] == [(2, 1)]


def test_a_run_killed_in_stage_two_resumes_exactly(tmp_path, monkeypatch):
    sections = {"train": {"max_steps": 6, "curriculum": STAGES, "save_every": 1, "keep_last": 1}}
    reference = train(toy_config(tmp_path / "ref", **sections), task=StagedToy())
    real_step = Trainer.train_step
    calls = {"n": 0}

    def crash_on_step_4(self, batches):
        calls["n"] += 1
        if calls["n"] == 4:  # step 4 is the second step of stage 2
            raise RuntimeError("simulated crash")
        return real_step(self, batches)

    cfg = toy_config(tmp_path / "crash", **sections)
    monkeypatch.setattr(Trainer, "train_step", crash_on_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, task=StagedToy())
    monkeypatch.undo()
    resumed = train(cfg, task=StagedToy())
    assert_bit_identical(final_weights(reference.output_dir), final_weights(resumed.output_dir))
    assert [r["step"] for r in records(resumed.output_dir, "curriculum")] == [2, 4]


@pytest.mark.parametrize(
    ("train_section", "message"),
    [
        ({"curriculum": [{"steps": 2}]}, "train.curriculum: needs train.max_steps"),
        ({"max_steps": 4, "curriculum": [{}, {}]}, r"train.curriculum\[0\]: needs steps or until"),
        ({"max_steps": 4, "curriculum": [{"steps": 0}]}, r"train.curriculum\[0\].steps: must be"),
        (
            {"max_steps": 4, "curriculum": [{"steps": 1, "until": {"metric": "loss", "value": 1}}]},
            r"train.curriculum\[0\].until: give steps or until",
        ),
        ({"max_steps": 4, "curriculum": [{"stepz": 1}]}, r"unknown key train.curriculum\[0\]"),
    ],
)
def test_bad_curricula_are_one_line_errors(tmp_path, train_section, message):
    with pytest.raises(ConfigError, match=message):
        toy_config(tmp_path, train={"max_steps": None, **train_section})
