"""The CUDA path: every memory on a GPU gives what it gives on the CPU, and a run trains there.

Opt-in (``pytest -m gpu``); skipped where no CUDA device is present. The CPU tests hold the
invariants; these check that nothing in the memories, the segment loop, generation or the
trainer silently assumes the CPU (a tensor made on the wrong device, a dtype the GPU run
changes, a cache kept off the device).
"""

from __future__ import annotations

import copy

import pytest
import torch

import memllm
from memllm.core.inject import inject_memory
from memllm.core.segments import forward_segments
from memllm.memory.registry import memory_config_from_dict
from tests.conftest import random_ids
from tests.training.test_train import ToyTask, records, toy_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MEMORIES = {
    "latent": {"type": "latent", "num_slots": 4, "memory_dim": 16, "num_heads": 2},
    "latent_delta": {
        "type": "latent",
        "num_slots": 4,
        "memory_dim": 16,
        "num_heads": 2,
        "write": "delta",
    },
    "episodic": {"type": "episodic", "layer_ids": [-1], "num_heads": 2, "key_dim": 16},
    "neural_context": {"type": "neural", "layer_ids": [1], "arch": "context", "chunk_size": 4},
    "neural_layer": {"type": "neural", "layer_ids": [1], "arch": "layer", "chunk_size": 4},
    "kv_retrieval": {"type": "kv_retrieval", "block_size": 4, "top_k": 2, "init_tokens": 2},
}


def _with_memory(tiny, config):
    model, _ = tiny("llama")
    inject_memory(model, config)
    # An untrained memory is the bare model: random values in its zero-initialised gates make
    # it change outputs. eval(): no dropout, so two runs of one model agree.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in memllm.memory_parameters(model):
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("name", sorted(MEMORIES))
def test_segments_on_the_gpu_equal_the_cpu(tiny, name):
    model = _with_memory(tiny, MEMORIES[name])
    ids = random_ids(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding in one row
    gpu_model = copy.deepcopy(model).cuda()  # copied before any segment fills a store
    with torch.no_grad():
        on_cpu = forward_segments(model, ids, mask, segment_length=12).logits
        on_gpu = forward_segments(gpu_model, ids.cuda(), mask.cuda(), segment_length=12).logits
    assert on_gpu.device.type == "cuda"
    real = mask[:, -on_cpu.shape[1] :].bool()
    # TF32 matmuls on the GPU: agreement to a few parts in a thousand, not bit-exact
    torch.testing.assert_close(on_gpu.cpu()[real], on_cpu[real], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("name", ["latent", "episodic", "neural_context", "kv_retrieval"])
def test_greedy_generation_on_the_gpu_equals_the_cpu(tiny, name):
    model = _with_memory(tiny, MEMORIES[name])
    ids = random_ids(2, 30, seed=1)
    gpu_model = copy.deepcopy(model).cuda()
    on_cpu = memllm.generate_ids(model, ids, segment_length=10, max_new_tokens=5)
    on_gpu = memllm.generate_ids(gpu_model, ids.cuda(), segment_length=10, max_new_tokens=5)
    assert torch.equal(on_gpu.cpu(), on_cpu)


@pytest.mark.parametrize("name", ["latent", "episodic", "neural_context"])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_a_run_trains_on_the_gpu_and_its_checkpoint_loads_on_the_cpu(tmp_path, name, precision):
    from memllm.training.trainer import train

    memory = {**MEMORIES[name], "layer_ids": [-1]} if name != "neural_context" else MEMORIES[name]
    cfg = toy_config(tmp_path)
    cfg.memory = memory_config_from_dict(memory)
    cfg.train.mixed_precision = precision
    result = train(cfg, task=ToyTask())
    assert next(result.model.parameters()).device.type == "cuda"
    losses = [r["loss"] for r in records(result.output_dir)]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    model, _ = memllm.load_backbone("tiny-llama")  # the checkpoint loads strictly on the CPU
    memllm.load_memory(model, result.output_dir / "final")
