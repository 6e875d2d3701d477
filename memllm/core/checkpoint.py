"""Save and load a memory: the trained part plus the config that rebuilds it.

A memory checkpoint is a folder with

- ``memory_config.json`` — the memory config, the backbone it was trained on (name, model type,
  depth, width) and the memllm version;
- ``memory.safetensors`` — the memory modules' weights, keyed ``layers.<index>.<param>``;
- ``adapter.safetensors`` — LoRA weights, only when the model carries a LoRA adapter.

The backbone is never written. Loading is strict: another backbone, other sizes, a missing or
an unexpected tensor is a :class:`~memllm.errors.CheckpointError` naming what differs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from memllm.core.backbone import backbone_name, decoder_stack, hidden_size
from memllm.core.inject import inject_memory, memory_config_dict, memory_modules
from memllm.errors import CheckpointError, ConfigError
from memllm.memory import memory_config_from_dict

CONFIG_FILE = "memory_config.json"
WEIGHTS_FILE = "memory.safetensors"
ADAPTER_FILE = "adapter.safetensors"


def _version() -> str:
    from memllm import __version__

    return __version__


def backbone_facts(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint records of its backbone, to refuse loading into another one."""
    _, layers = decoder_stack(model)
    return {
        "name": backbone_name(model),
        "model_type": model.config.model_type,
        "num_layers": len(layers),
        "hidden_size": hidden_size(model),
    }


def memory_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The memory's weights (and nothing of the backbone), keyed ``layers.<index>.<param>``."""
    return {
        f"layers.{k}": v.detach().contiguous()
        for k, v in memory_modules(model).state_dict().items()
    }


def _atomic_dir(target: Path):
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_memory(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the memory (and LoRA adapter, if any) of ``model`` to ``directory``, atomically."""
    from memllm.core.lora import adapter_state_dict, lora_config_dict

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_dir(target)
    meta = {
        "memllm_version": _version(),
        "backbone": backbone_facts(model),
        "memory": memory_config_dict(model),
        **(extra or {}),
    }
    adapter = adapter_state_dict(model)
    if adapter:
        meta["lora"] = lora_config_dict(model)
        save_file(adapter, tmp / ADAPTER_FILE)
    save_file(memory_state_dict(model), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def read_memory_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a memory checkpoint (no {CONFIG_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err.msg}, line {err.lineno})") from None


def load_memory(model: nn.Module, directory: str | os.PathLike, *, check_name: bool = True):
    """Rebuild the memory saved in ``directory`` on ``model`` and load its weights strictly.

    If the model already carries a memory, its config must equal the saved one; otherwise the
    memory is injected first. Returns the model.
    """
    from memllm.core.inject import has_memory
    from memllm.core.lora import apply_lora, load_adapter_state

    directory = Path(directory)
    meta = read_memory_config(directory)
    saved, here = meta.get("backbone", {}), backbone_facts(model)
    for key in ("model_type", "num_layers", "hidden_size"):
        if saved.get(key) != here[key]:
            raise CheckpointError(
                f"{directory}: memory was trained on a backbone with {key}={saved.get(key)!r}, "
                f"this model has {key}={here[key]!r}"
            )
    if check_name and saved.get("name") and here["name"] and saved["name"] != here["name"]:
        raise CheckpointError(
            f"{directory}: memory was trained on backbone {saved['name']!r}, not {here['name']!r} "
            "(pass check_name=False to load it anyway)"
        )
    try:
        config = memory_config_from_dict(meta.get("memory", {}), prefix="memory.")
    except ConfigError as err:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {err}") from None
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} is missing")
    weights = load_file(weights_path)
    if not has_memory(model):
        inject_memory(model, config)
    elif memory_config_dict(model) != meta.get("memory"):
        raise CheckpointError(f"{directory}: the model's memory config differs from the saved one")
    modules = memory_modules(model)
    expected = {f"layers.{k}": v for k, v in modules.state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(
            f"{weights_path}: does not match the memory config ({what}; "
            f"{len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{weights_path}: {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    modules.load_state_dict({k.removeprefix("layers."): v for k, v in weights.items()}, strict=True)
    if "lora" in meta:
        adapter_path = directory / ADAPTER_FILE
        if not adapter_path.is_file():
            raise CheckpointError(f"{directory}: {ADAPTER_FILE} is missing")
        apply_lora(model, meta["lora"])
        load_adapter_state(model, load_file(adapter_path), source=adapter_path)
    return model
