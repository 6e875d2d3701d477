"""Feature cache: memory + final norm + LM head on recorded features == the full forward."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import memllm
from memllm.core.segments import forward_segments
from memllm.errors import ConfigError
from memllm.training.feature_cache import FeatureCache, unsupported_reason
from memllm.training.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import SMALL_MEMORY, ToyTask, toy_config


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


@pytest.mark.parametrize(
    ("arch", "layer"),
    [(a, -1) for a in ("llama", "qwen2", "gemma3", "gpt2")]
    + [("llama", 0), ("gemma3", 0), ("gpt2", 0)],
)
def test_cached_forward_matches_forward_segments(tiny, arch, layer):
    model, tok = tiny(arch)
    # layer 0 of two: the cached path must run the layer above on the labelled segments
    memllm.inject_memory(model, {**SMALL_MEMORY, "layer_ids": [layer]})
    with torch.no_grad():  # a trained-looking gate, so that the memory changes the logits
        for p in memllm.memory_parameters(model):
            if p.dim() == 1 and p.shape[0] == model.config.hidden_size:
                p.normal_(0, 0.5)
    cache = FeatureCache(model)
    ids, mask, labels = _batch(len(tok))
    names = ["a", "b", "c"]
    kwargs = {"segment_length": 8, "bptt_segments": 2}

    def loss_and_grads(run):
        model.zero_grad()
        with memllm.memory_session(model) as session:
            out = run(session)
        (out.loss + out.aux_loss).backward()
        return out, [p.grad.clone() for p in memllm.memory_parameters(model)]

    with cache.record(names, mask):
        full, full_grads = loss_and_grads(
            lambda s: forward_segments(model, ids, mask, labels, session=s, **kwargs)
        )
    assert len(cache) == 3 and cache.features["b"].shape[0] == 22  # real tokens only
    # a new batch order: the cache is per example, re-padded for every batch
    order = [2, 0, 1]
    cached, cached_grads = loss_and_grads(
        lambda s: cache.forward(
            [names[i] for i in order], mask[order], labels[order], session=s, **kwargs
        )
    )
    assert cached.num_tokens == full.num_tokens and cached.num_segments == full.num_segments
    torch.testing.assert_close(cached.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.aux_loss, full.aux_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(cached_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_with_the_cache_matches_training_without(tmp_path):
    sections = {"train": {"max_steps": 6, "save_every": 0}, "eval": {"every": 3}}
    task = ToyTask(n_train=8)  # 2 steps per epoch: epochs 2 and 3 run from the cache
    plain = train(toy_config(tmp_path / "plain", **sections), task=task)
    sections["train"]["feature_cache"] = True
    cached = train(toy_config(tmp_path / "cached", **sections), task=task)
    lines = (cached.output_dir / "log.jsonl").read_text().splitlines()
    cache_log = [r for r in map(json.loads, lines) if r["kind"] == "feature_cache"]
    # logged at each new epoch: the train examples, then also the validation ones
    assert [r["examples"] for r in cache_log] == [8, 8 + 4]
    for run in (plain, cached):
        assert (run.output_dir / "final" / "memory.safetensors").is_file()
    a = load_file(plain.output_dir / "final" / "memory.safetensors")
    b = load_file(cached.output_dir / "final" / "memory.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_cache_refuses_placements_where_the_backbone_output_changes(tiny, tmp_path):
    model, _ = tiny("llama")
    memllm.inject_memory(model, {**SMALL_MEMORY, "layer_ids": [0, 1]})
    assert "one layer" in unsupported_reason(model, has_lora=False)
    for layer in (0, -1):
        model, _ = tiny("llama")
        memllm.inject_memory(model, {**SMALL_MEMORY, "layer_ids": [layer]})
        assert unsupported_reason(model, has_lora=False) is None
    assert "LoRA" in unsupported_reason(model, has_lora=True)
    cfg = toy_config(tmp_path, memory={**SMALL_MEMORY, "layer_ids": [0, 1]})
    cfg.train.feature_cache = True
    with pytest.raises(ConfigError, match=r"train\.feature_cache: memory sits at layers"):
        train(cfg, task=ToyTask())
