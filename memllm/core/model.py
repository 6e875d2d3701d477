"""``MemoryModel``: a backbone with memory (and optionally LoRA), in PEFT's style.

A thin wrapper over the function API (:func:`memllm.inject_memory`, :func:`memllm.generate`,
:func:`memllm.load_checkpoint`, ...): it holds the host model, whose decoder layers carry the
memory in place, and its tokenizer, and gives them the methods people know from PEFT's
``PeftModel``::

    model = memllm.MemoryModel.from_config("smollm2-135m", {"type": "latent", "num_slots": 16})
    ...train...
    model.save_pretrained("runs/mem")    # memory_config.json + memory.safetensors (+ PEFT adapter)
    model = memllm.MemoryModel.from_pretrained("smollm2-135m", "runs/mem")
    model.generate("a very long prompt ...", segment_length=512)

Attributes the wrapper does not define fall through to the backbone (``model.config``,
``model.device``, ...); ``model(...)`` is the backbone's forward with the memory active.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from memllm.core.checkpoint import load_checkpoint, save_checkpoint
from memllm.core.generation import generate, generate_ids
from memllm.core.inject import has_memory, inject_memory, memory_config, memory_parameters
from memllm.core.inject import memory_session as _memory_session
from memllm.core.lora import apply_lora, has_lora, lora_parameters
from memllm.core.segments import SegmentOutput, forward_segments
from memllm.core.session import MemorySession

Backbone = str | os.PathLike | nn.Module


def _backbone(backbone: Backbone, tokenizer, load_kwargs: dict[str, Any]):
    """(model, tokenizer) from a name/folder/.gguf or an already loaded model."""
    if isinstance(backbone, nn.Module):
        if load_kwargs:
            raise TypeError(
                f"loading options {sorted(load_kwargs)} need a backbone name, not a model"
            )
        return backbone, tokenizer
    from memllm.core.backbone import load_backbone

    model, loaded = load_backbone(str(backbone), **load_kwargs)
    return model, tokenizer if tokenizer is not None else loaded


class MemoryModel(nn.Module):
    """A Hugging Face causal LM with memory (and optionally a LoRA adapter).

    Build one with :meth:`from_config` (a new, untrained memory) or :meth:`from_pretrained` (a
    saved checkpoint), or wrap a model you prepared with the function API: ``MemoryModel(model,
    tokenizer)``. The wrapped model is changed in place, never copied.

    Attributes:
        model: the host model; its decoder layers carry the memory.
        tokenizer: its tokenizer when known (needed to generate from text), else None.
    """

    def __init__(self, model: nn.Module, tokenizer=None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        backbone: Backbone,
        memory_config=None,
        *,
        lora=None,
        tokenizer=None,
        **load_kwargs,
    ) -> MemoryModel:
        """A backbone with a new memory (the identity until trained) and/or LoRA adapter.

        Args:
            backbone: a name, folder or ``.gguf`` for :func:`memllm.load_backbone`, or a loaded
                model (changed in place).
            memory_config: a memory config dataclass or a dict with a ``type`` key; None for a
                LoRA-only model.
            lora: :class:`memllm.LoraSettings` or a dict of them, to co-train an adapter.
            tokenizer: the tokenizer of a loaded model (a loaded backbone brings its own).
            **load_kwargs: passed to :func:`memllm.load_backbone` (``dtype``, ``device``, ...).
        """
        if memory_config is None and lora is None:
            raise ValueError("from_config needs a memory config, LoRA settings or both")
        model, tokenizer = _backbone(backbone, tokenizer, load_kwargs)
        if memory_config is not None:
            inject_memory(model, memory_config)
        if lora is not None:
            apply_lora(model, lora)
        return cls(model, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        backbone: Backbone,
        checkpoint: str | os.PathLike,
        *,
        tokenizer=None,
        check_name: bool = True,
        **load_kwargs,
    ) -> MemoryModel:
        """A backbone with the memory and/or LoRA adapter saved in ``checkpoint``.

        Any memllm checkpoint loads (memory, memory + LoRA, LoRA only; a trainer's step or
        ``final/`` folder; an experiment arm's folder), and so does a plain PEFT LoRA adapter.
        Loading is strict (:func:`memllm.load_checkpoint`).

        Args:
            backbone: the model the checkpoint was trained on: a name, folder or ``.gguf`` for
                :func:`memllm.load_backbone`, or a loaded model without memory.
            checkpoint: the checkpoint folder.
            tokenizer: the tokenizer of a loaded model.
            check_name: also refuse a backbone of the same shape under another name.
            **load_kwargs: passed to :func:`memllm.load_backbone`.
        """
        model, tokenizer = _backbone(backbone, tokenizer, load_kwargs)
        load_checkpoint(model, checkpoint, check_name=check_name)
        return cls(model, tokenizer)

    # -- saving -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``memory_config.json`` + ``memory.safetensors`` and, with LoRA, PEFT's
        ``adapter_config.json`` + ``adapter_model.safetensors`` (never the backbone).

        The folder is replaced as a whole (see :func:`memllm.save_checkpoint`)."""
        return save_checkpoint(self.model, directory)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload memllm memory",
    ):
        """Save the checkpoint and upload it to a Hugging Face Hub model repository (created if
        needed). Needs the hub to be reachable. Returns the upload's commit info."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "checkpoint")
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id, folder_path=str(folder), commit_message=commit_message
            )

    # -- using ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The backbone's forward (one call = one segment; outside a session a fresh memory)."""
        return self.model(*args, **kwargs)

    def memory_session(self, state: dict[int, Any] | None = None):
        """:func:`memllm.memory_session` on this model: one example's memory for a block."""
        return _memory_session(self.model, state)

    def forward_segments(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        segment_length: int,
        session: MemorySession | None = None,
        **kwargs,
    ) -> SegmentOutput:
        """:func:`memllm.forward_segments` on this model: a long input, segment by segment."""
        return forward_segments(
            self.model,
            input_ids,
            attention_mask,
            labels,
            segment_length=segment_length,
            session=session,
            **kwargs,
        )

    def generate(
        self,
        prompts: str | Sequence[str] | Tensor | None = None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        segment_length: int | None = None,
        max_new_tokens: int = 20,
        **kwargs,
    ):
        """Generate with memllm's segment semantics: all but the last segment of the prompt
        are written into the memory, then the model decodes from the last segment.

        Text in (a string or a list of them; needs :attr:`tokenizer`), text out, as
        :func:`memllm.generate`. Token ids in (``input_ids`` (B, T), left-padded, with their
        ``attention_mask``), the *new* token ids out (B, ≤ max_new_tokens), as
        :func:`memllm.generate_ids` — unlike ``transformers``, the prompt is not repeated.
        Other keyword arguments go to ``model.generate`` (greedy by default).
        """
        if isinstance(prompts, Tensor):
            prompts, input_ids = None, prompts
        if input_ids is not None:
            if prompts is not None:
                raise TypeError("pass either prompts (text) or input_ids, not both")
            return generate_ids(
                self.model,
                input_ids,
                attention_mask,
                segment_length=segment_length,
                max_new_tokens=max_new_tokens,
                **kwargs,
            )
        if prompts is None:
            raise TypeError("generate needs prompts (text) or input_ids")
        if self.tokenizer is None:
            raise ValueError(
                "generating from text needs a tokenizer: MemoryModel(model, tokenizer)"
            )
        return generate(
            self.model,
            self.tokenizer,
            prompts,
            segment_length=segment_length,
            max_new_tokens=max_new_tokens,
            **kwargs,
        )

    # -- what it carries --------------------------------------------------------------------
    @property
    def memory_config(self):
        """The memory's config (None for a LoRA-only model)."""
        return memory_config(self.model) if has_memory(self.model) else None

    @property
    def has_lora(self) -> bool:
        return has_lora(self.model)

    def memory_parameters(self) -> list[nn.Parameter]:
        return memory_parameters(self.model) if has_memory(self.model) else []

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The memory's parameters and the LoRA adapter's: what training updates."""
        return self.memory_parameters() + (lora_parameters(self.model) if self.has_lora else [])

    def extra_repr(self) -> str:
        parts = []
        if self.memory_config is not None:
            parts.append(f"memory={self.memory_config.type}")
        if self.has_lora:
            parts.append("lora=True")
        return ", ".join(parts)
