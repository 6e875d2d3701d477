"""Attach memory to a Hugging Face causal LM: wrap its layers, find the memory again, open sessions.

``inject_memory`` wraps the chosen decoder layers in :class:`MemoryLayer`: the original layer is
called unchanged, the memory module decides what goes in and what comes out. The memory's state
(slots, fast weights) is a value held by a :class:`MemorySession`, never by the modules, so that
its lifetime is explicit: one session is one example (or one batch of independent examples), and
nothing leaks between sessions unless the caller passes a state on.

The session reaches the layers through the model, not through keyword arguments (``generate()``
rejects unknown ones): the model's decoder stack gets a forward pre-hook that records the
attention mask of each call, and each :class:`MemoryLayer` looks up the active session. Outside any
session, every forward call starts from a fresh memory (as a one-call session would).

Generation decodes one segment (the prompt's last segment, then one new token per call) inside
``session.decoding()``: memories that learn within a call stream a scratch state through those
calls, the committed state is left as it was (see :meth:`MemorySession.decoding`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from memllm.core.backbone import decoder_stack, hidden_size
from memllm.core.config import to_dict
from memllm.core.session import MemoryController, MemorySession
from memllm.errors import ConfigError
from memllm.memory import build_memory_module, memory_config_from_dict

ATTR = "_memllm"  # the controller's attribute on the host model


class MemoryLayer(nn.Module):
    """A decoder layer followed (or surrounded) by a memory module.

    The wrapped layer is called unchanged; attribute lookups this wrapper does not know fall
    through to it (HF models read e.g. ``layer.attention_type``).
    """

    def __init__(self, layer: nn.Module, memory: nn.Module, index: int) -> None:
        super().__init__()
        self.layer = layer
        self.memory = memory
        self.index = index
        self._controller: MemoryController | None = None  # set by inject_memory, not a module

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        controller = self._controller
        # called directly rather than through the decoder stack: a fresh, one-call memory
        session = controller.session or MemorySession(controller)
        extras: list[Any] = []

        def call_layer(h: Tensor) -> Tensor:
            out = self.layer(h, *args, **kwargs)
            if isinstance(out, tuple):  # older HF layers return (hidden, attn, ...)
                extras[:] = out[1:]
                return out[0]
            return out

        mask = session.mask
        tokens = hidden_states.shape[1]
        if mask is None or mask.shape[1] < tokens:
            mask = torch.ones(
                hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device
            )
        else:  # with a KV cache the 2-D mask covers past + current tokens
            mask = mask[:, -tokens:].to(hidden_states.device)
        committed = session.state_for(self.index, self.memory, hidden_states)
        state, write = committed, session.writing
        # decoding a memory that learns within a call: this call continues the segment that the
        # block's earlier calls began, so the module writes (as a teacher-forced call over the
        # whole segment would) into the scratch state, never into the committed one
        streaming = session.scratch is not None and self.memory.learns_within_call
        if streaming:
            state, write = session.scratch.get(self.index, committed), True
        out, new_state, aux = self.memory(
            call_layer, hidden_states, state, mask=mask, write=write, segment_state=committed
        )
        if streaming:
            session.scratch[self.index] = new_state
        elif session.writing:
            session.states[self.index] = new_state
        session.aux[self.index] = aux
        return (out, *extras) if extras else out


def get_controller(model: nn.Module) -> MemoryController | None:
    """The controller ``inject_memory`` left on ``model`` (or a module inside it), or None."""
    for module in model.modules():
        controller = getattr(module, ATTR, None)
        if isinstance(controller, MemoryController):
            return controller
    return None


def has_memory(model: nn.Module) -> bool:
    """Whether ``inject_memory`` was called on ``model`` (or a module inside it)."""
    return get_controller(model) is not None


def controller_of(model: nn.Module) -> MemoryController:
    """Like :func:`get_controller`, but a model without memory is an error."""
    controller = get_controller(model)
    if controller is None:
        raise ValueError("this model has no memory; call memllm.inject_memory(model, config) first")
    return controller


def resolve_layer_ids(layer_ids: list[int], num_layers: int, key: str = "layer_ids") -> list[int]:
    """Turn possibly negative layer indices into sorted positive ones, or fail naming the key."""
    resolved = []
    for i in layer_ids:
        if not -num_layers <= i < num_layers:
            raise ConfigError(
                f"{key}: layer {i} is out of range for a model with {num_layers} decoder layers "
                f"(valid: 0..{num_layers - 1}, or -1 for the last)"
            )
        resolved.append(i % num_layers)
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"{key}: {layer_ids} names the same layer twice")
    return sorted(resolved)


def inject_memory(model: nn.Module, config) -> nn.Module:
    """Wrap the configured decoder layers of ``model`` with memory modules, in place.

    The backbone is frozen (``requires_grad=False``); the memory modules are trainable and start
    as the identity of the backbone. Everything is validated before the model is touched.

    Args:
        model: a Hugging Face causal LM (see :data:`memllm.core.backbone.DECODER_STACKS`).
        config: a memory config dataclass or a plain dict with a ``type`` key.

    Returns:
        The same model, now with memory.
    """
    if isinstance(config, dict):
        config = memory_config_from_dict(config)
    if has_memory(model):
        raise ValueError("this model already has memory; call memllm.remove_memory(model) first")
    owner, layers = decoder_stack(model)
    # layer_ids None: every layer (a memory that acts inside every attention, kv_retrieval)
    wanted = config.layer_ids if config.layer_ids is not None else range(len(layers))
    layer_ids = resolve_layer_ids(list(wanted), len(layers))
    width = hidden_size(model)
    param = next(model.parameters())
    modules = {i: build_memory_module(config, width).to(param.device) for i in layer_ids}

    model.requires_grad_(False)

    hook = (
        owner.register_forward_pre_hook(_record_mask, with_kwargs=True),
        owner.register_forward_hook(_end_call, with_kwargs=True, always_call=True),
    )
    controller = MemoryController(model, config, layer_ids, hook)
    for i, memory in modules.items():
        wrapper = MemoryLayer(layers[i], memory, i)
        wrapper._controller = controller
        layers[i] = wrapper
        # a memory that acts inside the layer's attention installs its attention function
        if hasattr(memory, "attach"):
            memory.attach(model, wrapper.layer, i)
    # not registered as a submodule: the controller holds no parameters. The decoder stack's
    # hooks find it on their own module, so a deep copy of the model drives its own copy.
    object.__setattr__(model, ATTR, controller)
    object.__setattr__(owner, ATTR, controller)
    return model


def _record_mask(owner: nn.Module, _args, kwargs) -> None:
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        mask = None  # a prepared 4-D mask: fall back to "all tokens real"
    getattr(owner, ATTR).begin_call(mask.bool() if mask is not None else None)


def _end_call(owner: nn.Module, _args, _kwargs, _output) -> None:
    getattr(owner, ATTR).end_call()


def remove_memory(model: nn.Module) -> nn.Module:
    """Undo :func:`inject_memory`: restore the original decoder layers and drop the hooks."""
    controller = controller_of(model)
    _, layers = decoder_stack(model)
    for i, layer in enumerate(layers):
        if isinstance(layer, MemoryLayer):
            if hasattr(layer.memory, "detach"):
                layer.memory.detach(model)
            layers[i] = layer.layer
    for handle in controller.hook:
        handle.remove()
    object.__delattr__(model, ATTR)
    owner = decoder_stack(model)[0]
    if owner is not model:
        object.__delattr__(owner, ATTR)
    return model


def memory_layers(model: nn.Module) -> dict[int, MemoryLayer]:
    """The wrapped decoder layers, by layer index."""
    _, layers = decoder_stack(model)
    return {i: layer for i, layer in enumerate(layers) if isinstance(layer, MemoryLayer)}


def memory_modules(model: nn.Module) -> nn.ModuleDict:
    """The memory modules by layer index (a view; their parameters are the model's)."""
    return nn.ModuleDict({str(i): layer.memory for i, layer in memory_layers(model).items()})


def memory_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The memory's parameters, found by structure (the modules inside :class:`MemoryLayer`)."""
    return list(memory_modules(model).parameters())


def memory_config(model: nn.Module):
    """The memory config the model was injected with."""
    return controller_of(model).config


def memory_config_dict(model: nn.Module) -> dict[str, Any]:
    return to_dict(memory_config(model))


class SessionBlock:
    """The ``with`` block that :func:`memory_session` returns; it can be entered once.

    (A generator-based context manager entered a second time fails with an unrelated
    AttributeError; this says what happened.)
    """

    def __init__(self, model: nn.Module, state: dict[int, Any] | None) -> None:
        self.model = model
        self.initial_state = state
        self.entered = False
        self.controller: MemoryController | None = None

    def __enter__(self) -> MemorySession:
        if self.entered:
            raise RuntimeError(
                "this memory_session(...) block was already entered; call memory_session(model) "
                "again for another session (pass state=session.state() to continue one)"
            )
        self.entered = True
        controller = controller_of(self.model)
        if controller.session is not None and not controller.ephemeral:
            raise RuntimeError(
                "a memory session is already active on this model; sessions don't nest"
            )
        session = MemorySession(controller, self.initial_state)
        controller.session = session
        controller.ephemeral = False
        self.controller = controller
        return session

    def __exit__(self, *exc_info: object) -> None:
        if self.controller is not None:
            self.controller.session = None


def memory_session(model: nn.Module, state: dict[int, Any] | None = None) -> SessionBlock:
    """Own the memory of one example (or batch of independent examples) for a block of code.

    Every ``model(...)`` or ``model.generate(...)`` call inside reads the memory written by the
    earlier calls of this session and writes to it (unless inside ``session.read_only()`` or
    ``session.decoding()``). The memory starts fresh, or from ``state`` (a previous session's
    ``state()``) for runs that carry memory across examples on purpose (persistent memory).
    Use it as ``with memory_session(model) as session:``; one returned block is entered once,
    and sessions on one model don't nest (both are a RuntimeError).
    """
    return SessionBlock(model, state)
