"""How an example is laid out in tokens: inline, or with its question alone in the last segment.

``data.question_segment: inline`` (the default) reads an example as one row, prompt + target:
segments are cut from its end, so the last segment holds the question and whatever context
precedes it. Under ``data.question_segment: own`` a task gives each example a
``context_part`` and a ``question_part`` (instruction or few-shot prefix, question, answer
cue), and the row is::

    [context] [pad … pad] [question part] [target + EOS]
              └────────── segment_length tokens ─────────┘

The padding (attention mask 0) fills the last segment up to exactly ``segment_length`` tokens,
so the end-aligned segments of :func:`memllm.forward_segments` and of generation put the
question part alone in the last segment and the context in the earlier ones, with no change to
the segment loop. For generation the row ends after the question part, padded the same way
without the target. Segments restart their positions at 0 and count only real tokens
(:func:`memllm.core.segments.positions_from_mask`), attention and memory writes skip masked
tokens, so the padding changes nothing: a model without memory (``window``, the no-carry
control) sees only the question and is at chance by construction, and a memory arm reads the
same question segment as if it had been fed alone after the context. ``base`` reads
``example.prompt`` inline.

With ``model.chat_template``, the user turn holds the context and the question part; the chat
header goes with the context, the end of the turn and the assistant header with the question.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from memllm.data.base import Example
from memllm.errors import ConfigError


@dataclass
class Row:
    """One example as token rows.

    Attributes:
        ids: prompt + target (+ EOS), for training.
        mask: 1 on real tokens, 0 on the padding inside the row.
        prompt_len: tokens of ``ids`` before the target.
        prompt_ids, prompt_mask: the prompt as generation reads it (under ``own`` its question
            part is padded to a whole segment without the target).
    """

    ids: list[int]
    mask: list[int]
    prompt_len: int
    prompt_ids: list[int]
    prompt_mask: list[int]


def has_own_question(examples: Sequence[Example]) -> bool:
    """Whether any example is laid out with its question in its own segment."""
    return any(ex.question_part is not None for ex in examples)


def prompt_texts(tokenizer, example: Example, chat: bool = False) -> tuple[str, str, str]:
    """``(context, question part, target)`` texts of an ``own`` example as the model reads
    them (inside the chat template with ``chat``)."""
    context, question = example.context_part or "", example.question_part or ""
    if not chat:
        return context, question, example.target
    from memllm.data.prompting import chat_wrap

    wrapped = chat_wrap(tokenizer, f"{context}\n\n{question}" if context else question)
    at = wrapped.rfind(question)
    if at < 0:  # a template that rewrites the text: keep the question with the turn's end
        raise ConfigError(
            "data.question_segment: own: the chat template changes the question text; "
            "use question_segment: inline with this model"
        )
    return wrapped[:at], wrapped[at:], example.target.lstrip()


def encode_rows(
    examples: Sequence[Example],
    tokenizer,
    *,
    segment_length: int | None,
    chat: bool = False,
    eos: bool = True,
) -> list[Row]:
    """Token rows of ``examples`` (inline ones as prompt + target, ``own`` ones laid out as
    the module docstring shows).

    Args:
        segment_length: the segment length the model reads with (required for ``own``).
        eos: end the target with the tokenizer's EOS token (training).

    Raises:
        ConfigError: naming ``data.question_segment`` when a question part (with its answer)
            does not fit in one segment.
    """
    from memllm.data.prompting import format_example

    def encode(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        # verbose=False: long prompts are the point, not a reason for a tokenizer warning
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    pad = _pad_id(tokenizer)
    end = [tokenizer.eos_token_id] if eos else []
    own = [i for i, ex in enumerate(examples) if ex.question_part is not None]
    inline = [i for i, ex in enumerate(examples) if ex.question_part is None]
    rows: list[Row | None] = [None] * len(examples)
    pairs = [
        format_example(tokenizer, examples[i].prompt, examples[i].target, chat) for i in inline
    ]
    for i, p, t in zip(
        inline, encode([p for p, _ in pairs]), encode([t for _, t in pairs]), strict=True
    ):
        t = [*t, *end]
        rows[i] = Row(p + t, [1] * (len(p) + len(t)), len(p), p, [1] * len(p))
    if own:
        if not segment_length:
            raise ConfigError("data.question_segment: own needs the segment length it reads with")
        texts = [prompt_texts(tokenizer, examples[i], chat) for i in own]
        contexts, questions, targets = (encode([t[k] for t in texts]) for k in range(3))
        for i, c, q, t in zip(own, contexts, questions, targets, strict=True):
            t = [*t, *end]
            room = segment_length - len(q) - len(t)
            if room < 0:
                raise ConfigError(
                    f"data.question_segment: own: the question part of {examples[i].id} has "
                    f"{len(q)} tokens and its answer {len(t)}, more than one segment of "
                    f"{segment_length} (shorten the prompt or raise the segment length)"
                )
            ids = c + [pad] * room + q + t
            mask = [1] * len(c) + [0] * room + [1] * (len(q) + len(t))
            gen_pad = segment_length - len(q)
            rows[i] = Row(
                ids,
                mask,
                len(ids) - len(t),
                c + [pad] * gen_pad + q,
                [1] * len(c) + [0] * gen_pad + [1] * len(q),
            )
    return rows  # type: ignore[return-value]


def left_pad_rows(
    rows: Sequence[Sequence[int]], masks: Sequence[Sequence[int] | None], pad_id: int
) -> tuple[Tensor, Tensor]:
    """Rows with their own masks (None: all real) as one left-padded batch:
    ``(input_ids, attention_mask)``, both (B, longest)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks, strict=True)):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = torch.tensor(m) if m is not None else 1
    return ids, mask


def generate_examples(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    segment_length: int,
    max_new_tokens: int,
    batch_size: int = 8,
    chat: bool = False,
    context_tokens: int | None = None,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Generated text for each example, laid out by :func:`encode_rows` (so an ``own`` example
    has its question alone in the last segment); batched longest first, in the input order.

    ``context_tokens`` cuts each row to its last that many tokens first (the no-carry control).
    """
    from tqdm.auto import tqdm

    rows = encode_rows(examples, tokenizer, segment_length=segment_length, chat=chat, eos=False)
    order = longest_first([len(r.prompt_ids) for r in rows])
    result = [""] * len(rows)
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        chunk = order[s : s + batch_size]
        texts = generate_rows(
            model,
            tokenizer,
            [rows[i] for i in chunk],
            segment_length=segment_length,
            max_new_tokens=max_new_tokens,
            context_tokens=context_tokens,
        )
        for i, text in zip(chunk, texts, strict=True):
            result[i] = text
    return result


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices by decreasing length (ties in input order): batches that waste little padding."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def generate_rows(
    model,
    tokenizer,
    rows: Sequence[Row],
    *,
    segment_length: int,
    max_new_tokens: int,
    context_tokens: int | None = None,
) -> list[str]:
    """Generated text for ``rows`` (from :func:`encode_rows`) as one left-padded batch."""
    from memllm.core.generation import generate_ids

    device = next(model.parameters()).device
    cut = slice(-context_tokens, None) if context_tokens else slice(None)
    ids, mask = left_pad_rows(
        [r.prompt_ids[cut] for r in rows], [r.prompt_mask[cut] for r in rows], _pad_id(tokenizer)
    )
    new = generate_ids(
        model,
        ids.to(device),
        mask.to(device),
        segment_length=segment_length,
        max_new_tokens=max_new_tokens,
    )
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id
