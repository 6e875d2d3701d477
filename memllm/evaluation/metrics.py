"""Official metrics for BabiLong, HotpotQA and ZsRE, usable on any system's predictions.

Each benchmark has its own published scorer, and the numbers are only comparable when it is
reproduced exactly, quirks included:

* **BabiLong** — :func:`babilong_compare_answers` follows ``compare_answers`` in the benchmark's
  ``babilong/metrics.py``: lowercase the output, keep its first sentence (cut at the first ``.``,
  then at ``<context>``, ``<example>`` and ``Question`` — the last cut never fires on lowercased
  text, as in the original), find which of the task's labels occur in it as substrings, drop the
  labels that occur in the question, and count the answer correct iff the target is the only
  label left. Comma targets of qa8 (``len(target) > 3``) need every sub-target present and as
  many labels as sub-targets. Substring scorers (lm-eval-harness, OpenCompass, Hercules) give
  other numbers and are not used.
* **HotpotQA** — :func:`hotpot_evaluate` reproduces ``hotpot_evaluate_v1.py``: SQuAD
  normalisation, F1 forced to 0 when either normalised side is ``yes``/``no``/``noanswer`` and
  they differ, supporting facts as sets of ``(title, sent_id)``, joint precision/recall as
  products, every sum divided by the number of gold questions (a missing prediction counts 0;
  joint metrics only where both the answer and the supporting facts are predicted).
* **ZsRE** — three definitions, named in every output (:data:`ZSRE_DEFINITIONS`):
  ``token_acc`` (ROME/MEMIT/Larimar: teacher-forced, the argmax at each answer position equals
  the gold token, averaged over the answer's tokens, then over records), ``seq_acc`` (MEND: a
  record counts only when all its answer tokens are right) and ``exact_match`` (greedy
  generation, first line, SQuAD-normalised, equals a gold answer); with paraphrase (``rephrase_*``)
  and locality (``loc_*``) variants. :func:`teacher_forced_argmax` reads the prompt as a memllm
  model does in generation (segment by segment through the memory, or the last window only).
"""

from __future__ import annotations

import csv
import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from memllm.errors import DataError

# --------------------------------------------------------------------------------------------
# BabiLong
# --------------------------------------------------------------------------------------------

_ROOMS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")

BABILONG_LABELS: dict[str, tuple[str, ...]] = {
    "qa1": _ROOMS,
    "qa2": _ROOMS,
    "qa3": _ROOMS,
    "qa4": _ROOMS,
    "qa5": ("Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"),
    "qa6": ("no", "yes"),
    "qa7": ("none", "one", "three", "two"),
    "qa8": ("apple", "football", "milk", "nothing"),
    "qa9": ("no", "yes"),
    "qa10": ("maybe", "no", "yes"),
    "qa11": _ROOMS,
    "qa12": _ROOMS,
    "qa13": _ROOMS,
    "qa14": ("bedroom", "cinema", "kitchen", "office", "park", "school"),
    "qa15": ("cat", "mouse", "sheep", "wolf"),
    "qa16": ("gray", "green", "white", "yellow"),
    "qa17": ("no", "yes"),
    "qa18": ("no", "yes"),
    "qa19": ("e,e", "e,n", "e,s", "n,e", "n,n", "n,w", "s,e", "s,s", "s,w", "w,n", "w,s", "w,w"),
    "qa20": ("bedroom", "bored", "garden", "hungry", "kitchen", "thirsty", "tired"),
}
"""The answer labels of each BabiLong task (the benchmark's ``TASK_LABELS``)."""


def babilong_preprocess_output(output: str) -> str:
    """The part of a generation that BabiLong's checker reads (its ``preprocess_output``)."""
    output = output.lower()
    output = output.split(".")[0]
    output = output.split("<context>")[0]
    output = output.split("<example>")[0]
    # The original also cuts at "Question", after lowercasing, so that cut never happens; kept
    # for fidelity.
    output = output.split("Question")[0]
    return output


def babilong_compare_answers(
    target: str, output: str, question: str, task_labels: Iterable[str]
) -> bool:
    """Whether ``output`` answers ``question`` with ``target`` (BabiLong's ``compare_answers``)."""
    output = babilong_preprocess_output(output)
    target = target.lower()
    labels = {label.lower() for label in task_labels}
    in_question = {label for label in labels if label in question.lower()}
    in_output = {label for label in labels if label in output} - in_question
    if "," in target and len(target) > 3:  # qa8: several items, e.g. "apple,milk"
        parts = target.split(",")
        return all(p in in_output for p in parts) and len(in_output) == len(parts)
    return target in in_output and len(in_output) == 1


def babilong_labels(task: str) -> tuple[str, ...]:
    """The labels of ``task`` (``qa1`` … ``qa20``); an unknown task is a :class:`DataError`."""
    if task not in BABILONG_LABELS:
        raise DataError(f"unknown BabiLong task {task!r} (known: qa1 … qa20)")
    return BABILONG_LABELS[task]


def babilong_correct(
    task: str, targets: Sequence[str], outputs: Sequence[str], questions: Sequence[str]
) -> list[float]:
    """Per-example correctness (1.0/0.0) under the official checker."""
    if not len(targets) == len(outputs) == len(questions):
        raise DataError(
            f"babilong: {len(targets)} targets, {len(outputs)} outputs and "
            f"{len(questions)} questions: the counts must match"
        )
    labels = babilong_labels(task)
    return [
        float(babilong_compare_answers(t, o, q, labels))
        for t, o, q in zip(targets, outputs, questions, strict=True)
    ]


