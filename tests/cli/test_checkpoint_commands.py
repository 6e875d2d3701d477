"""``memllm generate`` and ``memllm info`` read every checkpoint kind (memory, memory + LoRA,
LoRA only) through the one loader, and refuse a checkpoint of another backbone in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_LATENT

import memllm
from memllm.cli import main

LORA = {"rank": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
KINDS = {
    "memory": (SMALL_LATENT, None),
    "memory+lora": (SMALL_LATENT, LORA),
    "lora": (None, LORA),
}


def save(kind: str, folder, arch: str = "llama"):
    model = memllm.MemoryModel.from_config(f"tiny-{arch}", *KINDS[kind][:1], lora=KINDS[kind][1])
    with torch.no_grad():  # off the identity, so that loading matters
        for p in model.trainable_parameters():
            p.add_(0.1)
    return model, model.save_pretrained(folder)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_generate_reads_every_checkpoint_kind(kind, tmp_path, capsys, one_thread):
    model, folder = save(kind, tmp_path / kind)
    assert memllm.read_checkpoint(folder).kind == kind
    argv = ["generate", "--model", "tiny-llama", "--checkpoint", str(folder)]
    argv += ["--prompt", "Mary went to the kitchen. " * 6, "--segment-length", "32"]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    expected = model.generate("Mary went to the kitchen. " * 6, segment_length=32, max_new_tokens=4)
    assert capsys.readouterr().out == expected + "\n"


def test_info_describes_a_lora_checkpoint(tmp_path, capsys):
    _, folder = save("memory+lora", tmp_path / "both")
    assert main(["info", "--model", "tiny-llama", "--checkpoint", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "memory " in out and "LoRA adapter" in out and "rank 2 on q_proj, v_proj" in out


def test_a_checkpoint_of_another_backbone_is_one_line(tmp_path, capsys):
    _, folder = save("lora", tmp_path / "lora", arch="qwen2")
    argv = ["generate", "--model", "tiny-llama", "--checkpoint", str(folder), "--prompt", "hi"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_type='qwen2'" in err
