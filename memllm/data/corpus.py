"""A text corpus for language-model pretraining of the memory, packed into fixed-length rows.

MemoryLlama pretrains its memory on FineWeb-Edu; here any text works (option ``source``):

``austen`` (default) / ``kjv``
    The offline public-domain books (:mod:`memllm.data.distractors`; ``memllm data fetch``).
a file or folder
    ``.txt`` (paragraphs separated by blank lines), ``.jsonl`` / ``.json`` (records with a
    ``text_field``), ``.parquet`` (a ``text_field`` column; needs pyarrow).
``hf:NAME[:CONFIG]``
    A Hugging Face dataset, streamed (e.g. ``hf:HuggingFaceFW/fineweb-edu:sample-10BT``), the
    first ``max_documents`` rows of its train split.

Long documents are cut at paragraph boundaries into pieces of at most ``max_doc_chars``
characters; each piece goes to train, validation or test by a seeded hash (fractions
``validation_fraction`` / ``test_fraction``), so a book contributes to every split without two
splits sharing text. :meth:`CorpusTask.token_sequences` tokenises a split's pieces, joins them
with the end-of-sequence token and cuts the stream into rows of ``seq_len`` tokens (the
incomplete last row is dropped).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from memllm.core.config import check
from memllm.data.base import Example, Task, check_split, stable_seed
from memllm.data.distractors import BOOK_SOURCES, Document, load_documents
from memllm.errors import DataError


@dataclass
class CorpusOptions:
    """Options of ``task: corpus`` (see the module docstring)."""

    source: str = field(default="austen", metadata={"help": "austen | kjv | path | hf:NAME"})
    text_field: str = "text"
    max_documents: int | None = field(default=None, metadata={"help": "hf default 10000"})
    max_doc_chars: int = 20000
    validation_fraction: float = 0.02
    test_fraction: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.max_doc_chars > 0, "max_doc_chars", "must be > 0")
        for key in ("validation_fraction", "test_fraction"):
            check(0.0 <= getattr(self, key) < 1.0, key, "must be in [0, 1)")
        check(
            self.validation_fraction + self.test_fraction < 1.0,
            "test_fraction",
            "validation_fraction + test_fraction must be < 1",
        )
        check(self.max_documents is None or self.max_documents > 0, "max_documents", "must be > 0")


def _record_documents(path: Path, text_field: str, limit: int | None) -> list[Document]:
    from memllm.data.base import read_json_records

    rows = read_json_records(path)
    docs = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        text = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}: record {i}: missing or non-text field {text_field!r}")
        paragraphs = tuple(p.strip() for p in text.split("\n\n") if p.strip())
        if paragraphs:
            docs.append(Document(f"{path.stem}-{i}", paragraphs))
    return docs


def load_corpus_documents(options: CorpusOptions) -> list[Document]:
    """The documents of ``options.source``."""
    src = options.source
    if src in BOOK_SOURCES:
        return load_documents(src)
    if src.startswith("hf:"):
        return load_documents(
            src, max_documents=options.max_documents or 10000, text_field=options.text_field
        )
    path = Path(src).expanduser()
    if path.is_file() and path.suffix in (".jsonl", ".json", ".parquet"):
        return _record_documents(path, options.text_field, options.max_documents)
    if path.is_dir():
        records = sorted(p for ext in ("*.jsonl", "*.json", "*.parquet") for p in path.rglob(ext))
        docs = [d for p in records for d in _record_documents(p, options.text_field, None)]
        if any(path.rglob("*.txt")):
            docs += load_documents(str(path))
        if not docs:
            raise DataError(f"{path}: no .txt, .jsonl, .json or .parquet files")
        return docs[: options.max_documents] if options.max_documents else docs
    return load_documents(src)


def pieces(doc: Document, max_chars: int) -> list[str]:
    """``doc`` cut at paragraph boundaries into pieces of at most ``max_chars`` characters
    (a longer paragraph is a piece of its own)."""
    out, current, size = [], [], 0
    for para in doc.paragraphs:
        if current and size + len(para) + 2 > max_chars:
            out.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        out.append("\n\n".join(current))
    return out


class CorpusTask(Task):
    """``task: corpus``: documents for LM pretraining (``prompt`` and ``target`` are empty;
    ``meta["text"]`` holds the text) and :meth:`token_sequences` for packed rows."""

    name = "corpus"
    max_new_tokens = 0

    def __init__(self, options: CorpusOptions):
        self.options = options
        self._splits: dict[str, list[Example]] | None = None

    def _split_of(self, name: str, index: int) -> str:
        o = self.options
        u = stable_seed(o.seed, "corpus", name, index) / 2**64
        if u < o.validation_fraction:
            return "validation"
        if u < o.validation_fraction + o.test_fraction:
            return "test"
        return "train"

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        if self._splits is None:
            splits: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
            for doc in load_corpus_documents(self.options):
                for j, text in enumerate(pieces(doc, self.options.max_doc_chars)):
                    s = self._split_of(doc.name, j)
                    ex_id = f"corpus/{s}/{len(splits[s])}"
                    splits[s].append(Example(ex_id, "", "", {"text": text, "source": doc.name}))
            self._splits = splits
        return self._splits[split]

    def token_sequences(
        self, tokenizer, seq_len: int, split: str = "train", *, batch_size: int = 64
    ) -> list[list[int]]:
        """Rows of exactly ``seq_len`` token ids packed from ``split``'s texts (EOS between)."""
        if seq_len <= 0:
            raise DataError(f"seq_len must be > 0, got {seq_len}")
        texts = [ex.meta["text"] for ex in self.examples(split)]
        eos = tokenizer.eos_token_id
        rows: list[list[int]] = []
        buffer: list[int] = []
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            for seq in ids:
                buffer.extend(seq)
                if eos is not None:
                    buffer.append(eos)
            full = len(buffer) // seq_len
            rows.extend(buffer[i * seq_len : (i + 1) * seq_len] for i in range(full))
            buffer = buffer[full * seq_len :]
        return rows

    def score(self, examples: list[Example], outputs: list[str]) -> dict[str, list[float]]:
        raise DataError("the corpus task has no answers to score; evaluate its perplexity")


def write_jsonl(path: str | Path, texts: list[str], text_field: str = "text") -> Path:
    """Write texts as JSON lines (handy for building small corpora)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({text_field: t}, ensure_ascii=False) + "\n")
    return path
