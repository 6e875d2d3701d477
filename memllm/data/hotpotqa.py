"""HotpotQA (distractor setting): loaders, the prompt with sentence markers, an offline builder.

Sources (option ``source``):

``offline`` (default)
    HotpotQA-schema questions built from real facts (:mod:`memllm.data.facts`): *bridge*
    questions through a Nobel laureate's birth country ("What is the capital of the country
    where Ernest Rutherford was born?", "In which part of the world is the country where … was
    born?") and *comparison* questions between two countries or two laureates ("Which country
    has more people, Chile or Peru?", "Which country covers a larger area, …?", "Are Ghana and
    Peru in the same region of the world?", "Who was awarded the Nobel Prize earlier, … or …?",
    "Were … and … born in the same country?"). Each fact is one sentence of a paragraph titled
    by its entity; the other paragraphs are about other entities (``num_paragraphs`` in all,
    shuffled); supporting facts are recorded. The question pool is shuffled under ``seed`` and
    cut into test, validation and train in that order, so no question appears in two splits.
``hf``
    ``hf_dataset`` (``hotpotqa/hotpot_qa``) / ``distractor`` from the Hugging Face hub
    (train → train/validation, validation → test). Needs ``datasets``.
a folder or ``train_file`` / ``test_file``
    The official raw JSON (``hotpot_train_v1.1.json`` for train/validation,
    ``hotpot_dev_distractor_v1.json`` for test) or the same records in the Hugging Face layout
    (``id``, columnar ``supporting_facts`` and ``context``), as JSON or JSON lines.

The test split is always the dev set (the official test set is hidden); validation is held
out from the train file. The prompt lists every paragraph as ``Paragraph: TITLE`` followed by
one line per sentence, ``[k] sentence`` (k = sent_id), then ``Question: …`` and
``answer_prefix`` (default ``"\\nAnswer:"``). ``meta["sentences"]`` holds ``[title, sent_id,
char_start, char_end]`` of each marked line in the prompt, for the supporting-fact head
(:mod:`memllm.data.supporting_facts`). Scoring is ``hotpot_evaluate_v1.py``
(:func:`memllm.data.hotpotqa_metric.hotpot_evaluate`) on the first line of each output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memllm.core.config import check
from memllm.data.answers import first_line
from memllm.data.base import (
    Example,
    ModelScores,
    Reading,
    Task,
    answer_target,
    check_lengths,
    check_split,
    read_json_records,
    rng_for,
)
from memllm.data.hotpotqa_metric import hotpot_answer_scores, hotpot_joint_scores, hotpot_sp_scores
from memllm.errors import DataError

log = logging.getLogger(__name__)

TRAIN_FILE = "hotpot_train_v1.1.json"
DEV_FILE = "hotpot_dev_distractor_v1.json"
INSTRUCTION = (
    "Answer the question using the paragraphs below. Each sentence is marked with its number "
    "in its paragraph."
)


@dataclass
class HotpotQAOptions:
    """Options of ``task: hotpotqa`` (see the module docstring)."""

    source: str = field(default="offline", metadata={"help": "offline | hf | a folder"})
    train_file: str | None = None
    test_file: str | None = None
    hf_dataset: str = "hotpotqa/hotpot_qa"
    num_train: int | None = field(default=1000, metadata={"help": "None = all"})
    num_validation: int = 100
    num_test: int | None = field(default=300, metadata={"help": "None = all"})
    num_paragraphs: int = field(default=10, metadata={"help": "offline: paragraphs per question"})
    comparison_fraction: float = field(default=0.3, metadata={"help": "offline builder"})
    instruction: bool = True
    answer_prefix: str = "\nAnswer:"
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("num_train", "num_test"):
            value = getattr(self, key)
            check(value is None or value >= 0, key, "must be >= 0 (or null for all)")
        check(self.num_validation >= 0, "num_validation", "must be >= 0")
        check(self.num_paragraphs >= 2, "num_paragraphs", "must be >= 2")
        check(0.0 <= self.comparison_fraction <= 1.0, "comparison_fraction", "must be in [0, 1]")


# --------------------------------------------------------------------------------------------
# records: validation, layouts
# --------------------------------------------------------------------------------------------


def from_hf_layout(row: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face ``hotpot_qa`` row (columnar facts and context) in the raw schema."""
    sf, ctx = row["supporting_facts"], row["context"]
    return {
        "_id": row["id"],
        "question": row["question"],
        "answer": row["answer"],
        "supporting_facts": [[t, i] for t, i in zip(sf["title"], sf["sent_id"], strict=True)],
        "context": [[t, list(s)] for t, s in zip(ctx["title"], ctx["sentences"], strict=True)],
        "type": row.get("type", ""),
        "level": row.get("level", ""),
    }


