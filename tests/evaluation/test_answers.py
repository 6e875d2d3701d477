"""Saved answers: an interrupted evaluation resumes, shards split one arm, stale answers are not
reused (memllm.evaluation.answers)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from memllm.cli import main
from memllm.errors import ConfigError
from memllm.evaluation.answers import AnswerStore, fingerprint, parse_shard, plan_batches
from tests.evaluation.test_experiment import CONFIG

# Arms that answer without training: base, window and an untrained memory (its initial weights
# are seeded, so every process builds the same one). Six questions in batches of two.
READY = {
    **CONFIG,
    "eval": {**CONFIG["eval"], "batch_size": 2},
    "arms": {
        "base": {"kind": "base"},
        "window": {"kind": "window"},
        "latent_untrained": {
            "kind": "memory",
            "untrained": True,
            "memory": {"type": "latent", "num_slots": 4, "memory_dim": 16, "num_heads": 2},
        },
    },
}


def _write(tmp_path, config, folder="out"):
    path = tmp_path / f"{folder}.yaml"
    path.write_text(
        yaml.safe_dump({**config, "output_dir": str(tmp_path / folder)}, sort_keys=False)
    )
    return path


def _results(tmp_path, folder="out"):
    return json.loads((tmp_path / folder / "results.json").read_text())


def _answer_lines(tmp_path, arm, folder="out"):
    path = tmp_path / folder / "arms" / arm / "answers.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batches_are_the_same_however_the_work_is_split():
    order = [5, 2, 7, 0, 1, 6, 3, 4]  # longest first
    whole = plan_batches(order, 3)
    assert whole == [[5, 2, 7], [0, 1, 6], [3, 4]]
    shards = [plan_batches(order, 3, shard=(k, 2)) for k in range(2)]
    assert shards == [[[5, 2, 7], [3, 4]], [[0, 1, 6]]]  # every batch in one shard, whole
    # answered examples are left out of their batch; the other batches do not move
    assert plan_batches(order, 3, answered={2, 0, 1, 6}) == [[5, 7], [3, 4]]
    assert plan_batches(order, 3, shard=(1, 2), answered={0, 1, 6}) == []


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_a_bad_shard_is_one_line(text):
    with pytest.raises(ConfigError, match="--shard: expected K/N"):
        parse_shard(text)
    assert parse_shard("2/3") == (1, 3) and parse_shard(None) is None


def test_the_fingerprint_follows_what_decides_an_answer():
    settings = {
        "name": "a",
        "model": {"name": "tiny-llama"},
        "eval": {"max_new_tokens": 3, "batch_size": 4, "max_examples": 10},
        "arms": {"x": {"kind": "memory"}, "y": {"kind": "window"}},
        "output_dir": "runs/a",
    }
    weights = [("memory.w", torch.ones(3))]
    same = fingerprint(settings, "x", weights)
    moved = {
        **settings,
        "name": "b",
        "output_dir": "elsewhere",
        "eval": {**settings["eval"], "batch_size": 1, "max_examples": 20},
        "arms": {**settings["arms"], "y": {"kind": "base"}},  # another arm's settings
    }
    assert fingerprint(moved, "x", weights) == same
    assert fingerprint(settings, "x", [("memory.w", torch.tensor([1.0, 1.0, 1.5]))]) != same
    longer = {**settings, "eval": {**settings["eval"], "max_new_tokens": 4}}
    assert fingerprint(longer, "x", weights) != same
    assert fingerprint(settings, "y", weights) != same


def test_a_line_cut_short_is_skipped(tmp_path):
    store = AnswerStore(tmp_path, "abc")
    store.append(["q1", "q2"], ["kitchen", "garden"], 2.0)
    with open(store.path, "a") as f:
        f.write('{"fingerprint": "abc", "id": "q3", "out')  # killed mid-write
    AnswerStore(tmp_path, "other").append(["q1"], ["hallway"], 1.0)
    answers, stale = store.load()
    assert answers == {"q1": ("kitchen", 1.0), "q2": ("garden", 1.0)} and stale == 1


def test_an_interrupted_arm_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Answers are saved batch by batch; a rerun generates only the missing ones and scores
    what an uninterrupted run scores."""
    config = {**READY, "arms": {"latent_untrained": READY["arms"]["latent_untrained"]}}
    assert main(["experiment", "--config", str(_write(tmp_path, config, "whole"))]) == 0
    whole = _results(tmp_path, "whole")["arms"]["latent_untrained"]

    real, batches = AnswerStore.append, []

    def stop_after_two(self, ids, outputs, seconds):
        real(self, ids, outputs, seconds)
        batches.append(list(ids))
        if len(batches) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(AnswerStore, "append", stop_after_two)
    path = _write(tmp_path, config)
    assert main(["experiment", "--config", str(path)]) == 130
    assert len(_answer_lines(tmp_path, "latent_untrained")) == 4
    batches.clear()
    assert main(["experiment", "--config", str(path)]) == 0
    assert len(batches) == 1 and len(batches[0]) == 2  # only the third batch was generated
    resumed = _results(tmp_path)["arms"]["latent_untrained"]
    assert resumed["per_example"] == whole["per_example"]
    assert resumed["eval_time_s"] > 0
    rows = (tmp_path / "out" / "arms" / "latent_untrained" / "predictions.jsonl").read_text()
    expected = (tmp_path / "whole" / "arms" / "latent_untrained" / "predictions.jsonl").read_text()
    assert rows == expected


