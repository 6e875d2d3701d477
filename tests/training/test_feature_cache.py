"""Feature cache: replaying recorded segments == the full forward, in both modes, and one
recorded pass per distinct segment (questions that share a context share its segments)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import memllm
from memllm.core.segments import forward_segments
from memllm.data.base import Example
from memllm.errors import ConfigError
from memllm.training.data import collate, encode_examples
from memllm.training.feature_cache import (
    FeatureCache,
    SharedFeatures,
    cache_mode,
    unsupported_reason,
)
from memllm.training.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import SMALL_MEMORY, ToyTask, toy_config

NEURAL = {"type": "neural", "mlp_depth": 2, "chunk_size": 4}


def _batch(vocab: int, seed: int = 0):
    """Left-padded batch of 3 examples of different lengths, labels on their last 4 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = [37, 22, 30]
    width = max(lengths)
    ids = torch.randint(3, vocab, (3, width), generator=g)
    mask = torch.zeros(3, width, dtype=torch.long)
    labels = torch.full((3, width), -100)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
        labels[row, -4:] = ids[row, -4:]
    return ids, mask, labels


def _wake(model) -> None:
    """Trained-looking memory weights, so that the memory changes the logits."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in memllm.memory_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _check_replay_matches(model, ids, mask, labels):
    cache = FeatureCache(model)
    kwargs = {"segment_length": 8, "bptt_segments": 2}

    def loss_and_grads(run):
        model.zero_grad()
        with memllm.memory_session(model) as session:
            out = run(session)
        (out.loss + out.aux_loss).backward()
        return out, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    full, full_grads = loss_and_grads(
        lambda s: forward_segments(model, ids, mask, labels, session=s, **kwargs)
    )
    recording, _ = loss_and_grads(lambda s: cache.forward(ids, mask, labels, session=s, **kwargs))
    assert cache.misses == full.num_segments and cache.hits == 0
    torch.testing.assert_close(recording.loss, full.loss)
    # a new batch order (rows re-padded around their real tokens): every segment replays
    order = [2, 0, 1]
    cached, cached_grads = loss_and_grads(
        lambda s: cache.forward(ids[order], mask[order], labels[order], session=s, **kwargs)
    )
    assert cache.hits == full.num_segments and cache.misses == full.num_segments
    assert cached.num_tokens == full.num_tokens and cached.num_segments == full.num_segments
    torch.testing.assert_close(cached.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.aux_loss, full.aux_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(cached_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    return cache


@pytest.mark.parametrize(
    ("arch", "layer"),
    [(a, -1) for a in ("llama", "qwen2", "gemma3", "gpt2")]
    + [("llama", 0), ("gemma3", 0), ("gpt2", 0)],
)
def test_output_mode_matches_forward_segments(tiny, arch, layer):
    model, tok = tiny(arch)
    # layer 0 of two: the cached path must run the layer above on the labelled segments
    memllm.inject_memory(model, {**SMALL_MEMORY, "layer_ids": [layer]})
    _wake(model)
    cache = _check_replay_matches(model, *_batch(len(tok)))
    assert cache.mode == "output"


@pytest.mark.parametrize(
    ("arch", "arch_mode", "layer"),
    [
        ("llama", "context", 1),
        ("llama", "layer", 1),
        ("gpt2", "context", 1),
        ("qwen2", "layer", 0),
        ("gemma3", "context", 1),
    ],
)
def test_entry_mode_matches_forward_segments(tiny, arch, arch_mode, layer):
    """Neural memories change their layer's input: the cache records what enters the memory's
    layer and replays the layers from there up."""
    model, tok = tiny(arch)
    memllm.inject_memory(model, {**NEURAL, "arch": arch_mode, "layer_ids": [layer]})
    _wake(model)
    cache = _check_replay_matches(model, *_batch(len(tok)))
    assert (cache.mode, cache.layer) == ("entry", layer)


def test_entry_mode_with_lora_at_and_above_the_entry(tiny):
    """LoRA trains the layers it is in: the cache enters at the lowest layer holding LoRA or
    memory, and replays adapters above it exactly."""
    from peft import LoraConfig, inject_adapter_in_model

    model, tok = tiny("llama")
    memllm.inject_memory(model, {**SMALL_MEMORY, "layer_ids": [1]})
    memllm.apply_lora(model, {"rank": 2, "target_modules": ["q_proj", "v_proj"]})
    assert cache_mode(model) == ("entry", 0)  # LoRA in every layer: nothing below to skip
    model, tok = tiny("llama")
    memllm.inject_memory(model, {**SMALL_MEMORY, "layer_ids": [1]})
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    inject_adapter_in_model(config, model)
    for p in memllm.memory_parameters(model):  # PEFT froze them
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    assert cache_mode(model) == ("entry", 1)  # a latent memory, but its layer has LoRA
    _wake(model)
    _check_replay_matches(model, *_batch(len(tok)))


def test_questions_sharing_a_context_record_it_once(tiny):
    """``questions_per_story: all`` + ``question_segment: own``: the context segments of a
    story are token-identical for all its questions, so the backbone runs them once."""
    model, tok = tiny("llama")
    memllm.inject_memory(model, {**SMALL_MEMORY, "layer_ids": [0]})
    _wake(model)
    context = " ".join(f"{k}={v}." for k, v in zip("abcdefghij", "0123456789", strict=True))
    examples = [
        Example(f"s/q{k}", f"{context} {k}?", f" {v}", {"context_id": "s"}, context, f" {k}?")
        for k, v in zip("abcd", "0123", strict=True)
    ]
    segment = 16
    items = encode_examples(examples, tok, None, segment_length=segment)
    batches = [collate(items[i : i + 2], tok.pad_token_id, "cpu") for i in (0, 2)]
    n_context = items[0].ids.__len__() // segment - 1 + (len(items[0].ids) % segment > 0)
    assert n_context >= 2
    calls = []
    _, layers = memllm.core.backbone.decoder_stack(model)
    handle = layers[0].layer.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[1]))
    cache = FeatureCache(model)
    losses = []
    try:
        for b in batches:
            with memllm.memory_session(model) as session, torch.no_grad():
                out = cache.forward(
                    b.input_ids, b.attention_mask, b.labels, segment_length=segment, session=session
                )
            losses.append(out.loss)
    finally:
        handle.remove()
    # batch 1: every segment once (the two rows' context segments together); batch 2: only
    # its question segment
    assert len(calls) == n_context + 1 + 1
    assert cache.misses == n_context + 2 and cache.hits == n_context
    assert len(cache) == n_context + 4  # the shared context segments + one per question
    with torch.no_grad():
        ref = forward_segments(
            model,
            *(batches[1].input_ids, batches[1].attention_mask),
            batches[1].labels,
            segment_length=segment,
        )
    torch.testing.assert_close(losses[1], ref.loss, rtol=1e-5, atol=1e-6)


def test_training_with_the_cache_matches_training_without(tmp_path):
    sections = {"train": {"max_steps": 6, "save_every": 0}, "eval": {"every": 3}}
    task = ToyTask(n_train=8)  # 2 steps per epoch: epochs 2 and 3 run from the cache
    plain = train(toy_config(tmp_path / "plain", **sections), task=task)
    sections["train"]["feature_cache"] = True
    cached = train(toy_config(tmp_path / "cached", **sections), task=task)
    lines = (cached.output_dir / "log.jsonl").read_text().splitlines()
    cache_log = [r for r in map(json.loads, lines) if r["kind"] == "feature_cache"]
    # logged at each new epoch; epoch 3 replays everything the earlier ones recorded
    assert len(cache_log) == 2 and cache_log[0]["hits"] == 0 and cache_log[1]["hits"] > 0
    assert cache_log[1]["misses"] > cache_log[0]["misses"]  # the validation examples
    a = load_file(plain.output_dir / "final" / "memory.safetensors")
    b = load_file(cached.output_dir / "final" / "memory.safetensors")
    for key in a:
        if key.endswith("key.bias"):
            # A key bias adds the same q.b to every key's score, which the softmax cancels: its
            # true gradient is zero, so Adam turns float noise into lr-sized steps that differ
            # between any two summation orders. What it holds is noise, not a cache effect.
            continue
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def _cache_log(run) -> list[dict]:
    lines = (run.output_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "feature_cache"]


def test_runs_sharing_features_record_each_segment_once(tmp_path):
    """Two memories at the same place on the same backbone (an experiment's latent and episodic
    arms) share one recorded table: the second records nothing and trains to the same weights
    as with a cache of its own; another seed's random backbone gets a table of its own."""
    from memllm.memory import memory_config_from_dict

    task = ToyTask(n_train=8)
    train_cfg = {"max_steps": 4, "save_every": 0, "feature_cache": True}
    episodic = memory_config_from_dict({"type": "episodic", "num_heads": 2, "key_dim": 16})
    shared = SharedFeatures()
    train(toy_config(tmp_path / "latent", train=train_cfg), task=task, shared_features=shared)
    recorded = shared.nbytes
    assert len(shared.tables) == 1 and recorded > 0
    second = train(
        toy_config(tmp_path / "episodic", memory=episodic, train=train_cfg),
        task=task,
        shared_features=shared,
    )
    assert all(r["misses"] == 0 for r in _cache_log(second)) and shared.nbytes == recorded
    alone = train(toy_config(tmp_path / "alone", memory=episodic, train=train_cfg), task=task)
    assert _cache_log(alone)[0]["misses"] > 0
    a = load_file(alone.output_dir / "final" / "memory.safetensors")
    b = load_file(second.output_dir / "final" / "memory.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    train(
        toy_config(tmp_path / "other_seed", train=train_cfg, seed=1),
        task=task,
        shared_features=shared,
    )
    assert len(shared.tables) == 2


