"""Generation: memory from the first new token, left-padded batches, prompts past the window."""

from __future__ import annotations

import torch
from conftest import SMALL_LATENT, random_ids, wake_memory

import memllm
from memllm.core.segments import forward_segments


def test_memory_is_used_from_the_first_generated_token(tiny):
    model, _ = tiny("llama")
    memllm.inject_memory(model, SMALL_LATENT)
    wake_memory(model)
    ids = random_ids(1, 40, seed=1)
    teacher = forward_segments(model, ids, segment_length=16).logits[:, -1]
    with memllm.memory_session(model) as session:
        model(input_ids=ids[:, :8])
        model(input_ids=ids[:, 8:24])
        with session.read_only():
            out = model.generate(
                ids[:, 24:],
                max_new_tokens=3,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
    assert torch.allclose(out.logits[0], teacher, atol=1e-5)
    bare = model(input_ids=ids[:, 24:])  # fresh memory: what the first token would be without it
    assert not torch.allclose(bare.logits[:, -1], teacher)


def test_generate_equals_teacher_forcing(tiny):
    """Greedy tokens, fed back teacher-forced through the same segments, are each the argmax."""
    model, _ = tiny("llama")
    memllm.inject_memory(model, SMALL_LATENT)
    wake_memory(model)
    ids = random_ids(1, 40, seed=2)
    new = memllm.generate_ids(model, ids, segment_length=16, max_new_tokens=5)
    full = torch.cat([ids, new], 1)
    with memllm.memory_session(model) as session:
        model(input_ids=full[:, :8])
        model(input_ids=full[:, 8:24])
        with session.read_only():
            logits = model(input_ids=full[:, 24:]).logits
    assert torch.equal(logits[0, 15:-1].argmax(-1), new[0])


def test_batched_generation_equals_one_at_a_time(tiny):
    model, tokenizer = tiny("llama")
    memllm.inject_memory(model, SMALL_LATENT)
    wake_memory(model)
    prompts = [
        "The cat sat on the mat and then " * 3,
        "Short prompt ",
        "Mary went to the garden. " * 2,
    ]
    batched = memllm.generate(model, tokenizer, prompts, segment_length=16, max_new_tokens=6)
    alone = [
        memllm.generate(model, tokenizer, p, segment_length=16, max_new_tokens=6) for p in prompts
    ]
    assert batched == alone


def test_prompt_longer_than_the_window(tiny):
    model, tokenizer = tiny("llama", context=32)
    memllm.inject_memory(model, SMALL_LATENT)
    prompt = "Daniel went to the office. " * 20  # 540 byte-tokens, the window is 32
    text = memllm.generate(model, tokenizer, prompt, segment_length=24, max_new_tokens=8)
    assert isinstance(text, str)
    # without memory the same call sees only the last segment (the window baseline)
    memllm.remove_memory(model)
    assert isinstance(memllm.generate(model, tokenizer, prompt, segment_length=24), str)


def test_identity_generation_through_segments(tiny):
    model, tokenizer = tiny("qwen2")
    prompt = "Sandra journeyed to the kitchen. " * 4
    bare = memllm.generate(model, tokenizer, prompt, segment_length=32, max_new_tokens=8)
    memllm.inject_memory(model, SMALL_LATENT)
    assert memllm.generate(model, tokenizer, prompt, segment_length=32, max_new_tokens=8) == bare


def test_context_tokens_reads_only_the_last_tokens(tiny, monkeypatch):
    """The no-carry control's reading: with ``context_tokens`` the model (and its memory) is
    given only each prompt's last tokens, so nothing before them can reach the answer."""
    import memllm.core.generation as generation

    model, tokenizer = tiny("llama")
    memllm.inject_memory(model, SMALL_LATENT)
    seen = []

    def spy(model, input_ids, attention_mask, **kwargs):
        seen.append((input_ids, attention_mask))
        return real(model, input_ids, attention_mask, **kwargs)

    real = generation.generate_ids
    monkeypatch.setattr(generation, "generate_ids", spy)
    tail = "Where is Mary? Answer:"
    prompts = ["John went to the hallway. " * 3 + tail, "Mary moved. " + tail]
    kw = {"segment_length": 16, "max_new_tokens": 2}
    generation.generate(model, tokenizer, prompts, context_tokens=len(tail), **kw)
    ids, mask = seen[-1]
    expected = tokenizer(tail, add_special_tokens=False)["input_ids"]
    assert ids.tolist() == [expected, expected] and bool(mask.all())
    generation.generate(model, tokenizer, prompts, **kw)  # without it: the whole prompts
    assert seen[-1][0].shape[1] == len(tokenizer(prompts[0], add_special_tokens=False)["input_ids"])


def test_generation_ends_at_the_tokenizers_eos_the_trainer_appends(tiny):
    # A GGUF converted by another transformers version can end generation at another token
    # than the tokenizer's eos, which training appends to every answer: decoding then ran past
    # the answer ("28<|im_end|>assistant ..."). load_backbone makes both end it.
    from memllm.core.backbone import end_answers_at_eos

    model, tok = tiny("llama")
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit 0: greedy always picks token 0
    tok.eos_token = tok.convert_ids_to_tokens(0)
    model.generation_config.eos_token_id = 0
    end_answers_at_eos(model, tok)
    assert model.generation_config.eos_token_id == 0
    model.generation_config.eos_token_id = [2]
    end_answers_at_eos(model, tok)
    assert model.generation_config.eos_token_id == [2, 0]
    memllm.inject_memory(model, SMALL_LATENT)
    text = memllm.generate(
        model, tok, "abc " * 12, segment_length=8, max_new_tokens=5, skip_special_tokens=False
    )
    assert text == tok.decode([0])  # one token, not five
    loaded, loaded_tok = memllm.load_backbone("tiny-llama")  # every memllm path loads so
    ends = loaded.generation_config.eos_token_id
    assert loaded_tok.eos_token_id in (ends if isinstance(ends, list) else [ends])


def test_generation_builds_no_autograd_graph(tiny):
    # the segments written before decoding run the trainable memory: under autograd they would
    # keep every segment's graph alive until the batch ends
    model, _ = tiny("llama")
    memllm.inject_memory(model, SMALL_LATENT)
    seen = []
    hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    memllm.generate_ids(model, random_ids(1, 30), segment_length=8, max_new_tokens=2)
    hook.remove()
    assert seen and not any(seen)
