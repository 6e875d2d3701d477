"""DESIGN.md's invariants for the Titans neural memory: on the update rule and on tiny models."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import memllm
from memllm.core.config import ConfigError, from_dict, load_yaml
from memllm.core.inject import memory_layers
from memllm.core.lora import LoraSettings
from memllm.core.segments import forward_segments, positions_from_mask, segment_bounds
from memllm.memory import memory_config_from_dict
from memllm.memory.diagnostics import retention_curve
from memllm.memory.neural import (
    PREVIOUS_DEFAULTS,
    NeuralMemory,
    NeuralMemoryConfig,
    neural_diagnostics,
)
from memllm.memory.neural_update import (
    chunked_update,
    gradient_factors,
    mlp_apply,
    pack,
    read,
    reference_update,
)

SMALL_NEURAL = {"type": "neural", "memory_dim": 16, "chunk_size": 4, "max_adaptive_lr": 0.1}
ARCHS = ["context", "layer", "gate"]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (5x slower when the
    machine is busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- helpers ----------------------------------------------------------------------------------
def random_state(batch: int, dims: list[int], seed: int = 0, offset=None):
    gen = torch.Generator().manual_seed(seed)
    weights = [
        torch.randn(batch, a, b, generator=gen) / a**0.5 for a, b in itertools.pairwise(dims)
    ]
    momentum = [0.01 * torch.randn(w.shape, generator=gen) for w in weights]
    base = [w + 0.01 * torch.randn(w.shape, generator=gen) for w in weights]
    if offset is None:  # no chunk in progress: the base is the weights
        offset, base = torch.zeros(batch, dtype=torch.long), list(weights)
    return pack(weights, momentum, base, torch.as_tensor(offset))


def random_inputs(batch: int, tokens: int, dim: int, seed: int = 0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    out = {
        "keys": F.normalize(torch.randn(batch, tokens, dim, generator=gen), dim=-1),
        "values": torch.randn(batch, tokens, dim, generator=gen),
        "queries": F.normalize(torch.randn(batch, tokens, dim, generator=gen), dim=-1),
        "lr": 0.1 * torch.rand(batch, tokens, generator=gen),  # stable: no blow-up
        "forget_logit": torch.randn(batch, tokens, generator=gen) - 3,
        "momentum_logit": torch.randn(batch, tokens, generator=gen) + 1,
    }
    if requires_grad:
        for value in out.values():
            value.requires_grad_(True)
    return out


def run(fn, state, inputs, mask, chunk_size, prior=None, max_grad_norm=None):
    out = fn(
        dict(state),
        *inputs.values(),
        mask,
        chunk_size=chunk_size,
        prior=prior,
        max_grad_norm=max_grad_norm,
    )
    return out[0], out[1]


def random_prior(dims: list[int], seed: int = 9):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(a, b, generator=gen) / a**0.5 for a, b in itertools.pairwise(dims)]


def assert_states_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol), key


def wake(model, seed: int = 0) -> None:
    """Give the zero-initialised gate scales and context projections random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in memory_layers(model).values():
            memory = layer.memory
            memory.gate_scale.copy_(torch.randn(memory.gate_scale.shape, generator=gen))
            if hasattr(memory, "to_context"):
                weight = memory.to_context.weight
                weight.copy_(
                    0.3 * torch.randn(weight.shape, generator=gen) / weight.shape[1] ** 0.5
                )


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, length), generator=gen)


# -- config -----------------------------------------------------------------------------------
def test_config_is_strict():
    config = memory_config_from_dict({"type": "neural", "layer_ids": [1, 2], "arch": "gate"})
    assert isinstance(config, NeuralMemoryConfig) and config.arch == "gate"
    bad = [
        ({"arch": "side"}, "arch"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"mlp_depth": 0}, "mlp_depth"),
        ({"max_adaptive_lr": 0}, "max_adaptive_lr"),
        ({"memory_dim": -1}, "memory_dim"),
        ({"layer_ids": [1, 1]}, "layer_ids"),
        ({"forget_toward": "one"}, "forget_toward"),
        ({"max_grad_norm": 0}, "max_grad_norm"),
        ({"num_slots": 4}, "num_slots"),
    ]
    for extra, key in bad:
        with pytest.raises(ConfigError, match=key):
            memory_config_from_dict({"type": "neural", **extra}, prefix="memory.")


