"""Data that users bring, through ``datasets``: sources with a field mapping, and the built
offline data exported as a datasets folder. Skipped without ``datasets`` (memllm[hub])."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")

from memllm.data import build_task  # noqa: E402
from memllm.data.hf_source import (  # noqa: E402
    DatasetSource,
    examples_from_dataset,
    export_examples,
    load_records,
)
from memllm.errors import ConfigError, DataError  # noqa: E402

ROWS = [
    {"story": "Mary went to the kitchen.", "q": "Where is Mary?", "a": "kitchen", "n": 1},
    {"story": "John took the apple.", "q": "Who took the apple?", "a": "John", "n": 2},
    {"story": "The box is red.", "q": "What colour is the box?", "a": "red", "n": 3},
]
MAPPING = {"context": "story", "question": "q", "answer": "a"}


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _jsonl(path, rows=ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "disk"])
def test_sources_read_with_a_field_mapping(tmp_path, kind):
    if kind == "jsonl":
        path = _jsonl(tmp_path / "qa.jsonl")
    elif kind == "parquet":
        path = tmp_path / "qa.parquet"
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    source = DatasetSource(str(path), fields=MAPPING, split="test")
    records = load_records(source, ("context", "question", "answer"))
    assert records == [{"context": r["story"], "question": r["q"], "answer": r["a"]} for r in ROWS]
    streamed = DatasetSource(str(path), fields=MAPPING, split="test", streaming=True, limit=2)
    assert load_records(streamed, ("context", "question", "answer")) == records[:2]


def test_a_missing_column_names_the_field_mapping(tmp_path):
    source = DatasetSource(str(_jsonl(tmp_path / "qa.jsonl")), fields={"context": "story"})
    with pytest.raises(DataError, match=r"no column 'question'.*fields"):
        load_records(source, ("context", "question", "answer"), "data.source")
    with pytest.raises(DataError, match="not found"):
        load_records(DatasetSource(str(tmp_path / "none.json"), format="json"), ("context",))


def test_qa_task_from_a_local_file(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl")
    task = build_task(
        "qa",
        {
            "source": {"path": str(path), "fields": MAPPING, "split": "test"},
            "train_source": {"path": str(path), "fields": MAPPING},
            "num_validation": 1,
        },
    )
    test = task.examples("test")
    assert [ex.meta["answer"] for ex in test] == ["kitchen", "John", "red"]
    assert test[0].prompt.startswith("Mary went to the kitchen.")
    assert test[0].prompt.endswith("Question: Where is Mary?\nAnswer:")
    assert test[0].target == " kitchen"
    assert len(task.examples("validation")) == 1 and len(task.examples("train")) == 2
    scores = task.score(test, ["The kitchen.", "john took it", "blue"])
    assert scores["exact_match"] == [1.0, 0.0, 0.0]
    assert scores["contains"] == [1.0, 1.0, 0.0]
    with pytest.raises(DataError, match="set source"):
        build_task("qa", {}).examples("test")
    with pytest.raises(ConfigError, match="template"):
        build_task("qa", {"template": "{question} only"})


def test_babilong_reads_a_mapped_source(tmp_path):
    folder = tmp_path / "qa1"
    folder.mkdir()
    _jsonl(folder / "0k.jsonl")
    source = {"path": str(tmp_path / "{task}" / "{length}.jsonl"), "fields": MAPPING}
    task = build_task("babilong", {"source": source, "prompt": "plain", "num_test": 2})
    examples = task.examples("test")
    assert [ex.meta["answer"] for ex in examples] == ["kitchen", "John"]
    assert "Mary went to the kitchen." in examples[0].prompt
    assert task.score(examples, ["kitchen", "Mary"])["accuracy"] == [1.0, 0.0]


def _round_trip(examples, folder):
    export_examples(examples, folder)
    data = datasets.load_from_disk(str(folder))
    assert len(data) == len(examples)
    for row, ex in zip(data, examples, strict=True):
        assert row["id"] == ex.id and row["prompt"] == ex.prompt and row["target"] == ex.target
        assert row["context_part"] == ex.context_part
        assert row["question_part"] == ex.question_part
        # JSON keeps every value; tuples come back as lists
        assert json.loads(row["meta"]) == json.loads(json.dumps(ex.meta))
    back = examples_from_dataset(folder)
    assert [(b.id, b.prompt, b.target) for b in back] == [
        (e.id, e.prompt, e.target) for e in examples
    ]


def test_offline_data_exports_as_a_datasets_folder(tmp_path):
    """The built offline BabiLong (facts, spans, question kept apart) round-trips every field,
    through the command line too."""
    from memllm.cli import main

    task = build_task("babilong", {"num_test": 3, "question_segment": "own"})
    examples = task.examples("test")
    assert examples[0].context_part is not None and examples[0].meta["fact_spans"]
    _round_trip(examples, tmp_path / "api")
    out = tmp_path / "cli"
    assert main(["data", "export", "babilong", str(out), "--format", "hf", "--set",
                 "num_test=3", "--set", "question_segment=own"]) == 0  # fmt: skip
    assert [r["id"] for r in datasets.load_from_disk(str(out))] == [ex.id for ex in examples]
    assert examples_from_dataset(out)[0].meta == json.loads(json.dumps(examples[0].meta))
