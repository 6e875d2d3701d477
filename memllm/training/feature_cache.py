"""Feature cache: run the frozen backbone below the trained part once per distinct segment.

Each segment is a separate forward call (positions restart at 0), and the decoder layers below
the lowest trainable layer depend on no trainable weight: what they hand upwards is a function
of the segment's tokens alone. The cache records it the first time a segment is seen and later
replays only what trains. Two modes, chosen from the model:

- **output** — one memory at layer L whose type works on the layer's *output* only
  (``MemoryModule.post_layer``, e.g. the latent memory) and no LoRA at or below L: the output of
  layer L is recorded; a cached segment runs the memory and — only where there are labels — the
  layers above L, the final norm and the LM head. With the memory after the last layer a
  cached step runs no decoder layer at all.
- **entry** — any other memory placement (neural ``context``/``layer`` memories, which change
  their layer's input, several memory layers) and LoRA at or above the lowest memory layer:
  the hidden states *entering* the lowest trainable layer S are recorded; a cached segment runs
  layers S and up (memories and adapters as usual; layers above the highest memory only where
  there are labels). A memory at layer L of N then trains at the cost of the layers above L.

Entries are keyed by **segment content** (the real tokens of the segment and their mask), not
by example: segments are aligned to the end of the input and rows left-padded, so an example's
segment holds the same real tokens whatever batch it is in. Examples that share a context
(``data.questions_per_story: all`` with ``data.question_segment: own``, where every question
of a story has token-identical earlier segments) share those entries, so one recorded pass
serves every question of a context — already in the first epoch. A batch in which some row's
segment is new runs that segment through the real model (recording what is missing); a batch
whose rows are all known replays from the cache.

A :class:`SharedFeatures` lets several runs in one process share what was recorded: the arms
of an experiment that train memories at the same place on the same frozen backbone (the latent
and episodic memories after the last layer, and their no-carry controls) record each segment
once between them.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from memllm.core.backbone import decoder_stack, final_norm, stack_spec, text_config
from memllm.core.config import to_dict
from memllm.core.inject import MemoryLayer, memory_config
from memllm.core.segments import (
    SegmentOutput,
    model_logits,
    positions_from_mask,
    segment_loss,
)
from memllm.core.session import MemorySession
from memllm.memory.registry import memory_class


def _lora_layers(layers: nn.ModuleList) -> list[int]:
    """Indices of the decoder layers that hold a LoRA adapter (found by structure)."""
    from peft.tuners.lora import LoraLayer

    return [
        i
        for i, layer in enumerate(layers)
        if any(isinstance(m, LoraLayer) for m in layer.modules())
    ]


def cache_mode(model: nn.Module) -> tuple[str, int]:
    """``(mode, layer)``: ``("output", L)`` or ``("entry", S)`` (see the module docstring).

    Raises:
        ValueError: the model has no memory and no LoRA (nothing trains).
    """
    _, layers = decoder_stack(model)
    wrapped = [i for i, layer in enumerate(layers) if isinstance(layer, MemoryLayer)]
    lora = _lora_layers(layers)
    if not wrapped and not lora:
        raise ValueError("the model has no memory")
    if (
        len(wrapped) == 1
        and memory_class(memory_config(model).type).post_layer
        and not any(i <= wrapped[0] for i in lora)
    ):
        return "output", wrapped[0]
    return "entry", min(wrapped + lora)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the feature cache cannot be used on ``model`` (None when it can)."""
    owner, layers = decoder_stack(model)
    if not any(isinstance(layer, MemoryLayer) for layer in layers):
        return "the model has no memory"
    mode, _ = cache_mode(model)
    if mode == "output" and not hasattr(owner, stack_spec(model).final_norm):
        return "the final norm was not found"
    return None