# -- the update rule --------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [[6, 6], [6, 12, 6], [6, 9, 9, 6]])
def test_closed_form_gradients_match_autograd(dims):
    from torch.func import grad, vmap

    state = random_state(2, dims)
    weights = [state[f"weight{i}"] for i in range(len(dims) - 1)]
    x = random_inputs(2, 5, dims[0])

    def loss(ws, k, v):
        return (mlp_apply(ws, k) - v).pow(2).sum()

    inputs, deltas, _ = gradient_factors(weights, x["keys"], x["values"])
    for t in range(5):
        expected = vmap(grad(loss))(weights, x["keys"][:, t], x["values"][:, t])
        for i, g in enumerate(expected):
            outer = inputs[i][:, t, :, None] * deltas[i][:, t, None, :]
            assert torch.allclose(outer, g, atol=1e-5)


def test_chunk_size_one_equals_the_per_token_reference():
    state = random_state(3, [8, 16, 8])
    x = random_inputs(3, 11, 8)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    mask[2, 5:7] = False  # a hole
    prior = random_prior([8, 16, 8])
    ref_y, ref_state = run(reference_update, state, x, mask, 1, prior)
    y, new_state = run(chunked_update, state, x, mask, 1, prior)
    assert torch.allclose(y, ref_y, atol=1e-5)
    assert_states_close(new_state, ref_state)


@pytest.mark.parametrize(
    ("chunk_size", "forget_toward", "max_grad_norm"),
    [(3, "zero", None), (4, "init", 0.5), (16, "init", None)],
)
def test_chunked_equals_a_loop_of_the_chunked_rule(chunk_size, forget_toward, max_grad_norm):
    # a chunk in progress carried in (offsets), padding and holes, chunks not dividing T
    state = random_state(3, [8, 16, 8], offset=[0, 1, 2])
    prior = random_prior([8, 16, 8]) if forget_toward == "init" else None
    x = random_inputs(3, 13, 8, seed=1)
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[1, :5] = False
    mask[2, 3:6] = False
    ref_y, ref_state = run(reference_update, state, x, mask, chunk_size, prior, max_grad_norm)
    y, new_state = run(chunked_update, state, x, mask, chunk_size, prior, max_grad_norm)
    assert torch.allclose(y, ref_y, atol=1e-5)
    assert_states_close(new_state, ref_state)


def test_streaming_equals_one_pass():
    state = random_state(2, [8, 16, 8])
    x = random_inputs(2, 20, 8, seed=2)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, :3] = False
    prior = random_prior([8, 16, 8])
    whole_y, whole_state = run(chunked_update, state, x, mask, 4, prior)
    pieces, carried = [], dict(state)
    for start, end in [(0, 7), (7, 8), (8, 9), (9, 20)]:  # three segments and two single tokens
        part = {k: v[:, start:end] for k, v in x.items()}
        y, carried = run(chunked_update, carried, part, mask[:, start:end], 4, prior)
        pieces.append(y)
    assert torch.allclose(torch.cat(pieces, 1), whole_y, atol=1e-5)
    assert_states_close(carried, whole_state)


@pytest.mark.parametrize("arch", ["layer", "gate"])
def test_streaming_through_the_module(arch):
    """With an identity decoder layer, three segments with carried state equal one pass."""
    torch.manual_seed(0)
    memory = NeuralMemory(NeuralMemoryConfig(arch=arch, chunk_size=4, memory_dim=8), 16)
    with torch.no_grad():
        memory.gate_scale.fill_(1.0)
    hidden = torch.randn(2, 18, 16)
    mask = torch.ones(2, 18, dtype=torch.bool)

    def identity(h):
        return h

    state = memory.init_state(2, hidden.device, hidden.dtype)
    whole, whole_state, _ = memory(identity, hidden, state, mask=mask, write=True)
    outs = []
    for start, end in [(0, 5), (5, 11), (11, 18)]:
        out, state, _ = memory(
            identity, hidden[:, start:end], state, mask=mask[:, start:end], write=True
        )
        outs.append(out)
    assert torch.allclose(torch.cat(outs, 1), whole, atol=1e-5)
    assert_states_close(state, whole_state)


