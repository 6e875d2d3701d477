"""LoRA co-training (MemoryLlama): only the memory and the adapter train; checkpoints carry both."""

from __future__ import annotations

import pytest
import torch
from conftest import single_thread

import memllm
from memllm.core.checkpoint import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
)
from memllm.core.lora import lora_parameters
from memllm.core.segments import forward_segments

NEURAL = {"type": "neural", "memory_dim": 16, "chunk_size": 4, "max_adaptive_lr": 0.1}
LORA = {"rank": 4, "alpha": 8, "dropout": 0.05}


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, length), generator=gen)


def build(tiny, arch: str = "context", seed: int = 0):
    model, _ = tiny("llama", seed=seed)
    memllm.inject_memory(model, {**NEURAL, "arch": arch})
    memllm.apply_lora(model, LORA)
    return model


def train_steps(model, steps: int = 2) -> None:
    params = memllm.memory_parameters(model) + lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = random_ids(2, 24)
    for _ in range(steps):  # the second step moves what sits behind the zero-initialised gates
        out = forward_segments(model, ids, labels=ids, segment_length=8)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("arch", ["context", "gate"])
def test_only_memory_and_lora_are_trainable(tiny, arch):
    model = build(tiny, arch)
    memory = {id(p) for p in memllm.memory_parameters(model)}
    lora = {id(p) for p in lora_parameters(model)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert memory and lora and not memory & lora
    assert trainable == memory | lora


def test_a_training_step_leaves_the_backbone_bit_identical(tiny):
    model = build(tiny)
    trained = {id(p) for p in memllm.memory_parameters(model) + lora_parameters(model)}
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in trained}
    ids = random_ids(2, 24)
    out = forward_segments(model, ids, labels=ids, segment_length=8)
    out.loss.backward()
    for name, p in model.named_parameters():
        if id(p) not in trained:
            assert p.grad is None, name
    # at init LoRA's B and the memory's gate scale are zero: they are what gets a gradient first
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in memllm.memory_parameters(model)
    )
    model.zero_grad()
    train_steps(model)
    for name, p in model.named_parameters():
        if id(p) not in trained:
            assert torch.equal(p, backbone[name]), name
    assert any(p.abs().sum() > 0 for p in lora_parameters(model) if p.shape[0] != 4)  # B moved


def test_save_load_round_trip_with_lora(tiny, tmp_path):
    model = build(tiny)
    train_steps(model)
    ids = random_ids(2, 24, seed=5)
    expected = forward_segments(model, ids, segment_length=8).logits
    folder = memllm.save_memory(model, tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [CONFIG_FILE, WEIGHTS_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, "manifest.json"]
    )
    fresh, _ = tiny("llama")  # the same backbone, no memory, no adapter
    memllm.load_memory(fresh, folder)
    assert torch.equal(forward_segments(fresh, ids, segment_length=8).logits, expected)
    # loading rebuilt memory and adapter, both trainable again, the backbone frozen
    trainable = {id(p) for p in fresh.parameters() if p.requires_grad}
    found = {id(p) for p in memllm.memory_parameters(fresh) + lora_parameters(fresh)}
    assert trainable == found


def test_load_refuses_another_backbone(tiny, tmp_path):
    model = build(tiny)
    folder = memllm.save_memory(model, tmp_path / "ckpt")
    other, _ = tiny("qwen2")
    with pytest.raises(memllm.CheckpointError, match="model_type"):
        memllm.load_memory(other, folder)
