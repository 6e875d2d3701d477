"""The contract every memory module keeps, as a :class:`typing.Protocol`.

:mod:`memllm.core.inject` wraps a decoder layer in a ``MemoryLayer`` that calls the module below
and nothing else; the session (:mod:`memllm.core.session`) holds the state it returns. A new
memory type is a config dataclass plus an ``nn.Module`` with this shape, registered with
:func:`memllm.memory.registry.register_memory`; nothing else in memllm needs to change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

# A memory's state: a tensor or a dict/tuple/list of tensors, batch dimension first.
State = Any


@runtime_checkable
class MemoryModule(Protocol):
    """What :class:`~memllm.core.inject.MemoryLayer` and the training code rely on.

    A module is built as ``Module(config, hidden_size)`` and holds parameters only: its state
    lives in a :class:`~memllm.core.session.MemorySession` and is passed in and returned.

    Attributes:
        learns_within_call: whether a token's read depends, through the state, on the tokens
            before it *in the same call* (the neural memory: each token reads the fast weights
            after its own chunk's update) rather than only on the state the call starts from
            (the latent memory: read, then write). It decides what ``session.decoding()`` does
            during generation; such a module's update must be exact in streaming (any split of
            a call's tokens into consecutive calls gives the same outputs and state).
        post_layer: whether the module calls the wrapped layer on its unchanged input and works
            on the layer's output only. Then the layer's output depends on no trainable weight
            and the training feature cache (:mod:`memllm.training.feature_cache`) can record it.
    """

    learns_within_call: ClassVar[bool]
    post_layer: ClassVar[bool]

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> State:
        """The memory of a fresh example (batch dimension first)."""
        ...

    def forward(
        self,
        call_layer: Callable[[Tensor], Tensor],
        hidden: Tensor,
        state: State,
        *,
        mask: Tensor,
        write: bool,
        segment_state: State | None = None,
    ) -> tuple[Tensor, State, dict[str, Tensor]]:
        """One call (a segment, or a piece of one while decoding).

        Args:
            call_layer: runs the wrapped decoder layer unchanged on the given hidden states.
            hidden: (batch, tokens, hidden_size), the layer's input.
            state: the state to read (and, when ``write``, to update).
            mask: (batch, tokens) bool, True on real tokens.
            write: False when the caller discards the new state: the module may return
                ``state`` unchanged, but its output must equal the ``write=True`` output.
            segment_state: the state at the start of the segment this call belongs to; None
                means ``state``. It differs from ``state`` only while decoding.

        Returns:
            ``(hidden_out, new_state, aux)``: ``aux["loss"]`` (weighted, added to the task loss
            by training), its named parts as ``aux["loss/<name>"]`` (detached; training logs
            each as ``<name>_loss``) and detached diagnostics, never ``.item()``-ed here.
        """
        ...
