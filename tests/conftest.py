"""Shared fixtures: tiny random models built from config classes, offline and fast."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

# Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from memllm.core.backbone import freeze  # noqa: E402
from memllm.core.inject import memory_layers  # noqa: E402
from memllm.core.tiny import build_tiny_model  # noqa: E402

SMALL_LATENT = {"type": "latent", "num_slots": 4, "memory_dim": 16, "num_heads": 2}


@contextlib.contextmanager
def single_thread():
    """Tiny tensors run fastest on one thread (and are not slowed by a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


@pytest.fixture
def tiny():
    """Factory: ``tiny("llama")`` → (frozen model, tokenizer); also qwen2, gemma3, gpt2."""

    def make(arch: str = "llama", seed: int = 0, **sizes):
        model, tokenizer = build_tiny_model(arch, seed=seed, **sizes)
        return freeze(model), tokenizer

    return make


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own memllm cache folder."""
    monkeypatch.setenv("MEMLLM_CACHE", str(tmp_path / "memllm-cache"))


def wake_memory(model, seed: int = 0) -> None:
    """Give the zero-initialised mixing gates random values so the memory changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in memory_layers(model).values():
            gate = layer.memory.out_gate
            gate.copy_(torch.randn(gate.shape, generator=gen))


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, length), generator=gen)
