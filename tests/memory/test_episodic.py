"""The episodic memory (stored hidden states read by attention with recency): DESIGN.md's
invariants, its bounded store, and a recall positive control, on tiny Llama/Qwen2/Gemma3/GPT-2."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, wake_memory

import memllm
from memllm.core.inject import memory_layers
from memllm.core.segments import forward_segments, segment_bounds
from memllm.errors import ConfigError
from memllm.memory import memory_config_from_dict
from memllm.memory.episodic import EpisodicMemory, EpisodicMemoryConfig

SMALL = {"type": "episodic", "num_heads": 2, "key_dim": 16, "max_tokens": 64}
ARCHS = ["llama", "gpt2", "qwen2", "gemma3"]


def woken(tiny, arch: str = "llama", **changes):
    """A tiny model with an episodic memory whose gate and recency slopes are non-zero."""
    model, tokenizer = tiny(arch)
    memllm.inject_memory(model, {**SMALL, **changes})
    wake_memory(model)
    with torch.no_grad():
        for layer in memory_layers(model).values():
            if layer.memory.recency_slope is not None:
                layer.memory.recency_slope.copy_(torch.linspace(-0.05, 0.2, SMALL["num_heads"]))
    return model, tokenizer


def store(model, index: int = 1) -> dict:
    return memory_layers(model)[index].memory


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_heads": 3}, "key_dim: 16 is not divisible by num_heads=3"),
        ({"max_tokens": 0}, "max_tokens: must be > 0"),
        ({"num_heads": 0}, "num_heads: must be > 0"),
        ({"store_dtype": "int8"}, "memory.store_dtype: must be one of"),
        ({"dropout": 1.0}, "dropout: must be in [0, 1)"),
        ({"slots": 4}, "slots"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(change, message):
    with pytest.raises(ConfigError, match=None) as err:
        memory_config_from_dict({**SMALL, **change}, prefix="memory.")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_defaults_suit_smollm2():
    config = memory_config_from_dict({"type": "episodic"})
    assert isinstance(config, EpisodicMemoryConfig)
    assert config.key_dim % config.num_heads == 0 and config.recency
    module = EpisodicMemory(config, 576)
    assert module.bytes_per_token(torch.float32) == 576 * 4 + 9
    fp16 = EpisodicMemory(
        memory_config_from_dict({"type": "episodic", "store_dtype": "float16"}), 576
    )
    assert fp16.bytes_per_token(torch.float32) == 576 * 2 + 9
    no_recency = EpisodicMemory(EpisodicMemoryConfig(recency=False), 576)
    assert "recency_slope" not in dict(no_recency.named_parameters())


# -- DESIGN.md invariants ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init_logits_and_generate(tiny, arch):
    model, _ = tiny(arch)
    ids = random_ids(2, 24)
    bare_logits = model(input_ids=ids).logits
    bare_gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    bare_window = memllm.generate_ids(model, ids, segment_length=8, max_new_tokens=4)
    memllm.inject_memory(model, {**SMALL, "layer_ids": [0, -1]})
    assert torch.equal(model(input_ids=ids).logits, bare_logits)
    assert torch.equal(
        model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), bare_gen
    )
    # segment by segment, the store fills but the zero gate keeps every read out
    out = forward_segments(model, ids, segment_length=8)
    assert torch.equal(out.logits, model(input_ids=ids[:, -8:]).logits)
    assert torch.equal(
        memllm.generate_ids(model, ids, segment_length=8, max_new_tokens=4), bare_window
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_memory_trains(tiny, arch):
    model, _ = tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memllm.inject_memory(model, SMALL)
    params = memllm.memory_parameters(model)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = random_ids(2, 32)
    for _ in range(2):  # the second step moves what sits behind the zero gate
        out = forward_segments(model, ids, labels=ids, segment_length=8)
        out.loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
        opt.zero_grad()
    assert all(p.abs().sum() > 0 for p in params if p.dim() == 1 and p.shape[0] == 32)
    memllm.remove_memory(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def _left_padded(long: torch.Tensor, short: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.zeros(2, long.shape[1], dtype=torch.long)
    mask = torch.zeros_like(batch)
    batch[0], mask[0] = long[0], 1
    batch[1, -short.shape[1] :], mask[1, -short.shape[1] :] = short[0], 1
    return batch, mask


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("max_tokens", [64, 10])  # 10: eviction with per-example padding
def test_batch_equals_examples_one_at_a_time(tiny, arch, max_tokens):
    model, _ = woken(tiny, arch, max_tokens=max_tokens)
    long, short = random_ids(1, 37, seed=1), random_ids(1, 19, seed=2)
    batch, mask = _left_padded(long, short)
    together = forward_segments(model, batch, mask, segment_length=8)
    alone_long = forward_segments(model, long, segment_length=8)
    alone_short = forward_segments(model, short, segment_length=8)
    torch.testing.assert_close(together.logits[0], alone_long.logits[0], atol=1e-5, rtol=1e-5)
    last = alone_short.logits.shape[1]
    torch.testing.assert_close(
        together.logits[1, -last:], alone_short.logits[0], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causality_within_a_call_and_across_segments(tiny, arch):
    model, _ = woken(tiny, arch)
    ids = random_ids(1, 32, seed=7)
    changed = ids.clone()
    t = 20
    changed[:, t + 1 :] = random_ids(1, 32 - t - 1, seed=8)
    with memllm.memory_session(model) as session:
        model(input_ids=random_ids(1, 8, seed=9))
        state = session.state()
    outputs = []
    for x in (ids, changed):
        with memllm.memory_session(model, state=state):
            outputs.append(model(input_ids=x).logits)
    assert torch.equal(outputs[0][:, : t + 1], outputs[1][:, : t + 1])
    assert not torch.equal(outputs[0][:, t + 1 :], outputs[1][:, t + 1 :])
    # across segments: a later segment never changes an earlier one's outputs...
    runs = []
    for x in (ids, changed):
        with memllm.memory_session(model):
            runs.append([model(input_ids=x[:, s:e]).logits for s, e in segment_bounds(32, 8)])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][:2], runs[1][:2], strict=True))
    # ...and the memory does carry the earlier segment into the later one
    other = ids.clone()
    other[:, :8] = random_ids(1, 8, seed=10)
    a = forward_segments(model, ids, segment_length=8).logits
    b = forward_segments(model, other, segment_length=8).logits
    assert not torch.allclose(a, b)


def test_no_leakage_between_sessions(tiny):
    model, _ = woken(tiny)
    a, b = random_ids(1, 24, seed=3), random_ids(1, 24, seed=4)
    first = forward_segments(model, b, segment_length=8).logits
    forward_segments(model, a, segment_length=8)
    assert torch.equal(forward_segments(model, b, segment_length=8).logits, first)


# -- the store ---------------------------------------------------------------------------------


def test_store_holds_real_tokens_with_absolute_positions(tiny):
    model, _ = woken(tiny)
    long, short = random_ids(1, 21, seed=1), random_ids(1, 13, seed=2)
    batch, mask = _left_padded(long, short)
    with memllm.memory_session(model) as session:
        forward_segments(model, batch, mask, segment_length=8, session=session)
        state = session.state()[1]
    assert state["seen"].tolist() == [21, 13]
    for row, n in enumerate((21, 13)):
        assert state["mask"][row].sum() == n  # padding is never stored as a token
        assert state["position"][row, state["mask"][row]].tolist() == list(range(n))
    # the stored states are the wrapped layer's outputs (before the memory's own read-out)
    captured = []
    handle = memory_layers(model)[1].layer.register_forward_hook(
        lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    forward_segments(model, long, segment_length=8)
    handle.remove()
    torch.testing.assert_close(state["hidden"][0, state["mask"][0]], torch.cat(captured, 1)[0])


def test_all_padding_call_changes_no_later_read(tiny):
    model, _ = woken(tiny)
    ids = random_ids(1, 16, seed=5)
    with memllm.memory_session(model) as session:
        model(input_ids=ids[:, :8])
        model(
            input_ids=random_ids(1, 8, seed=6), attention_mask=torch.zeros(1, 8, dtype=torch.long)
        )
        assert session.state()[1]["seen"].item() == 8
        padded = model(input_ids=ids[:, 8:]).logits
    with memllm.memory_session(model):
        model(input_ids=ids[:, :8])
        plain = model(input_ids=ids[:, 8:]).logits
    torch.testing.assert_close(padded, plain, atol=1e-6, rtol=1e-6)


def test_eviction_keeps_the_newest_tokens(tiny):
    """A store of 8 tokens after segments 1, 2, 3 equals an unbounded one after segments 2, 3:
    segment 3 reads all of segment 2 (its own write evicts nothing it reads), and nothing of
    segment 1. Distances are relative, so dropping segment 1 changes no recency bias."""
    model, _ = woken(tiny, max_tokens=8)
    ids = random_ids(1, 32, seed=11)
    with memllm.memory_session(model) as session:
        logits = [model(input_ids=ids[:, s : s + 8]).logits for s in (0, 8, 16, 24)]
        state = session.state()[1]
    assert state["hidden"].shape[1] == 8 and state["mask"].all()
    assert state["position"][0].tolist() == list(range(24, 32)) and state["seen"].item() == 32
    # the same weights in an unbounded store
    weights = store(model).state_dict()
    memllm.remove_memory(model)
    memllm.inject_memory(model, {**SMALL, "max_tokens": 1000})
    store(model).load_state_dict(weights)
    with memllm.memory_session(model):
        model(input_ids=ids[:, 8:16])
        unbounded = model(input_ids=ids[:, 16:24]).logits
    torch.testing.assert_close(logits[2], unbounded, atol=1e-6, rtol=1e-6)
    with memllm.memory_session(model):  # segment 1 does matter when it is kept
        for s in (0, 8):
            model(input_ids=ids[:, s : s + 8])
        assert not torch.allclose(model(input_ids=ids[:, 16:24]).logits, logits[2])


def test_a_segment_longer_than_the_store_keeps_its_last_tokens(tiny):
    model, _ = woken(tiny, max_tokens=5)
    ids = random_ids(2, 12, seed=12)
    with memllm.memory_session(model) as session:
        model(input_ids=ids)
        state = session.state()[1]
    assert state["position"].tolist() == [list(range(7, 12))] * 2


def test_recency_lets_the_latest_binding_win():
    """Two stored tokens that match the query equally (keys zeroed): with a zero slope the read
    is their average, with a positive one it is the later token's value alone."""
    module = EpisodicMemory(EpisodicMemoryConfig(num_heads=2, key_dim=8), 8)
    with torch.no_grad():
        module.key.weight.zero_()
        module.key.bias.zero_()
    state = {
        "hidden": torch.randn(1, 2, 8),
        "mask": torch.ones(1, 2, dtype=torch.bool),
        "position": torch.tensor([[0, 5]]),
        "seen": torch.tensor([6]),
    }
    query = torch.randn(1, 3, 8)
    old = module.read(query, {**state, "mask": torch.tensor([[True, False]])})
    new = module.read(query, {**state, "mask": torch.tensor([[False, True]])})
    with torch.no_grad():
        torch.testing.assert_close(module.read(query, state), (old + new) / 2)
        module.recency_slope.fill_(3.0)  # the older token is 5 tokens older: e^-15 of the weight
        torch.testing.assert_close(module.read(query, state), new)
        module.recency_slope.fill_(-3.0)  # a negative slope favours the older one
        torch.testing.assert_close(module.read(query, state), old)


