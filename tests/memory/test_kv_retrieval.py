"""kv_retrieval: training-free top-k retrieval of past keys/values at every attention layer."""

from __future__ import annotations

import pytest
import torch

import memllm
from memllm.core.generation import generate_ids
from memllm.core.inject import inject_memory, memory_layers, memory_session, remove_memory
from memllm.core.segments import forward_segments, positions_from_mask
from memllm.errors import ConfigError
from memllm.memory.kv_retrieval import ATTENTION, rotate
from tests.conftest import random_ids

ALL = {
    "type": "kv_retrieval",
    "block_size": 8,
    "repr_keys": 2,
    "top_k": 1000,
    "init_tokens": 4,
    "query_chunk": 8,
}
FEW = {**ALL, "top_k": 2}
ARCHS = [("llama", {}), ("qwen2", {}), ("gemma3", {"layers": 6})]  # gemma3: 5 local + 1 global


def padded(batch: int, length: int, pads: list[int], seed: int = 0):
    ids = random_ids(batch, length, seed)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def bare_logits(model, ids, mask):
    with torch.no_grad():
        return model(
            input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)
        ).logits


def segment_logits(model, ids, mask, segment, config=ALL, **kw):
    inject_memory(model, config)
    try:
        with torch.no_grad():
            return forward_segments(model, ids, mask, segment_length=segment, **kw).logits
    finally:
        remove_memory(model)


@pytest.mark.parametrize(("arch", "sizes"), ARCHS)
def test_first_segment_is_the_bare_model(tiny, one_thread, arch, sizes):
    model, _ = tiny(arch, **sizes)
    ids, mask = padded(2, 20, [0, 5])
    got = segment_logits(model, ids, mask, segment=32, config=FEW)
    real = mask.bool()
    assert torch.allclose(got[real], bare_logits(model, ids, mask)[real], atol=1e-5)
    assert model.config._attn_implementation != ATTENTION  # remove_memory gave it back


@pytest.mark.parametrize(("arch", "sizes"), ARCHS)
def test_all_blocks_at_true_positions_equal_full_attention(tiny, one_thread, arch, sizes):
    model, _ = tiny(arch, **sizes)
    ids, mask = padded(2, 100, [0, 13])
    full = bare_logits(model, ids, mask)
    got = segment_logits(model, ids, mask, segment=24)
    real = mask[:, -24:].bool()
    assert torch.allclose(got[real], full[:, -24:][real], atol=1e-4)
    # and the top-k memory really is a different (retrieving) model
    few = segment_logits(model, ids, mask, segment=24, config={**FEW, "top_k": 1})
    assert not torch.allclose(few[real], full[:, -24:][real], atol=1e-3)


@pytest.mark.parametrize(("arch", "sizes"), ARCHS)
def test_generation_with_all_blocks_equals_bare_generate(tiny, one_thread, arch, sizes):
    model, _ = tiny(arch, **sizes)
    ids, mask = padded(2, 70, [0, 9], seed=1)
    with torch.no_grad():
        bare = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0
        )[:, ids.shape[1] :]
    inject_memory(model, ALL)
    got = generate_ids(model, ids, mask, segment_length=20, max_new_tokens=8)
    assert torch.equal(got, bare)


@pytest.mark.parametrize(("arch", "sizes"), ARCHS[:2])
def test_decoding_retrieves_like_a_teacher_forced_pass(tiny, one_thread, arch, sizes):
    """Top-k < all blocks: each new token is what a forward pass over prompt + tokens predicts."""
    model, _ = tiny(arch, **sizes)
    ids, mask = padded(2, 90, [0, 11], seed=2)
    inject_memory(model, FEW)
    new = generate_ids(model, ids, mask, segment_length=30, max_new_tokens=10)
    whole = torch.cat([ids, new], 1)
    whole_mask = torch.cat([mask, torch.ones_like(new)], 1)
    # the same segments as generation: the prompt's last segment extended by the new tokens
    with memory_session(model) as session, torch.no_grad():
        forward_segments(model, ids[:, :-30], mask[:, :-30], segment_length=30, session=session)
        with session.read_only():
            logits = model(
                input_ids=whole[:, -40:],
                attention_mask=whole_mask[:, -40:],
                position_ids=positions_from_mask(whole_mask[:, -40:]),
            ).logits
    predicted = logits[:, -11:-1].argmax(-1)
    assert torch.equal(predicted, new)


