"""DESIGN.md's invariants for the gated latent memory, on tiny Llama, GPT-2, Qwen2, Gemma3."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_LATENT, random_ids, wake_memory

import memllm
from memllm.core.config import ConfigError
from memllm.core.inject import memory_layers
from memllm.core.segments import forward_segments, positions_from_mask, segment_bounds
from memllm.memory import memory_config_from_dict
from memllm.memory.latent_write import (
    delta_rule,
    delta_rule_reference,
    multihead_attention,
    relative_positions,
    slot_competition,
)
from memllm.training.feature_cache import FeatureCache, cache_mode, unsupported_reason

ARCHS = ["llama", "gpt2", "qwen2", "gemma3"]
# every write rule of LatentMemoryConfig (an ablation row each), checked against the invariants
WRITES = {
    "gmemllm": {},
    "gmemllm_recency": {"write_recency": True},
    "slot_competition": {"write": "slot_competition"},
    "slot_competition_recency": {"write": "slot_competition", "write_recency": True},
    "slot_competition_no_gate": {"write": "slot_competition", "update_gate": False},
    "delta": {"write": "delta"},
    "delta_recency": {"write": "delta", "write_recency": True},
}


def wake_writes(model, seed: int = 0) -> None:
    """:func:`wake_memory`, and random recency slopes so that the recency term acts too."""
    wake_memory(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in memory_layers(model).values():
            slope = layer.memory.write_recency
            if slope is not None:
                slope.copy_(3 * torch.randn(slope.shape, generator=gen))


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init_logits_and_generate(tiny, arch):
    model, _tokenizer = tiny(arch)
    ids = random_ids(2, 24)
    bare_logits = model(input_ids=ids).logits
    bare_gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    memllm.inject_memory(model, {**SMALL_LATENT, "layer_ids": [0, -1]})
    assert torch.equal(model(input_ids=ids).logits, bare_logits)
    with memllm.memory_session(model):
        assert torch.equal(model(input_ids=ids).logits, bare_logits)
    assert torch.equal(
        model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), bare_gen
    )
    # the segment-recurrent path too: with a zero gate every segment sees only the backbone
    out = forward_segments(model, ids, segment_length=8)
    bare_last = model(input_ids=ids[:, -8:]).logits
    assert torch.allclose(out.logits, bare_last, atol=1e-6)


@pytest.mark.parametrize("write", list(WRITES))
def test_every_write_rule_is_the_identity_at_init(tiny, write):
    model, _ = tiny("llama")
    ids = random_ids(2, 24)
    bare_logits = model(input_ids=ids).logits
    memllm.inject_memory(model, {**SMALL_LATENT, **WRITES[write], "layer_ids": [0, -1]})
    out = forward_segments(model, ids, segment_length=8)
    assert torch.equal(out.logits, model(input_ids=ids[:, -8:]).logits)
    with memllm.memory_session(model):
        assert torch.equal(model(input_ids=ids).logits, bare_logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_memory_trains(tiny, arch):
    model, _ = tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memllm.inject_memory(model, SMALL_LATENT)
    params = memllm.memory_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in trainable}
    assert len(params) > 0
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = random_ids(2, 32)
    for _ in range(2):  # the second step moves everything behind the (no longer zero) gate
        out = forward_segments(model, ids, labels=ids, segment_length=8)
        (out.loss + out.aux_loss).backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
        opt.zero_grad()
    memllm.remove_memory(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    memory = {id(p) for p in params}
    assert all(id(p) not in memory for p in model.parameters())


@pytest.mark.parametrize(
    ("arch", "write"),
    [("llama", "gmemllm"), ("gpt2", "gmemllm"), ("qwen2", "gmemllm")]
    + [("llama", write) for write in WRITES if write != "gmemllm"],
)
def test_batch_equals_examples_one_at_a_time(tiny, arch, write):
    model, _tokenizer = tiny(arch)
    memllm.inject_memory(model, {**SMALL_LATENT, **WRITES[write]})
    wake_writes(model)
    long, short = random_ids(1, 37, seed=1), random_ids(1, 19, seed=2)
    batch = torch.zeros(2, 37, dtype=torch.long)
    mask = torch.zeros(2, 37, dtype=torch.long)
    batch[0], mask[0] = long[0], 1
    batch[1, -19:], mask[1, -19:] = short[0], 1  # left padding
    together = forward_segments(
        model, batch, mask, labels=batch.masked_fill(mask == 0, -100), segment_length=8
    )
    alone_long = forward_segments(model, long, labels=long, segment_length=8)
    alone_short = forward_segments(model, short, labels=short, segment_length=8)
    assert torch.allclose(together.logits[0], alone_long.logits[0], atol=1e-5)
    last = alone_short.logits.shape[1]
    assert torch.allclose(together.logits[1, -last:], alone_short.logits[0], atol=1e-5)


def test_no_leakage_between_sessions(tiny):
    model, _ = tiny("llama")
    memllm.inject_memory(model, SMALL_LATENT)
    wake_memory(model)
    a, b = random_ids(1, 24, seed=3), random_ids(1, 24, seed=4)
    first = forward_segments(model, b, segment_length=8).logits
    forward_segments(model, a, segment_length=8)  # another example in between
    again = forward_segments(model, b, segment_length=8).logits
    assert torch.equal(first, again)
    # outside a session every call starts from a fresh memory
    assert torch.equal(model(input_ids=b).logits, model(input_ids=b).logits)


def test_persistent_memory_is_opt_in(tiny):
    model, _ = tiny("llama")
    memllm.inject_memory(model, SMALL_LATENT)
    wake_memory(model)
    a, b = random_ids(1, 16, seed=5), random_ids(1, 8, seed=6)
    with memllm.memory_session(model) as session:
        forward_segments(model, a, segment_length=8, session=session)
        carried = session.state()
    fresh = forward_segments(model, b, segment_length=8).logits
    with memllm.memory_session(model, state=carried) as session:
        continued = forward_segments(model, b, segment_length=8, session=session).logits
    with memllm.memory_session(model) as session:
        joint = forward_segments(model, torch.cat([a, b], 1), segment_length=8, session=session)
    assert not torch.allclose(fresh, continued)
    assert torch.allclose(continued, joint.logits, atol=1e-6)


@pytest.mark.parametrize(
    ("arch", "write"),
    [("llama", "gmemllm"), ("gpt2", "gmemllm")]
    + [("llama", write) for write in WRITES if write != "gmemllm"],
)
def test_causality(tiny, arch, write):
    model, _ = tiny(arch)
    memllm.inject_memory(model, {**SMALL_LATENT, **WRITES[write]})
    wake_writes(model)
    ids = random_ids(1, 32, seed=7)
    changed = ids.clone()
    t = 20
    changed[:, t + 1 :] = random_ids(1, 32 - t - 1, seed=8)
    # inside one call (the memory read holds only earlier segments)...
    with memllm.memory_session(model) as session:
        model(input_ids=random_ids(1, 8, seed=9))
        state = session.state()
    with memllm.memory_session(model, state=state):
        one = model(input_ids=ids).logits
    with memllm.memory_session(model, state=state):
        two = model(input_ids=changed).logits
    assert torch.equal(one[:, : t + 1], two[:, : t + 1])
    assert not torch.equal(one[:, t + 1 :], two[:, t + 1 :])
    # ...and across segments: a later segment never changes an earlier one
    with memllm.memory_session(model) as session:
        early = [model(input_ids=ids[:, s:e]).logits for s, e in segment_bounds(32, 8)[:2]]
    with memllm.memory_session(model) as session:
        late = [model(input_ids=changed[:, s:e]).logits for s, e in segment_bounds(32, 8)[:2]]
    for x, y in zip(early, late, strict=True):
        assert torch.equal(x, y)


def test_segments_equal_the_computation_by_hand(tiny):
    model, _ = tiny("llama")
    memllm.inject_memory(model, SMALL_LATENT)
    wake_memory(model)
    ids = random_ids(2, 30, seed=10)
    mask = torch.ones_like(ids)
    out = forward_segments(model, ids, mask, labels=ids, segment_length=8)
    assert out.num_segments == 4  # 6 + 8 + 8 + 8, aligned to the end
    losses, count = 0.0, 0
    with memllm.memory_session(model):
        for start, end in [(0, 6), (6, 14), (14, 22), (22, 30)]:
            logits = model(input_ids=ids[:, start:end]).logits
            # logits at t predict token t+1, also across the segment boundary
            targets = ids[:, start + 1 : end + 1]
            use = logits[:, : targets.shape[1]]
            losses += torch.nn.functional.cross_entropy(
                use.reshape(-1, use.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            count += targets.numel()
    assert torch.allclose(out.loss, losses / count, atol=1e-6)
    assert torch.allclose(out.logits, logits, atol=1e-6)
    assert out.num_tokens == count


def test_loss_only_logits_give_the_same_loss(tiny):
    """keep_logits=False computes the LM head only where there are labels; same loss."""
    model, _ = tiny("llama")
    memllm.inject_memory(model, SMALL_LATENT)
    wake_memory(model)
    ids = random_ids(2, 30, seed=13)
    labels = torch.full_like(ids, -100)
    labels[0, -5:], labels[1, -3:] = ids[0, -5:], ids[1, -3:]  # answer tokens at the end
    full = forward_segments(model, ids, labels=labels, segment_length=8)
    lean = forward_segments(model, ids, labels=labels, segment_length=8, keep_logits=False)
    assert lean.logits is None
    assert torch.allclose(full.loss, lean.loss, atol=1e-6)
    assert full.num_tokens == lean.num_tokens == 8


@pytest.mark.parametrize("write", ["gmemllm", "slot_competition", "delta"])
def test_segment_one_reaches_segment_three(tiny, write):
    model, _ = tiny("llama")
    memllm.inject_memory(model, {**SMALL_LATENT, **WRITES[write]})
    wake_memory(model)
    ids = random_ids(1, 24, seed=11)
    other = ids.clone()
    other[:, :8] = random_ids(1, 8, seed=12)
    a = forward_segments(model, ids, segment_length=8).logits
    b = forward_segments(model, other, segment_length=8).logits
    assert not torch.allclose(a, b)
    # and without memory the third segment could not know
    memllm.remove_memory(model)
    assert torch.equal(model(input_ids=ids[:, 16:]).logits, model(input_ids=other[:, 16:]).logits)


def test_update_gate_ablation_changes_the_write(tiny):
    model, _ = tiny("llama")
    memllm.inject_memory(model, {**SMALL_LATENT, "update_gate": False})
    wake_memory(model)
    out = forward_segments(model, random_ids(1, 24), labels=random_ids(1, 24), segment_length=8)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("write", list(WRITES))
def test_all_padding_segment_leaves_memory_unchanged(tiny, write):
    model, _ = tiny("llama")
    memllm.inject_memory(model, {**SMALL_LATENT, **WRITES[write]})
    wake_writes(model)
    ids = random_ids(1, 8)
    with memllm.memory_session(model) as session:
        model(input_ids=ids, attention_mask=torch.zeros_like(ids))
        after_padding = session.state()
    fresh = memory_layers(model)[1].memory.init_state(1, ids.device, torch.float32)
    assert torch.equal(after_padding[1], fresh)


def test_positions_from_mask():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_regularisers_are_loss_terms(tiny):
    model, _ = tiny("llama")
    memllm.inject_memory(model, {**SMALL_LATENT, "sparsity_weight": 0.5, "entropy_weight": 0.25})
    with memllm.memory_session(model) as session:
        model(input_ids=random_ids(1, 8))
        aux = session.aux[1]
        expected = 0.5 * aux["sparsity"] - 0.25 * aux["entropy"]
        assert torch.allclose(session.aux_loss(), expected)
        assert aux["loss"].requires_grad
        diag = session.diagnostics()
    assert {"layer1/sparsity", "layer1/entropy", "layer1/gate_abs_mean"} <= set(diag)


# -- the write rules on their own --------------------------------------------------------------


def test_delta_rule_solved_at_once_equals_the_token_loop():
    gen = torch.Generator().manual_seed(0)
    batch, tokens, heads, slots, width = 2, 9, 2, 5, 3
    memory = torch.randn(batch, slots, heads, width, generator=gen)
    keys = F.normalize(torch.randn(batch, tokens, heads, slots, generator=gen), dim=-1)
    values = torch.randn(batch, tokens, heads, width, generator=gen)
    beta = torch.rand(batch, tokens, heads, generator=gen)
    beta[1, :3] = 0  # padding: no write
    fast = delta_rule(memory, keys, values, beta)
    assert torch.allclose(fast, delta_rule_reference(memory, keys, values, beta), atol=1e-5)


def test_delta_rule_overwrites_a_key_written_again():
    """β = 1, orthonormal keys: M k returns the latest value written under k (no blending)."""
    keys = torch.eye(4)[None, [0, 1, 0], None, :]  # key 0, key 1, key 0 again: (1, 3, 1, 4)
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])[None, :, None, :]
    new = delta_rule(torch.zeros(1, 4, 1, 2), keys, values, torch.ones(1, 3, 1))
    assert torch.allclose(new[0, 0, 0], torch.tensor([5.0, 5.0]))
    assert torch.allclose(new[0, 1, 0], torch.tensor([0.0, 1.0]))


def test_slot_competition_gives_different_tokens_to_different_slots():
    """Two tokens, each matching one slot: each slot's candidate is its own token, not a
    blend; a slot that matches nothing wins (almost) nothing."""
    slots = torch.tensor([[[30.0, 0.0], [0.0, 30.0], [-30.0, -30.0]]])
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    values = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    candidate, won = slot_competition(slots, keys, values, 1, mask)
    assert torch.allclose(candidate[0, :2], values[0], atol=1e-3)
    assert won[0, 0, 2] < 1e-3 < won[0, 0, 0]


def test_recency_lets_the_latest_token_win():
    """With a large recency slope the write is the segment's last real token: the attention
    write and a slot's candidate return its value, and the delta rule stores it exactly."""
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 6, 4, generator=gen), torch.randn(1, 6, 4, generator=gen)
    mask = torch.tensor([[False, True, True, True, True, False]])  # last real token: 4
    late = 60.0 * relative_positions(mask)[:, None, :]  # (B, heads=1, T)
    slots = torch.randn(1, 3, 4, generator=gen)
    attended, _ = multihead_attention(slots, keys, values, 1, key_mask=mask, key_bias=late)
    assert torch.allclose(attended[0], values[0, 4].expand(3, -1), atol=1e-4)
    candidate, won = slot_competition(slots, keys, values, 1, mask, late)
    assert torch.allclose(candidate[0][won[0, 0] > 1e-3], values[0, 4], atol=1e-4)
    # delta: β = σ(logit + slope · position) → 1 on the last real token
    delta_keys = F.normalize(keys, dim=-1)[:, :, None, :]
    beta = torch.sigmoid(late.transpose(1, 2)) * mask[..., None]
    new = delta_rule(torch.randn(1, 4, 1, 4, generator=gen), delta_keys, values[:, :, None], beta)
    recalled = torch.einsum("bs,bsd->bd", delta_keys[:, 4, 0], new[:, :, 0])
    assert torch.allclose(recalled, values[:, 4], atol=1e-4)
    expected = torch.tensor([[0.0, 0.0, 1 / 3, 2 / 3, 1.0, 0.0]])
    assert torch.allclose(relative_positions(mask), expected)


