"""Teacher forcing: the model's argmax at each gold answer token, read as in generation.

:func:`teacher_forced_argmax` reads the prompt as a memllm model does in generation (segment by
segment through the memory, or the last window only) and returns, per record, the gold target
ids and the model's argmax at those positions; :func:`forced_scores` does it on token ids and
adds each target token's log-probability (the closed-set score of
:mod:`memllm.evaluation.closed_set` sums them per candidate answer). ZsRE's ``token_acc`` /
``seq_acc`` (:mod:`memllm.data.zsre_metric`) are computed from them (:func:`zsre_token_accuracy`,
:func:`zsre_sequence_accuracy`, and per example with paraphrase and locality variants
:func:`memllm.data.zsre.teacher_forced_metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence

from memllm.errors import DataError


def teacher_forced_argmax(
    model,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    segment_length: int | None = None,
    batch_size: int = 16,
    add_special_tokens: bool = True,
) -> list[tuple[list[int], list[int]]]:
    """For each record, the gold target token ids and the model's argmax at those positions.

    The model reads each prompt as :func:`memllm.core.generation.generate_ids` does before decoding:
    the prompt is cut into ``segment_length``-token segments aligned to its end; a model with
    memory writes all but the last segment into a fresh memory session (one per batch of
    independent records, so nothing leaks between batches), then reads the last segment followed
    by the target with the memory read-only; a model without memory sees only the last segment
    and the target (the window baselines). ``segment_length=None`` reads the whole prompt.

    The target text is appended verbatim (tokenised without special tokens), the prompt is
    tokenised with ``add_special_tokens`` (ROME's construction: the tokenizer's default; memllm's
    training and generation: without). Prompts are left-padded and targets right-padded with
    explicit position ids, so a batch gives what its records give one at a time.

    Returns:
        ``[(gold_ids, argmax_ids), ...]`` in the order of ``prompts``.
    """
    if len(prompts) != len(targets):
        raise DataError(f"zsre: {len(prompts)} prompts but {len(targets)} answers")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id or 0
    prompt_ids, target_ids = [], []
    for p, t in zip(prompts, targets, strict=True):
        p_ids = list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"])
        t_ids = list(tokenizer(t, add_special_tokens=False)["input_ids"])
        if not p_ids:
            raise DataError(f"zsre: empty prompt for answer {t!r}")
        if not t_ids:
            raise DataError(f"zsre: empty answer for prompt {p!r}")
        prompt_ids.append(p_ids)
        target_ids.append(t_ids)
    results: list[tuple[list[int], list[int]]] = []
    for t_ids, (_, argmax) in zip(
        target_ids,
        forced_scores(
            model,
            prompt_ids,
            target_ids,
            segment_length=segment_length,
            batch_size=batch_size,
            pad_id=pad_id,
        ),
        strict=True,
    ):
        results.append((t_ids, argmax))
    return results


def forced_scores(
    model,
    prompt_ids: Sequence[Sequence[int]],
    target_ids: Sequence[Sequence[int]],
    *,
    prompt_masks: Sequence[Sequence[int] | None] | None = None,
    segment_length: int | None = None,
    batch_size: int = 16,
    pad_id: int = 0,
) -> list[tuple[list[float], list[int]]]:
    """Per record, the log-probability of each target token and the model's argmax there, the
    target teacher-forced after the prompt read as in generation.

    The reading is :func:`teacher_forced_argmax`'s on token ids: prompts (with their own masks,
    e.g. the interior padding of :mod:`memllm.data.layout`; None = all real) are left-padded to
    one width per batch and cut into ``segment_length``-token segments aligned to their end; a
    model with memory writes all but the last into a fresh session per batch, then reads the
    last segment followed by the right-padded target with the memory read-only; a model without
    memory sees the last segment and the target. ``segment_length=None``: the whole prompt.

    Returns:
        ``[(token log-probs, argmax ids), ...]`` in the input order, one entry per target token.
    """
    import torch

    from memllm.core.inject import has_memory, memory_session
    from memllm.core.segments import (
        forward_segments,
        logits_to_keep_kwargs,
        positions_from_mask,
        segment_bounds,
    )

    masks = list(prompt_masks) if prompt_masks is not None else [None] * len(prompt_ids)
    if not (len(prompt_ids) == len(target_ids) == len(masks)):
        raise DataError(f"{len(prompt_ids)} prompts, {len(target_ids)} targets, {len(masks)} masks")
    device = next(model.parameters()).device
    with_memory = has_memory(model)
    # Longest prompts together: less padding, and fewer segments for the short ones.
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    results: list[tuple[list[float], list[int]] | None] = [None] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width_p = max(len(prompt_ids[i]) for i in chunk)
        width_t = max(len(target_ids[i]) for i in chunk)
        ids = torch.full((len(chunk), width_p + width_t), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):
            p_ids, t_ids, m = prompt_ids[i], target_ids[i], masks[i]
            if not p_ids or not t_ids:
                raise DataError("teacher forcing needs a non-empty prompt and target")
            ids[row, width_p - len(p_ids) : width_p] = torch.tensor(list(p_ids))
            ids[row, width_p : width_p + len(t_ids)] = torch.tensor(list(t_ids))
            mask[row, width_p - len(p_ids) : width_p] = torch.tensor(list(m)) if m else 1
            mask[row, width_p : width_p + len(t_ids)] = 1
        ids, mask = ids.to(device), mask.to(device)
        last_start = segment_bounds(width_p, segment_length or width_p)[-1][0]
        visible, visible_mask = ids[:, last_start:], mask[:, last_start:]
        # The logits at the prompt's last token and at every target token but the last are the
        # ones that predict the target; nothing before them needs the LM head.
        keep = width_t + 1
        kwargs = logits_to_keep_kwargs(model, keep)
        positions = positions_from_mask(visible_mask)
        if not with_memory:
            # Columns that are padding in every row (the own layout pads the question's segment
            # inside the row) change nothing without a memory: nothing attends to them and
            # positions count real tokens. Dropping them, window's closed-set rows on recall
            # shrink from the 128-token segment to the question and candidate (~25 tokens).
            used = visible_mask.bool().any(0)
            used[-keep:] = True
            if not used.all():
                visible, visible_mask, positions = (
                    t[:, used] for t in (visible, visible_mask, positions)
                )
        call = {
            "input_ids": visible,
            "attention_mask": visible_mask,
            "position_ids": positions,
            **kwargs,
        }
        with torch.no_grad():
            if with_memory:
                with memory_session(model) as session:
                    if last_start > 0:  # the earlier segments go into the memory
                        forward_segments(
                            model,
                            ids[:, :last_start],
                            mask[:, :last_start],
                            segment_length=segment_length or width_p,
                            session=session,
                            keep_logits=False,
                        )
                    with session.read_only():
                        logits = model(**call, use_cache=False).logits
            else:
                logits = model(**call).logits
        # The token at position t is predicted by the logits at t - 1: column 0 of the kept
        # logits is the prompt's last token, which predicts the target's first token.
        logits = logits[:, -keep:-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        gold = ids[:, width_p:].unsqueeze(-1)
        token_logp = logp.gather(-1, gold).squeeze(-1).cpu()
        pred = logits.argmax(-1).cpu()
        for row, i in enumerate(chunk):
            n = len(target_ids[i])
            results[i] = (token_logp[row, :n].tolist(), pred[row, :n].tolist())
    return [r for r in results if r is not None]


def teacher_forced_correct(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    answer_prefix: str = " ",
    segment_length: int | None = None,
    add_special_tokens: bool = True,
) -> list[list[bool]]:
    """For each record, whether each gold answer token is the model's argmax (teacher forcing).

    The prompt is tokenised as the tokenizer does by default (special tokens included), the
    answer separately as ``answer_prefix + answer`` without special tokens, and the two id lists
    are concatenated — ROME's construction. Batches are left-padded with explicit position ids,
    so a batch gives the same result as its records one at a time. ``segment_length`` and
    ``add_special_tokens``: see :func:`teacher_forced_argmax`.
    """
    pairs = teacher_forced_argmax(
        model,
        tokenizer,
        prompts,
        [answer_prefix + a.strip() for a in answers],
        segment_length=segment_length,
        batch_size=batch_size,
        add_special_tokens=add_special_tokens,
    )
    return [[g == p for g, p in zip(gold, pred, strict=True)] for gold, pred in pairs]


def zsre_token_accuracy(model, tokenizer, prompts, answers, *, batch_size: int = 16) -> list[float]:
    """Per-record teacher-forced token accuracy (ROME/MEMIT definition)."""
    correct = teacher_forced_correct(model, tokenizer, prompts, answers, batch_size=batch_size)
    return [sum(c) / len(c) for c in correct]


def zsre_sequence_accuracy(
    model, tokenizer, prompts, answers, *, batch_size: int = 16
) -> list[float]:
    """Per-record sequence accuracy (MEND definition: all answer tokens right)."""
    correct = teacher_forced_correct(model, tokenizer, prompts, answers, batch_size=batch_size)
    return [float(all(c)) for c in correct]