@pytest.mark.parametrize(("arch", "sizes"), ARCHS)
def test_batch_equals_one_at_a_time(tiny, one_thread, arch, sizes):
    model, _ = tiny(arch, **sizes)
    ids, mask = padded(3, 80, [0, 17, 30], seed=3)
    batch = segment_logits(model, ids, mask, segment=20, config=FEW)
    for row in range(3):
        pad = int((mask[row] == 0).sum())
        alone = segment_logits(
            model, ids[row : row + 1, pad:], mask[row : row + 1, pad:], segment=20, config=FEW
        )
        width = min(alone.shape[1], 20)
        real = mask[row, -width:].bool()
        assert torch.allclose(batch[row, -width:][real], alone[0, -width:][real], atol=1e-4)


def test_no_leakage_between_examples(tiny, one_thread):
    """An example's outputs do not depend on what the other examples of its batch hold."""
    model, _ = tiny("llama")
    ids, mask = padded(2, 64, [0, 0], seed=4)
    other = ids.clone()
    other[1] = random_ids(1, 64, seed=99)[0]
    a = segment_logits(model, ids, mask, segment=16, config=FEW)
    b = segment_logits(model, other, mask, segment=16, config=FEW)
    assert torch.allclose(a[0], b[0], atol=1e-6)
    assert not torch.allclose(a[1], b[1], atol=1e-3)


@pytest.mark.parametrize("top_k", [1, 2])
def test_causality(tiny, one_thread, top_k):
    """Changing tokens after t changes no output at or before t (retrieval included)."""
    model, _ = tiny("llama")
    ids, mask = padded(1, 96, [0], seed=5)
    t = 96 - 32 + 11  # inside the last segment, inside a query chunk
    changed = ids.clone()
    changed[:, t + 1 :] = random_ids(1, 96 - t - 1, seed=7)
    config = {**FEW, "top_k": top_k}
    a = segment_logits(model, ids, mask, segment=32, config=config)
    b = segment_logits(model, changed, mask, segment=32, config=config)
    local = t - (96 - 32)
    assert torch.allclose(a[:, : local + 1], b[:, : local + 1], atol=1e-6)
    assert not torch.allclose(a[:, local + 1 :], b[:, local + 1 :], atol=1e-3)


def test_sliding_window_layers_keep_their_window(tiny, one_thread):
    """Gemma3's local layers read stored tokens only within their window (16 in tiny-gemma3)."""
    model, _ = tiny("gemma3")  # two layers, both sliding
    ids, mask = padded(1, 80, [0], seed=6)
    window = model.config.sliding_window
    inject_memory(model, ALL)
    for layer in memory_layers(model).values():
        assert layer.memory.window == window
    # two layers of a 16-token window reach 2 * 15 tokens back from the last token
    changed = ids.clone()
    changed[:, : 80 - 2 * (window - 1) - 1] = 5
    with torch.no_grad():
        a = forward_segments(model, ids, mask, segment_length=20).logits[:, -1]
        b = forward_segments(model, changed, mask, segment_length=20).logits[:, -1]
        with memory_session(model) as session:
            forward_segments(model, ids, mask, segment_length=20, session=session)
            stores = [session.states[i].stores[0] for i in memory_layers(model)]
    assert torch.allclose(a, b, atol=1e-6)
    assert all(store.n <= 2 * window for store in stores)
    remove_memory(model)
    assert torch.allclose(a, bare_logits(model, ids, mask)[:, -1], atol=1e-4)


