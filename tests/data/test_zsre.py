"""ZsRE: MEND and KnowEdit layouts, the offline builder from real facts, metrics with a model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from memllm.cli import main
from memllm.data import build_task
from memllm.data.zsre import load_zsre_file, teacher_forced_metrics
from memllm.errors import DataError

FIXTURES = Path(__file__).parents[1] / "fixtures"


def test_mend_and_knowedit_layouts():
    mend = load_zsre_file(FIXTURES / "zsre_mend.json")
    assert mend[0] == {
        "id": "0",
        "subject": "Ada Kessel",
        "question": "Which country was Ada Kessel born in?",
        "answers": ["Portugal"],
        "alt": "Spain",
        "rephrase": ["Ada Kessel was born in which country?"],
        "loc": "nq question: who wrote the poem the harbour at night",
        "loc_ans": "Mara Quill",
        "relation": "",
    }
    knowedit = load_zsre_file(FIXTURES / "knowedit_zsre.json")
    assert knowedit[0]["answers"] == ["Portugal"] and knowedit[0]["alt"] == "Spain"
    assert knowedit[0]["loc"] == "The field of work of Ada Kessel is"
    assert knowedit[0]["loc_ans"] == "chemistry"
    assert knowedit[1]["answers"] == ["Canada"] and knowedit[1]["loc"] == ""


def test_malformed_records(tmp_path):
    bad = tmp_path / "zsre.json"
    bad.write_text(json.dumps([{"src": "Q?", "answers": ["a"]}, {"src": "Q?", "answers": []}]))
    with pytest.raises(DataError, match=r"zsre.json: record 1: no answer"):
        load_zsre_file(bad)
    bad.write_text(json.dumps([{"question": "Q?"}]))
    with pytest.raises(DataError, match=r"zsre.json: record 0: neither the MEND layout"):
        load_zsre_file(bad)


def test_task_from_files_and_exact_match():
    task = build_task(
        "zsre",
        {
            "train_file": str(FIXTURES / "zsre_mend.json"),
            "test_file": str(FIXTURES / "zsre_mend.json"),
            "num_validation": 1,
            "template": "Question: {question}\nAnswer:",
        },
    )
    test = task.examples("test")
    assert len(test) == 3 and len(task.examples("validation")) == 1
    assert len(task.examples("train")) == 2
    assert test[0].prompt == "Question: Which country was Ada Kessel born in?\nAnswer:"
    assert test[0].target == " Portugal"
    assert test[2].meta["rephrase_prompts"] == ["Question: Brennsted lies on which river?\nAnswer:"]
    per = task.score(test, ["Portugal\nmore", "Norway", "the Aune"])
    assert per == {"exact_match": [1.0, 0.0, 1.0]}
    alt = build_task("zsre", {"test_file": str(FIXTURES / "zsre_mend.json"), "answer_field": "alt"})
    assert alt.examples("test")[0].target == " Spain"
    assert alt.examples("train") == []


def test_offline_builder():
    options = {"num_train": 40, "num_validation": 10, "num_test": 30}
    task = build_task("zsre", options)
    again = build_task("zsre", options)
    splits = {s: task.examples(s) for s in ("train", "validation", "test")}
    assert [len(v) for v in splits.values()] == [40, 10, 30]
    assert [e.prompt for e in splits["test"]] == [e.prompt for e in again.examples("test")]
    facts = [{(e.meta["subject"], e.meta["relation"]) for e in v} for v in splits.values()]
    assert not (facts[0] & facts[1] or facts[0] & facts[2] or facts[1] & facts[2])
    for ex in splits["test"]:
        m = ex.meta
        assert m["subject"] in ex.prompt and ex.target == " " + m["answers"][0]
        assert len(m["rephrase"]) >= 2 and all(m["subject"] in q for q in m["rephrase"])
        assert m["loc"].startswith("nq question: ") and m["loc_ans"]
        assert m["subject"] not in m["loc"] and m["alt"] != m["answers"][0]
    capital = next(
        e for e in task.examples("train") + splits["test"] if e.meta["relation"] == "capital"
    )
    assert capital.prompt == f"What is the capital of {capital.meta['subject']}?"


def test_teacher_forced_metrics_on_a_tiny_model(tiny):
    model, tok = tiny("llama")
    task = build_task("zsre", {"test_file": str(FIXTURES / "knowedit_zsre.json")})
    examples = task.examples("test")
    per = teacher_forced_metrics(model, tok, examples, batch_size=2)
    assert set(per) == {
        "token_acc",
        "seq_acc",
        "rephrase_token_acc",
        "rephrase_seq_acc",
        "loc_token_acc",
        "loc_seq_acc",
    }
    assert all(len(v) == 2 for v in per.values())
    assert all(0.0 <= v <= 1.0 for v in per["token_acc"] + per["rephrase_token_acc"])
    assert math.isnan(per["loc_token_acc"][1])  # the second record has no locality question
    assert all(s <= t for s, t in zip(per["seq_acc"], per["token_acc"], strict=True))


def test_score_zsre_cli(tmp_path, capsys):
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps({"0": "Portugal", "2": "Aune"}))
    argv = ["score", "zsre", str(FIXTURES / "zsre_mend.json"), "--predictions", str(pred)]
    assert main([*argv, "--model", "tiny-llama"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 3 and out["missing_predictions"] == 1
    assert out["exact_match"] == pytest.approx(2 / 3)
    assert {"token_acc", "seq_acc", "loc_token_acc"} <= set(out)
    assert out["definitions"]["token_acc"].startswith("ROME/MEMIT")
    assert "MEND" in out["definitions"]["seq_acc"]