def test_fp16_store(tiny):
    model, _ = woken(tiny)
    ids = random_ids(1, 24, seed=13)
    exact = forward_segments(model, ids, segment_length=8).logits
    weights = store(model).state_dict()
    memllm.remove_memory(model)
    memllm.inject_memory(model, {**SMALL, "store_dtype": "float16"})
    store(model).load_state_dict(weights)
    with memllm.memory_session(model) as session:
        half = forward_segments(model, ids, segment_length=8, session=session).logits
        state = session.state()[1]
    assert state["hidden"].dtype == torch.float16
    torch.testing.assert_close(half, exact, atol=1e-2, rtol=1e-2)
    assert not torch.equal(half, exact)  # it did read through the rounded store


# -- generation --------------------------------------------------------------------------------


def test_generation_reads_the_store_from_the_first_token_and_equals_teacher_forcing(tiny):
    model, _ = woken(tiny)
    ids = random_ids(1, 40, seed=14)
    new = memllm.generate_ids(model, ids, segment_length=16, max_new_tokens=5, eos_token_id=None)
    full = torch.cat([ids, new], 1)
    with memllm.memory_session(model) as session:
        model(input_ids=full[:, :8])
        model(input_ids=full[:, 8:24])
        with session.read_only():  # the last segment, prompt tail + new tokens, in one call
            logits = model(input_ids=full[:, 24:]).logits
    assert torch.equal(logits[0, 15:-1].argmax(-1), new[0])
    bare = model(input_ids=ids[:, 24:]).logits[0, -1]  # a fresh memory: no store to read
    assert not torch.allclose(bare, logits[0, 15])


