"""Closed-set scoring and batched generation with memory, on tiny models."""

from __future__ import annotations

import pytest
import torch

import memllm
from memllm.core.segments import positions_from_mask, segment_bounds
from memllm.data.base import Example
from memllm.data.layout import generate_examples
from memllm.evaluation.closed_set import (
    candidate_log_likelihoods,
    chance_level,
    closed_set_correct,
)
from tests.conftest import SMALL_LATENT

S = 64
LABELS = ["17", "23", "42", "58"]


def _examples() -> list[Example]:
    """Recall-like examples under the own layout, with contexts of different lengths (so a
    batch is left-padded, and the question part padded inside the row)."""
    out = []
    for i, (name, value) in enumerate([("Ann", "42"), ("Bob", "17"), ("Cy", "58"), ("Di", "23")]):
        context = f"The locker of {name} is number {value}. " * (1 + 2 * i)
        question = f"Q: locker of {name}?\nA:"
        prompt = f"{context}\n\n{question}"
        out.append(
            Example(
                f"ex{i}",
                prompt,
                " " + value,
                {"answer": value},
                context_part=context,
                question_part=question,
            )
        )
    return out


def _memory_model(tiny, memory=SMALL_LATENT):
    model, tok = tiny("llama")
    memllm.inject_memory(model, memllm.memory_config_from_dict(memory))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the zero-initialised gates and projections: make the memory act
        for p in memllm.memory_parameters(model):
            if not p.any():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval(), tok


def test_batched_scores_equal_one_candidate_at_a_time(tiny, one_thread):
    model, tok = _memory_model(tiny)
    examples = _examples()
    cands = [LABELS] * len(examples)
    batched = candidate_log_likelihoods(model, tok, examples, cands, segment_length=S, batch_size=7)
    for ex, scores in zip(examples, batched, strict=True):
        alone = [
            candidate_log_likelihoods(model, tok, [ex], [[c]], segment_length=S, batch_size=1)[0][0]
            for c in LABELS
        ]
        assert scores == pytest.approx(alone, abs=1e-4)
        assert max(range(4), key=scores.__getitem__) == max(range(4), key=alone.__getitem__)
    correct = closed_set_correct(examples, cands, batched)
    best = [LABELS[max(range(4), key=s.__getitem__)] for s in batched]
    assert correct == [float(b == ex.meta["answer"]) for b, ex in zip(best, examples, strict=True)]
    assert chance_level(cands) == pytest.approx(0.25)


def test_a_candidate_score_is_its_teacher_forced_log_likelihood(tiny, one_thread):
    """The reference: write the context's segments into a memory session, then read the
    question part and the candidate alone (what the own layout's last segment holds)."""
    model, tok = _memory_model(tiny)
    ex = _examples()[2]
    score = candidate_log_likelihoods(model, tok, [ex], [["58"]], segment_length=S)[0][0]

    def ids(text):
        return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])

    context, question, target = ids(ex.context_part), ids(ex.question_part), ids(" 58")
    with torch.no_grad(), memllm.memory_session(model) as session:
        for start, end in segment_bounds(context.shape[1], S):
            part = context[:, start:end]
            model(input_ids=part, position_ids=positions_from_mask(torch.ones_like(part)))
        with session.read_only():
            logits = model(input_ids=torch.cat([question, target], 1)).logits
    logp = torch.log_softmax(logits[0, question.shape[1] - 1 : -1].float(), -1)
    reference = logp.gather(-1, target[0, :, None]).sum().item()
    assert score == pytest.approx(reference, abs=1e-4)


def test_without_memory_the_context_changes_nothing(tiny):
    model, tok = tiny("llama")
    examples = _examples()
    scores = candidate_log_likelihoods(
        model, tok, examples, [LABELS] * 4, segment_length=S, batch_size=3
    )
    # window (no memory) reads only the question's segment: same name, same scores
    same = [
        Example("a", "", " 42", {}, context_part="x " * 40, question_part="Question: Q?\nAnswer:"),
        Example("b", "", " 42", {}, context_part="y", question_part="Question: Q?\nAnswer:"),
    ]
    a, b = candidate_log_likelihoods(model, tok, same, [LABELS] * 2, segment_length=S)
    assert a == pytest.approx(b, abs=1e-5)
    assert len(scores) == 4 and all(len(s) == 4 for s in scores)


def test_without_memory_a_score_is_the_question_and_candidate_read_alone(tiny, one_thread):
    """window's scores skip the padding inside the question's segment: each equals the
    log-likelihood of the candidate after the question part read with nothing else."""
    model, tok = tiny("llama")
    examples = _examples()
    batched = candidate_log_likelihoods(
        model, tok, examples, [LABELS] * 4, segment_length=S, batch_size=16
    )
    for ex, scores in zip(examples, batched, strict=True):
        question = tok(ex.question_part, add_special_tokens=False)["input_ids"]
        for label, score in zip(LABELS, scores, strict=True):
            target = tok(" " + label, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([question + target])).logits
            logp = torch.log_softmax(logits[0, len(question) - 1 : -1].float(), -1)
            reference = logp.gather(-1, torch.tensor(target)[:, None]).sum().item()
            assert score == pytest.approx(reference, abs=1e-4)


@pytest.mark.parametrize(
    "memory",
    [
        SMALL_LATENT,
        {"type": "neural", "layer_ids": [-1], "mlp_depth": 2, "chunk_size": 16},
        {"type": "episodic", "layer_ids": [-1], "num_heads": 2, "key_dim": 16},
    ],
    ids=lambda m: m["type"],
)
def test_batched_generation_with_memory_equals_one_at_a_time(tiny, one_thread, memory):
    """Memory arms generate in batches: left padding between rows of different lengths and
    the own layout's padding inside each row change no answer."""
    model, tok = _memory_model(tiny, memory)
    examples = _examples()
    batched = generate_examples(
        model, tok, examples, segment_length=S, max_new_tokens=4, batch_size=4
    )
    alone = [
        generate_examples(model, tok, [ex], segment_length=S, max_new_tokens=4, batch_size=1)[0]
        for ex in examples
    ]
    assert batched == alone
