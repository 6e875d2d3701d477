"""BabiLong built offline: splits that share no story, dense qa1 questions on one context, and
the question in its own segment."""

from __future__ import annotations

from pathlib import Path

import pytest

from memllm.core.tiny import byte_tokenizer
from memllm.data import build_task
from memllm.data.babi import find_babi, group_stories, load_babi, story_text
from memllm.data.babilong import BabiLongTask, supporting_facts_in_window
from memllm.data.babilong_prompts import OFFICIAL_PROMPTS
from memllm.data.layout import encode_rows
from memllm.errors import ConfigError, DataError

BOOKS = str(Path(__file__).parents[1] / "fixtures" / "books")
SPLITS = ("train", "validation", "test")

try:
    find_babi()
    HAVE_BABI = True
except DataError:
    HAVE_BABI = False
pytestmark = pytest.mark.skipif(not HAVE_BABI, reason="bAbI data (shared/data/babi) not found")


def babilong(**overrides):
    options = {
        "tasks": ["qa1"],
        "lengths": ["0k"],
        "num_train": 40,
        "num_validation": 12,
        "num_test": 10,
        "distractor": BOOKS,
        "tokenizer": "tiny-llama",
    }
    options.update(overrides)
    return build_task("babilong", options)


@pytest.mark.parametrize("qa", ["qa1", "qa4"])
def test_splits_share_no_story(qa):
    """qa4's two-fact stories are mostly told in the test file too: they stay out of train."""
    task = babilong(tasks=[qa], num_train=300, num_validation=50)
    samples = {s: task.babi_samples(s, qa) for s in SPLITS}
    stories = {s: {x.story for x in samples[s]} for s in SPLITS}
    assert not stories["train"] & stories["validation"]  # validation: held-out whole stories
    test_texts = {story_text(g) for g in group_stories(load_babi(qa, "test")).values()}
    train_file = group_stories(load_babi(qa, "train", lang="en-10k"))
    for split in ("train", "validation"):
        texts = {story_text(train_file[x.story]) for x in samples[split]}
        assert not texts & test_texts
    assert len(samples["train"]) == 300 and len(samples["validation"]) == 50
    task.examples("train")  # the check passes


def test_splits_that_share_a_story_are_refused(monkeypatch):
    original = BabiLongTask.babi_samples

    def leaky(self, split, task):  # validation = the first train samples
        return original(self, "train" if split == "validation" else split, task)[:5]

    monkeypatch.setattr(BabiLongTask, "babi_samples", leaky)
    with pytest.raises(DataError, match=r"^babilong qa1: the train and validation splits share "):
        babilong().examples("test")


def test_dense_questions_ask_every_person_at_the_end_of_a_story():
    task = babilong(questions_per_story="all", num_train=5, lengths=["1k"])
    train = task.examples("train")
    by_context = {}
    for ex in train:
        by_context.setdefault(ex.meta["context_id"], []).append(ex)
    assert len(by_context) == 5 and len(train) > 5
    for group in by_context.values():
        contexts = {ex.prompt.split("<context>\n", 1)[1].split("\n</context>")[0] for ex in group}
        assert len(contexts) == 1
        assert len({ex.meta["question"] for ex in group}) == len(group)
        for ex in group:  # the answer is the person's latest place, the supporting fact says so
            who = ex.meta["question"].removeprefix("Where is ").rstrip("?")
            (i,) = ex.meta["supporting"]
            fact = ex.meta["facts"][i]
            assert fact.startswith(who + " ") and fact.endswith(f" {ex.meta['answer']}.")
            assert not any(f.startswith(who + " ") for f in ex.meta["facts"][i + 1 :])
    # validation and test keep their one bAbI question per story
    assert all("context_id" in ex.meta for ex in task.examples("test"))
    assert len(task.examples("test")) == 10
    with pytest.raises(ConfigError, match="questions_per_story"):
        babilong(tasks=["qa2"], questions_per_story="all")


def test_the_question_segment_is_the_same_at_every_length():
    """Only the haystack grows with the length: the same test stories, and the question's own
    segment (all that window and a no-carry control read) identical, so their answers are the
    same on every BabiLong rung and any gain at a longer length was carried."""
    by_length = {
        le: babilong(question_segment="own", lengths=[le]).examples("test")
        for le in ("0k", "1k", "2k")
    }
    rows = {
        le: [(e.question_part, e.target, e.meta["question"]) for e in exs]
        for le, exs in by_length.items()
    }
    assert len(rows["0k"]) == 10 and rows["0k"] == rows["1k"] == rows["2k"]
    contexts = [len(e.context_part) for e in (by_length[le][0] for le in ("0k", "1k", "2k"))]
    assert contexts == sorted(contexts) and len(set(contexts)) == 3  # the haystack grows


def test_official_prompt_travels_with_the_question_in_its_own_segment():
    task = babilong(question_segment="own", lengths=["1k"])
    tok = byte_tokenizer()
    parts = OFFICIAL_PROMPTS["qa1"]
    for ex in task.examples("test"):
        assert ex.context_part.startswith("<context>\n") and ex.context_part.endswith("</context>")
        assert ex.question_part.startswith(parts["instruction"])
        assert parts["examples"] in ex.question_part and parts["post_prompt"] in ex.question_part
        assert ex.question_part.endswith(f"Question: {ex.meta['question']}\nAnswer:")
        (row,) = encode_rows([ex], tok, segment_length=1536)
        last = [i for i, m in zip(row.ids[-1536:], row.mask[-1536:], strict=True) if m]
        assert tok.decode(last) == ex.question_part + ex.target + "</s>"
        assert tok.decode(row.ids[:-1536]) == ex.context_part
        assert supporting_facts_in_window(ex.prompt, ex, tok, 1536) is False
    # plain prompts: the question alone
    ex = babilong(question_segment="own", prompt="plain").examples("test")[0]
    assert ex.question_part == f"Question: {ex.meta['question']}\nAnswer:"