def test_batched_generation_equals_one_at_a_time(tiny):
    model, _ = woken(tiny, max_tokens=12)
    long, short = random_ids(1, 29, seed=15), random_ids(1, 19, seed=16)
    batch, mask = _left_padded(long, short)
    kwargs = {"segment_length": 8, "max_new_tokens": 6, "eos_token_id": None}
    together = memllm.generate_ids(model, batch, mask, **kwargs)
    alone = torch.cat([memllm.generate_ids(model, x, **kwargs) for x in (long, short)])
    assert torch.equal(together, alone)


# -- checkpoints, LoRA, feature cache, experiments, CLI ----------------------------------------


def _train(model, params, steps: int = 2) -> None:
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = random_ids(2, 24)
    for _ in range(steps):
        out = forward_segments(model, ids, labels=ids, segment_length=8)
        out.loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("lora", [False, True])
def test_save_load_round_trip(tiny, tmp_path, lora):
    from memllm.core.checkpoint import CONFIG_FILE, WEIGHTS_FILE
    from memllm.core.lora import lora_parameters, remove_lora

    model, _ = tiny("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    memllm.inject_memory(model, {**SMALL, "store_dtype": "float16", "max_tokens": 12})
    if lora:
        memllm.apply_lora(model, {"rank": 4, "alpha": 8})
    params = memllm.memory_parameters(model) + (lora_parameters(model) if lora else [])
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    _train(model, params)
    ids = random_ids(1, 30, seed=17)
    expected = forward_segments(model, ids, segment_length=8).logits
    memllm.save_memory(model, tmp_path / "ckpt")
    if lora:  # the backbone under the adapter did not move
        remove_lora(model)
    memllm.remove_memory(model)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "ckpt" / WEIGHTS_FILE)
    assert {k.split(".", 2)[2] for k in saved} == set(dict(store_names()))  # weights, no state
    assert '"max_tokens": 12' in (tmp_path / "ckpt" / CONFIG_FILE).read_text()
    fresh, _ = tiny("llama")
    memllm.load_memory(fresh, tmp_path / "ckpt")
    assert torch.equal(forward_segments(fresh, ids, segment_length=8).logits, expected)


