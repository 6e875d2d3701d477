"""Memory types: one file per type, each a config dataclass plus an ``nn.Module``.

Every module keeps one contract, stated as a Protocol in :mod:`memllm.memory.protocol`
(:class:`~memllm.memory.protocol.MemoryModule`). A module is built as
``Module(config, hidden_size)`` and provides:

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
    holds tensors: ``aux["loss"]`` (already weighted, added to the task loss by training), its
    named parts as ``aux["loss/<name>"]`` (detached; training logs each as ``<name>_loss``) and
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

``post_layer: bool`` (class attribute)
    Whether the module calls the wrapped layer on its unchanged input and works on the layer's
    output only (latent, episodic), rather than changing what goes into the layer (Titans'
    memory as context). Only then can the training feature cache record the layer's output.

The module must leave the backbone's output unchanged at initialisation (a zero gate).

**Adding a memory type.** Write ``memllm/memory/<name>.py`` with the config (its ``type`` field
defaults to ``"<name>"``) and the module, decorated where it is defined::

    from memllm.memory.registry import register_memory

    @register_memory("<name>", MyMemoryConfig)
    class MyMemory(nn.Module):
        learns_within_call = False
        post_layer = True
        ...

then add the file to the imports below: importing it is what registers it.
"""

from __future__ import annotations

# Importing a memory type's file registers it (each module class carries @register_memory).
from memllm.memory import episodic, kv_retrieval, latent, neural  # noqa: F401
from memllm.memory.latent import LatentMemory, LatentMemoryConfig
from memllm.memory.protocol import MemoryModule
from memllm.memory.registry import (
    MEMORY_TYPES,
    MemoryConfig,
    build_memory_module,
    memory_class,
    memory_config_from_dict,
    register_memory,
)

__all__ = [
    "MEMORY_TYPES",
    "LatentMemory",
    "LatentMemoryConfig",
    "MemoryConfig",
    "MemoryModule",
    "build_memory_module",
    "memory_class",
    "memory_config_from_dict",
    "register_memory",
]