def test_causality_inside_a_chunk():
    state = random_state(1, [8, 16, 8])
    x = random_inputs(1, 12, 8, seed=3)
    changed = {k: v.clone() for k, v in x.items()}
    t = 5  # in the middle of the second chunk of 4
    for value in changed.values():
        value[:, t + 1 :] = torch.randn_like(value[:, t + 1 :])
    mask = torch.ones(1, 12, dtype=torch.bool)
    one, _ = run(chunked_update, state, x, mask, 4)
    two, _ = run(chunked_update, state, changed, mask, 4)
    assert torch.equal(one[:, : t + 1], two[:, : t + 1])
    assert not torch.allclose(one[:, t + 1 :], two[:, t + 1 :])


def test_outer_gradients_flow_through_the_update_and_match_the_reference():
    state = random_state(2, [6, 12, 6])
    mask = torch.ones(2, 9, dtype=torch.bool)
    grads = []
    for fn in (reference_update, chunked_update):
        x = random_inputs(2, 9, 6, seed=4, requires_grad=True)
        prior = [p.requires_grad_(True) for p in random_prior([6, 12, 6])]
        y, new_state = run(fn, state, x, mask, 3, prior, max_grad_norm=0.5)
        later = read(new_state, x["queries"][:, :2].detach())  # a later read of the memory
        (y.pow(2).sum() + later.pow(2).sum()).backward()
        grads.append({**{k: v.grad for k, v in x.items()}, "prior": prior[0].grad})
    for key in grads[0]:
        assert grads[1][key] is not None and grads[1][key].abs().sum() > 0, key
        assert torch.allclose(grads[0][key], grads[1][key], atol=1e-4, rtol=1e-4), key


def test_gradients_reach_the_outer_parameters():
    """Keys, values and gates act only through the update: the loss of a later call reaches them."""
    torch.manual_seed(0)
    memory = NeuralMemory(NeuralMemoryConfig(arch="gate", chunk_size=4, memory_dim=8), 16)
    with torch.no_grad():
        memory.gate_scale.fill_(1.0)
    state = memory.init_state(1, torch.device("cpu"), torch.float32)
    mask = torch.ones(1, 10, dtype=torch.bool)
    _, state, _ = memory(lambda h: h, torch.randn(1, 10, 16), state, mask=mask, write=True)
    # read-only second call: one token, so the in-call update only adds that token's own write
    out, _, _ = memory(lambda h: h, torch.randn(1, 1, 16), state, mask=mask[:, :1], write=False)
    out.pow(2).sum().backward()
    for name in ("to_keys", "to_values", "to_gates", "to_queries", "to_output", "to_gate"):
        weight = getattr(memory, name).weight
        assert weight.grad is not None and weight.grad.abs().sum() > 0, name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in memory.initial_weights)


def test_recall_of_written_pairs():
    """After writing random key→value pairs, each value is retrieved far better than chance."""
    torch.manual_seed(0)
    config = NeuralMemoryConfig(
        memory_dim=32,
        chunk_size=4,
        max_adaptive_lr=1.0,  # stable thanks to the bound on each step (without it: NaN)
        max_grad_norm=1.0,
        lr_bias=9.0,  # θ ≈ max
        forget_bias=-9.0,  # no forgetting
        momentum_bias=-9.0,  # no momentum
    )
    memory = NeuralMemory(config, 32)
    with torch.no_grad():
        memory.to_queries.weight.copy_(memory.to_keys.weight)  # ask with the key
    pairs = 8
    x = memory.norm(torch.randn(1, pairs, 32))
    with torch.no_grad():
        fresh = memory.init_state(1, x.device, x.dtype)
        written = fresh
        mask = torch.ones(1, pairs, dtype=torch.bool)
        for _ in range(3):  # three passes over the pairs
            _, written, _ = memory.memorise(x, written, mask)
        values = F.normalize(memory.to_values(x)[0], dim=-1)

        def accuracy(state):
            found = F.normalize(read(state, memory.queries(x))[0], dim=-1)
            similarity = found @ values.T
            return (similarity.argmax(-1) == torch.arange(pairs)).float().mean(), similarity

        before, _ = accuracy(fresh)
        after, similarity = accuracy(written)
    assert after >= 0.75 > before + 0.25  # chance is 1/8
    assert similarity.diagonal().mean() > 0.7