def test_shards_answer_one_arm_between_them(tmp_path, capsys):
    """Two processes with --shard 1/2 and 2/2 on one folder: the first saves its answers and
    writes no result for the arms, the second completes them; the report equals one run's."""
    assert main(["experiment", "--config", str(_write(tmp_path, READY, "whole"))]) == 0
    whole = _results(tmp_path, "whole")
    path = _write(tmp_path, READY)
    assert main(["experiment", "--config", str(path), "--shard", "1/2"]) == 0
    assert "this shard's answers are saved" in capsys.readouterr().out
    assert not (tmp_path / "out" / "results.json").exists()
    first = {arm: len(_answer_lines(tmp_path, arm)) for arm in READY["arms"]}
    assert first == {arm: 4 for arm in READY["arms"]}  # batches 1 and 3 of 3, two each
    assert main(["experiment", "--config", str(path), "--shard", "2/2"]) == 0
    sharded = _results(tmp_path)
    assert list(sharded["arms"]) == list(READY["arms"])
    for arm in READY["arms"]:
        assert sharded["arms"][arm]["per_example"] == whole["arms"][arm]["per_example"]
        assert len(_answer_lines(tmp_path, arm)) == 6  # nothing answered twice
    assert "vs_window" in sharded["arms"]["latent_untrained"]["comparisons"]


def test_answers_from_other_settings_are_not_reused(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="memllm")
    config = {**READY, "arms": {"window": READY["arms"]["window"]}}
    path = _write(tmp_path, config)
    assert main(["experiment", "--config", str(path)]) == 0
    answers = tmp_path / "out" / "arms" / "window" / "answers.jsonl"
    # a saved answer is taken as it is: the rerun scores it instead of generating again
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    answers.write_text("".join(json.dumps({**r, "output": "nowhere"}) + "\n" for r in rows))
    assert main(["experiment", "--config", str(path)]) == 0
    assert "6 of 6 answers reused" in caplog.text
    outputs = (tmp_path / "out" / "arms" / "window" / "predictions.jsonl").read_text()
    assert {json.loads(line)["output"] for line in outputs.splitlines()} == {"nowhere"}
    # another generation length: those answers are stale, every example is generated again
    changed = {**config, "eval": {**config["eval"], "max_new_tokens": 2}}
    assert main(["experiment", "--config", str(_write(tmp_path, changed))]) == 0
    assert "6 answers in" in caplog.text and "not reused" in caplog.text
    outputs = (tmp_path / "out" / "arms" / "window" / "predictions.jsonl").read_text()
    assert "nowhere" not in outputs


def test_a_shard_refuses_an_arm_that_would_train(tmp_path, capsys):
    assert main(["experiment", "--config", str(_write(tmp_path, CONFIG)), "--shard", "1/2"]) == 2
    err = capsys.readouterr().err
    assert "--shard 1/2: arm latent trains in this run" in err and len(err.splitlines()) == 1
