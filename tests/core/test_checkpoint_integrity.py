"""What a checkpoint guarantees on disk: saving never removes a file memllm did not write, the
folder is replaced whole, and every file is checked against its manifest on load."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import SMALL_LATENT, random_ids, wake_memory
from safetensors.torch import load_file, save

import memllm
from memllm.core.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from memllm.core.integrity import MANIFEST_FILE, write_manifest
from memllm.core.segments import forward_segments


def snapshot(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def model(tiny):
    model, _ = tiny("llama")
    memllm.inject_memory(model, SMALL_LATENT)
    wake_memory(model)
    return model


@pytest.fixture
def saved(model, tmp_path):
    return model, memllm.save_memory(model, tmp_path / "ckpt")


def test_saving_into_a_folder_of_other_files_is_refused_and_changes_nothing(model, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    (folder / "data").mkdir()
    (folder / "data" / "x.csv").write_text("1,2\n")
    before = snapshot(tmp_path)
    with pytest.raises(memllm.CheckpointError, match=r"not a memllm checkpoint \(data, thesis"):
        memllm.save_memory(model, folder)
    assert snapshot(tmp_path) == before


def test_a_path_through_dotdot_is_judged_by_where_it_leads(model, tmp_path):
    """``dir/inner/..`` deleted dir's files before failing."""
    parent = tmp_path / "dir"
    (parent / "inner").mkdir(parents=True)
    (parent / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    for path in (parent / "inner" / "..", parent / "nothing" / ".."):
        with pytest.raises(memllm.CheckpointError, match="not a memllm checkpoint"):
            memllm.save_memory(model, path)
    assert snapshot(tmp_path) == before


def test_a_file_in_the_way_is_refused(model, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(memllm.CheckpointError, match="not a folder"):
        memllm.save_memory(model, tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


def test_replacing_a_checkpoint_keeps_the_users_files_and_drops_only_its_own(tiny, tmp_path):
    with_lora, _ = tiny("llama")
    memllm.inject_memory(with_lora, SMALL_LATENT)
    memllm.apply_lora(with_lora, {"rank": 2, "alpha": 4, "target_modules": ["q_proj"]})
    folder = memllm.save_memory(with_lora, tmp_path / "ckpt")
    (folder / "NOTES.md").write_text("my notes")
    (folder / "plots").mkdir()
    (folder / "plots" / "loss.png").write_bytes(b"png")
    memory_only, _ = tiny("llama")
    memllm.inject_memory(memory_only, SMALL_LATENT)
    memllm.save_memory(memory_only, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE, "NOTES.md", "plots"]
    )
    assert (folder / "NOTES.md").read_text() == "my notes"
    assert (folder / "plots" / "loss.png").read_bytes() == b"png"
    assert memllm.read_checkpoint(folder).kind == "memory"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no debris


def test_an_empty_folder_or_a_memllm_0_2_checkpoint_may_be_replaced(saved, tmp_path):
    model, folder = saved
    (tmp_path / "empty").mkdir()
    memllm.save_memory(model, tmp_path / "empty")
    (folder / MANIFEST_FILE).unlink()  # as memllm ≤ 0.2 wrote it
    memllm.save_memory(model, folder)
    assert (folder / MANIFEST_FILE).is_file()


def test_a_bare_peft_adapter_folder_is_not_ours_to_replace(tiny, model, tmp_path):
    lora, _ = tiny("llama")
    memllm.apply_lora(lora, {"rank": 2, "alpha": 4, "target_modules": ["q_proj"]})
    folder = memllm.save_checkpoint(lora, tmp_path / "adapter")
    (folder / MANIFEST_FILE).unlink()
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(save(load_file(weights)))  # PEFT's own file: no memllm metadata
    with pytest.raises(memllm.CheckpointError, match="not a memllm checkpoint"):
        memllm.save_memory(model, folder)


def _flip(path, count=300):
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_the_weights_are_refused(tiny, saved):
    """300 flipped bytes inside memory.safetensors loaded and generated with exit 0."""
    _, folder = saved
    _flip(folder / WEIGHTS_FILE)
    fresh, _ = tiny("llama")
    with pytest.raises(memllm.CheckpointError, match=r"memory\.safetensors: sha256 differs"):
        memllm.load_checkpoint(fresh, folder)
    assert not memllm.has_memory(fresh)


def test_an_edited_config_that_still_fits_the_shapes_is_refused(tiny, saved):
    """num_heads 2 → 4 fits every tensor shape of a 16-wide memory, and loaded silently."""
    _, folder = saved
    meta = json.loads((folder / CONFIG_FILE).read_text())
    meta["memory"]["num_heads"] = 4
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # the same size
    with pytest.raises(memllm.CheckpointError, match=r"memory_config\.json: sha256 differs"):
        memllm.load_checkpoint(tiny("llama")[0], folder)
    # with a manifest rewritten to match, the tensors' own record of their config still refuses
    write_manifest(folder)
    with pytest.raises(
        memllm.CheckpointError, match=r"written with \(num_heads: 2 saved, 4 here\)"
    ):
        memllm.load_checkpoint(tiny("llama")[0], folder)


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "bytes"),
        (lambda p: p.write_bytes(b""), "bytes"),
        (lambda p: p.write_bytes(b"garbage" * 50), "bytes"),
        (lambda p: p.unlink(), "missing"),
    ],
    ids=["truncated", "empty", "garbled", "missing"],
)
def test_damaged_weights_are_one_line_with_or_without_a_manifest(tiny, saved, damage, words):
    _, folder = saved
    damage(folder / WEIGHTS_FILE)
    with pytest.raises(memllm.CheckpointError, match=words) as info:
        memllm.load_checkpoint(tiny("llama")[0], folder)
    assert "\n" not in str(info.value)
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(memllm.CheckpointError) as info:
        memllm.load_checkpoint(tiny("llama")[0], folder)
    assert "\n" not in str(info.value)


def test_a_corrupt_manifest_is_one_line(tiny, saved):
    _, folder = saved
    (folder / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(memllm.CheckpointError, match="corrupt manifest"):
        memllm.load_checkpoint(tiny("llama")[0], folder)


def test_a_verified_checkpoint_round_trips(tiny, saved):
    model, folder = saved
    fresh, _ = tiny("llama")
    memllm.load_checkpoint(fresh, folder)
    ids = random_ids(1, 16)
    assert torch.equal(
        forward_segments(fresh, ids, segment_length=8).logits,
        forward_segments(model, ids, segment_length=8).logits,
    )