def babilong_score(
    task: str, targets: Sequence[str], outputs: Sequence[str], questions: Sequence[str]
) -> dict[str, Any]:
    """``{"task", "n", "correct", "accuracy"}`` under the official checker."""
    correct = babilong_correct(task, targets, outputs, questions)
    n = len(correct)
    hits = int(sum(correct))
    return {"task": task, "n": n, "correct": hits, "accuracy": hits / n if n else 0.0}


def read_babilong_predictions(path: str | Path) -> list[dict[str, str]]:
    """Rows ``{target, output, question}`` of a BabiLong prediction CSV (an empty cell is "")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"target", "output", "question"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(sorted(missing))} "
                "(expected a CSV with columns target,output,question)"
            )
        rows = []
        for i, row in enumerate(reader):
            if row["target"] is None or row["target"] == "":
                raise DataError(f"{path}: record {i} (line {reader.line_num}) has no target")
            rows.append({k: row[k] or "" for k in ("target", "output", "question")})
    return rows


def infer_babilong_task(path: str | Path) -> str | None:
    """``qaN`` from a file name such as ``gpt2_qa1_0k.csv`` (None when absent or ambiguous)."""
    found = set(re.findall(r"(?<![a-z0-9])(qa\d{1,2})(?![0-9])", Path(path).name.lower()))
    return found.pop() if len(found) == 1 else None


# --------------------------------------------------------------------------------------------
# HotpotQA
# --------------------------------------------------------------------------------------------

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

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD/HotpotQA normalisation: lowercase, drop punctuation and articles, squash spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


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


# --------------------------------------------------------------------------------------------
# ZsRE
# --------------------------------------------------------------------------------------------

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

BABILONG_DEFINITIONS = {
    "accuracy": "BabiLong's official checker: the output up to its first '.', lowercased, holds "
    "the answer label(s) and no other label of the task (labels in the question ignored)",
}
BABILONG_KINDS = {"accuracy": "binary"}

METRIC_DEFINITIONS: dict[str, str] = {
    **BABILONG_DEFINITIONS,
    **HOTPOT_DEFINITIONS,
    **ZSRE_DEFINITIONS,
}
"""Metric name → definition, shown in reports next to the numbers."""

METRIC_KINDS: dict[str, str] = {**BABILONG_KINDS, **HOTPOT_KINDS, **ZSRE_KINDS}
"""Metric name → ``binary`` / ``continuous`` by definition (reports choose intervals by it)."""


def first_line(text: str) -> str:
    """The generation up to its first newline, stripped (how short answers are read)."""
    return text.strip().split("\n", 1)[0].strip()


def zsre_exact_match(output: str, answers: Sequence[str]) -> float:
    """1.0 when the first line of ``output`` equals a gold answer after normalisation."""
    pred = normalize_answer(first_line(output))
    return float(any(pred == normalize_answer(a) for a in answers))


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
    import torch

    from memllm.core.inject import has_memory, memory_session
    from memllm.core.segments import (
        forward_segments,
        logits_to_keep_kwargs,
        positions_from_mask,
        segment_bounds,
    )

    if len(prompts) != len(targets):
        raise DataError(f"zsre: {len(prompts)} prompts but {len(targets)} answers")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id or 0
    device = next(model.parameters()).device
    has_memory = has_memory(model)
    encoded = []
    for p, t in zip(prompts, targets, strict=True):
        p_ids = list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"])
        t_ids = list(tokenizer(t, add_special_tokens=False)["input_ids"])
        if not p_ids:
            raise DataError(f"zsre: empty prompt for answer {t!r}")
        if not t_ids:
            raise DataError(f"zsre: empty answer for prompt {p!r}")
        encoded.append((p_ids, t_ids))
    # Longest prompts together: less padding, and fewer segments for the short ones.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[tuple[list[int], list[int]] | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width_p = max(len(encoded[i][0]) for i in chunk)
        width_t = max(len(encoded[i][1]) for i in chunk)
        ids = torch.full((len(chunk), width_p + width_t), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):
            p_ids, t_ids = encoded[i]
            ids[row, width_p - len(p_ids) : width_p] = torch.tensor(p_ids)
            ids[row, width_p : width_p + len(t_ids)] = torch.tensor(t_ids)
            mask[row, width_p - len(p_ids) : width_p + len(t_ids)] = 1
        ids, mask = ids.to(device), mask.to(device)
        last_start = segment_bounds(width_p, segment_length or width_p)[-1][0]
        visible, visible_mask = ids[:, last_start:], mask[:, last_start:]
        # The logits at the prompt's last token and at every target token but the last are the
        # ones that predict the target; nothing before them needs the LM head.
        keep = width_t + 1
        kwargs = logits_to_keep_kwargs(model, keep)
        call = {
            "input_ids": visible,
            "attention_mask": visible_mask,
            "position_ids": positions_from_mask(visible_mask),
            **kwargs,
        }
        with torch.no_grad():
            if has_memory:
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
        pred = logits[:, -keep:].argmax(-1).cpu()
        for row, i in enumerate(chunk):
            t_ids = encoded[i][1]
            # The token at position t is predicted by the logits at t - 1: column 0 of the kept
            # logits is the prompt's last token, which predicts the target's first token.
            results[i] = (t_ids, pred[row, : len(t_ids)].tolist())
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


def mean(values: Sequence[float]) -> float:
    """Plain mean (nan for no values), for reports."""
    return sum(values) / len(values) if values else math.nan
