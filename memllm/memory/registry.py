"""The registry of memory types: a name, its config dataclass and its module class.

Each memory type's file registers itself where its module class is defined::

    @register_memory("latent", LatentMemoryConfig)
    class LatentMemory(nn.Module): ...

and :mod:`memllm.memory` imports that file, so that the type is known as soon as ``memllm`` is
imported. The config class must have a ``type`` field whose default is the registered name
(it is what a YAML ``memory: {type: ...}`` section selects).
"""

from __future__ import annotations

from typing import Any

from memllm.core.config import ConfigError, from_dict

# name -> (config dataclass, module class); filled by @register_memory as the modules import
MEMORY_TYPES: dict[str, tuple[type, type]] = {}

MemoryConfig = Any  # an instance of one of the config classes in MEMORY_TYPES

# what the rest of memllm reads from a module class (see memllm.memory.protocol.MemoryModule)
_REQUIRED = ("learns_within_call", "post_layer", "init_state", "forward")


def register_memory(name: str, config_cls: type):
    """Class decorator: make ``name`` (a config's ``type``) build the decorated module class.

    Checks that the class states the :class:`~memllm.memory.protocol.MemoryModule` contract
    (``learns_within_call``, ``post_layer``, ``init_state``, ``forward``). Registering the same
    pair twice is harmless; another class under a taken name is an error.
    """

    def decorate(module_cls: type) -> type:
        absent = [attr for attr in _REQUIRED if not hasattr(module_cls, attr)]
        if absent:
            raise TypeError(
                f"memory type {name!r}: {module_cls.__name__} lacks {', '.join(absent)} "
                "(see memllm.memory.protocol.MemoryModule)"
            )
        default = getattr(config_cls, "type", None)
        if default != name:
            raise TypeError(
                f"memory type {name!r}: {config_cls.__name__}.type defaults to {default!r}"
            )
        known = MEMORY_TYPES.get(name)
        if known is not None and known != (config_cls, module_cls):
            raise ValueError(f"memory type {name!r} is already registered by {known[1].__name__}")
        MEMORY_TYPES[name] = (config_cls, module_cls)
        return module_cls

    return decorate


def memory_config_from_dict(data: dict[str, Any], prefix: str = "") -> MemoryConfig:
    """Build the memory config named by ``data["type"]``; strict like every memllm config."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'memory'}: expected a mapping, got {data!r}")
    kind = data.get("type", "latent")
    if kind not in MEMORY_TYPES:
        known = ", ".join(sorted(MEMORY_TYPES))
        raise ConfigError(f"{prefix}type: unknown memory type {kind!r} (known: {known})")
    config_cls, _ = MEMORY_TYPES[kind]
    return from_dict(config_cls, {**data, "type": kind}, prefix=prefix)


def memory_class(kind: str) -> type:
    """The module class registered for memory type ``kind``."""
    return MEMORY_TYPES[kind][1]


def build_memory_module(config: MemoryConfig, hidden_size: int):
    """Instantiate the module for ``config``."""
    return memory_class(config.type)(config, hidden_size)
