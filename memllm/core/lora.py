"""LoRA co-training through PEFT, in place on the host model.

PEFT's ``inject_adapter_in_model`` adds LoRA layers to the model object itself (no ``PeftModel``
wrapper), so memory and adapter live on one model and one checkpoint covers both. Adapter keys
are stored without memllm's wrapper segment (``layers.3.layer.self_attn`` → ``layers.3.self_attn``),
so a checkpoint loads whether LoRA or memory was attached first.

On disk the adapter is PEFT's own format (``adapter_config.json`` + ``adapter_model.safetensors``,
keys prefixed ``base_model.model.``): :func:`peft_config` and :func:`settings_from_peft` convert
between it and :class:`LoraSettings`; :mod:`memllm.core.checkpoint` reads and writes the files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memllm.core.config import check, from_dict, to_dict
from memllm.errors import CheckpointError, ConfigError

ADAPTER = "default"


@dataclass
class LoraSettings:
    """LoRA on the backbone (MemoryLlama co-trains it with the memory)."""

    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA scaling alpha"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        metadata={"help": "module names (suffixes) that get adapters"},
    )

    def __post_init__(self) -> None:
        check(self.rank > 0, "rank", f"must be > 0, got {self.rank}")
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        check(len(self.target_modules) > 0, "target_modules", "needs at least one module name")


def _settings(settings: LoraSettings | dict[str, Any]) -> LoraSettings:
    return settings if isinstance(settings, LoraSettings) else from_dict(LoraSettings, settings)


def apply_lora(model: nn.Module, settings: LoraSettings | dict[str, Any]) -> nn.Module:
    """Add LoRA adapters to ``model`` in place; the adapters and the memory (if any) are then the
    only trainable parameters."""
    from peft import inject_adapter_in_model

    from memllm.core.inject import has_memory, memory_parameters

    settings = _settings(settings)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [t for t in settings.target_modules if t not in names]
    if absent:
        raise ConfigError(
            f"lora.target_modules: {absent[0]!r} names no module of {type(model).__name__}"
        )
    config = peft_config(settings)
    # PEFT freezes every parameter that is not LoRA's, which would also freeze a memory injected
    # before the adapter: the memory's parameters (found by structure) keep their trainability.
    has_memory = has_memory(model)
    memory = [p for p in memory_parameters(model) if p.requires_grad] if has_memory else []
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for p in memory:
        p.requires_grad_(True)
    # PEFT's new modules (LoRA dropout) start in training mode: follow the model's mode instead
    model.train(model.training)
    model._memllm_lora = settings
    return model


def peft_config(settings: LoraSettings | dict[str, Any], base_model: str | None = None):
    """PEFT's ``LoraConfig`` for ``settings`` (a causal-LM adapter of ``base_model``)."""
    from peft import LoraConfig

    settings = _settings(settings)
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model or None,
    )


# PEFT LoRA options memllm does not reproduce, with the value that means "not used"
_UNSUPPORTED_PEFT = {
    "bias": "none",
    "use_dora": False,
    "use_rslora": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
}


def settings_from_peft(data: dict[str, Any], source: str = "adapter_config.json") -> LoraSettings:
    """The :class:`LoraSettings` of a PEFT ``adapter_config.json`` mapping, strictly: a LoRA
    option memllm would not reproduce (DoRA, rsLoRA, per-layer ranks, ...) is an error."""
    if data.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{source}: peft_type {data.get('peft_type')!r} is not LORA")
    for key, unused in _UNSUPPORTED_PEFT.items():
        if data.get(key, unused) not in (unused, None, {}, [], False, "none"):
            raise CheckpointError(f"{source}: {key}={data[key]!r} is not supported by memllm")
    targets = data.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise CheckpointError(
            f"{source}: target_modules must be a list of module names, got {targets!r}"
        )
    try:
        return LoraSettings(
            rank=int(data["r"]),
            alpha=float(data["lora_alpha"]),
            dropout=float(data.get("lora_dropout", 0.0)),
            target_modules=sorted(targets),
        )
    except KeyError as err:
        raise CheckpointError(f"{source}: {err.args[0]} is missing") from None
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from None


def remove_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_lora`: put the original layers back (a failed load rolls back with it)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    for attr in ("peft_config", "_memllm_lora"):
        if attr in vars(model):
            delattr(model, attr)
    return model


def has_lora(model: nn.Module) -> bool:
    return getattr(model, "_memllm_lora", None) is not None


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters, found by structure (PEFT's LoRA layers), not by name matching."""
    from peft.tuners.lora import LoraLayer

    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for sub in (module.lora_A, module.lora_B):
                params.extend(sub.parameters())
    return params


def lora_config_dict(model: nn.Module) -> dict[str, Any]:
    return to_dict(model._memllm_lora)


def lora_settings(model: nn.Module) -> LoraSettings | None:
    """The settings :func:`apply_lora` was called with (None without LoRA)."""
    return getattr(model, "_memllm_lora", None)


def _wrapper_pattern(model: nn.Module) -> re.Pattern:
    from memllm.core.inject import MemoryLayer

    prefixes = [re.escape(n) for n, m in model.named_modules() if isinstance(m, MemoryLayer)]
    if not prefixes:
        return re.compile(r"(?!)(.)")  # matches nothing, but has the group the callers use
    return re.compile(rf"^({'|'.join(prefixes)})\.layer\.")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights, with memllm's wrapper segment removed from the keys ({} without LoRA)."""
    if not has_lora(model):
        return {}
    from peft import get_peft_model_state_dict

    pattern = _wrapper_pattern(model)
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {pattern.sub(r"\1.", k): v.detach().contiguous() for k, v in state.items()}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source=None) -> None:
    """Load LoRA weights saved by :func:`adapter_state_dict`, strictly."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    pattern = _wrapper_pattern(model)
    # saved key (wrapper segment removed) -> the model's own key (PEFT's naming, wrapper included)
    raw = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    expected = {pattern.sub(r"\1.", k): k for k in raw}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"{source or 'adapter'}: does not match the LoRA config ({what})")
    for key, value in state.items():
        if value.shape != raw[expected[key]].shape:
            raise CheckpointError(
                f"{source or 'adapter'}: {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(raw[expected[key]].shape)}"
            )
    mapped = {expected[k]: v for k, v in state.items()}
    result = set_peft_model_state_dict(model, mapped, adapter_name=ADAPTER)
    ignored = getattr(result, "unexpected_keys", None)
    if ignored:  # PEFT loads non-strictly: a key it could not place is an error here
        raise CheckpointError(f"{source or 'adapter'}: {ignored[0]} was not loaded")
