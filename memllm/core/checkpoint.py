"""Save and load what was trained: the memory and/or a LoRA adapter, plus the configs that rebuild
them. One writer (:func:`save_checkpoint`) and one strict loader (:func:`load_checkpoint`) serve
every kind of checkpoint: memory only, memory + LoRA, LoRA only.

A checkpoint is a folder with

- ``memory_config.json`` — the memory config, the backbone it was trained on (name, model type,
  depth, width) and the memllm version; ``memory.safetensors`` — the memory modules' weights,
  keyed ``layers.<index>.<param>``. Both only when the model carries a memory.
- ``adapter_config.json`` + ``adapter_model.safetensors`` — a LoRA adapter in PEFT's own format,
  so that ``peft.PeftModel.from_pretrained(backbone, folder)`` opens it too. Only with LoRA. The
  weights' metadata records the backbone (checked when there is no memory config).

The backbone is never written. Trainer checkpoints add their own files beside these
(``trainer.pt``, ``state.json``, ``sp_head.safetensors``, ...); the loader ignores them.
``manifest.json`` holds the sha256 of every file (:mod:`memllm.core.integrity`), checked on
load; ``memory.safetensors`` also records the memory config it was written with, so an edited
``memory_config.json`` that still fits the tensor shapes is refused too. Saving replaces the
folder atomically, and only when it is empty or a memllm checkpoint.

Loading is strict: another backbone, other sizes, a missing or an unexpected tensor is a
one-line :class:`~memllm.errors.CheckpointError` naming the file and what differs, and the model
is left as it was. Checkpoints of memllm ≤ 0.1 (``adapter.safetensors`` with the LoRA settings
in ``memory_config.json``, or beside a ``lora_config.json`` for LoRA-only runs) still load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from memllm.core.backbone import backbone_name, decoder_stack, hidden_size
from memllm.core.config import from_dict, to_dict
from memllm.core.inject import (
    has_memory,
    inject_memory,
    memory_config_dict,
    memory_modules,
    remove_memory,
)
from memllm.core.integrity import (
    check_replaceable,
    replace_dir,
    sibling_tmp,
    verify_manifest,
    write_manifest,
)
from memllm.core.lora import (
    LoraSettings,
    adapter_state_dict,
    apply_lora,
    has_lora,
    load_adapter_state,
    lora_settings,
    peft_config,
    remove_lora,
    settings_from_peft,
)
from memllm.errors import CheckpointError, ConfigError
from memllm.memory import MemoryConfig, memory_config_from_dict

CONFIG_FILE = "memory_config.json"
WEIGHTS_FILE = "memory.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's names
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT keys an adapter by its path inside a PeftModel
# memllm 0.1: LoRA weights without PEFT's prefix; their settings in memory_config.json["lora"]
# or, for a LoRA-only run, in lora_config.json
LEGACY_ADAPTER_FILE = "adapter.safetensors"
LEGACY_LORA_FILE = "lora_config.json"
BACKBONE_KEYS = ("model_type", "num_layers", "hidden_size")
MEMORY_METADATA = "memllm_memory"  # memory.safetensors' record of the config it was written with


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


# -- writing ----------------------------------------------------------------------------------


def save_checkpoint(
    model: nn.Module, directory: str | os.PathLike, extra: dict | None = None
) -> Path:
    """Write what ``model`` trains (memory and/or LoRA adapter) to ``directory``, atomically.

    The folder is replaced as a whole (written beside it, fsynced, then swapped in), so a file of
    an earlier checkpoint can never change what this one loads as. A folder that holds anything
    but a memllm checkpoint is refused (:class:`~memllm.errors.CheckpointError`) before anything
    is written; files the user added to a checkpoint folder are kept.

    Args:
        model: a model with a memory (:func:`~memllm.inject_memory`), a LoRA adapter
            (:func:`~memllm.apply_lora`) or both.
        directory: the checkpoint folder.
        extra: more keys for ``memory_config.json`` (memory checkpoints only).

    Returns:
        The folder.
    """
    with_memory, with_lora = has_memory(model), has_lora(model)
    if not (with_memory or with_lora):
        raise ValueError("this model has neither memory nor a LoRA adapter: nothing to save")
    # resolved first: "dir/inner/.." is "dir", whatever it holds, and is judged as such
    target = Path(directory).expanduser().resolve()
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_tmp(target)
    facts = backbone_facts(model)
    if with_memory:
        memory = memory_config_dict(model)
        meta = {"memllm_version": _version(), "backbone": facts, "memory": memory, **(extra or {})}
        metadata = {"format": "pt", MEMORY_METADATA: json.dumps(memory, sort_keys=True)}
        save_file(memory_state_dict(model), tmp / WEIGHTS_FILE, metadata=metadata)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if with_lora:
        weights = {PEFT_PREFIX + k: v for k, v in adapter_state_dict(model).items()}
        metadata = {
            "format": "pt",
            "memllm_version": _version(),
            "memllm_backbone": json.dumps(facts),
        }
        save_file(weights, tmp / ADAPTER_WEIGHTS_FILE, metadata=metadata)
        peft_config(lora_settings(model), facts["name"]).save_pretrained(str(tmp))
    write_manifest(tmp)
    replace_dir(tmp, target)
    return target


save_memory = save_checkpoint  # the name of memllm 0.1, kept


# -- reading ----------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    """What a checkpoint folder holds, read from its config files (no weights loaded).

    Attributes:
        directory: the folder.
        memory: the memory config (None: no memory).
        memory_dict: the memory config as saved (compared with a model's own memory).
        lora: the LoRA settings (None: no adapter).
        adapter_path: the adapter's weights file.
        adapter_prefix: what precedes the model's own key in that file (PEFT's prefix, or none).
        backbone: the backbone facts recorded (None for memllm 0.1's LoRA-only checkpoints).
    """

    directory: Path
    memory: MemoryConfig | None = None
    memory_dict: dict[str, Any] | None = None
    lora: LoraSettings | None = None
    adapter_path: Path | None = None
    adapter_prefix: str = ""
    backbone: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        """``"memory"``, ``"memory+lora"`` or ``"lora"``."""
        return "+".join(k for k, v in (("memory", self.memory), ("lora", self.lora)) if v)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text (offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_memory_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``memory_config.json`` of a memory checkpoint."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a memory checkpoint (no {CONFIG_FILE})")
    return _read_json(path)


def _adapter_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None


def read_checkpoint(directory: str | os.PathLike) -> CheckpointInfo:
    """Read and validate a checkpoint's config files: which kind it is and what rebuilds it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint folder not found")
    info = CheckpointInfo(directory)
    meta = None
    if (directory / CONFIG_FILE).is_file():
        meta = _read_json(directory / CONFIG_FILE)
        info.memory_dict = meta.get("memory")
        try:
            info.memory = memory_config_from_dict(info.memory_dict or {}, prefix="memory.")
        except ConfigError as err:
            raise CheckpointError(f"{directory / CONFIG_FILE}: {err}") from None
        info.backbone = meta.get("backbone") or None
        if info.backbone is not None and not isinstance(info.backbone, dict):
            raise CheckpointError(f"{directory / CONFIG_FILE}: 'backbone' must be an object")
    if (directory / ADAPTER_CONFIG_FILE).is_file():
        info.lora = settings_from_peft(
            _read_json(directory / ADAPTER_CONFIG_FILE), str(directory / ADAPTER_CONFIG_FILE)
        )
        info.adapter_path, info.adapter_prefix = directory / ADAPTER_WEIGHTS_FILE, PEFT_PREFIX
        if not info.adapter_path.is_file():
            raise CheckpointError(f"{directory}: {ADAPTER_WEIGHTS_FILE} is missing")
        recorded = _adapter_metadata(info.adapter_path).get("memllm_backbone")
        if info.backbone is None and recorded:
            info.backbone = json.loads(recorded)
    else:  # memllm 0.1
        legacy = (meta or {}).get("lora")
        source = directory / CONFIG_FILE
        if legacy is None and (directory / LEGACY_LORA_FILE).is_file():
            source = directory / LEGACY_LORA_FILE
            legacy = _read_json(source)
        if legacy is not None:
            try:
                info.lora = from_dict(LoraSettings, legacy)
            except ConfigError as err:
                raise CheckpointError(f"{source}: LoRA settings: {err}") from None
            info.adapter_path = directory / LEGACY_ADAPTER_FILE
            if not info.adapter_path.is_file():
                raise CheckpointError(f"{directory}: {LEGACY_ADAPTER_FILE} is missing")
    if info.memory is None and info.lora is None:
        raise CheckpointError(
            f"{directory}: not a memory checkpoint (no {CONFIG_FILE} or {ADAPTER_CONFIG_FILE})"
        )
    return info


# -- loading ----------------------------------------------------------------------------------

# What the loader reads, and so what it verifies (trainer files beside them are the trainer's).
LOADED_FILES = [
    CONFIG_FILE,
    WEIGHTS_FILE,
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    LEGACY_ADAPTER_FILE,
    LEGACY_LORA_FILE,
]


def verify_checkpoint(directory: str | os.PathLike) -> CheckpointInfo:
    """Read a checkpoint's configs and check its weight and config files against the sha256 in
    its manifest (checkpoints of memllm ≤ 0.2 have none), without loading any weights; a
    corrupt or edited file is a one-line :class:`~memllm.errors.CheckpointError`."""
    if Path(directory).is_dir():
        verify_manifest(directory, only=LOADED_FILES)
    return read_checkpoint(directory)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: {path.name} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None


def _check_backbone(info: CheckpointInfo, model: nn.Module, check_name: bool) -> None:
    if info.backbone is None:
        return  # memllm 0.1 LoRA-only: the adapter's keys and shapes are still checked
    saved, here, where = info.backbone, backbone_facts(model), info.directory
    for key in BACKBONE_KEYS:
        if saved.get(key) != here[key]:
            raise CheckpointError(
                f"{where}: trained on a backbone with {key}={saved.get(key)!r}, "
                f"this model has {key}={here[key]!r}"
            )
    if check_name and saved.get("name") and here["name"] and saved["name"] != here["name"]:
        raise CheckpointError(
            f"{where}: trained on backbone {saved['name']!r}, not {here['name']!r} "
            "(pass check_name=False to load it anyway)"
        )


def _first_difference(saved: dict[str, Any], here: dict[str, Any]) -> str:
    for key in sorted(set(saved) | set(here)):
        if saved.get(key) != here.get(key):
            return f"{key}: {saved.get(key)!r} saved, {here.get(key)!r} here"
    return "equal"


def _lora_dict(settings: LoraSettings) -> dict[str, Any]:
    """Settings as a plain dict, target modules in one order (PEFT saves them as a set)."""
    return {**to_dict(settings), "target_modules": sorted(settings.target_modules)}


def _check_parts(info: CheckpointInfo, model: nn.Module) -> None:
    """Without attaching, the model must carry exactly the checkpoint's parts."""
    for part, saved, here in (
        ("memory", info.memory is not None, has_memory(model)),
        ("LoRA adapter", info.lora is not None, has_lora(model)),
    ):
        if saved != here:
            what = (
                f"holds a {part}, but the model has none"
                if saved
                else (f"holds no {part}, but the model has one")
            )
            raise CheckpointError(f"{info.directory}: {what}")


def _check_written_config(info: CheckpointInfo, path: Path) -> None:
    """``memory_config.json`` must be the config the tensors were written with (an edited
    ``num_heads`` may still fit every shape, and would load as another model)."""
    if not path.is_file():
        return  # _load_weights names it
    recorded = _adapter_metadata(path).get(MEMORY_METADATA)
    if recorded is None:
        return  # written by memllm ≤ 0.2
    try:
        written = json.loads(recorded)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: corrupt {MEMORY_METADATA} metadata") from None
    if written != info.memory_dict:
        raise CheckpointError(
            f"{info.directory / CONFIG_FILE}: does not match the config {path.name} was written "
            f"with ({_first_difference(written, info.memory_dict or {})}); edited after saving?"
        )


def _load_memory_part(info: CheckpointInfo, model: nn.Module) -> None:
    path = info.directory / WEIGHTS_FILE
    modules = memory_modules(model)
    expected = {f"layers.{k}": v for k, v in modules.state_dict().items()}
    _check_written_config(info, path)
    weights = _load_weights(path)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(
            f"{path}: does not match the memory config ({what}; "
            f"{len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    modules.load_state_dict({k.removeprefix("layers."): v for k, v in weights.items()}, strict=True)


def _load_lora_part(info: CheckpointInfo, model: nn.Module) -> None:
    path = info.adapter_path
    weights = _load_weights(path)
    prefix = info.adapter_prefix
    stray = [k for k in weights if not k.startswith(prefix)]
    if stray:
        raise CheckpointError(f"{path}: unexpected {stray[0]} (keys start with {prefix!r})")
    load_adapter_state(model, {k[len(prefix) :]: v for k, v in weights.items()}, source=path)


def load_checkpoint(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    check_name: bool = True,
    attach: bool = True,
) -> nn.Module:
    """Load any memllm checkpoint (memory, memory + LoRA, LoRA only) into ``model``, strictly.

    A part the model already carries must have the saved config; a part it lacks is attached
    first (memory injected, LoRA applied) unless ``attach`` is False. On any error the model
    is left as it was (what this call attached is taken off again).

    Args:
        model: the backbone the checkpoint was trained on (with or without its parts).
        directory: the checkpoint folder.
        check_name: also refuse a backbone of the same shape under another name.
        attach: False: the model must carry exactly the checkpoint's parts already (resuming
            a run whose model was built from its config).

    Returns:
        The model.
    """
    info = verify_checkpoint(directory)
    _check_backbone(info, model, check_name)
    if not attach:
        _check_parts(info, model)
    where = info.directory
    if info.memory is not None and has_memory(model):
        here = memory_config_dict(model)
        if here != info.memory_dict:
            raise CheckpointError(
                f"{where}: the model's memory config differs from the saved one "
                f"({_first_difference(info.memory_dict or {}, here)})"
            )
    if info.lora is not None and has_lora(model):
        saved, here = _lora_dict(info.lora), _lora_dict(lora_settings(model))
        if saved != here:
            raise CheckpointError(
                f"{where}: the model's LoRA settings differ from the saved ones "
                f"({_first_difference(saved, here)})"
            )
    injected = applied = False
    try:
        if info.memory is not None:
            if not has_memory(model):
                try:
                    inject_memory(model, info.memory)
                except ConfigError as err:
                    raise CheckpointError(f"{where / CONFIG_FILE}: memory.{err}") from None
                injected = True
            _load_memory_part(info, model)
        if info.lora is not None:
            if not has_lora(model):
                try:
                    apply_lora(model, info.lora)
                except ConfigError as err:
                    raise CheckpointError(f"{where}: {err}") from None
                applied = True
            _load_lora_part(info, model)
    except CheckpointError:
        if applied:
            remove_lora(model)
        if injected:
            remove_memory(model)
        raise
    return model


load_memory = load_checkpoint  # the name of memllm 0.1, kept