def validate_record(record: Any, where: str) -> dict[str, Any]:
    """One record in the raw schema (HF layout converted); errors name ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    rid = record.get("_id", record.get("id"))
    where = f"{where} (id {rid!r})" if rid is not None else where
    if "_id" not in record and "id" in record and isinstance(record.get("context"), dict):
        try:
            record = from_hf_layout(record)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{where}: malformed Hugging Face layout ({err})") from None
    for key in ("_id", "question", "answer"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: missing or non-text field {key!r}")
    context = record.get("context")
    if not isinstance(context, list) or not context:
        raise DataError(f"{where}: 'context' must be a non-empty list of [title, sentences]")
    for j, para in enumerate(context):
        ok = (
            isinstance(para, (list, tuple))
            and len(para) == 2
            and isinstance(para[0], str)
            and isinstance(para[1], list)
            and all(isinstance(s, str) for s in para[1])
        )
        if not ok:
            raise DataError(f"{where}: context[{j}] must be [title, [sentence, ...]]")
    facts = record.get("supporting_facts")
    if not isinstance(facts, list):
        raise DataError(f"{where}: 'supporting_facts' must be a list of [title, sent_id]")
    for j, f in enumerate(facts):
        ok = (
            isinstance(f, (list, tuple))
            and len(f) == 2
            and isinstance(f[0], str)
            and isinstance(f[1], int)
            and not isinstance(f[1], bool)
        )
        if not ok:
            raise DataError(f"{where}: supporting_facts[{j}] must be [title, sent_id], got {f!r}")
    return {
        "_id": record["_id"],
        "question": record["question"],
        "answer": record["answer"],
        "supporting_facts": [[t, int(i)] for t, i in facts],
        "context": [[t, list(s)] for t, s in context],
        "type": record.get("type", ""),
        "level": record.get("level", ""),
    }


def load_hotpot_file(path: str | Path) -> list[dict[str, Any]]:
    """Raw-schema records from the official JSON or the Hugging Face layout (JSON / JSONL)."""
    path = Path(path)
    rows = read_json_records(path)
    return [validate_record(r, f"{path}: record {i}") for i, r in enumerate(rows)]


def load_hotpot_hub(split: str, dataset: str = "hotpotqa/hotpot_qa") -> list[dict[str, Any]]:
    """``hotpot_qa`` / ``distractor`` from the hub (split ``train`` or ``validation``)."""
    try:
        import datasets  # optional: only with source "hf"
    except ImportError as err:
        raise DataError(
            "source 'hf' needs the datasets package: pip install 'memllm[hub]'"
        ) from err
    rows = datasets.load_dataset(dataset, "distractor", split=split)
    return [validate_record(dict(r), f"{dataset}/{split}: record {i}") for i, r in enumerate(rows)]


# --------------------------------------------------------------------------------------------
# prompt
# --------------------------------------------------------------------------------------------


def format_prompt(
    record: dict[str, Any], *, instruction: bool = True, answer_prefix: str = "\nAnswer:"
) -> tuple[str, list[list[Any]]]:
    """The prompt of one record and ``[title, sent_id, char_start, char_end]`` per sentence."""
    parts: list[str] = []
    pos = 0
    sentences: list[list[Any]] = []

    def add(text: str) -> int:
        nonlocal pos
        start = pos
        parts.append(text)
        pos += len(text)
        return start

    if instruction:
        add(INSTRUCTION + "\n\n")
    for j, (title, sents) in enumerate(record["context"]):
        if j:
            add("\n")
        add(f"Paragraph: {title}\n")
        for k, sentence in enumerate(sents):
            line = f"[{k}] {' '.join(sentence.split())}"
            start = add(line)
            add("\n")
            sentences.append([title, k, start, start + len(line)])
    add(f"\nQuestion: {record['question'].strip()}")
    add(answer_prefix)
    return "".join(parts), sentences


# --------------------------------------------------------------------------------------------
# offline builder from real facts
# --------------------------------------------------------------------------------------------


def _paragraph(entity) -> tuple[str, list[str]]:
    from memllm.data.facts import Country, country_sentences, laureate_sentences

    if isinstance(entity, Country):
        return entity.name, country_sentences(entity)
    return entity.name, laureate_sentences(entity)


def offline_question_pool(seed: int, comparisons: int) -> list[dict[str, Any]]:
    """Question specs: every bridge question, plus ``comparisons`` comparison questions."""
    from memllm.data.facts import COUNTRY_SENTENCES as CS
    from memllm.data.facts import LAUREATE_SENTENCES as LS
    from memllm.data.facts import countries, country_index, laureates

    index = country_index()
    pool: list[dict[str, Any]] = []
    for p in laureates():
        c = index[p.birth_country]
        born = [p.name, LS.index("birth")]
        questions = (
            (f"What is the capital of the country where {p.name} was born?", c.capital, "capital"),
            (
                f"In which part of the world is the country where {p.name} was born?",
                c.subregion,
                "location",
            ),
        )
        for question, answer, fact in questions:
            pool.append(
                {
                    "type": "bridge",
                    "question": question,
                    "answer": answer,
                    "gold": [p, c],
                    "supporting_facts": [born, [c.name, CS.index(fact)]],
                }
            )
    rng = rng_for(seed, "hotpot-comparisons")
    nations, people = list(countries()), list(laureates())
    kinds = ["population", "area", "region", "earlier", "same_country"]
    seen: set[tuple[str, str, str]] = set()
    attempts = 0
    while comparisons > 0 and attempts < comparisons * 50:
        attempts += 1
        kind = kinds[attempts % len(kinds)]
        if kind in ("population", "area", "region"):
            a, b = rng.sample(nations, 2)
            if kind == "region" and rng.random() < 0.5:  # balance yes and no
                b = rng.choice([c for c in nations if c.region == a.region and c != a])
        else:
            a, b = rng.sample(people, 2)
            if kind == "same_country" and rng.random() < 0.5:
                same = [p for p in people if p.birth_country == a.birth_country and p != a]
                if same:
                    b = rng.choice(same)
        key = (kind, *sorted((a.name, b.name)))
        if key in seen:
            continue
        spec = _comparison(kind, a, b, CS, LS)
        if spec is None:
            continue
        seen.add(key)
        pool.append(spec)
        comparisons -= 1
    return pool


def _comparison(kind: str, a, b, CS, LS) -> dict[str, Any] | None:
    if kind == "population":
        if a.population == b.population:
            return None
        answer = a.name if a.population > b.population else b.name
        question = f"Which country has more people, {a.name} or {b.name}?"
        sent = CS.index("population")
    elif kind == "area":
        if not a.area or not b.area or a.area == b.area:
            return None
        answer = a.name if a.area > b.area else b.name
        question = f"Which country covers a larger area, {a.name} or {b.name}?"
        sent = CS.index("area")
    elif kind == "region":
        answer = "yes" if a.region == b.region else "no"
        question = f"Are {a.name} and {b.name} in the same region of the world?"
        sent = CS.index("location")
    elif kind == "earlier":
        if a.year == b.year:
            return None
        answer = a.name if a.year < b.year else b.name
        question = f"Who was awarded the Nobel Prize earlier, {a.name} or {b.name}?"
        sent = LS.index("prize")
    else:
        answer = "yes" if a.birth_country == b.birth_country else "no"
        question = f"Were {a.name} and {b.name} born in the same country?"
        sent = LS.index("birth")
    return {
        "type": "comparison",
        "question": question,
        "answer": answer,
        "gold": [a, b],
        "supporting_facts": [[a.name, sent], [b.name, sent]],
    }


def build_offline_record(spec: dict[str, Any], index: int, num_paragraphs: int, rng) -> dict:
    """A raw-schema record for one question spec, with distractor paragraphs, shuffled."""
    from memllm.data.facts import countries, laureates

    gold = spec["gold"]
    titles = {g.name for g in gold}
    need = max(num_paragraphs - len(gold), 0)
    pools = [list(countries()), list(laureates())]
    distractors = []
    while len(distractors) < need:
        # Half the distractors are of each kind, so entity type does not give the answer away.
        candidate = rng.choice(pools[len(distractors) % 2])
        if candidate.name not in titles:
            titles.add(candidate.name)
            distractors.append(candidate)
    paragraphs = [_paragraph(e) for e in [*gold, *distractors]]
    rng.shuffle(paragraphs)
    return {
        "_id": f"offline-{stable_id(spec['question'])}",
        "question": spec["question"],
        "answer": spec["answer"],
        "supporting_facts": spec["supporting_facts"],
        "context": [[t, s] for t, s in paragraphs],
        "type": spec["type"],
        "level": "medium",
        "index": index,
    }


def stable_id(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:16]


def build_offline(options: HotpotQAOptions) -> dict[str, list[dict[str, Any]]]:
    """Offline records for the three splits (test, validation, train cut from one pool)."""
    o = options
    n_test = o.num_test if o.num_test is not None else 300
    n_train = o.num_train if o.num_train is not None else 1000
    total = n_test + o.num_validation + n_train
    pool = offline_question_pool(o.seed, round(total * o.comparison_fraction))
    bridges = [s for s in pool if s["type"] == "bridge"]
    comparisons = [s for s in pool if s["type"] == "comparison"]
    rng = rng_for(o.seed, "hotpot-order")
    rng.shuffle(bridges)
    n_bridge = min(total - len(comparisons), len(bridges))
    chosen = bridges[:n_bridge] + comparisons
    rng.shuffle(chosen)
    if len(chosen) < total:
        log.warning("offline HotpotQA: only %d questions available, %d asked", len(chosen), total)
    cuts = {"test": chosen[:n_test]}
    cuts["validation"] = chosen[n_test : n_test + o.num_validation]
    cuts["train"] = chosen[n_test + o.num_validation : total]
    out = {}
    for split, specs in cuts.items():
        records = []
        for i, spec in enumerate(specs):
            rec_rng = rng_for(o.seed, "hotpot-paragraphs", spec["question"])
            records.append(build_offline_record(spec, i, o.num_paragraphs, rec_rng))
        out[split] = records
    return out


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------


class HotpotQATask(Task):
    """``task: hotpotqa``: answer generation plus supporting facts, scored officially."""

    name = "hotpotqa"
    max_new_tokens = 32

    def __init__(self, options: HotpotQAOptions):
        self.options = options
        self._records: dict[str, list[dict[str, Any]]] = {}
        self._examples: dict[str, list[Example]] = {}

    def records(self, split: str) -> list[dict[str, Any]]:
        """Raw-schema records of ``split`` (after selection)."""
        check_split(split)
        if split not in self._records:
            self._records.update(self._load())
        return self._records[split]

    def _load(self) -> dict[str, list[dict[str, Any]]]:
        o = self.options
        if o.source == "offline" and not (o.train_file or o.test_file):
            return build_offline(o)
        train, test = self._raw_sources()
        order = rng_for(o.seed, "hotpot-validation").sample(range(len(train)), len(train))
        n_val = min(o.num_validation, len(order))
        val_idx = order[:n_val]
        train_idx = order[n_val:] if o.num_train is None else order[n_val : n_val + o.num_train]
        return {
            "test": test if o.num_test is None else test[: o.num_test],
            "validation": [train[i] for i in val_idx],
            "train": [train[i] for i in sorted(train_idx)],
        }

    def _raw_sources(self) -> tuple[list[dict], list[dict]]:
        o = self.options
        if o.train_file or o.test_file:
            if not (o.train_file and o.test_file):
                raise DataError("hotpotqa: give both train_file and test_file")
            return load_hotpot_file(o.train_file), load_hotpot_file(o.test_file)
        if o.source == "hf":
            return load_hotpot_hub("train", o.hf_dataset), load_hotpot_hub(
                "validation", o.hf_dataset
            )
        folder = Path(o.source).expanduser()
        if not folder.is_dir():
            raise DataError(f"hotpotqa source {o.source!r}: expected offline, hf or a folder")
        for name in (TRAIN_FILE, DEV_FILE):
            if not (folder / name).is_file():
                raise DataError(f"{folder}: {name} not found")
        return load_hotpot_file(folder / TRAIN_FILE), load_hotpot_file(folder / DEV_FILE)

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        if split not in self._examples:
            self._examples[split] = [self.to_example(r) for r in self.records(split)]
        return self._examples[split]

    def to_example(self, record: dict[str, Any]) -> Example:
        prompt, sentences = format_prompt(
            record, instruction=self.options.instruction, answer_prefix=self.options.answer_prefix
        )
        meta = {
            "_id": record["_id"],
            "question": record["question"],
            "answer": record["answer"],
            "supporting_facts": record["supporting_facts"],
            "sentences": sentences,
            "type": record.get("type", ""),
            "level": record.get("level", ""),
            "group": record.get("type") or "all",
        }
        target = answer_target(prompt, record["answer"])
        return Example(f"hotpotqa/{record['_id']}", prompt, target, meta)

    def score(
        self,
        examples: list[Example],
        outputs: list[str],
        supporting_facts: list[list[list[Any]]] | None = None,
    ) -> dict[str, list[float]]:
        """Per-example official values: ``em, f1, prec, recall`` from the outputs' first lines;
        with ``supporting_facts`` (one ``[[title, sent_id], ...]`` per example) also ``sp_*``
        and ``joint_*``."""
        check_lengths(examples, outputs, self.name)
        keys = ["em", "f1", "prec", "recall"]
        if supporting_facts is not None:
            check_lengths(examples, supporting_facts, self.name)
            keys += ["sp_em", "sp_f1", "sp_prec", "sp_recall"]
            keys += ["joint_em", "joint_f1", "joint_prec", "joint_recall"]
        out: dict[str, list[float]] = {k: [] for k in keys}
        for i, (ex, output) in enumerate(zip(examples, outputs, strict=True)):
            ans = hotpot_answer_scores(first_line(output), ex.meta["answer"])
            values = list(ans)
            if supporting_facts is not None:
                sp = hotpot_sp_scores(supporting_facts[i], ex.meta["supporting_facts"])
                values += [*sp, *hotpot_joint_scores(ans, sp)]
            for k, v in zip(keys, values, strict=True):
                out[k].append(float(v))
        return out

    def model_scores(
        self, model, tokenizer, examples: list[Example], reading: Reading
    ) -> ModelScores:
        """Each example's supporting facts, scored with its answer (``sp_*``, ``joint_*``).

        An arm trained with the supporting-fact head (``train.supporting_facts_weight``) or
        loaded with one uses it (``reading.heads["sp"]``, named after the trainer plug-in).
        Every other arm (base, window, untrained, trained without the head) cannot predict
        supporting facts zero-shot: it gets a probe, the same head trained on this arm's own
        frozen final hidden states of the training examples. Features come from the arm's own
        reading of the input (memory arms segment by segment, window and finetuned the last
        ``segment_length`` tokens, base its whole window), so a sentence outside what the arm
        sees gets no score and is never predicted. Writes the official prediction file
        ``hotpot_predictions.json`` into ``reading.output_dir``.
        """
        from memllm.core.backbone import hidden_size
        from memllm.core.inject import has_memory
        from memllm.data.supporting_facts import write_hotpot_predictions
        from memllm.training import sp_head as sp

        start = time.perf_counter()
        size, name, seed = hidden_size(model), reading.arm, reading.seed
        how = {
            "segment_length": reading.segment_length,
            "chat": reading.chat,
            "batch_size": reading.batch_size,
        }
        notes = [
            f"supporting facts: sentences with head probability ≥ {sp.SELECT_THRESHOLD}, at least "
            f"the {sp.SELECT_MIN_K} best (every HotpotQA question has two supporting paragraphs)"
        ]
        head = reading.heads.get("sp")
        if head is not None:
            notes.append(f"{name}: supporting facts from the SP head trained with the arm")
        else:
            # an arm trained on a corpus (no sentences) gets a probe of this task's train split
            hotpot = getattr(reading.train_task, "name", None) == self.name
            train = (reading.train_task if hotpot else self).examples("train")
            probe = sp.build_head(size, seed)
            features = sp.sentence_features(model, tokenizer, train, head=probe, **how)
            head = sp.fit_probe(features, train, size, seed=seed)
            notes.append(
                f"{name}: supporting facts from a probe, the SP head trained {sp.PROBE_EPOCHS} "
                f"epochs on this arm's frozen final hidden states of the {len(train)} training "
                "examples (no SP training of the model itself)"
                + (
                    ""
                    if has_memory(model)
                    else f"; it reads the last {reading.segment_length} tokens of each input, "
                    "sentences before them get no score"
                )
            )
        head = head.to(next(model.parameters()).device)
        features = sp.sentence_features(model, tokenizer, examples, head=head, **how)
        facts = sp.predict_supporting_facts(head, features, examples)
        scores = self.score(examples, list(reading.outputs), supporting_facts=facts)
        if reading.output_dir is not None:
            write_hotpot_predictions(
                Path(reading.output_dir) / "hotpot_predictions.json",
                [ex.meta["_id"] for ex in examples],
                [first_line(o) for o in reading.outputs],
                facts,
            )
        log.info("arm %s: supporting facts in %.1f s", name, time.perf_counter() - start)
        kept = {k: v for k, v in scores.items() if k.startswith(("sp_", "joint_"))}
        return ModelScores(kept, notes)

    def checkpoint_heads(
        self, checkpoint: str | Path, model, train: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The supporting-fact head saved with a checkpoint's memory; strict when ``train``
        trains the head (then a checkpoint without one is an error)."""
        from memllm.core.backbone import hidden_size
        from memllm.training import sp_head as sp

        path = Path(checkpoint)
        if train.get("supporting_facts_weight", 0) > 0 or (path / sp.SP_HEAD_FILE).is_file():
            return {"sp": sp.load_sp_head(path, hidden_size(model))}
        return {}

    @staticmethod
    def prediction_file(
        examples: list[Example],
        outputs: list[str],
        supporting_facts: list[list[list[Any]]] | None = None,
    ) -> dict[str, Any]:
        """The official prediction dict (answers are the outputs' first lines)."""
        ids = [ex.meta["_id"] for ex in examples]
        return {
            "answer": {i: first_line(o) for i, o in zip(ids, outputs, strict=True)},
            "sp": dict(zip(ids, supporting_facts, strict=True)) if supporting_facts else {},
        }

    @staticmethod
    def gold_records(examples: list[Example]) -> list[dict[str, Any]]:
        """Gold records as the official scorer reads them."""
        return [
            {
                "_id": ex.meta["_id"],
                "answer": ex.meta["answer"],
                "supporting_facts": ex.meta["supporting_facts"],
            }
            for ex in examples
        ]