@pytest.mark.parametrize("write", list(WRITES))
def test_the_feature_cache_applies_to_every_write_rule(tiny, write):
    """Every write rule works on the layer's output only: the cache records that output, and
    a replayed batch gives the loss of the full forward."""
    model, _ = tiny("llama")
    memllm.inject_memory(model, {**SMALL_LATENT, **WRITES[write]})
    wake_writes(model)
    assert unsupported_reason(model) is None and cache_mode(model)[0] == "output"
    ids = random_ids(2, 24, seed=5)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    full = forward_segments(model, ids, mask, labels, segment_length=8)
    cache = FeatureCache(model)
    for _ in range(2):  # records, then replays
        with memllm.memory_session(model) as session:
            cached = cache.forward(ids, mask, labels, segment_length=8, session=session)
    assert cache.hits == full.num_segments
    torch.testing.assert_close(cached.loss, full.loss, rtol=1e-5, atol=1e-6)


def test_unknown_write_rule_is_a_config_error():
    with pytest.raises(ConfigError, match="write"):
        memory_config_from_dict({**SMALL_LATENT, "write": "nope"})


def test_memory_learns_to_carry_a_key_across_segments(tiny, one_thread):
    """Positive control for retrieval: a key token in segment 1, its question at the end of
    segment 3; the frozen backbone sees only segment 3, so only the memory can answer."""
    keys, seg = torch.arange(10, 18), 8

    def passkey_batch(n: int, gen: torch.Generator, with_key: bool = True):
        ids = torch.randint(100, 250, (n, 3 * seg), generator=gen)
        key = keys[torch.randint(0, len(keys), (n,), generator=gen)]
        if with_key:
            ids[torch.arange(n), torch.randint(0, seg, (n,), generator=gen)] = key
        ids[:, -2] = 5  # the question token; the answer (the key) follows it
        ids[:, -1] = key
        labels = torch.full_like(ids, -100)
        labels[:, -1] = key
        return ids, labels, key

    model, _ = tiny("llama")
    torch.manual_seed(0)
    memllm.inject_memory(
        model,
        {"type": "latent", "num_slots": 8, "memory_dim": 64, "num_heads": 2, "layer_ids": [-1]},
    )
    opt = torch.optim.AdamW(memllm.memory_parameters(model), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        ids, labels, _ = passkey_batch(16, gen)
        out = forward_segments(model, ids, labels=labels, segment_length=seg, keep_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad()

    def accuracy(with_key: bool) -> float:
        ids, _, key = passkey_batch(256, torch.Generator().manual_seed(99), with_key)
        with torch.no_grad():
            logits = forward_segments(model, ids, segment_length=seg).logits
        return (logits[:, -2].argmax(-1) == key).float().mean().item()

    assert accuracy(with_key=True) > 0.7  # chance: 1 in 8
    assert accuracy(with_key=False) < 0.3  # the key's segment removed: back to chance
