"""Injection: validation before touching the model, removal, configs, the backbone table."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SMALL_LATENT

import memllm
from memllm.core.backbone import DECODER_STACKS, decoder_stack
from memllm.core.config import ConfigError
from memllm.core.inject import MemoryLayer, has_memory


def test_bad_layer_index_fails_before_touching_the_model(tiny):
    model, _ = tiny("llama")
    layers_before = list(decoder_stack(model)[1])
    with pytest.raises(
        ConfigError, match=r"layer_ids: layer 5 is out of range .* 2 decoder layers"
    ):
        memllm.inject_memory(model, {**SMALL_LATENT, "layer_ids": [0, 5]})
    assert list(decoder_stack(model)[1]) == layers_before
    assert not has_memory(model)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_slots": 0}, "num_slots: must be > 0"),
        ({"memory_dim": 10, "num_heads": 4}, "memory_dim: 10 is not divisible"),
        ({"slots": 4}, "unknown key slots"),
        ({"num_slots": "many"}, "num_slots: expected an integer"),
        ({"type": "magic"}, "type: unknown memory type 'magic'"),
        ({"layer_ids": [1, 1]}, "layer_ids: has duplicates"),
    ],
)
def test_bad_memory_config_is_one_line(tiny, change, message):
    model, _ = tiny("llama")
    with pytest.raises(ConfigError, match=message) as err:
        memllm.inject_memory(model, {**SMALL_LATENT, **change})
    assert "\n" not in str(err.value)
    assert not has_memory(model)


def test_remove_memory_restores_the_model(tiny):
    model, _ = tiny("gpt2")
    ids = torch.randint(3, 200, (1, 12))
    before = model(input_ids=ids).logits
    memllm.inject_memory(model, {**SMALL_LATENT, "layer_ids": [0, 1]})
    assert all(isinstance(layer, MemoryLayer) for layer in decoder_stack(model)[1])
    with pytest.raises(ValueError, match="already has memory"):
        memllm.inject_memory(model, SMALL_LATENT)
    memllm.remove_memory(model)
    assert not any(isinstance(layer, MemoryLayer) for layer in decoder_stack(model)[1])
    assert torch.equal(model(input_ids=ids).logits, before)
    memllm.inject_memory(model, SMALL_LATENT)  # and it can be attached again


def test_wrapper_passes_layer_attributes_through(tiny):
    model, _ = tiny("gemma3")
    kinds = [(layer.layer_idx, layer.hidden_size) for layer in decoder_stack(model)[1]]
    memllm.inject_memory(model, {**SMALL_LATENT, "layer_ids": [0, 1]})
    assert [(layer.layer_idx, layer.hidden_size) for layer in decoder_stack(model)[1]] == kinds


def test_sessions_do_not_nest(tiny):
    model, _ = tiny("llama")
    memllm.inject_memory(model, SMALL_LATENT)
    with (
        memllm.memory_session(model),
        pytest.raises(RuntimeError, match="don't nest"),
        memllm.memory_session(model),
    ):
        pass


def test_session_rejects_another_batch_size(tiny):
    model, _ = tiny("llama")
    memllm.inject_memory(model, SMALL_LATENT)
    with memllm.memory_session(model), pytest.raises(ValueError, match="batch size 2"):
        model(input_ids=torch.ones(2, 4, dtype=torch.long))
        model(input_ids=torch.ones(3, 4, dtype=torch.long))


def test_model_without_memory_is_a_clear_error(tiny):
    model, _ = tiny("llama")
    with pytest.raises(ValueError, match="no memory"), memllm.memory_session(model):
        pass


def test_decoder_table_covers_the_named_families():
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "gpt_neox"):
        assert model_type in DECODER_STACKS


def test_unsupported_architecture_is_one_line(tiny):
    model, _ = tiny("llama")
    model.config.model_type = "mystery"
    with pytest.raises(memllm.BackboneError, match="model_type 'mystery' is not supported"):
        memllm.inject_memory(model, SMALL_LATENT)


@pytest.mark.parametrize("config", [SMALL_LATENT, {"type": "kv_retrieval", "block_size": 4}])
def test_a_deep_copy_runs_its_own_memory(tiny, config):
    # The decoder stack's hooks must drive the copy's controller, not the original's: with
    # them crossed, the copy read its padding mask from the other model (left-padded rows went
    # wrong) and a copy made for another device (.cuda()) gave other logits.
    from memllm.core.segments import forward_segments
    from tests.conftest import random_ids, wake_memory

    model, _ = tiny("llama")
    memllm.inject_memory(model, config)
    if config["type"] == "latent":
        wake_memory(model)
    ids = random_ids(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    twin = copy.deepcopy(model)
    with torch.no_grad():
        expected = forward_segments(model, ids, mask, segment_length=12).logits
        got = forward_segments(twin, ids, mask, segment_length=12).logits
    assert torch.equal(got, expected)
    memllm.remove_memory(twin)
    assert has_memory(model) and not has_memory(twin)
