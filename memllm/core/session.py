"""The memory state of one example or stream, and the controller that hands it to the layers.

A :class:`MemorySession` owns the state (slots, fast weights) of every memory layer for one
example (or a batch of independent examples); :func:`memllm.core.inject.memory_session` opens one.
The :class:`MemoryController` is what ``inject_memory`` leaves on the model: the config, the
wrapped layer ids and the session that is active now.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from memllm.core.backbone import backbone_name


class MemorySession:
    """The memory state of one example or stream (a batch of independent examples).

    Attributes:
        states: per memory layer index, that layer's committed state (batch dimension first).
        writing: whether forward calls update the memory (False while generating).
        scratch: inside :meth:`decoding` only (None otherwise): per memory layer whose module
            learns within a call, the state after the calls made so far in the block.
        aux: per memory layer, the ``aux`` tensors of the most recent forward call.
    """

    def __init__(self, controller: MemoryController, state: dict[int, Any] | None = None):
        self.controller = controller
        self.states: dict[int, Any] = dict(state or {})
        self.writing = True
        self.scratch: dict[int, Any] | None = None
        self.aux: dict[int, dict[str, Tensor]] = {}
        self.mask: Tensor | None = None  # (B, T) bool for the current call, set by the hook

    # -- state -------------------------------------------------------------------------------
    def state_for(self, index: int, module: nn.Module, hidden: Tensor) -> Any:
        batch = hidden.shape[0]
        if index not in self.states:
            self.states[index] = module.init_state(batch, hidden.device, hidden.dtype)
        state = self.states[index]
        leaf = next(iter(_leaves(state)), None)
        if leaf is not None and leaf.shape[0] != batch:
            raise ValueError(
                f"memory session holds state for batch size {leaf.shape[0]}, "
                f"but the model was called with batch size {batch}; use one session per batch"
            )
        return state

    def state(self) -> dict[int, Any]:
        """The current state of every memory layer (pass it to a new session to continue)."""
        return dict(self.states)

    def detach(self) -> None:
        """Cut the graph through the memory state (truncated back-propagation)."""
        self.states = {k: tree_map(_detach, v) for k, v in self.states.items()}

    def reset(self) -> None:
        """Forget everything: the next call starts from a fresh memory."""
        self.states.clear()
        self.aux.clear()
        if self.scratch is not None:
            self.scratch.clear()

    @contextlib.contextmanager
    def read_only(self) -> Iterator[MemorySession]:
        """Calls inside read the memory but do not write it; each call is a segment of its own
        that reads the committed memory (e.g. one teacher-forced pass over a prompt's tail)."""
        before, self.writing = self.writing, False
        try:
            yield self
        finally:
            self.writing = before

    @contextlib.contextmanager
    def decoding(self) -> Iterator[MemorySession]:
        """Calls inside are the pieces of *one* segment that is thrown away at the end
        (generation: the prefill of the prompt's last segment, then one call per new token).

        The committed state is never changed. A memory that reads before it writes
        (``learns_within_call = False``, the latent memory) reads the committed state in every
        call, as under :meth:`read_only` — which is what a teacher-forced pass over the segment
        does. A memory that also learns within a call (``learns_within_call = True``, the neural
        memory) streams a scratch copy: the first call starts from the committed state, each
        call continues from the state the previous one left, and the module gets the committed
        state as ``segment_state`` for reads that must see earlier segments only. Because its
        update is exact in streaming, the calls of the block together compute what one
        teacher-forced call over prompt tail and generated tokens computes.
        """
        if self.scratch is not None:
            raise RuntimeError("already decoding: session.decoding() blocks don't nest")
        before, self.writing = self.writing, False
        self.scratch = {}
        try:
            yield self
        finally:
            self.writing = before
            self.scratch = None

    # -- losses and diagnostics ---------------------------------------------------------------
    def aux_loss(self) -> Tensor | float:
        """Sum of the memory modules' regularisation losses of the latest forward call."""
        losses = [aux["loss"] for aux in self.aux.values() if "loss" in aux]
        return torch.stack(losses).sum() if losses else 0.0

    def diagnostics(self) -> dict[str, float]:
        """Memory diagnostics of the latest forward call as floats, ``layer{i}/{name}``."""
        out = {}
        for index, aux in sorted(self.aux.items()):
            for name, value in aux.items():
                if isinstance(value, Tensor) and value.numel() == 1:
                    out[f"layer{index}/{name}"] = float(value.detach())
        return out


def _leaves(state: Any) -> Iterator[Tensor]:
    if isinstance(state, Tensor):
        yield state
    elif isinstance(state, dict):
        for v in state.values():
            yield from _leaves(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _leaves(v)


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


class MemoryController:
    """What ``inject_memory`` leaves on the model: config, wrapped layers, the active session."""

    def __init__(self, model: nn.Module, config, layer_ids: list[int], hook) -> None:
        self.config = config
        self.layer_ids = layer_ids
        self.hook = hook
        self.session: MemorySession | None = None
        self.ephemeral = False  # the session was created by the hook for a single call
        self.backbone = backbone_name(model)

    def begin_call(self, mask: Tensor | None) -> None:
        if self.session is None:
            self.session = MemorySession(self)
            self.session.writing = False  # discarded after this call: writing it is wasted work
            self.ephemeral = True
        self.session.mask = mask

    def end_call(self) -> None:
        if self.ephemeral:
            self.session = None
            self.ephemeral = False