def test_forgetting_toward_the_initial_weights_keeps_the_memory_alive():
    """With the earlier default gates (α ≈ 0.02) and nothing consistent to learn, decaying
    toward zero drives the bias-free MLP to its dead point (all gradients vanish there);
    decaying toward the learned initial weights does not."""
    torch.manual_seed(0)
    norms = {}
    for toward in ("zero", "init"):
        config = NeuralMemoryConfig(memory_dim=16, forget_toward=toward, **PREVIOUS_DEFAULTS)
        memory = NeuralMemory(config, 32)
        state = memory.init_state(1, torch.device("cpu"), torch.float32)
        x = memory.norm(torch.randn(1, 1024, 32))
        with torch.no_grad():
            _, state, _ = memory.memorise(x, state, torch.ones(1, 1024, dtype=torch.bool))
        norms[toward] = state["weight0"].norm() / memory.initial_weights[0].norm()
    assert norms["zero"] < 1e-3 and norms["init"] > 0.5


def test_a_written_key_survives_distractors_at_the_new_defaults_only():
    """Retention (docs/neural_memory.md): one key→value write, then 64 distractor tokens, in a
    memory of a tiny model's width (32). At the defaults the key's trace is still a tenth of
    the value and points at it; at the earlier defaults it never exceeds 1% of the value."""
    distances = [0, 8, 64]
    new = retention_curve(NeuralMemoryConfig(), distances, width=32)
    old = retention_curve(NeuralMemoryConfig(**PREVIOUS_DEFAULTS), distances, width=32)
    assert all(point.recoverable for point in new)
    assert new[-1].imprint > 0.2 and new[-1].alignment > 0.8
    assert not any(point.recoverable for point in old)
    assert max(point.imprint for point in old) < 0.01


