"""How a short answer is read out of a generation, and compared with a gold answer.

Shared by the HotpotQA and ZsRE metrics: the first line of the output, then SQuAD/HotpotQA
normalisation (``normalize_answer`` of ``hotpot_evaluate_v1.py``).
"""

from __future__ import annotations

import re
import string

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD/HotpotQA normalisation: lowercase, drop punctuation and articles, squash spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def first_line(text: str) -> str:
    """The generation up to its first newline, stripped (how short answers are read)."""
    return text.strip().split("\n", 1)[0].strip()
