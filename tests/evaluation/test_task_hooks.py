"""Task hooks: what a task adds to an experiment beyond scoring its generations."""

from __future__ import annotations

import dataclasses

import pytest

from memllm.core.backbone import load_tokenizer
from memllm.data import build_task
from memllm.data.babilong import supporting_facts_in_window
from memllm.data.base import Breakdown, Example, ModelScores, Reading, Task
from memllm.data.prompting import format_example

BABILONG = {
    "tasks": ["qa1", "qa2"],
    "lengths": ["0k"],
    "prompt": "plain",
    "num_train": 2,
    "num_validation": 1,
    "num_test": 8,
    "tokenizer": "tiny-llama",
}


class PlainTask(Task):
    """A task that declares none of the hooks."""

    name = "plain"
    max_new_tokens = 4

    def examples(self, split: str) -> list[Example]:
        return [Example(f"plain/{i}", f"Question {i}?", " yes") for i in range(3)]

    def score(self, examples, outputs):
        return {"accuracy": [float(o.strip() == "yes") for o in outputs]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


@pytest.fixture(scope="module")
def babilong():
    task = build_task("babilong", BABILONG)
    return task, task.examples("test")


def test_a_task_without_hooks_adds_no_scores_and_no_breakdown(tokenizer):
    task = PlainTask()
    examples = task.examples("test")
    reading = Reading(16, outputs=["yes"] * 3, reference_model=lambda: pytest.fail("loaded"))
    assert isinstance(task, Task)
    assert task.model_scores(object(), tokenizer, examples, reading) == ModelScores({}, [])
    assert task.breakdown(examples, tokenizer, reading) is None
    assert task.checkpoint_heads("nowhere", object(), {"supporting_facts_weight": 1.0}) == {}


def _facts_reach(examples, tokenizer, segment_length: int, chat: bool) -> dict[str, str]:
    """What the experiment computed itself before BabiLong had the hook (its _facts_reach)."""
    if not all(ex.meta.get("facts") for ex in examples):
        return {}
    reach = {}
    for ex in examples:
        text = format_example(tokenizer, ex.prompt, ex.target, chat)[0]
        inside = supporting_facts_in_window(text, ex, tokenizer, segment_length)
        if inside is None:
            return {}
        reach[ex.id] = "facts in window" if inside else "facts earlier"
    return reach


@pytest.mark.parametrize("segment", [40, 120, 10_000])
def test_babilong_breakdown_is_where_the_supporting_facts_are(babilong, tokenizer, segment):
    task, examples = babilong
    split = task.breakdown(examples, tokenizer, Reading(segment))
    assert isinstance(split, Breakdown)
    assert split.labels == _facts_reach(examples, tokenizer, segment, chat=False)
    assert split.key == "where the supporting facts are"
    assert list(split.order) == ["facts in window", "facts earlier"]
    assert f"lies in the last {segment} tokens of the prompt" in split.description
    if segment == 10_000:  # every prompt fits
        assert set(split.labels.values()) == {"facts in window"}
    if segment == 40:  # the prompts here are 90 to 840 bytes: some facts lie earlier
        assert "facts earlier" in split.labels.values()


def test_babilong_files_without_facts_have_no_breakdown(babilong, tokenizer):
    task, examples = babilong
    bare = [
        dataclasses.replace(ex, meta={k: v for k, v in ex.meta.items() if k != "facts"})
        for ex in examples
    ]
    assert task.breakdown(bare, tokenizer, Reading(64)) is None


def test_zsre_and_hotpotqa_checkpoint_hooks_need_no_head_when_none_is_trained(tmp_path):
    for name in ("zsre", "hotpotqa"):
        task = build_task(name, {"num_train": 2, "num_validation": 1, "num_test": 2})
        assert task.checkpoint_heads(tmp_path, object(), {}) == {}
