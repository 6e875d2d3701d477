"""The pretraining corpus, the task registry, and that nothing reaches a hub."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from memllm.core.backbone import load_tokenizer
from memllm.data import TASKS, Example, Task, build_task
from memllm.data.babi import find_babi
from memllm.errors import ConfigError, DataError

FIXTURES = Path(__file__).parents[1] / "fixtures"
BOOKS = FIXTURES / "books"


def test_registry():
    assert set(TASKS) == {"babilong", "hotpotqa", "zsre", "corpus", "recall", "qa"}
    for spec in TASKS.values():
        task = spec.task_cls(spec.options_cls())
        assert isinstance(task, Task) and task.name == spec.name
    with pytest.raises(ConfigError, match=r"run\.yaml: task: unknown task 'babylong'"):
        build_task("babylong", {}, source_file="run.yaml")
    with pytest.raises(ConfigError, match=r"run\.yaml: corpus options: unknown key data\.sourse"):
        build_task("corpus", {"sourse": "x"}, source_file="run.yaml", key_prefix="data.")
    with pytest.raises(ConfigError, match="validation_fraction"):
        build_task("corpus", {"validation_fraction": 1.5})


def test_text_corpus_splits_and_packing():
    options = {
        "source": str(BOOKS),
        "max_doc_chars": 400,
        "validation_fraction": 0.2,
        "test_fraction": 0.2,
    }
    task = build_task("corpus", options)
    splits = {s: task.examples(s) for s in ("train", "validation", "test")}
    assert all(splits.values())
    texts = [{ex.meta["text"] for ex in v} for v in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert all(isinstance(ex, Example) and ex.prompt == ex.target == "" for ex in splits["train"])
    again = build_task("corpus", options)
    assert [e.meta["text"] for e in again.examples("test")] == [
        e.meta["text"] for e in splits["test"]
    ]

    tok = load_tokenizer("tiny-llama")
    rows = task.token_sequences(tok, 64, "train")
    assert rows and all(len(r) == 64 for r in rows)
    stream = []
    for ex in splits["train"]:
        stream += tok(ex.meta["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [t for r in rows for t in r] == stream[: 64 * len(rows)]
    assert len(stream) - 64 * len(rows) < 64
    with pytest.raises(DataError, match="no answers to score"):
        task.score([], [])


def test_jsonl_corpus_and_bad_records(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "\n".join(json.dumps({"body": f"Document {i}.\n\nSecond part."}) for i in range(30))
    )
    task = build_task("corpus", {"source": str(path), "text_field": "body", "max_documents": 20})
    total = sum(len(task.examples(s)) for s in ("train", "validation", "test"))
    assert total == 20
    assert task.examples("train")[0].meta["text"].endswith("\n\nSecond part.")
    bad = build_task("corpus", {"source": str(path), "text_field": "text"})
    with pytest.raises(DataError, match=r"docs.jsonl: record 0: missing or non-text field 'text'"):
        bad.examples("train")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_offline_tasks_never_reach_a_hub(no_network):
    has_babi = True
    try:
        find_babi()
    except DataError:
        has_babi = False
    built = {
        "hotpotqa": {"num_train": 5, "num_validation": 2, "num_test": 5},
        "zsre": {"num_train": 5, "num_validation": 2, "num_test": 5},
        "corpus": {"source": str(BOOKS), "max_doc_chars": 300, "test_fraction": 0.3},
    }
    if has_babi:
        built["babilong"] = {
            "lengths": ["1k"],
            "num_train": 2,
            "num_validation": 1,
            "num_test": 2,
            "distractor": str(BOOKS),
            "tokenizer": "tiny-llama",
        }
    for name, options in built.items():
        task = build_task(name, options)
        for split in ("train", "validation", "test"):
            assert task.examples(split), (name, split)
