"""HotpotQA: loaders, prompt and sentence spans, the offline builder, the supporting-fact head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memllm.cli import main
from memllm.core.backbone import load_tokenizer
from memllm.data import build_task
from memllm.data.hotpotqa import format_prompt, load_hotpot_file
from memllm.data.hotpotqa_metric import hotpot_evaluate
from memllm.data.supporting_facts import (
    SupportingFactHead,
    pad_labels,
    select_supporting_facts,
    sentence_labels,
    sentence_token_spans,
    shift_spans,
    write_hotpot_predictions,
)
from memllm.errors import DataError

FIXTURES = Path(__file__).parents[1] / "fixtures"


def fixture_task(**overrides):
    options = {
        "train_file": str(FIXTURES / "hotpot_raw.json"),
        "test_file": str(FIXTURES / "hotpot_hf.jsonl"),
        "num_validation": 1,
    }
    options.update(overrides)
    return build_task("hotpotqa", options)


def test_raw_and_hf_layouts_agree():
    raw = load_hotpot_file(FIXTURES / "hotpot_raw.json")
    hf = load_hotpot_file(FIXTURES / "hotpot_hf.jsonl")
    assert raw == hf
    assert raw[0]["supporting_facts"] == [["Ada Kessel", 0], ["Portugal", 1]]
    assert raw[1]["context"][1] == ["Tern Lake", ["Tern Lake is a lake in Canada.", ""]]


def test_malformed_records_name_file_and_record(tmp_path):
    with pytest.raises(DataError, match=r"hotpot_malformed.json: record 1 \(id 'q-compare-2'\)"):
        load_hotpot_file(FIXTURES / "hotpot_malformed.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"_id": "x", "question": "q", "answer": "a", "context": []}]))
    with pytest.raises(DataError, match=r"bad.json: record 0 \(id 'x'\): 'context'"):
        load_hotpot_file(bad)
    bad.write_text("[{]")
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON"):
        load_hotpot_file(bad)


def test_prompt_marks_every_sentence():
    record = load_hotpot_file(FIXTURES / "hotpot_raw.json")[0]
    prompt, sentences = format_prompt(record)
    assert prompt.endswith(f"Question: {record['question']}\nAnswer:")
    assert len(sentences) == sum(len(s) for _, s in record["context"])
    for title, k, start, end in sentences:
        para = dict((t, s) for t, s in record["context"])[title]
        assert prompt[start:end] == f"[{k}] {para[k].strip()}"
    assert (
        "Paragraph: Portugal\n[0] Portugal is a country in Southern Europe.\n[1] Its capital"
        in prompt
    )


def test_task_splits_and_scores():
    task = fixture_task()
    assert len(task.examples("validation")) == 1 and len(task.examples("train")) == 2
    assert {ex.meta["_id"] for ex in task.examples("test")} == {
        "q-bridge-1",
        "q-compare-2",
        "q-bridge-3",
    }
    test = task.examples("test")
    assert test[0].target == " Lisbon"
    outputs = ["Lisbon\nQuestion: more text", "yes", "Aune"]
    sp = [[["Ada Kessel", 0], ["Portugal", 1]], [["Tern Lake", 0]], []]
    per = task.score(test, outputs, supporting_facts=sp)
    assert per["em"] == [1.0, 0.0, 0.0]
    assert per["sp_em"] == [1.0, 0.0, 0.0]
    assert per["joint_em"] == [1.0, 0.0, 0.0]
    # per-example values average to the official aggregate
    official = hotpot_evaluate(task.prediction_file(test, outputs, sp), task.gold_records(test))
    for key, values in per.items():
        assert official[key] == pytest.approx(sum(values) / len(values)), key
    assert set(task.score(test, outputs)) == {"em", "f1", "prec", "recall"}


def test_offline_builder_is_real_and_deterministic():
    options = {"num_train": 30, "num_validation": 10, "num_test": 20, "num_paragraphs": 6}
    task = build_task("hotpotqa", options)
    again = build_task("hotpotqa", options)
    splits = {s: task.examples(s) for s in ("train", "validation", "test")}
    assert [len(v) for v in splits.values()] == [30, 10, 20]
    assert [ex.prompt for ex in splits["test"]] == [ex.prompt for ex in again.examples("test")]
    questions = [{ex.meta["question"] for ex in v} for v in splits.values()]
    assert not (
        questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2]
    )
    types = {ex.meta["type"] for v in splits.values() for ex in v}
    assert types == {"bridge", "comparison"}
    for ex in splits["test"]:
        record = task.records("test")[splits["test"].index(ex)]
        assert len(record["context"]) == 6
        paragraphs = dict((t, s) for t, s in record["context"])
        supporting = [paragraphs[t][k] for t, k in ex.meta["supporting_facts"]]
        answer = ex.meta["answer"]
        if answer not in ("yes", "no"):
            assert any(answer in s for s in supporting) or ex.meta["type"] == "comparison"
        if ex.meta["question"].startswith("What is the capital of the country where"):
            assert (
                supporting[1] == f"The capital of {ex.meta['supporting_facts'][1][0]} is {answer}."
            )


def test_export_and_score_round_trip(tmp_path, capsys):
    gold = tmp_path / "gold.json"
    argv = ["data", "export", "hotpotqa", str(gold), "--set", "num_test=5", "--set", "num_train=5"]
    assert main([*argv, "--set", "num_validation=0"]) == 0
    records = json.loads(gold.read_text())
    assert len(records) == 5
    ids = [r["_id"] for r in records]
    pred = write_hotpot_predictions(
        tmp_path / "pred.json",
        ids,
        [r["answer"] for r in records],
        [r["supporting_facts"] for r in records],
    )
    capsys.readouterr()
    assert main(["score", "hotpotqa", str(pred), str(gold)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["joint_em"] == 1.0 and scores["f1"] == 1.0


# -- the supporting-fact head -------------------------------------------------------------


def test_sentence_token_spans():
    tok = load_tokenizer("tiny-llama")
    text = "ab [0] first one.\n[1] second.\nQ"
    spans = sentence_token_spans(tok, text, [(3, 17), (18, 28)])
    assert spans == [(3, 17), (18, 28)]  # byte tokenizer: tokens are characters
    assert shift_spans(spans, 5) == [(8, 22), (23, 33)]


def test_head_learns_the_supporting_sentences(tiny, one_thread):
    model, tok = tiny("llama", context=1024)
    task = fixture_task()
    examples = task.examples("test")
    prompts = [ex.prompt for ex in examples]
    batch = tok(prompts, return_tensors="pt", padding=True)
    width = batch["input_ids"].shape[1]
    spans = []
    for ex, mask in zip(examples, batch["attention_mask"], strict=True):
        own = sentence_token_spans(tok, ex.prompt, [s[2:] for s in ex.meta["sentences"]])
        spans.append(shift_spans(own, width - int(mask.sum())))  # left padding
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    labels = pad_labels([sentence_labels(ex.meta) for ex in examples])
    assert labels.shape == (3, 7) and labels[1, 4:].eq(-1).all()

    torch.manual_seed(0)
    head = SupportingFactHead(hidden.shape[-1], pooling="mean_last")
    scores = head(hidden, spans)
    assert scores.shape == labels.shape
    assert torch.isinf(scores[labels < 0]).all() and torch.isfinite(scores[labels >= 0]).all()
    opt = torch.optim.Adam(head.parameters(), lr=3e-2)
    first = head.loss(head(hidden, spans), labels).item()
    for _ in range(60):
        loss = head.loss(head(hidden, spans), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 4
    with torch.no_grad():
        scores = head(hidden, spans)
    predictions = [
        select_supporting_facts(scores[i], ex.meta["sentences"]) for i, ex in enumerate(examples)
    ]
    for predicted, ex in zip(predictions, examples, strict=True):
        assert sorted(predicted) == sorted(ex.meta["supporting_facts"])
    per = task.score(examples, [ex.meta["answer"] for ex in examples], supporting_facts=predictions)
    assert per["joint_em"] == [1.0, 1.0, 1.0]


def test_select_supporting_facts_modes():
    sentences = [["A", 0, 0, 1], ["A", 1, 2, 3], ["B", 0, 4, 5]]
    scores = torch.tensor([2.0, -3.0, 0.5])
    assert select_supporting_facts(scores, sentences) == [["A", 0], ["B", 0]]
    assert select_supporting_facts(scores, sentences, threshold=0.9) == [["A", 0]]
    assert select_supporting_facts(scores, sentences, threshold=0.99, min_k=2) == [
        ["A", 0],
        ["B", 0],
    ]
    assert select_supporting_facts(scores, sentences, top_k=1) == [["A", 0]]
    padded = torch.tensor([1.0, float("-inf"), float("-inf")])
    assert select_supporting_facts(padded, sentences, top_k=3) == [["A", 0]]
