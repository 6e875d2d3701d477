"""HotpotQA's official metrics, usable on any system's predictions.

:func:`hotpot_evaluate` reproduces ``hotpot_evaluate_v1.py``: SQuAD normalisation, F1 forced to
0 when either normalised side is ``yes``/``no``/``noanswer`` and they differ, supporting facts as
sets of ``(title, sent_id)``, joint precision/recall as products, every sum divided by the number
of gold questions (a missing prediction counts 0; joint metrics only where both the answer and the
supporting facts are predicted). :func:`hotpot_per_question` gives the per-question values that
reports put intervals and paired tests on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from memllm.data.answers import normalize_answer

HOTPOT_KEYS = (
    "em",
    "f1",
    "prec",
    "recall",
    "sp_em",
    "sp_f1",
    "sp_prec",
    "sp_recall",
    "joint_em",
    "joint_f1",
    "joint_prec",
    "joint_recall",
)


def hotpot_answer_scores(prediction: str, gold: str) -> tuple[float, float, float, float]:
    """``(em, f1, precision, recall)`` of one answer, as in ``hotpot_evaluate_v1.py``."""
    pred_n, gold_n = normalize_answer(prediction), normalize_answer(gold)
    em = float(pred_n == gold_n)
    special = ("yes", "no", "noanswer")
    if (pred_n in special or gold_n in special) and pred_n != gold_n:
        return em, 0.0, 0.0, 0.0
    pred_tokens, gold_tokens = pred_n.split(), gold_n.split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return em, 0.0, 0.0, 0.0
    prec = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return em, 2 * prec * recall / (prec + recall), prec, recall


def _fact_set(facts: Iterable[Sequence[Any]]) -> set[tuple[Any, ...]]:
    return {tuple(f) for f in facts}


def hotpot_sp_scores(
    prediction: Iterable[Sequence[Any]], gold: Iterable[Sequence[Any]]
) -> tuple[float, float, float, float]:
    """``(sp_em, sp_f1, sp_precision, sp_recall)`` of one question's supporting facts."""
    pred, ref = _fact_set(prediction), _fact_set(gold)
    tp = len(pred & ref)
    fp = len(pred - ref)
    fn = len(ref - pred)
    prec = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * prec * recall / (prec + recall) if prec + recall > 0 else 0.0
    return (1.0 if fp + fn == 0 else 0.0), f1, prec, recall


def hotpot_joint_scores(
    answer: tuple[float, float, float, float], sp: tuple[float, float, float, float]
) -> tuple[float, float, float, float]:
    """``(joint_em, joint_f1, joint_prec, joint_recall)`` from answer and sp scores."""
    em, _, prec, recall = answer
    sp_em, _, sp_prec, sp_recall = sp
    joint_prec = prec * sp_prec
    joint_recall = recall * sp_recall
    if joint_prec + joint_recall > 0:
        joint_f1 = 2 * joint_prec * joint_recall / (joint_prec + joint_recall)
    else:
        joint_f1 = 0.0
    return em * sp_em, joint_f1, joint_prec, joint_recall


def hotpot_per_question(
    prediction: dict[str, Any], gold: Sequence[dict[str, Any]]
) -> dict[str, list[float]]:
    """Per-question values of every official key (0 where the official script adds nothing)."""
    answers = prediction.get("answer") or {}
    sps = prediction.get("sp") or {}
    out: dict[str, list[float]] = {k: [] for k in HOTPOT_KEYS}
    for dp in gold:
        qid = dp["_id"]
        values = dict.fromkeys(HOTPOT_KEYS, 0.0)
        ans = sp = None
        if qid in answers:
            ans = hotpot_answer_scores(str(answers[qid]), dp["answer"])
            values.update(zip(("em", "f1", "prec", "recall"), ans, strict=True))
        if qid in sps:
            sp = hotpot_sp_scores(sps[qid], dp["supporting_facts"])
            values.update(zip(("sp_em", "sp_f1", "sp_prec", "sp_recall"), sp, strict=True))
        if ans is not None and sp is not None:
            joint = hotpot_joint_scores(ans, sp)
            keys = ("joint_em", "joint_f1", "joint_prec", "joint_recall")
            values.update(zip(keys, joint, strict=True))
        for k in HOTPOT_KEYS:
            out[k].append(values[k])
    return out


def hotpot_evaluate(prediction: dict[str, Any], gold: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The official aggregate: each key summed over gold questions, divided by their number.

    Args:
        prediction: ``{"answer": {_id: str}, "sp": {_id: [[title, sent_id], ...]}}``; a missing
            ``"answer"`` or ``"sp"`` part counts as no prediction at all (the official script
            would stop with a KeyError).
        gold: raw-schema records (``_id``, ``answer``, ``supporting_facts``).
    """
    per = hotpot_per_question(prediction, gold)
    n = len(gold)
    return {k: (sum(per[k]) / n if n else 0.0) for k in HOTPOT_KEYS}


HOTPOT_DEFINITIONS: dict[str, str] = {
    "em": "HotpotQA answer exact match (hotpot_evaluate_v1 normalisation) of the first line",
    "f1": "HotpotQA answer token F1 (0 when a yes/no/noanswer side differs)",
    "prec": "HotpotQA answer token precision",
    "recall": "HotpotQA answer token recall",
    "sp_em": "supporting facts: the predicted (title, sent_id) set equals the gold set",
    "sp_f1": "supporting facts: F1 of the predicted (title, sent_id) set against the gold set",
    "sp_prec": "supporting facts: precision of the predicted set",
    "sp_recall": "supporting facts: recall of the predicted set",
    "joint_em": "answer em × sp_em",
    "joint_f1": "F1 of joint precision (prec × sp_prec) and joint recall (recall × sp_recall)",
    "joint_prec": "prec × sp_prec",
    "joint_recall": "recall × sp_recall",
}

HOTPOT_KINDS: dict[str, str] = {
    k: "binary" if k.endswith("em") else "continuous" for k in HOTPOT_DEFINITIONS
}
"""EM-like values are 0/1 (Wilson interval); F1, precision and recall are fractions (bootstrap),
even when every value of a run happens to be 0 or 1."""
