"""MemoryModel: PEFT-style wrapper; save_pretrained writes a PEFT adapter that PEFT itself opens."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from conftest import SMALL_LATENT, random_ids, single_thread

import memllm
from memllm.core.checkpoint import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CONFIG_FILE,
    PEFT_PREFIX,
    WEIGHTS_FILE,
)
from memllm.core.lora import adapter_state_dict

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def perturb(model: memllm.MemoryModel, seed: int = 0) -> None:
    """Move every trainable weight (zero gates and LoRA's zero B included) off its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.fixture
def trained(tiny):
    model, tokenizer = tiny("llama")
    mm = memllm.MemoryModel.from_config(
        model, {**SMALL_LATENT, "layer_ids": [0, 1]}, lora=LORA, tokenizer=tokenizer
    )
    perturb(mm)
    return mm


def test_save_pretrained_round_trip_gives_identical_logits_and_generation(tiny, trained, tmp_path):
    folder = trained.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [CONFIG_FILE, WEIGHTS_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, "manifest.json"]
    )
    backbone, tokenizer = tiny("llama")
    reopened = memllm.MemoryModel.from_pretrained(backbone, folder, tokenizer=tokenizer)
    ids = random_ids(2, 24, seed=3)
    expected = trained.forward_segments(ids, segment_length=8).logits
    assert torch.equal(reopened.forward_segments(ids, segment_length=8).logits, expected)
    assert torch.equal(
        reopened.generate(ids, segment_length=8, max_new_tokens=6),
        trained.generate(ids, segment_length=8, max_new_tokens=6),
    )
    prompt = "Mary went to the kitchen. " * 4
    assert reopened.generate(prompt, segment_length=16, max_new_tokens=5) == trained.generate(
        prompt, segment_length=16, max_new_tokens=5
    )
    assert reopened.has_lora and reopened.memory_config.layer_ids == [0, 1]
    trainable = {id(p) for p in reopened.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in reopened.trainable_parameters()}


def test_peft_opens_the_adapter_with_the_same_weights_and_outputs(tiny, trained, tmp_path):
    from peft import PeftModel

    folder = trained.save_pretrained(tmp_path / "ckpt")
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    base, _ = tiny("llama")
    peft_model = PeftModel.from_pretrained(base, folder)
    from peft import get_peft_model_state_dict

    theirs = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    ours = {PEFT_PREFIX + k: v for k, v in adapter_state_dict(trained.model).items()}
    assert len(ours) == 2 * 2 * 2  # A and B, q and v, two layers
    assert sorted(theirs) == sorted(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    # without the memory, our model is backbone + LoRA: what PEFT computes
    memllm.remove_memory(trained.model)
    ids = random_ids(2, 12)
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, trained(ids).logits, atol=1e-6)


def test_attributes_fall_through_to_the_backbone(trained):
    assert trained.config.model_type == "llama"
    assert trained.get_input_embeddings() is trained.model.get_input_embeddings()
    assert "memory=latent" in repr(trained) and "lora=True" in repr(trained)
    with pytest.raises(AttributeError):
        trained.no_such_attribute  # noqa: B018


def test_memory_session_carries_memory_across_calls(tiny):
    model, tokenizer = tiny("llama")
    mm = memllm.MemoryModel.from_config(model, SMALL_LATENT, tokenizer=tokenizer)
    perturb(mm)
    ids = random_ids(1, 16)
    with torch.no_grad():
        fresh = mm(ids[:, 8:]).logits
        with mm.memory_session() as session:
            mm(ids[:, :8])
            carried = mm(ids[:, 8:]).logits
            assert session.states
        assert torch.equal(carried, mm.forward_segments(ids, segment_length=8).logits)
    assert not torch.equal(fresh, carried)


def test_from_config_by_name_loads_the_backbone_and_its_tokenizer():
    mm = memllm.MemoryModel.from_config("tiny-gpt2", {**SMALL_LATENT, "layer_ids": [-1]})
    assert mm.tokenizer is not None and mm.memory_config.type == "latent"
    text = mm.generate(["hello", "a longer prompt"], segment_length=4, max_new_tokens=3)
    assert len(text) == 2


def test_text_generation_needs_a_tokenizer(tiny):
    mm = memllm.MemoryModel.from_config(tiny("llama")[0], SMALL_LATENT)
    with pytest.raises(ValueError, match="tokenizer"):
        mm.generate("hello")


def test_push_to_hub_uploads_the_saved_folder(trained):
    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, commit_message):
        from pathlib import Path

        uploaded["repo"] = repo_id
        uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        return "commit"

    with (
        mock.patch("huggingface_hub.HfApi.create_repo") as create,
        mock.patch("huggingface_hub.HfApi.upload_folder", upload_folder),
    ):
        assert trained.push_to_hub("me/memory") == "commit"
    create.assert_called_once_with("me/memory", private=None, exist_ok=True)
    assert uploaded == {
        "repo": "me/memory",
        "files": sorted(
            [CONFIG_FILE, WEIGHTS_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, "manifest.json"]
        ),
    }
