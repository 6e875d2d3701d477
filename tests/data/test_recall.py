"""The recall task: facts before the last segment, latest value wins, splits that share no
key/value assignment, dense questions on one context, closed-set scoring."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memllm.cli import main
from memllm.core.tiny import byte_tokenizer
from memllm.data import TASKS, build_task
from memllm.data import recall as recall_module
from memllm.data.babilong import supporting_facts_in_window
from memllm.data.layout import encode_rows
from memllm.data.recall import NAMES, recall_correct, split_names
from memllm.errors import ConfigError, DataError

BOOKS = str(Path(__file__).parents[1] / "fixtures" / "books")
SPLITS = ("train", "validation", "test")


def small_recall(**overrides):
    options = {
        "num_facts": [1, 4],
        "lengths": ["1k"],
        "num_train": 6,
        "num_validation": 3,
        "num_test": 4,
        "segment_length": 256,
        "distractor": BOOKS,
        "tokenizer": "tiny-llama",  # byte-level: one token per byte
    }
    options.update(overrides)
    return build_task("recall", options)


def test_registered_with_the_other_tasks(capsys):
    assert TASKS["recall"].task_cls is recall_module.RecallTask
    assert main(["data", "tasks"]) == 0
    assert "recall" in capsys.readouterr().out
    argv = ["data", "preview", "recall", "-n", "1", "--set", f"distractor={BOOKS}"]
    argv += ["--set", "tokenizer=tiny-llama", "--set", "lengths=[1k]"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("=== recall/k1/1k/test/0") and "What is the locker number of" in out


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_every_fact_lies_before_the_last_segment(k):
    task = small_recall(num_facts=[k], lengths=["1k", "2k"])
    tok = byte_tokenizer()
    for split in SPLITS:
        for ex in task.examples(split):
            meta = ex.meta
            assert len(meta["facts"]) == k and meta["facts_before_last_segment"]
            context = ex.prompt.rsplit("\n\nQuestion:", 1)[0]
            assert [context[s:e] for s, e in meta["fact_spans"]] == meta["facts"]
            # every fact ends at least segment_length bytes (= tokens) before the prompt's end
            last_end = max(e for _, e in meta["fact_spans"])
            assert len(ex.prompt.encode()) - len(context[:last_end].encode()) >= 256
            assert supporting_facts_in_window(ex.prompt, ex, tok, 256) is False
            assert ex.target == " " + meta["answer"] and meta["answer"] in task.labels
            assert meta["group"] == f"k{k}/{meta['length']}"


def test_lengths_are_budgets_in_tokens_and_0k_is_the_facts_alone():
    task = small_recall(lengths=["0k", "1k"], num_facts=[4])
    by_length = {}
    for ex in task.examples("test"):
        by_length.setdefault(ex.meta["length"], []).append(ex)
    for ex in by_length["0k"]:
        assert ex.prompt.startswith(ex.meta["facts"][0])
        assert ex.meta["facts_before_last_segment"] is False  # no text to put them before
    for ex in by_length["1k"]:
        assert abs(ex.meta["context_tokens"] - (1024 - 32)) <= 0.02 * 1024
        assert len(ex.prompt.rsplit("\n\nQuestion:", 1)[0].encode()) == ex.meta["context_tokens"]
    # the same story at every length: lengths compare paired
    assert [e.meta["facts"] for e in by_length["0k"]] == [e.meta["facts"] for e in by_length["1k"]]


def test_with_overwrites_the_latest_value_is_the_answer():
    task = small_recall(num_facts=[2, 4], overwrites=2, lengths=["0k"], num_test=20)
    for ex in task.examples("test"):
        key, facts = ex.meta["key"], ex.meta["facts"]
        about = [i for i, f in enumerate(facts) if f"The locker of {key} is" in f]
        assert len(about) == 2 and ex.meta["overwritten"]
        first, latest = (facts[i].rsplit(" ", 1)[1].rstrip(".") for i in about)
        assert first != latest and ex.meta["answer"] == latest
        assert ex.meta["supporting"] == [about[-1]]


def test_splits_share_no_key_and_no_assignment():
    names = split_names(42)
    assert sum(len(v) for v in names.values()) == len(NAMES)
    assert not set(names["train"]) & set(names["test"])
    assert not set(names["validation"]) & (set(names["test"]) | set(names["train"]))
    task = small_recall(lengths=["0k"], num_train=50, num_test=50)
    keys = {s: {k for ex in task.examples(s) for k in _keys(ex)} for s in SPLITS}
    assert keys["train"] <= set(names["train"]) and keys["test"] <= set(names["test"])


def _keys(ex):
    return [f.split(" ")[3] for f in ex.meta["facts"]]


def test_splits_sharing_an_assignment_are_refused(monkeypatch):
    shared = tuple(NAMES[:10])
    monkeypatch.setattr(recall_module, "split_names", lambda seed: dict.fromkeys(SPLITS, shared))
    task = small_recall(lengths=["0k"], num_values=2)
    shares = r"^recall K=1: the \w+ and \w+ splits share the key/value assignment \w+ → \d\d$"
    with pytest.raises(DataError, match=shares):
        task.examples("test")


def test_stories_are_seeded():
    a = [ex.prompt for ex in small_recall().examples("test")]
    assert a == [ex.prompt for ex in small_recall().examples("test")]
    assert a != [ex.prompt for ex in small_recall(seed=7).examples("test")]


def test_dense_questions_share_one_context():
    task = small_recall(num_facts=[4], questions_per_story="all", overwrites=1)
    train = task.examples("train")
    assert len(train) == 6 * 4
    by_context = {}
    for ex in train:
        by_context.setdefault(ex.meta["context_id"], []).append(ex)
    assert len(by_context) == 6
    for group in by_context.values():
        contexts = {ex.prompt.rsplit("\n\nQuestion:", 1)[0] for ex in group}
        assert len(contexts) == 1 and len({ex.meta["key"] for ex in group}) == 4
        for ex in group:  # each key answered with its latest value
            latest = [f for f in ex.meta["facts"] if f" {ex.meta['key']} " in f][-1]
            assert latest.endswith(f" {ex.meta['answer']}.")
    # validation and test stay one question per story
    assert len(task.examples("test")) == 4
    assert len({ex.meta["context_id"] for ex in task.examples("test")}) == 4


def test_question_in_its_own_segment():
    task = small_recall(question_segment="own", instruction="Answer with the number.")
    tok = byte_tokenizer()
    for ex in task.examples("test"):
        assert ex.question_part.startswith("Answer with the number.\n\nQuestion: What is")
        assert ex.prompt == f"{ex.context_part}\n\n{ex.question_part}"
        (row,) = encode_rows([ex], tok, segment_length=128)
        last = [i for i, m in zip(row.ids[-128:], row.mask[-128:], strict=True) if m]
        assert tok.decode(last) == ex.question_part + ex.target + "</s>"
        assert supporting_facts_in_window(ex.prompt, ex, tok, 128) is False


def test_closed_set_scoring_and_chance():
    labels = {str(n) for n in range(10, 30)}
    assert recall_correct("17", " 17", labels)
    assert recall_correct("17", "Number 17.\nAnd 12", labels)  # only the first line counts
    assert not recall_correct("17", "17 or 12", labels)
    assert not recall_correct("17", "117", labels) and not recall_correct("17", "", labels)
    task = small_recall(num_values=20)
    assert task.chance == pytest.approx(0.05) and len(task.labels) == 20
    examples = task.examples("test")[:2]
    outputs = [" " + examples[0].meta["answer"], "no idea"]
    assert task.score(examples, outputs) == {"accuracy": [1.0, 0.0]}


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"num_facts": [0]}, "num_facts[0]"),
        ({"num_facts": [2], "overwrites": 3}, "overwrites"),
        ({"num_values": 1}, "num_values"),
        ({"lengths": ["huge"]}, "lengths[0]"),
        ({"question_segment": "alone"}, "question_segment"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_options_are_strict(options, key):
    with pytest.raises(ConfigError, match=re.escape(f"data.{key}")):
        build_task("recall", options, key_prefix="data.")


def test_experiment_with_the_question_in_its_own_segment(tmp_path, tiny):
    """Every arm runs; window and the no-carry control read only the question, base all."""
    import json

    import yaml

    from memllm.data.base import Example
    from memllm.data.layout import generate_examples

    latent = {"type": "latent", "num_slots": 4, "memory_dim": 16, "num_heads": 2}
    config = {
        "name": "recall",
        "model": {"name": "tiny-llama"},
        "data": {
            "task": "recall",
            "num_facts": [2],
            "lengths": ["0k"],
            "question_segment": "own",
            "num_train": 8,
            "num_validation": 4,
            "num_test": 6,
            "tokenizer": "tiny-llama",
        },
        "segment_length": 80,
        "train": {"max_steps": 2, "batch_size": 4, "save_every": 0, "mixed_precision": "no"},
        "validation": {"every": 0, "max_examples": 4, "generate": False},
        "log": {"every": 1, "tensorboard": False, "progress_bar": False},
        "eval": {"max_new_tokens": 3, "batch_size": 4},
        "arms": {
            "base": {"kind": "base"},
            "window": {"kind": "window"},
            "latent": {"kind": "memory", "memory": latent},
            "control": {"kind": "memory", "memory": latent, "carry": False},
        },
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["experiment", "--config", str(path)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["arms"]) == ["base", "window", "latent", "control"]
    sizes = results["breakdowns"]["where the supporting facts are"]["sizes"]
    assert sizes["facts earlier"] == 6 and not sizes.get("facts in window")
    # window's answers are those it gives with no context at all
    rows = (tmp_path / "out" / "arms" / "window" / "predictions.jsonl").read_text().splitlines()
    task = build_task("recall", {k: v for k, v in config["data"].items() if k != "task"})
    bare = [
        Example(
            ex.id, ex.question_part, ex.target, {}, context_part="", question_part=ex.question_part
        )
        for ex in task.examples("test")
    ]
    model, tok = tiny("llama")
    assert [json.loads(r)["output"] for r in rows] == generate_examples(
        model, tok, bare, segment_length=80, max_new_tokens=3
    )
