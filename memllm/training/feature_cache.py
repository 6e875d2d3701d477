"""Feature cache: skip the frozen backbone below the memory after the first epoch.

With one latent memory at decoder layer L (G-MemLLM puts it after the last layer), no LoRA, and
a memory type that only sees the layer's *output*, the output of the wrapped layer depends on no
trainable weight. The first time an example is trained on, its per-token output of that layer is
recorded; afterwards a batch of cached examples runs, segment by segment, only the memory and —
for segments with labels — the layers above L, the final norm and the LM head, exactly as
:func:`memllm.core.segments.forward_segments` would. Segments without labels only write the memory
(which reads layer L's output), so nothing above L is needed there: with the memory after the
last layer a cached step runs no decoder layer at all, with it at a middle layer only the upper
layers of the answer's segment.

Segments are aligned to the end of the input and examples are left-padded, so an example's real
tokens fall into the same segments whatever batch it is in: the cache is kept per example (real
tokens only) and re-padded for each new batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from memllm.core.backbone import decoder_stack, final_norm, stack_spec, text_config
from memllm.core.inject import MemoryLayer, memory_config
from memllm.core.segments import SegmentOutput, positions_from_mask, segment_loss
from memllm.core.session import MemorySession
from memllm.memory.registry import memory_class


def unsupported_reason(model: nn.Module, has_lora: bool) -> str | None:
    """Why the feature cache cannot be used on ``model`` (None when it can)."""
    owner, layers = decoder_stack(model)
    wrapped = [i for i, layer in enumerate(layers) if isinstance(layer, MemoryLayer)]
    if not wrapped:
        return "the model has no memory"
    if has_lora:
        return "LoRA trains the backbone, so its hidden states change"
    if len(wrapped) > 1:
        return f"memory sits at layers {wrapped}; the cache holds the output of one layer"
    kind = memory_config(model).type
    # the module must call its layer on the unchanged input and work on the output only, so
    # that the layer's output can stand in for the layer (MemoryModule.post_layer)
    if not memory_class(kind).post_layer:
        return f"memory type {kind!r} changes the input of its layer"
    if not hasattr(owner, stack_spec(model).final_norm):
        return "the final norm was not found"
    return None


class _Recorded(nn.Module):
    """Stands in for a decoder layer at or below the memory while the layers above it run.

    Returns its input unchanged (layers below: their work is in the cache) or ``output`` (the
    memory's layer: the memory's mixed output). Attribute look-ups fall through to the real
    layer (HF models read e.g. ``layer.attention_type``); the real layer is never called.
    """

    def __init__(self, layer: nn.Module, output: Tensor | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.output = output

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states if self.output is None else self.output


class FeatureCache:
    """Per-example outputs of the memory's (wrapped) decoder layer, kept on the CPU."""

    def __init__(self, model: nn.Module) -> None:
        reason = unsupported_reason(model, has_lora=False)
        if reason:
            raise ValueError(f"feature cache unavailable: {reason}")
        owner, layers = decoder_stack(model)
        self.owner, self.layers = owner, layers
        self.index = next(i for i, layer in enumerate(layers) if isinstance(layer, MemoryLayer))
        self.has_upper = self.index < len(layers) - 1  # decoder layers above the memory
        self.wrapper: MemoryLayer = layers[self.index]
        self.norm = final_norm(model)
        self.head = model.get_output_embeddings()
        self.softcap = getattr(text_config(model), "final_logit_softcapping", None)
        self.features: dict[str, Tensor] = {}
        # Set by callers that hook the final norm for every position's hidden state (trainer
        # plug-ins that read all positions, e.g. the supporting-fact head): the norm then runs
        # on whole segments, the LM head still only where there are targets.
        self.full_hidden = False

    def __len__(self) -> int:
        return len(self.features)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.features.values())

    def has(self, ids: list[str]) -> bool:
        return all(i in self.features for i in ids)

    @contextlib.contextmanager
    def record(self, ids: list[str], attention_mask: Tensor) -> Iterator[None]:
        """Record the wrapped layer's output for the batch run inside this block."""
        pieces: list[Tensor] = []

        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            pieces.append(out.detach())

        handle = self.wrapper.layer.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
        full = torch.cat(pieces, dim=1)  # segment calls in order = the whole padded input
        mask = attention_mask.bool()
        for row, example_id in enumerate(ids):
            self.features[example_id] = full[row, mask[row]].to("cpu", copy=True)

    @contextlib.contextmanager
    def _upper_layers_only(self, memory_output: Tensor) -> Iterator[None]:
        """Make the decoder stack run only the layers above the memory, on ``memory_output``."""
        originals = [self.layers[i] for i in range(self.index + 1)]
        try:
            for i, layer in enumerate(originals):
                self.layers[i] = _Recorded(layer, memory_output if i == self.index else None)
            yield
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer

    def _above(self, memory_output: Tensor, mask: Tensor) -> Tensor:
        """The final-normed hidden states of the layers above the memory, fed its output.

        The decoder stack's own forward runs them (its masks, positions and rotary tables), with
        placeholder embeddings that the stand-in layers ignore.
        """
        with self._upper_layers_only(memory_output):
            return self.owner(
                inputs_embeds=torch.zeros_like(memory_output),
                attention_mask=mask.long(),
                position_ids=positions_from_mask(mask),
                use_cache=False,
            ).last_hidden_state

    def padded(self, ids: list[str], attention_mask: Tensor) -> Tensor:
        """Cached features of ``ids`` laid out like the left-padded batch (zeros on padding)."""
        first = self.features[ids[0]]
        batch, tokens = attention_mask.shape
        out = torch.zeros(batch, tokens, first.shape[-1], dtype=first.dtype)
        for row, example_id in enumerate(ids):
            feats = self.features[example_id]
            out[row, tokens - feats.shape[0] :] = feats
        return out.to(attention_mask.device)

    def forward(
        self,
        ids: list[str],
        attention_mask: Tensor,
        labels: Tensor,
        *,
        segment_length: int,
        session: MemorySession,
        bptt_segments: int | None = None,
        keep_logits: bool = False,
    ) -> SegmentOutput:
        """Loss of a cached batch, segment by segment: what ``forward_segments`` computes
        (``keep_logits``: also the last segment's logits at every position)."""
        hidden = self.padded(ids, attention_mask)
        memory = self.wrapper.memory

        def run(start: int, end: int, keep: int | None) -> Tensor | None:
            h = hidden[:, start:end]
            mask = attention_mask[:, start:end].bool()
            # What MemoryLayer.forward does, with the recorded output standing in for the layer.
            state = session.state_for(self.index, memory, h)
            out, new_state, aux = memory(
                lambda _h, h=h: h, h, state, mask=mask, write=session.writing
            )
            if session.writing:
                session.states[self.index] = new_state
            session.aux[self.index] = aux
            # A segment without labels only writes the memory, which reads layer L's output:
            # nothing above L runs for it (unless every position's hidden state is wanted).
            normed = None
            if self.has_upper and (keep is not None or self.full_hidden):
                normed = self._above(out, mask)
            elif self.full_hidden:
                normed = self.norm(out)
            if keep is None:
                return None
            tail = slice(-keep, None) if keep else slice(None)
            normed = normed[:, tail] if normed is not None else self.norm(out[:, tail])
            logits = self.head(normed)
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return logits

        return segment_loss(
            run,
            labels,
            length=labels.shape[1],
            segment_length=segment_length,
            session=session,
            bptt_segments=bptt_segments,
            keep_logits=keep_logits,
        )