# -- on tiny models ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init(tiny, family, arch):
    model, _ = tiny(family)
    ids = random_ids(2, 20)
    bare_logits = model(input_ids=ids).logits
    bare_gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    memllm.inject_memory(model, {**SMALL_NEURAL, "arch": arch, "layer_ids": [0, -1]})
    assert torch.equal(model(input_ids=ids).logits, bare_logits)
    with memllm.memory_session(model):
        model(input_ids=ids)  # a written memory still changes nothing through a zero gate
        assert torch.equal(model(input_ids=ids).logits, bare_logits)
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, bare_gen)
    out = forward_segments(model, ids, segment_length=8)
    assert torch.allclose(out.logits, model(input_ids=ids[:, -8:]).logits, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_examples_one_at_a_time(tiny, arch):
    model, _ = tiny("llama")
    memllm.inject_memory(model, {**SMALL_NEURAL, "arch": arch})
    wake(model)
    long, short = random_ids(1, 29, seed=1), random_ids(1, 14, seed=2)
    batch = torch.zeros(2, 29, dtype=torch.long)
    mask = torch.zeros(2, 29, dtype=torch.long)
    batch[0], mask[0] = long[0], 1
    batch[1, -14:], mask[1, -14:] = short[0], 1  # left padding
    together = forward_segments(model, batch, mask, segment_length=6)
    alone_long = forward_segments(model, long, segment_length=6)
    alone_short = forward_segments(model, short, segment_length=6)
    assert torch.allclose(together.logits[0], alone_long.logits[0], atol=1e-5)
    last = alone_short.logits.shape[1]
    assert torch.allclose(together.logits[1, -last:], alone_short.logits[0], atol=1e-5)


def test_memory_is_fresh_per_session_and_used_across_segments(tiny):
    model, _ = tiny("llama")
    memllm.inject_memory(model, {**SMALL_NEURAL, "arch": "context"})
    wake(model)
    a, b = random_ids(1, 16, seed=3), random_ids(1, 16, seed=4)
    first = forward_segments(model, b, segment_length=8).logits
    forward_segments(model, a, segment_length=8)  # another example in between
    assert torch.equal(forward_segments(model, b, segment_length=8).logits, first)
    # the first segment changes the second: the memory carries it
    other = torch.cat([a[:, :8], b[:, 8:]], 1)
    assert not torch.allclose(forward_segments(model, other, segment_length=8).logits, first)


@pytest.mark.parametrize("arch", ARCHS)
def test_causality_on_a_model(tiny, arch):
    model, _ = tiny("llama")
    memllm.inject_memory(model, {**SMALL_NEURAL, "arch": arch})
    wake(model)
    ids = random_ids(1, 24, seed=7)
    changed = ids.clone()
    t = 13  # inside a chunk of 4
    changed[:, t + 1 :] = random_ids(1, 24 - t - 1, seed=8)
    with memllm.memory_session(model) as session:
        model(input_ids=random_ids(1, 8, seed=9))
        state = session.state()
    outs = []
    for x in (ids, changed):
        with memllm.memory_session(model, state=state):
            outs.append(model(input_ids=x).logits)
    assert torch.equal(outs[0][:, : t + 1], outs[1][:, : t + 1])
    assert not torch.allclose(outs[0][:, t + 1 :], outs[1][:, t + 1 :])
    # across segments: tokens after t change nothing up to t
    runs = []
    for x in (ids, changed):
        with memllm.memory_session(model):
            runs.append(
                torch.cat([model(input_ids=x[:, s:e]).logits for s, e in segment_bounds(24, 8)], 1)
            )
    assert torch.equal(runs[0][:, : t + 1], runs[1][:, : t + 1])
    assert not torch.allclose(runs[0][:, t + 1 :], runs[1][:, t + 1 :])


def test_read_only_calls_leave_the_state_and_prefill_matches_teacher_forcing(tiny):
    model, _ = tiny("llama")
    memllm.inject_memory(model, {**SMALL_NEURAL, "arch": "context"})
    wake(model)
    ids = random_ids(2, 24, seed=10)
    with memllm.memory_session(model) as session:
        model(input_ids=ids[:, :16])
        before = session.state()
        with session.read_only():
            model(input_ids=ids[:, 16:])
        after = session.state()
    for index in before:
        for key in before[index]:
            assert before[index][key] is after[index][key]
    # the first generated token comes from the same logits as a teacher-forced pass
    teacher = forward_segments(model, ids, segment_length=8).logits[:, -1].argmax(-1)
    generated = memllm.generate_ids(model, ids, segment_length=8, max_new_tokens=1)
    assert torch.equal(generated[:, 0], teacher)


def test_diagnostics(tiny):
    model, _ = tiny("llama")
    memllm.inject_memory(model, {**SMALL_NEURAL, "arch": "context", "layer_ids": [0, 1]})
    wake(model)
    with memllm.memory_session(model) as session:
        forward_segments(model, random_ids(2, 16), segment_length=8, session=session)
        stats = neural_diagnostics(session)
        floats = session.diagnostics()
    for name in (
        "gate_mean",
        "gate_std",
        "gate_min",
        "gate_max",
        "contribution_ratio",
        "surprise",
        "lr_mean",
        "forget_mean",
        "momentum_mean",
        "context_ratio",
    ):
        for key in (f"layer0/{name}", f"layer1/{name}", f"mean/{name}"):
            assert isinstance(stats[key], float) and stats[key] == stats[key], key
    assert stats["mean/contribution_ratio"] > 0 and stats["mean/surprise"] > 0
    assert stats["layer0/gate_min"] <= stats["layer0/gate_mean"] <= stats["layer0/gate_max"]
    assert 0 < stats["mean/lr_mean"] < SMALL_NEURAL["max_adaptive_lr"]
    assert stats["layer0/contribution_per_token"].shape == (2, 8)
    assert floats["layer1/surprise"] == stats["layer1/surprise"]


# -- shipped presets --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "layers", "expected"),
    [
        ("memoryllama_alma", 16, [14, 15]),
        ("memoryllama_elma", 16, [1, 2]),
        ("smollm2_neural_alma", 30, None),
        ("smollm2_neural_elma", 30, None),
    ],
)
def test_presets_load(name, layers, expected):
    from memllm.core.inject import resolve_layer_ids

    data = load_yaml(CONFIGS / f"{name}.yaml")
    memory = memory_config_from_dict(data["memory"], prefix="memory.")
    assert memory.type == "neural" and memory.arch == "context"
    resolved = resolve_layer_ids(memory.layer_ids, layers)
    assert expected is None or resolved == expected
    lora = from_dict(LoraSettings, data["lora"], prefix="lora.")
    assert (lora.rank, lora.alpha) == (16, 32)
    assert set(lora.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


# -- generation: decoding continues the prompt's last segment --------------------------------
DECODE = {**SMALL_NEURAL, "chunk_size": 3}  # 8-token segments: chunks end inside the decoding


def teacher_forced_logits(model, ids, mask, new, segment_length):
    """Logits that predict each of ``new`` in a teacher-forced pass segmented as generation is:
    the prompt's segments (aligned to its end), the last one extended by the new tokens."""
    last_start = segment_bounds(ids.shape[1], segment_length)[-1][0]
    tail = torch.cat([ids[:, last_start:], new], 1)
    tail_mask = torch.cat([mask[:, last_start:], torch.ones_like(new)], 1)
    with memllm.memory_session(model) as session:
        if last_start:
            forward_segments(
                model,
                ids[:, :last_start],
                mask[:, :last_start],
                segment_length=segment_length,
                session=session,
                keep_logits=False,
            )
        logits = model(
            input_ids=tail,
            attention_mask=tail_mask,
            position_ids=positions_from_mask(tail_mask),
            use_cache=False,
        ).logits
    return logits[:, ids.shape[1] - last_start - 1 : -1]


def decoding_model(tiny, arch):
    model, _ = tiny("llama")
    memllm.inject_memory(model, {**DECODE, "arch": arch})
    wake(model)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_equals_teacher_forcing_token_for_token(tiny, arch):
    model = decoding_model(tiny, arch)
    ids = random_ids(1, 29, seed=11)
    mask = torch.ones_like(ids)
    # eos_token_id=None: a random model may emit </s>; every step must be compared
    new = memllm.generate_ids(model, ids, segment_length=8, max_new_tokens=7, eos_token_id=None)
    assert new.shape == (1, 7)
    teacher = teacher_forced_logits(model, ids, mask, new, 8).argmax(-1)
    assert torch.equal(new, teacher)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_generation_equals_one_at_a_time_and_teacher_forcing(tiny, arch):
    model = decoding_model(tiny, arch)
    long, short = random_ids(1, 29, seed=12), random_ids(1, 19, seed=13)
    batch = torch.zeros(2, 29, dtype=torch.long)
    mask = torch.zeros(2, 29, dtype=torch.long)
    batch[0], mask[0] = long[0], 1
    batch[1, -19:], mask[1, -19:] = short[0], 1  # left padding, also inside the last segment
    kwargs = {"segment_length": 8, "max_new_tokens": 6, "eos_token_id": None}
    together = memllm.generate_ids(model, batch, mask, **kwargs)
    alone = torch.cat([memllm.generate_ids(model, x, **kwargs) for x in (long, short)])
    assert torch.equal(together, alone)
    teacher = teacher_forced_logits(model, batch, mask, together, 8).argmax(-1)
    assert torch.equal(together, teacher)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_streams_a_scratch_state_and_leaves_the_committed_one(tiny, arch):
    model = decoding_model(tiny, arch)
    ids = random_ids(2, 24, seed=14)
    mask = torch.ones_like(ids)

    def generate(block):
        with block():
            out = model.generate(
                ids[:, 16:],
                attention_mask=mask[:, 16:],
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=None,
                output_logits=True,
                return_dict_in_generate=True,
            )
        return out.sequences[:, 8:], torch.stack(out.logits, 1)

    with memllm.memory_session(model) as session:
        model(input_ids=ids[:, :8])
        model(input_ids=ids[:, 8:16])
        before = session.state()
        new, logits = generate(session.decoding)
        assert session.scratch is None
        after = session.state()
        _, read_only_logits = generate(session.read_only)
        with session.decoding(), pytest.raises(RuntimeError, match="nest"), session.decoding():
            pass
    assert before.keys() == after.keys()
    for index in before:
        for key in before[index]:
            assert before[index][key] is after[index][key], (index, key)
    teacher = teacher_forced_logits(model, ids, mask, new, 8)
    assert torch.allclose(logits, teacher, atol=1e-4)
    # what read-only decoding (each step a segment of its own) gets wrong after the first token
    assert torch.allclose(read_only_logits[:, 0], teacher[:, 0], atol=1e-4)
    assert not torch.allclose(read_only_logits[:, 1:], teacher[:, 1:], atol=1e-3)
    # beam search would reorder the batch behind the scratch state's back
    with pytest.raises(ValueError, match="beam search"):
        memllm.generate_ids(model, ids, segment_length=8, max_new_tokens=2, num_beams=2)
    # generate_ids from a given state leaves that state's tensors as they were
    copies = {i: {k: v.clone() for k, v in s.items()} for i, s in before.items()}
    memllm.generate_ids(model, ids[:, 16:], state=before, segment_length=8, max_new_tokens=4)
    for index in before:
        for key in before[index]:
            assert torch.equal(before[index][key], copies[index][key])