def store_names():
    return EpisodicMemory(EpisodicMemoryConfig(num_heads=2, key_dim=16), 32).named_parameters()


@pytest.mark.parametrize(("arch", "layer"), [("llama", -1), ("llama", 0), ("gpt2", -1)])
def test_feature_cache_gives_the_plain_loss(tiny, arch, layer):
    from memllm.training.feature_cache import FeatureCache

    model, tok = woken(tiny, arch, layer_ids=[layer], max_tokens=20)
    cache = FeatureCache(model)
    g = torch.Generator().manual_seed(0)
    lengths = [37, 22, 30]
    ids = torch.randint(3, len(tok), (3, 37), generator=g)
    mask = torch.zeros(3, 37, dtype=torch.long)
    labels = torch.full((3, 37), -100)
    for row, n in enumerate(lengths):
        mask[row, 37 - n :] = 1
        labels[row, -4:] = ids[row, -4:]
    kwargs = {"segment_length": 8, "bptt_segments": 2}

    def loss_and_grads(run):
        model.zero_grad()
        with memllm.memory_session(model) as session:
            out = run(session)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in memllm.memory_parameters(model)]

    full, full_grads = loss_and_grads(
        lambda s: forward_segments(model, ids, mask, labels, session=s, **kwargs)
    )
    with memllm.memory_session(model) as session, torch.no_grad():  # records every segment
        cache.forward(ids, mask, labels, session=session, **kwargs)
    order = [2, 0, 1]  # another batch order: the cache re-pads per segment
    cached, cached_grads = loss_and_grads(
        lambda s: cache.forward(ids[order], mask[order], labels[order], session=s, **kwargs)
    )
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(cached_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_experiment_arm_and_info(tmp_path, capsys):
    import yaml

    from memllm.cli import main
    from memllm.evaluation.experiment_config import arm_run_config, load_experiment_config

    memory = {**SMALL, "store_dtype": "float16"}
    config = {
        "model": {"name": "tiny-llama"},
        "data": {"task": "babilong", "tasks": ["qa1"], "lengths": ["0k"], "prompt": "plain"},
        "segment_length": 64,
        "arms": {"window": {"kind": "window"}, "episodic": {"kind": "memory", "memory": memory}},
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config))
    exp = load_experiment_config(tmp_path / "exp.yaml")
    run = arm_run_config(exp, "episodic", exp.arms["episodic"])
    assert run.memory.type == "episodic" and run.memory.store_dtype == "float16"
    (tmp_path / "memory.yaml").write_text(yaml.safe_dump({"memory": memory}))
    capsys.readouterr()
    assert main(["info", "--model", "tiny-llama", "--memory", str(tmp_path / "memory.yaml")]) == 0
    out = capsys.readouterr().out
    # tiny-llama: width 32 in float16 plus index and mask, at layer -1
    (line,) = [x for x in out.splitlines() if x.startswith("memory per stored token")]
    assert "73 bytes over 1 layer(s)" in line and "float16" in line


