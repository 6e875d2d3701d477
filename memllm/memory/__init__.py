"""Memory types. Each is a config dataclass plus an ``nn.Module`` with one contract.

A memory module is built as ``Module(config, hidden_size)`` and provides:

``init_state(batch_size, device, dtype) -> state``
    The memory of a fresh example: a tensor or a dict/tuple of tensors, batch dimension first.

``forward(call_layer, hidden, state, *, mask, write, segment_state=None)
-> (hidden_out, new_state, aux)``
    ``call_layer(h)`` runs the wrapped decoder layer unchanged (its other arguments bound) and
    returns its output hidden states; the module decides what goes in and what comes out.
    ``mask`` is (batch, tokens) bool, True on real tokens. ``write`` False means the caller
    will discard the new state: the module may return ``state`` unchanged (and skip work), but
    must compute the same output as with ``write=True``. ``segment_state`` is the state at the
    start of the segment this call belongs to; None means ``state`` (the call is a whole
    segment, or starts one). It differs from ``state`` only while decoding (below). ``aux``
    holds tensors: ``aux["loss"]`` (already weighted, added to the task loss by training) and
    diagnostics, detached, never ``.item()``-ed here.

``learns_within_call: bool`` (class attribute)
    Whether a token's read depends on the tokens before it *in the same call* through the
    state (the neural memory: test-time learning, each token reads the memory after its own
    chunk's update), rather than only on the state the call starts from (the latent memory:
    reads before writes). It decides what ``session.decoding()`` does during generation, where
    one segment (the prompt's last segment plus the generated tokens) arrives as many calls: a
    memory that learns within a call is given the state its previous call returned, with
    ``write=True``, and ``segment_state`` = the committed state for reads that must see earlier
    segments only; the returned state is kept in a scratch dict and dropped after generation.
    Such a memory's update must be exact in streaming (any split of a call's tokens into
    consecutive calls gives the same outputs and state), so that decoding equals one
    teacher-forced call. A memory that does not learn within a call gets the committed state
    and ``write=False`` in every decoding call.

The module must leave the backbone's output unchanged at initialisation (a zero gate).
"""

from __future__ import annotations

from typing import Any

from memllm.core.config import ConfigError, from_dict
from memllm.memory.latent import LatentMemory, LatentMemoryConfig

MEMORY_TYPES: dict[str, tuple[type, type]] = {
    "latent": (LatentMemoryConfig, LatentMemory),
}

try:  # the neural memory registers here once it exists
    from memllm.memory.neural import NeuralMemory, NeuralMemoryConfig

    MEMORY_TYPES["neural"] = (NeuralMemoryConfig, NeuralMemory)
except ImportError:  # pragma: no cover
    pass

MemoryConfig = Any  # one of the config classes in MEMORY_TYPES


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


def build_memory_module(config: MemoryConfig, hidden_size: int):
    """Instantiate the module for ``config``."""
    _, module_cls = MEMORY_TYPES[config.type]
    return module_cls(config, hidden_size)


__all__ = [
    "MEMORY_TYPES",
    "LatentMemory",
    "LatentMemoryConfig",
    "build_memory_module",
    "memory_config_from_dict",
]
