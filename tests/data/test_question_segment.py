"""data.question_segment: own — the question alone in the last segment, and interior padding
that changes nothing (forward, memory writes, generation, batches)."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_LATENT, random_ids, wake_memory

import memllm
from memllm.core.segments import forward_segments, positions_from_mask, segment_bounds
from memllm.core.tiny import byte_tokenizer
from memllm.data.base import Example
from memllm.data.layout import encode_rows, generate_examples, left_pad_rows
from memllm.errors import ConfigError
from memllm.training.data import collate, encode_examples

S = 16  # segment length of the tiny-model checks


def own_example(context: str, question: str, answer: str, id_: str = "x") -> Example:
    prompt = f"{context}\n\n{question}"
    return Example(id_, prompt, " " + answer, {}, context_part=context, question_part=question)


def real_tokens(ids, mask) -> list[int]:
    return [i for i, m in zip(ids, mask, strict=True) if m]


def test_the_last_segment_holds_exactly_the_question_part_and_the_answer():
    tok = byte_tokenizer()  # one token per byte
    ex = own_example("Mary went to the hall. " * 5, "Q: Where is Mary?\nA:", "hall")
    (row,) = encode_rows([ex], tok, segment_length=48)
    last_ids, last_mask = row.ids[-48:], row.mask[-48:]
    assert tok.decode(real_tokens(last_ids, last_mask)) == "Q: Where is Mary?\nA: hall</s>"
    assert last_mask[0] == 0  # padded on the left within the segment
    before = real_tokens(row.ids[:-48], row.mask[:-48])
    assert tok.decode(before) == ex.context_part and all(row.mask[:-48])
    # generation: the prompt row's last segment is the question part alone, padded to 48
    gen_ids, gen_mask = row.prompt_ids[-48:], row.prompt_mask[-48:]
    assert len(row.prompt_ids) == len(ex.context_part) + 48
    assert tok.decode(real_tokens(gen_ids, gen_mask)) == ex.question_part
    assert row.ids[row.prompt_len :] == [*tok(" hall")["input_ids"][-5:], tok.eos_token_id]


def test_a_question_longer_than_a_segment_is_a_config_error():
    ex = own_example("context", "Q: " + "why " * 10 + "?\nA:", "yes")
    with pytest.raises(ConfigError, match=r"^data\.question_segment: .* x has 47 tokens"):
        encode_rows([ex], byte_tokenizer(), segment_length=40)


def test_training_items_keep_the_mask_and_the_generation_row():
    tok = byte_tokenizer()
    examples = [
        own_example("A long context. " * 4, "Q: x?\nA:", "yes", "a"),
        own_example("Short.", "Q: longer one?\nA:", "no", "b"),
    ]
    items = encode_examples(examples, tok, None, segment_length=S + 8)
    batch = collate(items, tok.pad_token_id, "cpu")
    # the loss is on the answer (+ EOS) only, never on padding
    for b, item in enumerate(items):
        labelled = batch.labels[b][batch.labels[b] != -100].tolist()
        assert labelled == item.ids[item.prompt_len :]
        assert batch.attention_mask[b, -(S + 8) :].tolist() == item.mask[-(S + 8) :]
    prompts = collate(items, tok.pad_token_id, "cpu", prompt_only=True)
    for b, item in enumerate(items):
        ids, mask = item.prompt_row
        assert prompts.input_ids[b, -len(ids) :].tolist() == ids
        assert (
            tok.decode(real_tokens(ids[-(S + 8) :], mask[-(S + 8) :])) == examples[b].question_part
        )
    # a model without memory is cut to one segment: it sees the question and the answer only
    (cut,) = encode_examples(examples[:1], tok, S + 8, segment_length=S + 8)
    assert tok.decode(real_tokens(cut.ids, cut.mask)) == "Q: x?\nA: yes</s>"


NEURAL = {"type": "neural", "memory_dim": 16, "chunk_size": 4, "max_adaptive_lr": 0.1}


def _memory_model(tiny, config=None):
    model, _ = tiny("llama")
    memllm.inject_memory(model, config or SMALL_LATENT)
    if config is None:
        wake_memory(model)
    else:
        _wake_zeros(model)
    return model


def _wake_zeros(model) -> None:
    """Random values in the zero-initialised memory parameters (gates, projections), so that
    the memory changes the outputs."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in memllm.memory_parameters(model):
            if not p.any():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def _reference_question_logits(model, context: torch.Tensor, question: torch.Tensor):
    """Context segments written one by one (end-aligned, as alone), then the question alone."""
    with memllm.memory_session(model):
        for start, end in segment_bounds(context.shape[1], S):
            model(input_ids=context[:, start:end])
        return model(input_ids=question).logits


