"""Official metrics: BabiLong's checker on real prediction dumps, HotpotQA edge cases, ZsRE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memllm.cli import main
from memllm.core.backbone import load_tokenizer
from memllm.data.answers import normalize_answer
from memllm.data.babilong_metric import (
    babilong_compare_answers,
    babilong_score,
    infer_babilong_task,
    read_babilong_predictions,
)
from memllm.data.hotpotqa_metric import (
    HOTPOT_KEYS,
    hotpot_answer_scores,
    hotpot_evaluate,
    hotpot_per_question,
    hotpot_sp_scores,
)
from memllm.data.zsre_metric import zsre_exact_match
from memllm.evaluation.teacher_forcing import (
    teacher_forced_correct,
    zsre_sequence_accuracy,
    zsre_token_accuracy,
)

FIXTURES = Path(__file__).parents[1] / "fixtures"
DUMPS = Path(__file__).resolve().parents[3] / "shared" / "data" / "babilong-predictions"
if not DUMPS.is_dir():
    DUMPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "babilong-predictions"
EXPECTED = json.loads((DUMPS / "expected.json").read_text()) if DUMPS.is_dir() else {}


# -- BabiLong ------------------------------------------------------------------------------


@pytest.mark.skipif(not EXPECTED, reason="shared/data/babilong-predictions not found")
def test_babilong_dumps_cover_every_file():
    assert len(EXPECTED) == len(list(DUMPS.glob("*.csv"))) >= 17


@pytest.mark.skipif(not EXPECTED, reason="shared/data/babilong-predictions not found")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_babilong_official_counts(name):
    expected = EXPECTED[name]
    rows = read_babilong_predictions(DUMPS / name)
    result = babilong_score(
        expected["task"],
        [r["target"] for r in rows],
        [r["output"] for r in rows],
        [r["question"] for r in rows],
    )
    assert (result["n"], result["correct"]) == (expected["n"], expected["correct"])
    assert result["accuracy"] == pytest.approx(expected["accuracy"])
    assert infer_babilong_task(name) == expected["task"]


@pytest.mark.skipif(not EXPECTED, reason="shared/data/babilong-predictions not found")
def test_score_babilong_cli(capsys):
    assert main(["score", "babilong", str(DUMPS / "gpt2_qa1_0k.csv")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["task"], out["n"], out["correct"]) == ("qa1", 1000, 351)
    assert out["accuracy"] == pytest.approx(0.351)


def test_compare_answers_rules():
    rooms = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]
    q = "Where is John?"
    assert babilong_compare_answers("hallway", "The hallway.", q, rooms)
    # only the first sentence counts
    assert not babilong_compare_answers("hallway", "He left. The hallway", q, rooms)
    # two labels: wrong even if one is the target
    assert not babilong_compare_answers("hallway", "hallway or kitchen", q, rooms)
    # labels named in the question are ignored
    q2 = "Where was the apple before the kitchen?"
    assert babilong_compare_answers("office", "Before the kitchen it was in the office", q2, rooms)
    # generation of examples is cut
    assert babilong_compare_answers("garden", "garden <example> kitchen", q, rooms)
    # the "Question" cut never fires after lowercasing (kept from the original)
    assert not babilong_compare_answers("garden", "garden Question: kitchen", q, rooms)
    # qa7: "none" also contains "one" -> never correct, as in the original
    counts = ["none", "one", "three", "two"]
    assert not babilong_compare_answers("none", "none", "How many?", counts)
    assert babilong_compare_answers("two", "Two", "How many?", counts)
    # qa8: comma targets need every item and nothing else
    items = ["apple", "football", "milk", "nothing"]
    assert babilong_compare_answers("apple,milk", "milk, apple", "What?", items)
    assert not babilong_compare_answers("apple,milk", "milk", "What?", items)
    assert not babilong_compare_answers("apple,milk", "milk, apple, football", "What?", items)
    # qa19: a 3-character comma target is a single label
    dirs = ["e,e", "n,w", "s,s", "w,n"]
    assert babilong_compare_answers("n,w", "n,w", "How?", dirs)


def test_read_babilong_predictions_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("target,output\nx,y\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing column\(s\) question"):
        read_babilong_predictions(bad)
    empty = tmp_path / "empty_target.csv"
    empty.write_text("target,output,question\n,x,y\n")
    with pytest.raises(ValueError, match="record 0"):
        read_babilong_predictions(empty)


# -- HotpotQA ------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("a cat, an owl and THE dog") == "cat owl and dog"


def test_hotpot_answer_yes_no_rule():
    assert hotpot_answer_scores("yes", "yes") == (1.0, 1.0, 1.0, 1.0)
    assert hotpot_answer_scores("yes", "yes it is")[1:] == (0.0, 0.0, 0.0)  # pred is yes/no
    assert hotpot_answer_scores("no it is not", "no")[1:] == (0.0, 0.0, 0.0)  # gold is yes/no
    assert hotpot_answer_scores("noanswer", "Paris")[1] == 0.0
    em, f1, p, r = hotpot_answer_scores("the River Aune", "Aune river")
    assert em == 0.0 and f1 == pytest.approx(1.0)
    em, f1, p, r = hotpot_answer_scores("Paris France", "Paris")
    assert (p, r) == (0.5, 1.0) and f1 == pytest.approx(2 / 3)


def test_hotpot_sp_scores():
    gold = [["A", 0], ["B", 1]]
    assert hotpot_sp_scores([["A", 0], ["B", 1]], gold) == (1.0, 1.0, 1.0, 1.0)
    em, _, p, r = hotpot_sp_scores([["A", 0], ["A", 0], ["C", 2]], gold)  # duplicates: a set
    assert (em, p, r) == (0.0, 0.5, 0.5)
    assert hotpot_sp_scores([], gold) == (0.0, 0.0, 0.0, 0.0)


def test_hotpot_evaluate_missing_and_joint():
    gold = [
        {"_id": "1", "answer": "Paris", "supporting_facts": [["A", 0], ["B", 1]]},
        {"_id": "2", "answer": "yes", "supporting_facts": [["C", 0]]},
        {"_id": "3", "answer": "Rome", "supporting_facts": [["D", 0]]},
    ]
    pred = {
        "answer": {"1": "Paris France", "2": "yes"},  # 3 has no answer
        "sp": {"1": [["A", 0]], "3": [["D", 0]]},  # 2 has no sp
    }
    m = hotpot_evaluate(pred, gold)
    assert set(m) == set(HOTPOT_KEYS)
    assert m["em"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx((2 / 3 + 1.0) / 3)
    assert m["sp_em"] == pytest.approx(1 / 3)
    assert m["sp_prec"] == pytest.approx(2 / 3)
    assert m["sp_recall"] == pytest.approx((0.5 + 1.0) / 3)
    # joint only for question 1 (both parts present): prec 0.5*1, recall 1*0.5
    assert m["joint_prec"] == pytest.approx(0.5 / 3)
    assert m["joint_recall"] == pytest.approx(0.5 / 3)
    assert m["joint_f1"] == pytest.approx(0.5 / 3)
    assert m["joint_em"] == 0.0
    per = hotpot_per_question(pred, gold)
    assert per["joint_f1"][2] == 0.0 and per["sp_em"][2] == 1.0


def test_score_hotpotqa_cli_raw_and_hf_layouts(tmp_path, capsys):
    pred = {
        "answer": {"q-bridge-1": "Lisbon", "q-compare-2": "yes", "q-bridge-3": "River Aune"},
        "sp": {
            "q-bridge-1": [["Ada Kessel", 0], ["Portugal", 1]],
            "q-compare-2": [["Tern Lake", 0]],
        },
    }
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(pred))
    results = []
    for gold in ("hotpot_raw.json", "hotpot_hf.jsonl"):
        assert main(["score", "hotpotqa", str(path), str(FIXTURES / gold)]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1]
    m = results[0]
    assert list(m) == list(HOTPOT_KEYS)
    assert m["em"] == pytest.approx(2 / 3)  # "yes" vs "no" is wrong; "the River Aune" matches
    assert m["sp_em"] == pytest.approx(1 / 3)
    assert m["sp_recall"] == pytest.approx((1 + 0.5) / 3)


def test_score_hotpotqa_cli_rejects_bad_files(tmp_path, capsys):
    pred = tmp_path / "pred.json"
    pred.write_text("[1, 2]")
    assert main(["score", "hotpotqa", str(pred), str(FIXTURES / "hotpot_raw.json")]) == 2
    assert "expected an object" in capsys.readouterr().err
    pred.write_text('{"answer": {}}')
    assert main(["score", "hotpotqa", str(pred), str(FIXTURES / "hotpot_malformed.json")]) == 2
    err = capsys.readouterr().err
    assert "hotpot_malformed.json: record 1" in err and "q-compare-2" in err


# -- ZsRE ------------------------------------------------------------------------------------


def test_zsre_exact_match():
    assert zsre_exact_match(" Paris\nIt is big.", ["Paris"]) == 1.0
    assert zsre_exact_match("the Aune", ["River Aune", "Aune"]) == 1.0
    assert zsre_exact_match("Paris, France", ["Paris"]) == 0.0


def _manual_correct(model, tokenizer, prompt, answer):
    p = tokenizer(prompt)["input_ids"]
    a = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a])
    with torch.no_grad():
        pred = model(input_ids=ids).logits.argmax(-1)[0]
    return [int(pred[len(p) - 1 + i]) == a[i] for i in range(len(a))]


def test_teacher_forced_matches_one_by_one(tiny, one_thread):
    model, tok = tiny("llama")
    prompts = ["What is the capital of France?", "Q", "Which river flows through Brennsted?"]
    answers = ["Paris", "a much longer answer here", "Aune"]
    batched = teacher_forced_correct(model, tok, prompts, answers, batch_size=3)
    single = [_manual_correct(model, tok, p, a) for p, a in zip(prompts, answers, strict=True)]
    assert batched == single
    assert [len(c) for c in batched] == [6, 26, 5]  # byte tokenizer: one token per byte
    tok_acc = zsre_token_accuracy(model, tok, prompts, answers, batch_size=2)
    seq_acc = zsre_sequence_accuracy(model, tok, prompts, answers, batch_size=2)
    assert tok_acc == [sum(c) / len(c) for c in single]
    assert seq_acc == [float(all(c)) for c in single]


class OracleLM(torch.nn.Module):
    """Predicts, at each position, the token that actually comes ``shift`` places later."""

    def __init__(self, vocab: int, shift: int = 1):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.shift = vocab, shift

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        future = torch.roll(input_ids, -self.shift, dims=1)
        logits = torch.nn.functional.one_hot(future, self.vocab).float()
        return type("Out", (), {"logits": logits})()


def test_teacher_forced_alignment_with_an_oracle():
    tok = load_tokenizer("tiny-llama")
    prompts = ["What is the capital of France?", "Q", "Which river?"]
    answers = ["Paris", "a much longer answer here", "the Aune"]
    oracle = OracleLM(len(tok))
    assert zsre_token_accuracy(oracle, tok, prompts, answers, batch_size=3) == [1.0, 1.0, 1.0]
    assert zsre_sequence_accuracy(oracle, tok, prompts, answers, batch_size=2) == [1.0] * 3
    late = OracleLM(len(tok), shift=2)  # off by one position: (almost) nothing is right
    assert max(zsre_token_accuracy(late, tok, prompts, answers)) < 0.2
    assert zsre_sequence_accuracy(late, tok, prompts, answers) == [0.0] * 3
