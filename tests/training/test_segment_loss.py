"""The one segment loop (core.segments.segment_loss) against a plain reference loop.

forward_segments, the trainer's plain-window forward and the feature cache all compute their
loss through ``segment_loss``; here each is checked against a slow reference written out in
full (what the separate loops computed before they were merged): every segment a full forward
call in one memory session, cross-entropy summed over the labelled tokens, divided by their
count, the memory's regulariser averaged over segments.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_LATENT, wake_memory

import memllm
from memllm.core.segments import forward_segments, positions_from_mask, segment_bounds
from memllm.training.data import Batch
from memllm.training.feature_cache import FeatureCache
from memllm.training.forward import window_forward

SEGMENT = 8


def _batch(vocab: int, lengths=(29, 17, 24), labelled: int = 5, seed: int = 0):
    """A left-padded batch, labels on the last ``labelled`` tokens of each row."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), -100)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
        labels[row, -labelled:] = ids[row, -labelled:]
    return ids, mask, labels


def _reference(model, ids, mask, labels, segment_length, session=None):
    """(mean loss, tokens, mean aux, segments, last segment's logits), one segment at a time."""
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    total, tokens, aux, logits = 0.0, 0, [], None
    bounds = segment_bounds(ids.shape[1], segment_length)
    for start, end in bounds:
        m = mask[:, start:end]
        logits = model(
            input_ids=ids[:, start:end],
            attention_mask=m,
            position_ids=positions_from_mask(m),
            use_cache=False,
        ).logits
        if session is not None:
            aux.append(session.aux_loss())
        t = targets[:, start:end]
        total = total + torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), t.flatten(), ignore_index=-100, reduction="sum"
        )
        tokens += int((t != -100).sum())
    return total / tokens, tokens, (sum(aux) / len(aux) if aux else 0.0), len(bounds), logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_segments_equals_the_reference_loop(tiny, arch):
    model, tok = tiny(arch)
    memllm.inject_memory(model, {**SMALL_LATENT, "layer_ids": [0]})
    wake_memory(model)  # an untrained memory is the identity: make it matter
    ids, mask, labels = _batch(len(tok))
    with torch.no_grad():
        with memllm.memory_session(model) as session:
            loss, tokens, aux, segments, logits = _reference(
                model, ids, mask, labels, SEGMENT, session
            )
        out = forward_segments(model, ids, mask, labels, segment_length=SEGMENT)
    assert (out.num_tokens, out.num_segments) == (tokens, segments) == (15, 4)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.logits, logits)  # keep_logits: the last segment, in full


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_feature_cache_equals_the_reference_loop(tiny, arch):
    model, tok = tiny(arch)
    memllm.inject_memory(model, {**SMALL_LATENT, "layer_ids": [0]})  # a layer runs above it
    wake_memory(model)
    ids, mask, labels = _batch(len(tok))
    cache = FeatureCache(model)
    with torch.no_grad():
        with memllm.memory_session(model) as session:
            loss, tokens, aux, segments, logits = _reference(
                model, ids, mask, labels, SEGMENT, session
            )
        with memllm.memory_session(model) as session:  # records every segment
            cache.forward(ids, mask, None, segment_length=SEGMENT, session=session)
        with memllm.memory_session(model) as session:  # replays every segment
            out = cache.forward(
                ids, mask, labels, segment_length=SEGMENT, session=session, keep_logits=True
            )
    assert cache.hits == segments
    assert (out.num_tokens, out.num_segments) == (tokens, segments)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, aux, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_window_forward_equals_one_plain_forward(tiny, arch):
    model, tok = tiny(arch)
    ids, mask, labels = _batch(len(tok), lengths=(12, 7, 9), labelled=3)
    batch = Batch(["a", "b", "c"], ids, mask, labels, [])
    with torch.no_grad():
        loss, tokens, aux, segments, _ = _reference(model, ids, mask, labels, ids.shape[1])
        out = window_forward(model, batch)
    assert (out.num_tokens, out.num_segments, out.aux_loss) == (tokens, segments, aux) == (9, 1, 0)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
