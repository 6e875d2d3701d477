"""ZsRE's metric definitions and its exact match.

Three definitions, named in every output (:data:`ZSRE_DEFINITIONS`): ``token_acc``
(ROME/MEMIT/Larimar: teacher-forced, the argmax at each answer position equals the gold token,
averaged over the answer's tokens, then over records), ``seq_acc`` (MEND: a record counts only
when all its answer tokens are right) and ``exact_match`` (greedy generation, first line,
SQuAD-normalised, equals a gold answer); with paraphrase (``rephrase_*``) and locality
(``loc_*``) variants. The teacher-forced ones run a model:
:mod:`memllm.evaluation.teacher_forcing` and :func:`memllm.data.zsre.teacher_forced_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from memllm.data.answers import first_line, normalize_answer

ZSRE_DEFINITIONS: dict[str, str] = {
    "token_acc": (
        "ROME/MEMIT/Larimar teacher-forced token accuracy: at each position of the gold answer "
        "(answers[0]), given the gold prefix, the argmax next token equals the gold token; "
        "averaged over the answer's tokens, then over records"
    ),
    "seq_acc": (
        "MEND teacher-forced sequence accuracy: a record counts 1 only when every answer token "
        "is the argmax given the gold prefix"
    ),
    "exact_match": (
        "greedy generation, cut at the first newline, SQuAD-normalised, equals a gold answer"
    ),
    "rephrase_token_acc": "generalisation: token_acc on the paraphrased question(s)",
    "rephrase_seq_acc": "generalisation: seq_acc on the paraphrased question(s)",
    "loc_token_acc": (
        "locality (ROME/MEMIT neighbourhood): token_acc of loc_ans after the unrelated loc "
        "question; compare with the bare backbone (unchanged behaviour means the same number)"
    ),
    "loc_seq_acc": "locality: seq_acc of loc_ans after the loc question",
    "loc_unchanged": (
        "locality as unchanged behaviour (EasyEdit): teacher-forced on loc_ans after the loc "
        "question, the fraction of positions whose argmax equals the bare backbone's; 1 = "
        "unaffected"
    ),
}

ZSRE_KINDS: dict[str, str] = {
    "token_acc": "continuous",
    "seq_acc": "binary",
    "exact_match": "binary",
    "rephrase_token_acc": "continuous",
    "rephrase_seq_acc": "continuous",  # averaged over a record's paraphrases
    "loc_token_acc": "continuous",
    "loc_seq_acc": "binary",
    "loc_unchanged": "continuous",
}
"""Per-record value kinds by definition: a mean of token fractions is continuous (bootstrap
interval) even when every answer happens to be one token; 0/1 values are binary (Wilson)."""


def zsre_exact_match(output: str, answers: Sequence[str]) -> float:
    """1.0 when the first line of ``output`` equals a gold answer after normalisation."""
    pred = normalize_answer(first_line(output))
    return float(any(pred == normalize_answer(a) for a in answers))


def mean(values: Sequence[float]) -> float:
    """Plain mean (nan for no values): the aggregates of ``memllm score zsre``."""
    return sum(values) / len(values) if values else math.nan
