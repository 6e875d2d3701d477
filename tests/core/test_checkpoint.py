"""Checkpoints of every kind (memory, memory + LoRA, LoRA only, those of memllm 0.1) through
the one strict loader: identical outputs after a round trip, no backbone weights, one-line
errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_LATENT, random_ids, wake_memory
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

import memllm
from memllm.core.checkpoint import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CONFIG_FILE,
    LEGACY_ADAPTER_FILE,
    LEGACY_LORA_FILE,
    WEIGHTS_FILE,
    backbone_facts,
    memory_state_dict,
)
from memllm.core.inject import has_memory, memory_config_dict
from memllm.core.integrity import write_manifest as resign  # edits below keep a valid manifest
from memllm.core.lora import adapter_state_dict, has_lora, lora_parameters
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
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [CONFIG_FILE, WEIGHTS_FILE, "manifest.json"]
    )
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
    resign(path)
    with pytest.raises(memllm.CheckpointError, match=f"missing {key}"):
        memllm.load_memory(tiny("llama")[0], path)
    weights[key] = torch.zeros(3, 3)
    save_file(weights, path / WEIGHTS_FILE)
    resign(path)
    with pytest.raises(memllm.CheckpointError, match="shape"):
        memllm.load_memory(tiny("llama")[0], path)


def test_not_a_checkpoint(tiny, tmp_path):
    with pytest.raises(memllm.CheckpointError, match="not a memory checkpoint"):
        memllm.load_memory(tiny("llama")[0], tmp_path)


def test_save_is_atomic_and_overwrites(trained, tmp_path):
    model, path = trained
    memllm.save_memory(model, path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- every kind through the one loader ---------------------------------------------------------

LORA = {"rank": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _perturb_lora(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.fixture
def lora_only(tiny, tmp_path):
    model, _ = tiny("llama")
    memllm.apply_lora(model, LORA)
    _perturb_lora(model)
    return model, memllm.save_checkpoint(model, tmp_path / "lora")


def test_lora_only_round_trip(tiny, lora_only):
    model, path = lora_only
    assert sorted(p.name for p in path.iterdir()) == [
        ADAPTER_CONFIG_FILE,
        ADAPTER_WEIGHTS_FILE,
        "manifest.json",
    ]
    assert memllm.read_checkpoint(path).kind == "lora"
    ids = random_ids(2, 16)
    fresh, _ = tiny("llama")
    memllm.load_checkpoint(fresh, path)
    assert not has_memory(fresh) and has_lora(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_memory_only_round_trip_reports_its_kind(tiny, trained):
    _, path = trained
    assert memllm.read_checkpoint(path).kind == "memory"
    fresh, _ = tiny("llama")
    memllm.load_checkpoint(fresh, path)
    assert has_memory(fresh) and not has_lora(fresh)


def test_trainer_files_beside_the_weights_are_ignored(tiny, trained):
    model, path = trained
    (path / "trainer.pt").write_bytes(b"not read")
    (path / "state.json").write_text("{}")
    (path / "sp_head.safetensors").write_bytes(b"not read")
    fresh, _ = tiny("llama")
    memllm.load_checkpoint(fresh, path)
    ids = random_ids(1, 16)
    assert torch.equal(
        forward_segments(fresh, ids, segment_length=8).logits,
        forward_segments(model, ids, segment_length=8).logits,
    )


def test_memllm_0_1_checkpoints_still_load(tiny, tmp_path):
    """0.1 wrote ``adapter.safetensors`` (keys without PEFT's prefix) with the LoRA settings in
    memory_config.json, or beside a lora_config.json for LoRA-only runs."""
    model, _ = tiny("llama")
    memllm.inject_memory(model, SMALL_LATENT)
    memllm.apply_lora(model, LORA)
    wake_memory(model)
    _perturb_lora(model)
    ids = random_ids(2, 16)
    expected = forward_segments(model, ids, segment_length=8).logits
    both = tmp_path / "both"
    both.mkdir()
    meta = {"backbone": backbone_facts(model), "memory": memory_config_dict(model), "lora": LORA}
    (both / CONFIG_FILE).write_text(json.dumps(meta))
    save_file(memory_state_dict(model), both / WEIGHTS_FILE)
    save_file(adapter_state_dict(model), both / LEGACY_ADAPTER_FILE)
    fresh, _ = tiny("llama")
    memllm.load_memory(fresh, both)
    assert torch.equal(forward_segments(fresh, ids, segment_length=8).logits, expected)

    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    (lora_dir / LEGACY_LORA_FILE).write_text(json.dumps(LORA))
    save_file(adapter_state_dict(model), lora_dir / LEGACY_ADAPTER_FILE)
    bare, _ = tiny("llama")
    assert memllm.read_checkpoint(lora_dir).kind == "lora"
    memllm.load_checkpoint(bare, lora_dir)
    assert has_lora(bare) and not has_memory(bare)


def test_lora_for_other_sizes_is_refused_and_rolled_back(tiny, lora_only):
    _, path = lora_only
    wider, _ = tiny("llama", hidden=48)
    with pytest.raises(memllm.CheckpointError, match="hidden_size=32"):
        memllm.load_checkpoint(wider, path)
    # without the recorded backbone facts the tensors' shapes still refuse it, and the adapter
    # this call attached is taken off again
    (path / ADAPTER_WEIGHTS_FILE).write_bytes(_resave_without_metadata(path / ADAPTER_WEIGHTS_FILE))
    resign(path)
    with pytest.raises(memllm.CheckpointError, match="shape"):
        memllm.load_checkpoint(wider, path)
    assert not has_lora(wider)
    assert not [m for m in wider.modules() if isinstance(m, LoraLayer)]
    wider(random_ids(1, 4))  # still the plain backbone, and it runs


def _resave_without_metadata(path):
    from safetensors.torch import save

    return save(load_file(path))


def test_missing_or_extra_adapter_tensor_is_refused(tiny, lora_only):
    _, path = lora_only
    weights = load_file(path / ADAPTER_WEIGHTS_FILE)
    key = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != key}, path / ADAPTER_WEIGHTS_FILE)
    resign(path)
    with pytest.raises(memllm.CheckpointError, match="missing"):
        memllm.load_checkpoint(tiny("llama")[0], path)
    save_file(
        {**weights, key.replace("q_proj", "k_proj"): weights[key].clone()},
        path / ADAPTER_WEIGHTS_FILE,
    )
    resign(path)
    with pytest.raises(memllm.CheckpointError, match="unexpected"):
        memllm.load_checkpoint(tiny("llama")[0], path)


def test_extra_memory_tensor_is_refused_and_the_memory_rolled_back(tiny, trained):
    _, path = trained
    weights = load_file(path / WEIGHTS_FILE)
    save_file({**weights, "layers.0.stray": torch.zeros(2)}, path / WEIGHTS_FILE)
    resign(path)
    model, _ = tiny("llama")
    with pytest.raises(memllm.CheckpointError, match=r"unexpected layers\.0\.stray"):
        memllm.load_checkpoint(model, path)
    assert not has_memory(model)


def test_a_model_with_other_parts_or_settings_is_refused(tiny, trained, lora_only):
    memory_ckpt, lora_ckpt = trained[1], lora_only[1]
    bare, _ = tiny("llama")
    with pytest.raises(memllm.CheckpointError, match="holds a memory, but the model has none"):
        memllm.load_checkpoint(bare, memory_ckpt, attach=False)
    with pytest.raises(memllm.CheckpointError, match="holds no memory, but the model has one"):
        other, _ = tiny("llama")
        memllm.inject_memory(other, SMALL_LATENT)
        memllm.apply_lora(other, LORA)
        memllm.load_checkpoint(other, lora_ckpt, attach=False)
    sized, _ = tiny("llama")
    memllm.inject_memory(sized, {**SMALL_LATENT, "layer_ids": [0, 1], "num_slots": 8})
    with pytest.raises(memllm.CheckpointError, match="num_slots: 4 saved, 8 here"):
        memllm.load_checkpoint(sized, memory_ckpt)
    ranked, _ = tiny("llama")
    memllm.apply_lora(ranked, {**LORA, "rank": 4})
    with pytest.raises(memllm.CheckpointError, match="rank: 2 saved, 4 here"):
        memllm.load_checkpoint(ranked, lora_ckpt)


def test_unsupported_peft_options_are_refused(tiny, lora_only):
    _, path = lora_only
    config = json.loads((path / ADAPTER_CONFIG_FILE).read_text())
    (path / ADAPTER_CONFIG_FILE).write_text(json.dumps({**config, "use_dora": True}))
    resign(path)
    with pytest.raises(memllm.CheckpointError, match="use_dora=True is not supported"):
        memllm.load_checkpoint(tiny("llama")[0], path)


def test_nothing_to_save_is_an_error(tiny, tmp_path):
    with pytest.raises(ValueError, match="nothing to save"):
        memllm.save_checkpoint(tiny("llama")[0], tmp_path / "x")
