"""Generate with memory: write a long prompt segment by segment, then decode with the memory.

All but the last segment of the prompt are written into the memory; the last segment is the
model's visible context, and ``model.generate`` decodes from it with the backbone's KV cache
inside ``session.decoding()``: the prefill and every decoding step are pieces of one segment (the
prompt's last segment extended by the generated tokens). Memories that learn within a call (the
neural memory) stream a scratch state through those pieces; the others read the memory of the
earlier segments. Either way each new token is the one a teacher-forced forward pass over the
same segments would predict, from the first new token on, and the session's committed memory is
unchanged by generating.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from memllm.core.backbone import context_length
from memllm.core.inject import has_memory, memory_layers, memory_session
from memllm.core.segments import logits_to_keep_kwargs, positions_from_mask, segment_bounds


def default_segment_length(model: nn.Module, max_new_tokens: int) -> int:
    window = context_length(model) or 2048
    return max(1, window - max_new_tokens)


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    segment_length: int | None = None,
    max_new_tokens: int = 20,
    state: dict | None = None,
    **generate_kwargs,
) -> Tensor:
    """Greedy (by default) generation over a left-padded batch of any length.

    With memory, the prompt is written segment by segment and the last segment is the context
    of ``model.generate``. Without memory, only the last ``segment_length`` tokens are seen (the
    same-window baseline). Returns the new tokens only, (B, ≤ max_new_tokens).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    segment_length = segment_length or default_segment_length(model, max_new_tokens)
    bounds = segment_bounds(input_ids.shape[1], segment_length)
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", model.generation_config.pad_token_id)
    last_start, last_end = bounds[-1]
    last_ids = input_ids[:, last_start:last_end]
    last_mask = attention_mask[:, last_start:last_end]

    def decode() -> Tensor:
        out = model.generate(
            input_ids=last_ids,
            attention_mask=last_mask,
            max_new_tokens=max_new_tokens,
            **generate_kwargs,
        )
        return out[:, last_ids.shape[1] :]

    if not has_memory(model):
        return decode()
    beams = generate_kwargs.get("num_beams") or model.generation_config.num_beams or 1
    learning = [layer.memory.learns_within_call for layer in memory_layers(model).values()]
    if beams > 1 and any(learning):
        # beam search reorders the batch between steps; the decoding scratch state would not
        # follow it, and the memory would silently mix beams
        raise ValueError("beam search is not supported with a memory that learns within a call")
    # segments before the last only write the memory: their logits are never read, and the LM
    # head over the whole vocabulary is a fifth of a small model's forward
    skip_head = logits_to_keep_kwargs(model, 1)
    with memory_session(model, state) as session:
        for start, end in bounds[:-1]:
            mask = attention_mask[:, start:end]
            model(
                input_ids=input_ids[:, start:end],
                attention_mask=mask,
                position_ids=positions_from_mask(mask),
                use_cache=False,
                **skip_head,
            )
        with session.decoding():
            return decode()


def generate(
    model: nn.Module,
    tokenizer,
    prompts: str | Sequence[str],
    *,
    segment_length: int | None = None,
    max_new_tokens: int = 20,
    batch_size: int = 8,
    skip_special_tokens: bool = True,
    progress: bool = False,
    desc: str = "generate",
    context_tokens: int | None = None,
    **generate_kwargs,
) -> str | list[str]:
    """Generate a continuation for each prompt, reading prompts longer than the window through
    the memory. Prompts are batched with left padding; returns the decoded new text.

    ``context_tokens`` cuts each prompt to its last that many tokens first (a memory then reads
    only those: the no-carry control of experiments)."""
    from tqdm.auto import tqdm

    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    device = next(model.parameters()).device
    outputs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        enc = tokenizer(
            prompts[i : i + batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(device)
        # left padding: the last columns are every prompt's last tokens
        cut = slice(-context_tokens, None) if context_tokens else slice(None)
        new = generate_ids(
            model,
            enc["input_ids"][:, cut],
            enc["attention_mask"][:, cut],
            segment_length=segment_length,
            max_new_tokens=max_new_tokens,
            **generate_kwargs,
        )
        outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=skip_special_tokens))
    return outputs[0] if single else outputs
