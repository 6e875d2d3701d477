"""Closed-set scoring: pick the candidate answer the model finds most likely, teacher-forced.

For a task whose answers come from a closed set (recall's numbers, BabiLong ``qa1``–``qa5``'s
rooms and names: :meth:`memllm.data.base.Task.answer_candidates`), each candidate answer is
appended to the prompt and scored by its log-likelihood (the sum of its tokens'
log-probabilities), and the arm's choice is the argmax. The prompt is read exactly as the arm
reads it to generate (:func:`memllm.evaluation.teacher_forcing.forced_scores` on the rows of
:func:`memllm.data.layout.encode_rows`): a memory arm writes the earlier segments into its
memory, then reads the last segment followed by the candidate; ``window`` and the no-carry
control see only the last segment (``context_tokens``), ``base`` the whole prompt.

``closed_set_accuracy`` is reported beside the official generative accuracy, never instead of
it: it cannot be lost to the answer's format (a model that knows the number but writes a
sentence), so it has less noise, and it says whether the information reached the last segment at
all. Its chance level is ``1 / number of candidates``.

Cost: each candidate is its own row, so a memory arm writes the earlier segments once per
candidate (a memory state is not shared between rows); keep it for the short contexts and small
label sets it is meant for, or few examples.
"""

from __future__ import annotations

from collections.abc import Sequence

from memllm.data.base import Example, answer_target
from memllm.errors import DataError

METRIC = "closed_set_accuracy"


def candidate_log_likelihoods(
    model,
    tokenizer,
    examples: Sequence[Example],
    candidates: Sequence[Sequence[str]],
    *,
    segment_length: int,
    chat: bool = False,
    context_tokens: int | None = None,
    batch_size: int = 16,
) -> list[list[float]]:
    """Per example, the teacher-forced log-likelihood of each of its candidate answers.

    Args:
        examples: the examples, laid out inline or with their question in its own segment.
        candidates: per example, the answers to score (bare, e.g. ``"47"``; each is put after
            the prompt as its target would be).
        segment_length: the segment length the arm reads with (``base``: its window).
        chat: prompts go through the chat template.
        context_tokens: read only the last that many prompt tokens (the no-carry control).
        batch_size: rows (example × candidate) per forward call.
    """
    from memllm.data.layout import _pad_id, encode_rows
    from memllm.evaluation.teacher_forcing import forced_scores

    if len(candidates) != len(examples):
        raise DataError(f"{len(examples)} examples but {len(candidates)} candidate lists")
    rows = encode_rows(examples, tokenizer, segment_length=segment_length, chat=chat, eos=False)
    cut = slice(-context_tokens, None) if context_tokens else slice(None)
    prompts, masks, targets, owner = [], [], [], []
    for i, (ex, row) in enumerate(zip(examples, rows, strict=True)):
        if not candidates[i]:
            raise DataError(f"{ex.id}: no candidate answers")
        texts = [answer_target(ex.prompt, c) for c in candidates[i]]
        if chat:  # the chat template's assistant turn starts the answer (format_example)
            texts = [t.lstrip() for t in texts]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            prompts.append(row.prompt_ids[cut])
            masks.append(row.prompt_mask[cut])
            targets.append(ids)
            owner.append(i)
    scores = forced_scores(
        model,
        prompts,
        targets,
        prompt_masks=masks,
        segment_length=segment_length,
        batch_size=batch_size,
        pad_id=_pad_id(tokenizer),
    )
    out: list[list[float]] = [[] for _ in examples]
    for i, (logp, _) in zip(owner, scores, strict=True):
        out[i].append(float(sum(logp)))
    return out


def closed_set_correct(
    examples: Sequence[Example],
    candidates: Sequence[Sequence[str]],
    likelihoods: Sequence[Sequence[float]],
) -> list[float]:
    """1.0 where the most likely candidate (the first on a tie) is the gold answer
    (``meta["answer"]``, compared case-insensitively)."""
    out = []
    for ex, cands, scores in zip(examples, candidates, likelihoods, strict=True):
        gold = str(ex.meta.get("answer", ex.target)).strip().lower()
        names = [c.strip().lower() for c in cands]
        if gold not in names:
            raise DataError(f"{ex.id}: the answer {gold!r} is not among its candidates")
        best = max(range(len(scores)), key=lambda k: (scores[k], -k))
        out.append(float(names[best] == gold))
    return out


def chance_level(candidates: Sequence[Sequence[str]]) -> float:
    """The accuracy of a uniform guess among each example's candidates, averaged."""
    return sum(1.0 / len(c) for c in candidates) / max(1, len(candidates))
