"""Supporting-fact prediction for HotpotQA: a small head over the model's hidden states.

The HotpotQA prompt (:mod:`memllm.data.hotpotqa`) puts every context sentence on its own line
with a marker; ``example.meta["sentences"]`` holds ``[title, sent_id, char_start, char_end]``
for each. The pieces here:

* :func:`sentence_token_spans` — character spans → token spans in the tokenised prompt (through
  the fast tokenizer's offset mapping); :func:`shift_spans` moves them for left padding.
* :class:`SupportingFactHead` — pools each sentence's hidden states (mean, last token, or both)
  and scores it with a two-layer MLP; :meth:`SupportingFactHead.loss` is binary cross-entropy
  on the labelled sentences.
* :func:`sentence_labels` / :func:`pad_labels` — 0/1 targets from the gold supporting facts.
* :func:`select_supporting_facts` — scores → ``[[title, sent_id], ...]`` (threshold on the
  probability, or the top k), and :func:`write_hotpot_predictions` writes the official
  prediction file read by ``hotpot_evaluate_v1.py`` and ``memllm score hotpotqa``.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from memllm.errors import DataError

Span = tuple[int, int]


def sentence_token_spans(
    tokenizer, text: str, char_spans: Sequence[Sequence[int]], *, add_special_tokens: bool = True
) -> list[Span]:
    """Token ``[start, end)`` of each character span of ``text`` as ``tokenizer`` splits it.

    A token belongs to a span when their character ranges overlap. Spans are never empty: a
    span that no token overlaps gets the token at its start.
    """
    enc = tokenizer(
        text, return_offsets_mapping=True, add_special_tokens=add_special_tokens, verbose=False
    )
    offsets = enc["offset_mapping"]
    real = [(t, s, e) for t, (s, e) in enumerate(offsets) if e > s]  # special tokens are empty
    if not real:
        raise DataError("sentence_token_spans: the text has no tokens")
    ends = [e for _, _, e in real]
    spans: list[Span] = []
    for cs, ce in char_spans:
        k = bisect.bisect_right(ends, cs)  # the first token ending after the span starts
        k = min(k, len(real) - 1)
        first = last = real[k][0]
        while k < len(real) and real[k][1] < ce:
            last = real[k][0]
            k += 1
        spans.append((first, last + 1))
    return spans


def shift_spans(spans: Sequence[Span], offset: int) -> list[Span]:
    """Spans moved right by ``offset`` tokens (the left padding of a batch row)."""
    return [(s + offset, e + offset) for s, e in spans]


class SupportingFactHead(nn.Module):
    """Scores each sentence of a prompt from the hidden states over its token span.

    Args:
        hidden_size: the model's hidden size (``memllm.core.backbone.hidden_size(model)``).
        pooling: ``mean`` over the span, ``last`` token of the span, or ``mean_last`` (both,
            concatenated).
        inner: width of the MLP's hidden layer (default ``hidden_size // 2``, at least 16).
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        pooling: Literal["mean", "last", "mean_last"] = "mean",
        inner: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if pooling not in ("mean", "last", "mean_last"):
            raise ValueError(f"pooling must be mean, last or mean_last, got {pooling!r}")
        self.pooling = pooling
        width = hidden_size * (2 if pooling == "mean_last" else 1)
        inner = inner or max(16, hidden_size // 2)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, 1)
        )

    def pool(self, hidden: torch.Tensor, spans: Sequence[Sequence[Span]]) -> torch.Tensor:
        """``(batch, max_sentences, width)`` pooled features (zeros where padded)."""
        batch, _, size = hidden.shape
        count = max((len(s) for s in spans), default=0)
        starts = torch.zeros(batch, count, dtype=torch.long, device=hidden.device)
        ends = torch.ones(batch, count, dtype=torch.long, device=hidden.device)
        for b, row in enumerate(spans):
            if row:
                t = torch.tensor(row, dtype=torch.long, device=hidden.device)
                starts[b, : len(row)] = t[:, 0]
                ends[b, : len(row)] = t[:, 1]
        features = []
        if self.pooling in ("mean", "mean_last"):
            zeros = hidden.new_zeros(batch, 1, size)
            csum = torch.cat([zeros, hidden.float().cumsum(1)], dim=1)  # (B, T+1, H)
            hi = csum.gather(1, ends.unsqueeze(-1).expand(-1, -1, size))
            lo = csum.gather(1, starts.unsqueeze(-1).expand(-1, -1, size))
            length = (ends - starts).clamp(min=1).unsqueeze(-1)
            features.append(((hi - lo) / length).to(hidden.dtype))
        if self.pooling in ("last", "mean_last"):
            last = (ends - 1).clamp(min=0).unsqueeze(-1).expand(-1, -1, size)
            features.append(hidden.gather(1, last))
        return torch.cat(features, dim=-1)

    def forward(self, hidden: torch.Tensor, spans: Sequence[Sequence[Span]]) -> torch.Tensor:
        """Logits ``(batch, max_sentences)``; padded positions are ``-inf``.

        Args:
            hidden: ``(batch, tokens, hidden_size)``, e.g. the last layer's hidden states.
            spans: per batch row, the token span of each sentence (already shifted for padding).
        """
        logits = self.score_features(self.pool(hidden, spans))
        valid = torch.zeros_like(logits, dtype=torch.bool)
        for b, row in enumerate(spans):
            valid[b, : len(row)] = True
        return logits.masked_fill(~valid, float("-inf"))

    def score_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits of already pooled sentence features ``(..., width)`` → ``(...)`` (probes train
        on features pooled once)."""
        return self.mlp(self.norm(pooled.to(self.norm.weight.dtype))).squeeze(-1)

    @staticmethod
    def loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy over labelled sentences (``labels`` is -1 where padded)."""
        mask = labels >= 0
        if not mask.any():
            return scores.new_zeros(())
        return nn.functional.binary_cross_entropy_with_logits(
            scores[mask], labels[mask].to(scores.dtype)
        )


