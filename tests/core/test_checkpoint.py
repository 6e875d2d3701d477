"""Checkpoints: identical outputs after a round trip, no backbone weights, strict loading."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_LATENT, random_ids, wake_memory
from safetensors.torch import load_file, save_file

import memllm
from memllm.core.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from memllm.core.inject import has_memory
from memllm.core.segments import forward_segments


@pytest.fixture
def trained(tiny, tmp_path):
    model, _ = tiny("llama")
    memllm.inject_memory(model, {**SMALL_LATENT, "layer_ids": [0, 1]})
    wake_memory(model)
    path = memllm.save_memory(model, tmp_path / "mem")
    return model, path


def test_round_trip_gives_identical_outputs(tiny, trained):
    model, path = trained
    ids = random_ids(2, 24)
    expected = forward_segments(model, ids, segment_length=8).logits
    fresh, _ = tiny("llama")
    memllm.load_memory(fresh, path)
    assert torch.equal(forward_segments(fresh, ids, segment_length=8).logits, expected)
    assert [p.requires_grad for p in memllm.memory_parameters(fresh)] == [
        True for _ in memllm.memory_parameters(fresh)
    ]


def test_checkpoint_holds_no_backbone_weights(trained):
    model, path = trained
    weights = load_file(path / WEIGHTS_FILE)
    assert all(k.startswith("layers.") for k in weights)
    assert sum(v.numel() for v in weights.values()) == sum(
        p.numel() for p in memllm.memory_parameters(model)
    )
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    meta = json.loads((path / CONFIG_FILE).read_text())
    assert meta["backbone"]["name"] == "tiny-llama"
    assert meta["memory"]["layer_ids"] == [0, 1]
    assert meta["memllm_version"] == memllm.__version__


def test_other_backbone_is_refused(tiny, trained):
    _, path = trained
    wider, _ = tiny("llama", hidden=48)
    with pytest.raises(memllm.CheckpointError, match="hidden_size=32"):
        memllm.load_memory(wider, path)
    gpt2, _ = tiny("gpt2")
    with pytest.raises(memllm.CheckpointError, match="model_type"):
        memllm.load_memory(gpt2, path)
    deeper, _ = tiny("llama", layers=3)
    with pytest.raises(memllm.CheckpointError, match="num_layers"):
        memllm.load_memory(deeper, path)
    assert not has_memory(wider)


def test_missing_or_reshaped_tensor_is_refused(tiny, trained):
    _, path = trained
    weights = load_file(path / WEIGHTS_FILE)
    key = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != key}, path / WEIGHTS_FILE)
    with pytest.raises(memllm.CheckpointError, match=f"missing {key}"):
        memllm.load_memory(tiny("llama")[0], path)
    weights[key] = torch.zeros(3, 3)
    save_file(weights, path / WEIGHTS_FILE)
    with pytest.raises(memllm.CheckpointError, match="shape"):
        memllm.load_memory(tiny("llama")[0], path)


def test_not_a_checkpoint(tiny, tmp_path):
    with pytest.raises(memllm.CheckpointError, match="not a memory checkpoint"):
        memllm.load_memory(tiny("llama")[0], tmp_path)


def test_save_is_atomic_and_overwrites(trained, tmp_path):
    model, path = trained
    memllm.save_memory(model, path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