class _StandIn(nn.Module):
    """Stands in for a decoder layer whose work is in the cache (or not needed).

    Returns its input unchanged, or ``output`` (output mode: the memory's mixed output at its
    layer). Attribute look-ups fall through to the real layer (HF models read e.g.
    ``layer.attention_type``); the real layer is never called.
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


def _hidden_arg(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def segment_key(ids: Tensor, mask: Tensor) -> str | None:
    """The cache key of one row's segment (CPU tensors): its real tokens and their mask from
    the first real token on (what the frozen layers' output depends on); None when the row has
    no real token in this segment."""
    real = mask.nonzero()
    if real.numel() == 0:
        return None
    first = int(real[0])
    m = mask[first:].to(torch.uint8)
    data = (ids[first:].long() * m).numpy().tobytes() + m.numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class FeatureCache:
    """What the frozen layers below the trained part hand upwards, per distinct segment, kept
    on the CPU.

    Attributes:
        mode, layer: see :func:`cache_mode`.
        features: segment key → recorded hidden states of that segment's real span.
        hits, misses: segments replayed from the cache / run through the model to record.
        full_hidden: set by callers that hook the final norm for every position's hidden state
            (trainer plug-ins that read all positions, e.g. the supporting-fact head): the norm
            then runs on whole segments, the LM head still only where there are targets.
    """

    def __init__(self, model: nn.Module, features: dict[str, Tensor] | None = None) -> None:
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"feature cache unavailable: {reason}")
        owner, layers = decoder_stack(model)
        self.model, self.owner, self.layers = model, owner, layers
        self.mode, self.layer = cache_mode(model)
        wrapped = [i for i, layer in enumerate(layers) if isinstance(layer, MemoryLayer)]
        # layers above this one are needed only for segments with labels
        self.top = max(wrapped)
        if self.mode == "output":
            self.wrapper: MemoryLayer = layers[self.layer]
            self.norm = final_norm(model)
            self.head = model.get_output_embeddings()
            self.softcap = getattr(text_config(model), "final_logit_softcapping", None)
        # the table may be shared (SharedFeatures): it is only ever added to
        self.features: dict[str, Tensor] = {} if features is None else features
        self.hits = self.misses = 0
        self.full_hidden = False

    def __len__(self) -> int:
        return len(self.features)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.features.values())

    def stats(self) -> dict[str, float]:
        """What the trainer logs: segments held, their size, hits and misses so far."""
        return {
            "segments": len(self),
            "megabytes": self.nbytes / 2**20,
            "hits": self.hits,
            "misses": self.misses,
        }

    # -- recording ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _recording(self, keys: list[str | None], mask: Tensor) -> Iterator[None]:
        """Record, for the rows whose key is new, what the cache holds of the segment run
        inside this block (one forward call)."""
        seen: list[Tensor] = []
        if self.mode == "output":

            def hook(_module, _args, output):
                seen.append(output[0] if isinstance(output, tuple) else output)

            handle = self.wrapper.layer.register_forward_hook(hook)
        else:

            def pre_hook(_module, args, kwargs):
                seen.append(_hidden_arg(args, kwargs))

            handle = self.layers[self.layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
        (hidden,) = seen
        width = mask.shape[1]
        for row, key in enumerate(keys):
            if key is None or key in self.features:
                continue
            first = int(mask[row].nonzero()[0])
            self.features[key] = hidden[row, first:width].detach().to("cpu", copy=True)

    def _padded(self, keys: list[str | None], width: int, device) -> Tensor:
        """The cached features of a segment's rows, end-aligned, zeros where there are none."""
        known = next(self.features[k] for k in keys if k is not None)
        out = torch.zeros(len(keys), width, known.shape[-1], dtype=known.dtype)
        for row, key in enumerate(keys):
            if key is not None:
                feats = self.features[key]
                out[row, width - feats.shape[0] :] = feats
        return out.to(device)

    # -- replay ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stand_ins(self, replace: dict[int, Tensor | None]) -> Iterator[None]:
        """Put stand-ins at the given layer indices (value: the output they return, None: their
        input) for the duration of the block."""
        originals = {i: self.layers[i] for i in replace}
        try:
            for i, output in replace.items():
                self.layers[i] = _StandIn(originals[i], output)
            yield
        finally:
            for i, layer in originals.items():
                self.layers[i] = layer

    def _upper(self, keep: int | None) -> dict[int, None]:
        """Layers above the highest memory skipped for a segment without labels."""
        if keep is not None or self.full_hidden:
            return {}
        return dict.fromkeys(range(self.top + 1, len(self.layers)))

    def _replay_entry(self, h: Tensor, mask: Tensor, keep: int | None) -> Tensor:
        """Layers from the recorded one up (through the model's own forward: its masks,
        positions, rotary tables, norm and head), fed ``h`` at the recorded layer."""

        def inject(_module, args, kwargs):
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        skipped = dict.fromkeys(range(self.layer)) | self._upper(keep)
        handle = self.layers[self.layer].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            with self._stand_ins(skipped):
                # placeholder embeddings: the stand-ins below ignore them, the hook replaces them
                return self.model(
                    inputs_embeds=torch.zeros_like(h),
                    attention_mask=mask.long(),
                    position_ids=positions_from_mask(mask),
                    use_cache=False,
                    **_keep_kwargs(self.model, keep),
                ).logits
        finally:
            handle.remove()

    def _replay_output(
        self, h: Tensor, mask: Tensor, keep: int | None, session: MemorySession
    ) -> Tensor | None:
        """What ``MemoryLayer.forward`` does, with the recorded output standing in for the
        layer; then (where needed) the layers above, the norm and the head."""
        memory = self.wrapper.memory
        state = session.state_for(self.layer, memory, h)
        out, new_state, aux = memory(
            lambda _h: h, h, state, mask=mask.bool(), write=session.writing
        )
        if session.writing:
            session.states[self.layer] = new_state
        session.aux[self.layer] = aux
        # A segment without labels only writes the memory, which reads layer L's output:
        # nothing above L runs for it (unless every position's hidden state is wanted).
        has_upper = self.layer < len(self.layers) - 1
        normed = None
        if has_upper and (keep is not None or self.full_hidden):
            with self._stand_ins(dict.fromkeys(range(self.layer)) | {self.layer: out}):
                normed = self.owner(
                    inputs_embeds=torch.zeros_like(out),
                    attention_mask=mask.long(),
                    position_ids=positions_from_mask(mask),
                    use_cache=False,
                ).last_hidden_state
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

    # -- the forward pass --------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None,
        *,
        segment_length: int,
        session: MemorySession,
        bptt_segments: int | None = None,
        keep_logits: bool = False,
    ) -> SegmentOutput:
        """What :func:`memllm.core.segments.forward_segments` computes, segment by segment:
        segments the cache holds for every row are replayed, the others run through the model
        and are recorded (``keep_logits``: also the last segment's logits at every position)."""
        ids_cpu, mask_cpu = input_ids.cpu(), attention_mask.cpu()

        def run(start: int, end: int, keep: int | None) -> Tensor | None:
            mask = attention_mask[:, start:end]
            keys = [
                segment_key(ids_cpu[r, start:end], mask_cpu[r, start:end])
                for r in range(len(ids_cpu))
            ]
            if any(k is not None and k not in self.features for k in keys):
                self.misses += 1
                with self._recording(keys, mask_cpu[:, start:end]):
                    return model_logits(self.model, input_ids[:, start:end], mask, keep)
            self.hits += 1
            h = self._padded(keys, end - start, input_ids.device)
            if self.mode == "output":
                return self._replay_output(h, mask, keep, session)
            return self._replay_entry(h, mask, keep)

        return segment_loss(
            run,
            labels,
            length=input_ids.shape[1],
            segment_length=segment_length,
            session=session,
            bptt_segments=bptt_segments,
            keep_logits=keep_logits,
        )


class SharedFeatures:
    """Recorded features shared by the runs of one process, one table per backbone and cache
    place: what a frozen backbone hands to layer ``L`` depends on the backbone (its settings and,
    for random test models, the seed), the precision and ``(mode, L)`` — not on the memory that
    trains there, its LoRA above that place, or its carry setting (keys are segment contents)."""

    def __init__(self) -> None:
        self.tables: dict[tuple, dict[str, Tensor]] = {}

    def table(self, cfg, model: nn.Module) -> dict[str, Tensor]:
        """The table for ``model``'s cache place on the backbone of run config ``cfg``."""
        backbone = (repr(to_dict(cfg.model)), cfg.train.mixed_precision, cfg.seed)
        return self.tables.setdefault((*backbone, *cache_mode(model)), {})

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for table in self.tables.values() for t in table.values()
        )


def _keep_kwargs(model: nn.Module, keep: int | None) -> dict[str, int]:
    from memllm.core.segments import logits_to_keep_kwargs

    return logits_to_keep_kwargs(model, 1 if keep is None else keep)


__all__ = ["FeatureCache", "cache_mode", "segment_key", "unsupported_reason"]