def sentence_labels(meta: dict[str, Any]) -> list[int]:
    """1 for each prompt sentence that is a gold supporting fact, else 0 (prompt order)."""
    gold = {(t, int(i)) for t, i in meta.get("supporting_facts", [])}
    return [int((title, int(sid)) in gold) for title, sid, *_ in meta["sentences"]]


def pad_labels(rows: Sequence[Sequence[int]], *, device=None) -> torch.Tensor:
    """``(batch, max_sentences)`` float labels, -1 where padded."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), -1.0, device=device)
    for b, row in enumerate(rows):
        if row:
            out[b, : len(row)] = torch.tensor(row, dtype=torch.float, device=device)
    return out


def select_supporting_facts(
    scores: torch.Tensor | Sequence[float],
    sentences: Sequence[Sequence[Any]],
    *,
    threshold: float = 0.5,
    top_k: int | None = None,
    min_k: int = 1,
) -> list[list[Any]]:
    """``[[title, sent_id], ...]`` chosen from one example's sentence scores (logits).

    With ``top_k`` the ``top_k`` highest-scoring sentences are chosen; otherwise those whose
    probability is at least ``threshold``, and at least ``min_k`` of the best.
    """
    logits = torch.as_tensor(scores, dtype=torch.float).flatten()[: len(sentences)]
    probs = torch.sigmoid(logits)
    order = torch.argsort(probs, descending=True).tolist()
    if top_k is not None:
        chosen = order[:top_k]
    else:
        chosen = [i for i in order if probs[i] >= threshold]
        if len(chosen) < min_k:
            chosen = order[:min_k]
    chosen = sorted(i for i in chosen if torch.isfinite(logits[i]))
    return [[sentences[i][0], int(sentences[i][1])] for i in chosen]


def write_hotpot_predictions(
    path: str | Path,
    ids: Sequence[str],
    answers: Sequence[str] | None = None,
    supporting_facts: Sequence[Sequence[Sequence[Any]]] | None = None,
) -> Path:
    """Write the official prediction file ``{"answer": {_id: str}, "sp": {_id: [...]}}``."""
    if answers is not None and len(answers) != len(ids):
        raise DataError(f"{len(ids)} ids but {len(answers)} answers")
    if supporting_facts is not None and len(supporting_facts) != len(ids):
        raise DataError(f"{len(ids)} ids but {len(supporting_facts)} supporting-fact lists")
    payload = {
        "answer": dict(zip(ids, answers, strict=True)) if answers is not None else {},
        "sp": {
            qid: [[t, int(i)] for t, i in sp]
            for qid, sp in zip(ids, supporting_facts or [], strict=False)
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path