def _laid_out(context: torch.Tensor, question: torch.Tensor) -> tuple[list[int], list[int]]:
    pad = S - question.shape[1]
    ids = context[0].tolist() + [0] * pad + question[0].tolist()
    return ids, [1] * context.shape[1] + [0] * pad + [1] * question.shape[1]


@pytest.mark.parametrize("config", [None, NEURAL], ids=["latent", "neural"])
def test_interior_padding_equals_no_padding_in_the_question_segment(tiny, one_thread, config):
    model = _memory_model(tiny, config)
    context, question = random_ids(1, 2 * S - 3, seed=1), random_ids(1, 5, seed=2)
    reference = _reference_question_logits(model, context, question)
    ids, mask = left_pad_rows(*zip(_laid_out(context, question), strict=True), pad_id=0)
    out = forward_segments(model, ids, mask, segment_length=S)
    assert out.num_segments == 3
    assert torch.allclose(out.logits[:, -5:], reference, atol=1e-5)
    # the memory did read something: without the context the question's logits differ
    assert not torch.allclose(model(input_ids=question).logits, reference, atol=1e-3)


def test_a_batch_with_interior_padding_equals_its_rows_alone(tiny, one_thread):
    model = _memory_model(tiny)
    rows = [
        _laid_out(random_ids(1, 3 * S - 5, seed=3), random_ids(1, 7, seed=4)),
        _laid_out(random_ids(1, S + 2, seed=5), random_ids(1, 3, seed=6)),
    ]
    ids, mask = left_pad_rows([r for r, _ in rows], [m for _, m in rows], pad_id=0)
    batched = forward_segments(model, ids, mask, segment_length=S).logits
    for b, (row, m) in enumerate(rows):
        one_ids, one_mask = left_pad_rows([row], [m], pad_id=0)
        alone = forward_segments(model, one_ids, one_mask, segment_length=S).logits
        real = one_mask[0, -S:].bool()
        assert torch.allclose(batched[b, real], alone[0, real], atol=1e-5)


def test_generation_with_interior_padding_equals_the_question_fed_alone(tiny, one_thread):
    model = _memory_model(tiny)
    context, question = random_ids(1, 2 * S + 4, seed=7), random_ids(1, 6, seed=8)
    ids, mask = left_pad_rows(*zip(_laid_out(context, question), strict=True), pad_id=0)
    new = memllm.generate_ids(model, ids, mask, segment_length=S, max_new_tokens=5)
    with memllm.memory_session(model) as session:
        for start, end in segment_bounds(context.shape[1], S):
            part = torch.ones_like(context[:, start:end])
            model(input_ids=context[:, start:end], position_ids=positions_from_mask(part))
        with session.decoding():
            alone = model.generate(question, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(new, alone[:, question.shape[1] :])


def test_window_without_memory_sees_only_the_question(tiny):
    model, tok = tiny("llama")
    question = "Q: Where is Mary?\nA:"
    examples = [own_example(c, question, "hall", c[:4]) for c in ("Mary went home.", "Nothing.")]
    outputs = generate_examples(model, tok, examples, segment_length=S + 16, max_new_tokens=4)
    assert outputs[0] == outputs[1]  # different contexts, same answer: the context is unseen
