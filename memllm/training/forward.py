"""What the trainer needs around a forward pass: the run's model (backbone + memory + LoRA),
which parameters train, train/eval modes, a batch's memory or plain-window forward, the
memory's diagnostics and named loss terms, and validation answers.

Nothing here knows a memory type: a memory module reports its regulariser as ``aux["loss"]``,
its named parts as ``aux["loss/<name>"]`` (detached) and diagnostics as the other scalar
``aux`` entries; the trainer logs them as ``<name>_loss`` and ``memory/layer{i}/<key>``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from memllm.core.inject import has_memory, memory_modules, memory_session
from memllm.core.segments import SegmentOutput, forward_segments, model_logits, segment_loss
from memllm.core.session import MemorySession
from memllm.errors import ConfigError
from memllm.training.data import Batch
from memllm.training.run_config import RunConfig, check_against_model, with_file

if TYPE_CHECKING:
    from memllm.training.feature_cache import FeatureCache
    from memllm.training.run_config import TrainSettings

LOSS_PREFIX = "loss/"  # aux keys that name a part of the memory's regulariser


def memory_forward(
    model: nn.Module,
    batch: Batch,
    settings: TrainSettings,
    *,
    cache: FeatureCache | None = None,
    state: dict[int, Any] | None = None,
    keep_logits: bool = False,
) -> tuple[SegmentOutput, dict[str, float], MemorySession]:
    """Loss of one batch segment by segment in a memory session started from ``state`` (None:
    a fresh memory), through the feature cache when there is one (validation batches too:
    their backbone features never change either); also the memory diagnostics averaged over
    segments, and the session (closed). ``keep_logits``: the output also holds the last
    segment's logits at every position (distillation)."""
    with (
        memory_session(model, state) as session,
        collect_diagnostics(model) as diagnostics,
    ):
        kwargs = {
            "segment_length": settings.segment_length,
            "session": session,
            "bptt_segments": settings.bptt_segments,
        }
        args = (batch.attention_mask, batch.labels)
        if cache is not None:  # replays the segments it holds, records the others
            out = cache.forward(batch.input_ids, *args, keep_logits=keep_logits, **kwargs)
        else:
            out = forward_segments(model, batch.input_ids, *args, keep_logits=keep_logits, **kwargs)
    return out, diagnostics, session


def window_forward(model: nn.Module, batch: Batch) -> SegmentOutput:
    """Plain forward of a model without memory (its inputs are already cut to one window)."""

    def run(start: int, end: int, keep: int | None) -> Tensor:
        ids, mask = batch.input_ids[:, start:end], batch.attention_mask[:, start:end]
        return model_logits(model, ids, mask, keep)

    width = batch.input_ids.shape[1]
    return segment_loss(run, batch.labels, length=width, segment_length=max(width, 1))


@contextlib.contextmanager
def collect_diagnostics(model: nn.Module) -> Iterator[dict[str, float]]:
    """Memory diagnostics (``layer{i}/{name}``) averaged over every segment of the block.

    ``MemorySession.diagnostics()`` holds only the latest segment; the regulariser in the loss is
    the mean over segments, so its logged terms must be averaged the same way.
    """
    calls: dict[int, list[dict[str, Tensor]]] = {}
    handles = []
    for index, module in memory_modules(model).items():
        calls[int(index)] = []

        def hook(_module, _args, output, seen=calls[int(index)]):
            seen.append({k: v.detach() for k, v in output[2].items() if v.numel() == 1})

        handles.append(module.register_forward_hook(hook))
    result: dict[str, float] = {}
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()
    for index, seen in sorted(calls.items()):
        for name in seen[0] if seen else ():
            values = torch.stack([aux[name].float() for aux in seen])
            result[f"layer{index}/{name}"] = float(values.mean())


def split_loss_terms(diagnostics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """``(terms, rest)``: the regulariser's named parts summed over layers as ``<name>_loss``,
    and the other diagnostics."""
    terms: dict[str, float] = {}
    rest: dict[str, float] = {}
    for key, value in diagnostics.items():
        _layer, _, name = key.partition("/")
        if name.startswith(LOSS_PREFIX):
            term = f"{name.removeprefix(LOSS_PREFIX)}_loss"
            terms[term] = terms.get(term, 0.0) + value
        else:
            rest[key] = value
    return terms, rest


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Memory + LoRA parameters, found by structure (never by name)."""
    from memllm.core.lora import lora_parameters

    params = list(memory_modules(model).parameters()) if has_memory(model) else []
    return params + lora_parameters(model)


def set_train_mode(model: nn.Module, training: bool) -> None:
    """Backbone always in eval mode; memory and LoRA layers follow ``training`` (dropout)."""
    from peft.tuners.lora import LoraLayer

    model.eval()
    if has_memory(model):
        memory_modules(model).train(training)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for sub in (module.lora_A, module.lora_B, module.lora_dropout):
                sub.train(training)


def build_model(cfg: RunConfig, source=None) -> tuple[nn.Module, Any]:
    """The run's backbone with its memory and LoRA (memory weights seeded by ``cfg.seed``)."""
    from accelerate.utils import set_seed

    import memllm

    model, tokenizer = memllm.load_backbone(
        cfg.model.name, gguf_file=cfg.model.gguf_file, dtype=cfg.model.dtype
    )
    check_against_model(cfg, model, source)
    try:
        if cfg.memory is not None:
            set_seed(cfg.seed)  # the memory's initial weights depend on the seed only
            memllm.inject_memory(model, cfg.memory)
        if cfg.lora is not None:
            memllm.apply_lora(model, cfg.lora)
    except ConfigError as err:
        raise with_file(err, source) from None
    return model, tokenizer


def generate_texts(model: nn.Module, tokenizer, batch: Batch, cfg: RunConfig, max_new: int):
    """Greedy answers to a batch of prompts, read segment by segment as in training."""
    from memllm.core.generation import generate_ids

    new = generate_ids(
        model,
        batch.input_ids,
        batch.attention_mask,
        segment_length=cfg.train.segment_length,
        max_new_tokens=max_new,
    )
    return tokenizer.batch_decode(new, skip_special_tokens=True)