def test_retrieval_picks_the_block_whose_keys_match_the_queries():
    """Scores: mean query of the chunk's window . best sub-block mean, summed over heads."""
    from types import SimpleNamespace

    from memllm.memory.kv_retrieval import KVRetrievalConfig, KVState, _choose_blocks
    from memllm.memory.kv_store import LayerStore, StoreSpec

    config = KVRetrievalConfig(block_size=8, repr_keys=2, top_k=1, init_tokens=2, query_chunk=8)
    spec = StoreSpec(8, 2, 2, None, None, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    keys = 0.1 * torch.randn(1, 2 + 40, 4, generator=gen)
    target = torch.tensor([3.0, -1.0, 2.0, 0.5])
    keys[0, 2 + 3 * 8 + 4 : 2 + 3 * 8 + 8] = target  # the second half of block 3 only
    store = LayerStore(spec).append(keys, keys.clone(), torch.arange(42))
    assert (store.num_blocks, store.full) == (5, 5)
    memory = SimpleNamespace(config=config)
    call = SimpleNamespace(state=KVState([store]))
    queries = target.expand(2, 8, 4)  # two query heads sharing the one kv head
    true_q = torch.arange(42, 50)
    (chosen,) = _choose_blocks(
        memory, call, 0, store, [42 // 8], 42, queries, true_q, torch.ones(8, dtype=torch.bool)
    )
    assert chosen.tolist() == [3]
    # the initial tokens are always read, then the chosen blocks' rows in stored order
    assert store.block_rows(chosen).tolist() == [0, 1, *range(26, 34)]


def per_chunk_choice(memory, call, b, store, chunk, start, unrotated_q, true_q, real):
    """The block choice as it was first written: one chunk at a time, every block's means
    rebuilt per chunk (the reference the batched scoring must reproduce)."""
    cfg = memory.config
    count = store.num_blocks
    if cfg.top_k >= count:
        return torch.arange(count)
    size = cfg.query_chunk
    hi = max(start, chunk * size)
    lo = max(start, hi - size + 1)
    queries, where = [unrotated_q], [torch.where(real, true_q, -1)]
    recent = call.state.recent[b]
    if recent is not None:
        queries.insert(0, recent[0].to(unrotated_q.dtype))
        where.insert(0, recent[1])
    queries_all, where_all = torch.cat(queries, 1), torch.cat(where)
    pick = (where_all >= lo) & (where_all <= hi)
    if not pick.any():
        pick = where_all == where_all.max()
    mean_q = queries_all[:, pick].float().mean(1)
    reprs, present = store.block_reprs()
    grouped = mean_q.unflatten(0, (reprs.shape[1], -1))
    scores = torch.einsum("hgd,nhrd->nhgr", grouped, reprs.float())
    scores = scores.masked_fill(~present[:, None, None, :], float("-inf"))
    best = scores.amax(-1).sum((1, 2))
    return torch.topk(best, cfg.top_k).indices.sort().values


@pytest.mark.parametrize("top_k", [1, 3])
def test_batched_block_choice_equals_the_per_chunk_one(tiny, one_thread, top_k):
    """Scoring all query chunks of a call at once chooses exactly the blocks that scoring each
    chunk alone chooses: over padded segments, partial blocks and decoding."""
    import memllm.memory.kv_retrieval as kv

    model, _ = tiny("qwen2")
    ids, mask = padded(2, 150, [0, 21], seed=13)
    calls = []
    original = kv._choose_blocks

    def spy(memory, call, b, store, chunks, *rest):
        got = original(memory, call, b, store, chunks, *rest)
        want = [per_chunk_choice(memory, call, b, store, j, *rest) for j in chunks]
        calls.append([(g.tolist(), w.tolist()) for g, w in zip(got, want, strict=True)])
        return got

    kv._choose_blocks = spy
    try:
        inject_memory(model, {**FEW, "top_k": top_k, "query_chunk": 4})
        generate_ids(model, ids, mask, segment_length=24, max_new_tokens=6)
    finally:
        kv._choose_blocks = original
        remove_memory(model)
    pairs = [pair for call in calls for pair in call]
    assert len(pairs) > 100 and any(len(got) < 8 for got, _ in pairs)  # some retrieval happened
    assert all(got == want for got, want in pairs)


def test_positions_beyond_the_trained_context(tiny, one_thread):
    """Past max_position_embeddings the retrieved block is packed right before the segment: a
    one-layer model then reads exactly what the bare model reads on block + segment."""
    import memllm.memory.kv_retrieval as kv

    model, _ = tiny("llama", layers=1, context=64)
    ids, mask = padded(1, 208, [0], seed=9)
    config = {
        **ALL,
        "init_tokens": 0,
        "top_k": 1,
        "block_size": 16,
        "repr_keys": 4,
        "query_chunk": 16,
    }
    chosen = []
    original = kv._choose_blocks

    def spy(*args):
        chosen.append(original(*args))
        return chosen[-1]

    kv._choose_blocks = spy
    try:
        got = segment_logits(model, ids, mask, segment=16, config=config)
    finally:
        kv._choose_blocks = original
    # the last segment (true positions 192..207) is one query chunk
    (block,) = chosen[-1][-1].tolist()
    window = torch.cat([ids[:, 16 * block : 16 * block + 16], ids[:, -16:]], 1)
    bare = bare_logits(model, window, torch.ones_like(window))[:, -16:]
    assert torch.allclose(got, bare, atol=1e-4)
    # rotations are exact inverses, and dot products depend on distances only
    x, y = torch.randn(2, 3, 5, 8).unbind(0)
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    p = torch.arange(5)
    assert torch.allclose(rotate(rotate(x, p + 100, inv), -(p + 100), inv), x, atol=1e-5)
    near = (rotate(x, p, inv) * rotate(y, p - 3, inv)).sum(-1)
    far = (rotate(x, p + 1000, inv) * rotate(y, p + 997, inv)).sum(-1)
    assert torch.allclose(near, far, atol=1e-4)


def test_bounded_store_and_cpu_offload(tiny, one_thread):
    model, _ = tiny("llama")
    ids, mask = padded(2, 120, [0, 7], seed=10)
    plain = segment_logits(model, ids, mask, segment=16, config=FEW)
    offloaded = segment_logits(model, ids, mask, segment=16, config={**FEW, "offload": "cpu"})
    assert torch.allclose(plain, offloaded, atol=1e-6)
    inject_memory(model, {**FEW, "max_blocks": 3})
    with memory_session(model) as session, torch.no_grad():
        forward_segments(model, ids, mask, segment_length=16, session=session)
        for state in session.states.values():
            for store in state.stores:
                assert store.full <= 3
                assert store.n <= 4 + 4 * 8  # init + 3 complete blocks + a partial one
    remove_memory(model)


def split_run(model, ids, mask, config, at=64):
    """Logits of the part after ``at`` (16-token segments), then again from a snapshot at ``at``."""
    inject_memory(model, config)
    try:
        with memory_session(model) as session, torch.no_grad():
            forward_segments(model, ids[:, :at], mask[:, :at], segment_length=16, session=session)
            snapshot = session.state()
            rest = forward_segments(
                model, ids[:, at:], mask[:, at:], segment_length=16, session=session
            ).logits
            stores = session.states[0].stores
        with memory_session(model, snapshot) as session, torch.no_grad():
            again = forward_segments(
                model, ids[:, at:], mask[:, at:], segment_length=16, session=session
            ).logits
    finally:
        remove_memory(model)
    return rest, again, stores


def test_disk_offload_equals_ram_and_leaves_no_file(tiny, one_thread, tmp_path):
    """``offload: disk``: the same outputs, snapshots included; the files are never visible."""
    model, _ = tiny("llama")
    ids, mask = padded(2, 120, [0, 7], seed=10)
    disk = {**FEW, "offload": "disk", "offload_dir": str(tmp_path)}
    plain, _, _ = split_run(model, ids, mask, FEW)
    rest, again, stores = split_run(model, ids, mask, disk)
    assert all(store.storage.mapped is not None for store in stores)
    assert [store.n for store in stores] == [120, 113]
    assert list(tmp_path.iterdir()) == []  # unlinked as soon as mapped
    assert torch.allclose(rest, plain, atol=1e-6)
    assert torch.equal(again, rest)
    with pytest.raises(ConfigError, match="offload_dir"):
        segment_logits(
            model, ids, mask, segment=16, config={**disk, "offload_dir": str(tmp_path / "nope")}
        )


def test_released_pages_keep_their_data(tmp_path):
    """Unmapping an on-disk store's pages (what bounds the resident set) loses nothing."""
    from memllm.memory.kv_store import LayerStore, StoreSpec

    spec = StoreSpec(8, 2, 2, None, None, torch.float16, torch.device("cpu"), str(tmp_path))
    keys = torch.randn(3, 4000, 16).half()
    store = LayerStore(spec).append(keys, -keys, torch.arange(4000))
    before = store.block_reprs()[0].clone()
    store.release()
    got_k, got_v, got_p = store.last_rows(4000)
    assert torch.equal(got_k, keys) and torch.equal(got_v, -keys)
    assert torch.equal(got_p, torch.arange(4000))
    assert torch.equal(store.block_reprs()[0], before)


def test_snapshot_survives_later_writes(tiny, one_thread):
    """``session.state()`` stays valid while the session writes on (stores are versions)."""
    model, _ = tiny("llama")
    ids, mask = padded(1, 64, [0], seed=11)
    inject_memory(model, FEW)
    with memory_session(model) as session, torch.no_grad():
        forward_segments(model, ids[:, :32], mask[:, :32], segment_length=16, session=session)
        snapshot = session.state()
        forward_segments(model, ids[:, 32:48], mask[:, 32:48], segment_length=16, session=session)
    with memory_session(model, snapshot) as session, torch.no_grad():
        resumed = forward_segments(
            model, ids[:, 32:48], mask[:, 32:48], segment_length=16, session=session
        ).logits
    fresh = segment_logits_after_remove(model, ids[:, :48], mask[:, :48])
    assert torch.allclose(resumed, fresh, atol=1e-5)


def segment_logits_after_remove(model, ids, mask):
    remove_memory(model)
    return segment_logits(model, ids, mask, segment=16, config=FEW)


def test_checkpoint_holds_the_config_only(tiny, one_thread, tmp_path):
    model, _ = tiny("llama")
    inject_memory(model, FEW)
    assert memllm.memory_parameters(model) == []
    path = memllm.save_checkpoint(model, tmp_path / "kv")
    fresh, _ = tiny("llama")
    memllm.load_checkpoint(fresh, path)
    assert memllm.memory_config(fresh) == memllm.memory_config(model)
    ids, mask = padded(1, 60, [0], seed=12)
    with torch.no_grad():
        a = forward_segments(model, ids, mask, segment_length=16).logits
        b = forward_segments(fresh, ids, mask, segment_length=16).logits
    assert torch.equal(a, b)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="repr_keys"):
        memllm.memory_config_from_dict({"type": "kv_retrieval", "block_size": 10, "repr_keys": 3})
    with pytest.raises(ConfigError, match="offload"):
        memllm.memory_config_from_dict({"type": "kv_retrieval", "offload": "gpu"})
    with pytest.raises(ConfigError, match="top_k"):
        memllm.memory_config_from_dict({"type": "kv_retrieval", "top_k": -1})


def test_info_reports_bytes_per_stored_token(tiny, capsys, tmp_path):
    from memllm.cli import main

    path = tmp_path / "kv.yaml"
    path.write_text("type: kv_retrieval\nstore_dtype: float16\n")
    assert main(["info", "--model", "tiny-llama", "--memory", str(path)]) == 0
    out = capsys.readouterr().out
    # tiny-llama: 2 layers x (k + v: 2 x 2 kv heads x 8 dims x 2 bytes = 64, position 8,
    # block means 32 x 4 / 64 = 2)
    assert "memory per stored token  148 bytes over 2 layer(s), stored in float16" in out


def test_experiment_arm_untrained(tmp_path, one_thread, monkeypatch):
    """``memory: {type: kv_retrieval}`` as an untrained experiment arm, end to end."""
    import json

    import yaml

    from memllm.cli import main

    monkeypatch.setattr("memllm.evaluation.plots.draw_plots", lambda *_args, **_kw: [])
    config = {
        "name": "tiny kv",
        "model": {"name": "tiny-llama"},
        "data": {"task": "zsre", "num_train": 0, "num_validation": 0, "num_test": 4},
        "segment_length": 16,
        "log": {"every": 1, "tensorboard": False, "progress_bar": False},
        "eval": {"max_new_tokens": 2, "batch_size": 2},
        "arms": {"kv": {"kind": "memory", "untrained": True, "memory": FEW}},
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["experiment", "--config", str(path)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "kv" in results["arms"]