# -- positive control --------------------------------------------------------------------------

KEYS, VALUES, SEG, MARK = torch.arange(10, 18), torch.arange(20, 28), 8, 5


def recall_batch(n: int, gen: torch.Generator, facts: int = 4, rebind: bool = False):
    """Three 8-token segments of random filler. ``facts`` key→value bindings, written as two
    adjacent tokens (8 keys, 8 values), sit in segments 1 and 2; segment 3 ends with a question
    mark, one of the keys and its value (the answer, the only label). With ``rebind`` a later
    fact binds an earlier fact's key to a new value, and the question asks that key: the latest
    binding is the answer. Returns ``(ids, labels, facts_removed_ids, answers)``."""
    rows = torch.arange(n)
    ids = torch.randint(100, 250, (n, 3 * SEG), generator=gen)
    keys = torch.stack([KEYS[torch.randperm(len(KEYS), generator=gen)[:facts]] for _ in rows])
    values = VALUES[torch.randint(0, len(VALUES), (n, facts), generator=gen)]
    # fact slots: token pairs at offsets 0, 2, 4, 6 of segments 1 and 2, in order
    slots = torch.stack([torch.randperm(8, generator=gen)[:facts].sort().values for _ in rows])
    starts = (slots // 4) * SEG + (slots % 4) * 2
    ask = torch.randint(0, facts, (n,), generator=gen)
    if rebind:
        ask = torch.randint(1, facts, (n,), generator=gen)
        earlier = (torch.rand(n, generator=gen) * ask).long()
        keys[rows, ask] = keys[rows, earlier]
    without = ids.clone()
    ids[rows[:, None], starts], ids[rows[:, None], starts + 1] = keys, values
    answer = values[rows, ask]
    for x in (ids, without):
        x[:, -3], x[:, -2], x[:, -1] = MARK, keys[rows, ask], answer
    labels = torch.full_like(ids, -100)
    labels[:, -1] = answer
    return ids, labels, without, answer


def recall_accuracy(tiny, memory: dict, *, steps: int, rebind: bool = False, seed: int = 0):
    """Train ``memory`` on a tiny Llama on :func:`recall_batch`; accuracy on 512 held-out
    inputs with and without the facts (chance: 1/8)."""
    model, _ = tiny("llama")
    torch.manual_seed(seed)
    memllm.inject_memory(model, memory)
    opt = torch.optim.AdamW(memllm.memory_parameters(model), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids, labels, _, _ = recall_batch(32, gen, rebind=rebind)
        out = forward_segments(model, ids, labels=labels, segment_length=SEG, keep_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    ids, _, without, answer = recall_batch(512, torch.Generator().manual_seed(99), rebind=rebind)
    accuracy = []
    with torch.no_grad():
        for x in (ids, without):
            logits = forward_segments(model, x, segment_length=SEG).logits
            accuracy.append((logits[:, -2].argmax(-1) == answer).float().mean().item())
    return tuple(accuracy)


def test_memory_learns_to_recall_one_of_several_facts(tiny, one_thread):
    """Positive control: four key→value facts in earlier segments, a question about one at the
    end; the frozen backbone sees only the last segment, so only the memory can answer."""
    memory = {"type": "episodic", "num_heads": 2, "key_dim": 64, "max_tokens": 64}
    with_facts, without_facts = recall_accuracy(tiny, memory, steps=300)
    assert with_facts > 0.4  # chance: 1 in 8 values (1 in 4 among the values present)
    assert without_facts < 0.25  # the facts removed: back to chance