def test_neural_memory_trains_through_the_cache(tmp_path):
    """The neural arm at a middle layer trains through the entry-mode cache to the same
    weights as without it."""
    from memllm.memory import memory_config_from_dict

    # a config object, not a mapping: toy_config would merge a mapping into the latent one
    memory = memory_config_from_dict({**NEURAL, "arch": "context", "layer_ids": [1]})
    sections = {"memory": memory, "train": {"max_steps": 4, "save_every": 0}, "eval": {"every": 0}}
    task = ToyTask(n_train=8)
    plain = train(toy_config(tmp_path / "plain", **sections), task=task)
    sections["train"] = {**sections["train"], "feature_cache": True}
    cached = train(toy_config(tmp_path / "cached", **sections), task=task)
    a = load_file(plain.output_dir / "final" / "memory.safetensors")
    b = load_file(cached.output_dir / "final" / "memory.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_cache_refuses_a_model_without_memory(tiny, tmp_path):
    model, _ = tiny("llama")
    assert "no memory" in unsupported_reason(model)
    memllm.inject_memory(model, {**SMALL_MEMORY, "layer_ids": [0, 1]})
    assert unsupported_reason(model) is None and cache_mode(model) == ("entry", 0)
    cfg_text = {"memory": None, "lora": {"rank": 2}, "train": {"feature_cache": True}}
    with pytest.raises(ConfigError, match=r"train\.feature_cache: needs a memory"):
        toy_config(tmp_path, **cfg_text)
