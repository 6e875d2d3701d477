"""ZsRE: relation questions about a subject, with paraphrases and a locality question.

Sources (option ``source``):

``offline`` (default)
    ZsRE-schema records built from real facts (:mod:`memllm.data.facts`): for countries the
    capital, the region of the world and the currency code; for Nobel laureates the birth
    country, birth city, prize year and prize field. Each record has the question (``src``),
    paraphrases (``rephrase`` — the first — and ``rephrases``, all of them), the answer
    (``answers``), a plausible wrong answer of the same relation (``alt``, for editing-style
    use) and a locality question about an unrelated fact (``loc`` = ``"nq question: …"``,
    ``loc_ans``). The (subject, relation) pairs are shuffled under ``seed`` and cut into test,
    validation and train, so no fact is in two splits.
a folder, ``train_file`` / ``test_file``
    ``zsre_mend_train.json`` / ``zsre_mend_eval.json``-style records (``subject, src, pred,
    rephrase, alt, answers, loc, loc_ans, cond``) or the KnowEdit layout (``subject,
    target_new, prompt, ground_truth, rephrase, portability, locality``), JSON or JSON lines.
    Validation is held out from the train file.
``hf``
    A file of a Hugging Face dataset repository (``hf_repo``, default ``zjunlp/KnowEdit``;
    ``hf_test_file`` / ``hf_train_file`` name the files), fetched with ``huggingface_hub``.

The prompt is ``template.format(question=…)`` (default ``"{question}"``, the raw question as
ROME/MEMIT feed it); the target is ``" " + answer`` where ``answer`` is ``answers[0]``
(``answer_field: alt`` switches to the edit target). Metrics and their definitions:
:data:`memllm.data.zsre_metric.ZSRE_DEFINITIONS`; :func:`teacher_forced_metrics` computes the
teacher-forced ones with a model, :meth:`ZsRETask.score` the generation exact match.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from memllm.core.config import check
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
from memllm.data.zsre_metric import ZSRE_DEFINITIONS, zsre_exact_match
from memllm.errors import DataError
from memllm.evaluation.teacher_forcing import teacher_forced_argmax

log = logging.getLogger(__name__)

TRAIN_FILE = "zsre_mend_train.json"
TEST_FILE = "zsre_mend_eval.json"


@dataclass
class ZsREOptions:
    """Options of ``task: zsre`` (see the module docstring)."""

    source: str = field(default="offline", metadata={"help": "offline | hf | a folder"})
    train_file: str | None = None
    test_file: str | None = None
    hf_repo: str = "zjunlp/KnowEdit"
    hf_train_file: str | None = None
    hf_test_file: str = "benchmark/ZsRE/ZsRE-test-all.json"
    num_train: int | None = field(default=2000, metadata={"help": "None = all"})
    num_validation: int = 200
    num_test: int | None = field(default=500, metadata={"help": "None = all"})
    template: str = field(default="{question}", metadata={"help": "prompt, with {question}"})
    answer_field: Literal["answers", "alt"] = "answers"
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("num_train", "num_test"):
            value = getattr(self, key)
            check(value is None or value >= 0, key, "must be >= 0 (or null for all)")
        check(self.num_validation >= 0, "num_validation", "must be >= 0")
        check("{question}" in self.template, "template", "must contain {question}")


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v.strip()]
    return []


def normalize_record(raw: Any, where: str, index: int) -> dict[str, Any]:
    """One record (MEND or KnowEdit layout) as ``{id, subject, question, answers, alt,
    rephrase: [...], loc, loc_ans, relation}``; errors name ``where``."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
    rid = str(raw.get("id", raw.get("case_id", index)))
    if "src" in raw:  # MEND / ROME layout
        question, answers, alt = raw.get("src"), _texts(raw.get("answers")), raw.get("alt", "")
        rephrase = _texts(raw.get("rephrases")) or _texts(raw.get("rephrase"))
        loc, loc_ans = raw.get("loc", ""), raw.get("loc_ans", "")
    elif "prompt" in raw:  # KnowEdit layout
        question, answers = raw.get("prompt"), _texts(raw.get("ground_truth"))
        alt = raw.get("target_new", "")
        rephrase = _texts(raw.get("rephrase")) or _texts(raw.get("rephrase_prompt"))
        loc, loc_ans = _knowedit_locality(raw.get("locality"))
    else:
        raise DataError(f"{where}: neither the MEND layout (src) nor KnowEdit's (prompt)")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: missing or empty question")
    if not answers:
        raise DataError(f"{where}: no answer (answers / ground_truth)")
    if not isinstance(raw.get("subject", ""), str):
        raise DataError(f"{where}: 'subject' must be text")
    if isinstance(alt, list):
        alt = alt[0] if alt else ""
    if isinstance(loc_ans, list):
        loc_ans = loc_ans[0] if loc_ans else ""
    if not isinstance(alt, str) or not isinstance(loc, str) or not isinstance(loc_ans, str):
        raise DataError(f"{where}: alt, loc and loc_ans must be text")
    return {
        "id": rid,
        "subject": raw.get("subject", ""),
        "question": question.strip(),
        "answers": [a.strip() for a in answers],
        "alt": alt.strip(),
        "rephrase": [r.strip() for r in rephrase],
        "loc": loc.strip(),
        "loc_ans": loc_ans.strip(),
        "relation": raw.get("relation", ""),
    }


def _knowedit_locality(value: Any) -> tuple[str, str]:
    items: list[Any] = []
    if isinstance(value, dict):
        for v in value.values():
            items.extend(v if isinstance(v, list) else [v])
    elif isinstance(value, list):
        items = value
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            answers = _texts(item.get("ground_truth"))
            if answers:
                return item["prompt"], answers[0]
    return "", ""


def load_zsre_file(path: str | Path) -> list[dict[str, Any]]:
    """Normalised records of a ZsRE file (MEND or KnowEdit layout)."""
    path = Path(path)
    rows = read_json_records(path)
    return [normalize_record(r, f"{path}: record {i}", i) for i, r in enumerate(rows)]


# --------------------------------------------------------------------------------------------
# offline builder
# --------------------------------------------------------------------------------------------

PRIZE_FIELDS = {
    "physics": "Physics",
    "chemistry": "Chemistry",
    "medicine": "Physiology or Medicine",
    "literature": "Literature",
    "peace": "Peace",
    "economics": "Economic Sciences",
}

RELATIONS: dict[str, tuple[str, ...]] = {
    "capital": (
        "What is the capital of {s}?",
        "What city is the capital of {s}?",
        "Which city serves as the capital of {s}?",
        "{s} has which city as its capital?",
    ),
    "region": (
        "In which region of the world is {s}?",
        "Which part of the world does {s} belong to?",
        "{s} is located in which region of the world?",
    ),
    "currency": (
        "What is the currency code of {s}?",
        "Which currency code is used in {s}?",
        "What currency code does {s} use?",
    ),
    "birth_country": (
        "In which country was {s} born?",
        "What is the country of birth of {s}?",
        "{s} was born in which country?",
        "Which country is the birthplace of {s}?",
    ),
    "birth_city": (
        "In which city was {s} born?",
        "What is the birthplace of {s}?",
        "{s} was born in which city?",
    ),
    "prize_year": (
        "In which year did {s} receive the Nobel Prize?",
        "When was {s} awarded the Nobel Prize?",
        "In what year was {s} awarded the Nobel Prize?",
    ),
    "prize_field": (
        "In which field did {s} win a Nobel Prize?",
        "For which field was {s} awarded the Nobel Prize?",
        "{s} won the Nobel Prize in which field?",
    ),
}


def offline_facts() -> list[tuple[str, str, str]]:
    """All ``(subject, relation, answer)`` facts of the offline builder."""
    from memllm.data.facts import countries, laureates

    facts = []
    for c in countries():
        facts.append((c.name, "capital", c.capital))
        facts.append((c.name, "region", c.region))
        if c.currencies:
            facts.append((c.name, "currency", c.currencies[0]))
    for p in laureates():
        facts.append((p.name, "birth_country", p.birth_country))
        facts.append((p.name, "birth_city", p.birth_city))
        facts.append((p.name, "prize_year", str(p.year)))
        if p.category in PRIZE_FIELDS:
            facts.append((p.name, "prize_field", PRIZE_FIELDS[p.category]))
    return facts


def build_offline(options: ZsREOptions) -> dict[str, list[dict[str, Any]]]:
    """MEND-layout records for test, validation and train, cut from one shuffled pool."""
    o = options
    facts = offline_facts()
    rng = rng_for(o.seed, "zsre-order")
    rng.shuffle(facts)
    by_relation: dict[str, list[str]] = {}
    for _, rel, ans in facts:
        by_relation.setdefault(rel, []).append(ans)
    n_test = o.num_test if o.num_test is not None else 500
    n_train = o.num_train if o.num_train is not None else len(facts)
    cuts = {
        "test": facts[:n_test],
        "validation": facts[n_test : n_test + o.num_validation],
        "train": facts[n_test + o.num_validation : n_test + o.num_validation + n_train],
    }
    out = {}
    for split, chosen in cuts.items():
        records = []
        for i, (subject, relation, answer) in enumerate(chosen):
            r = rng_for(o.seed, "zsre-record", subject, relation)
            templates = RELATIONS[relation]
            others = [a for a in set(by_relation[relation]) if a != answer]
            alt = r.choice(sorted(others)) if others else answer
            while True:  # an unrelated fact: another subject and relation
                loc_s, loc_rel, loc_ans = r.choice(facts)
                if loc_s != subject and loc_rel != relation:
                    break
            loc_q = RELATIONS[loc_rel][0].format(s=loc_s).rstrip("?")
            src = templates[0].format(s=subject)
            rephrases = [t.format(s=subject) for t in templates[1:]]
            records.append(
                {
                    "id": f"{split}-{i}",
                    "subject": subject,
                    "relation": relation,
                    "src": src,
                    "pred": answer,
                    "rephrase": rephrases[0],
                    "rephrases": rephrases,
                    "alt": alt,
                    "answers": [answer],
                    "loc": "nq question: " + loc_q[0].lower() + loc_q[1:],
                    "loc_ans": loc_ans,
                    "cond": f"{answer} >> {alt} || {src}",
                }
            )
        out[split] = records
    return out


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------


class ZsRETask(Task):
    """``task: zsre``: relation questions, scored by generation exact match and (with a model)
    teacher-forced token / sequence accuracy."""

    name = "zsre"
    max_new_tokens = 16

    def __init__(self, options: ZsREOptions):
        self.options = options
        self._records: dict[str, list[dict[str, Any]]] | None = None
        self._examples: dict[str, list[Example]] = {}

    def records(self, split: str) -> list[dict[str, Any]]:
        """Normalised records of ``split``."""
        check_split(split)
        if self._records is None:
            self._records = self._load()
        return self._records[split]

    def _load(self) -> dict[str, list[dict[str, Any]]]:
        o = self.options
        if o.source == "offline" and not (o.train_file or o.test_file):
            raw = build_offline(o)
            return {
                split: [normalize_record(r, f"offline {split}", i) for i, r in enumerate(rows)]
                for split, rows in raw.items()
            }
        train, test = self._raw_sources()
        out: dict[str, list[dict[str, Any]]] = {
            "test": test if o.num_test is None else test[: o.num_test]
        }
        if train is None:
            out["train"] = out["validation"] = []
            log.info("zsre: no train file; train and validation are empty")
            return out
        order = rng_for(o.seed, "zsre-validation").sample(range(len(train)), len(train))
        n_val = min(o.num_validation, len(order))
        rest = order[n_val:] if o.num_train is None else order[n_val : n_val + o.num_train]
        out["validation"] = [train[i] for i in order[:n_val]]
        out["train"] = [train[i] for i in sorted(rest)]
        return out

    def _raw_sources(self) -> tuple[list[dict] | None, list[dict]]:
        o = self.options
        if o.train_file or o.test_file:
            if not o.test_file:
                raise DataError("zsre: test_file is required with train_file")
            train = load_zsre_file(o.train_file) if o.train_file else None
            return train, load_zsre_file(o.test_file)
        if o.source == "hf":
            train = (
                load_zsre_file(_hub_file(o.hf_repo, o.hf_train_file)) if o.hf_train_file else None
            )
            return train, load_zsre_file(_hub_file(o.hf_repo, o.hf_test_file))
        folder = Path(o.source).expanduser()
        if not folder.is_dir():
            raise DataError(f"zsre source {o.source!r}: expected offline, hf or a folder")
        if not (folder / TEST_FILE).is_file():
            raise DataError(f"{folder}: {TEST_FILE} not found")
        train = load_zsre_file(folder / TRAIN_FILE) if (folder / TRAIN_FILE).is_file() else None
        return train, load_zsre_file(folder / TEST_FILE)

    def prompt(self, question: str) -> str:
        return self.options.template.format(question=question)

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        if split not in self._examples:
            self._examples[split] = [self.to_example(r, split) for r in self.records(split)]
        return self._examples[split]

    def answer(self, record: dict[str, Any]) -> str:
        if self.options.answer_field == "alt" and record["alt"]:
            return record["alt"]
        return record["answers"][0]

    def to_example(self, record: dict[str, Any], split: str) -> Example:
        prompt = self.prompt(record["question"])
        answer = self.answer(record)
        meta = {
            **record,
            "answer": answer,
            "rephrase_prompts": [self.prompt(q) for q in record["rephrase"]],
            "loc_prompt": self.prompt(record["loc"]) if record["loc"] else "",
            "group": record.get("relation") or "all",
        }
        return Example(f"zsre/{split}/{record['id']}", prompt, answer_target(prompt, answer), meta)

    def score(self, examples: list[Example], outputs: list[str]) -> dict[str, list[float]]:
        """Per-example ``exact_match`` of generated outputs (first line, normalised)."""
        check_lengths(examples, outputs, self.name)
        use_alt = self.options.answer_field == "alt"
        return {
            "exact_match": [
                zsre_exact_match(out, [ex.meta["answer"]] if use_alt else ex.meta["answers"])
                for ex, out in zip(examples, outputs, strict=True)
            ]
        }

    def model_scores(
        self, model, tokenizer, examples: list[Example], reading: Reading
    ) -> ModelScores:
        """The teacher-forced accuracies of :func:`teacher_forced_metrics`, read as the arm reads.

        The model reads each question as the arm reads it in generation: a memory arm writes
        the earlier segments into a fresh memory per batch and reads the last one, the window
        and finetuned arms see the last ``segment_length`` tokens, base its whole window.
        Locality (``loc_unchanged``) compares with the bare backbone. A variant that some test
        records lack (no paraphrase or locality question) is left out with a note: an interval
        over a subset would not pair with the other metrics' examples.
        """
        start = time.perf_counter()
        per = teacher_forced_metrics(
            model,
            tokenizer,
            examples,
            batch_size=reading.batch_size,
            segment_length=reading.segment_length,
            chat=reading.chat,
            add_special_tokens=False,  # prompts are tokenised as in training and generation
            reference_model=reading.reference_model() if reading.reference_model else None,
        )
        out = ModelScores(
            notes=[
                "zsre: token_acc, seq_acc and their rephrase_/loc_ variants are teacher-forced "
                "on each arm's own reading of the question (memory arms segment by segment, "
                "window and finetuned arms the last segment_length tokens, base the whole "
                "input); loc_unchanged compares with the bare backbone"
            ]
        )
        for metric, values in per.items():
            missing = sum(v != v for v in values)  # nan: the record has no such question
            if missing:
                out.notes.append(
                    f"zsre: {metric} not reported: {missing} of {len(values)} test records "
                    "have no such question"
                )
            else:
                out.scores[metric] = values
        log.info(
            "arm %s: zsre teacher-forced metrics in %.1f s",
            reading.arm,
            time.perf_counter() - start,
        )
        return out


def _hub_file(repo: str, filename: str) -> str:
    try:
        from huggingface_hub import hf_hub_download  # only with source "hf"
    except ImportError as err:
        raise DataError("source 'hf' needs huggingface_hub") from err
    return hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset")


def teacher_forced_metrics(
    model,
    tokenizer,
    examples: list[Example],
    *,
    batch_size: int = 16,
    segment_length: int | None = None,
    chat: bool = False,
    add_special_tokens: bool = True,
    reference_model=None,
) -> dict[str, list[float]]:
    """Per-example teacher-forced metrics (see :data:`memllm.data.zsre_metric.ZSRE_DEFINITIONS`).

    ``token_acc`` / ``seq_acc`` on the question and ``meta["answer"]``; with paraphrases,
    ``rephrase_token_acc`` / ``rephrase_seq_acc`` (averaged over an example's paraphrases);
    with a locality question, ``loc_token_acc`` / ``loc_seq_acc`` on ``loc_ans``, and with a
    ``reference_model`` (the bare backbone, reading the whole question) ``loc_unchanged``.
    Examples lacking paraphrases or a locality question get ``nan`` there.

    The defaults are ROME's construction (the raw prompt with the tokenizer's special tokens,
    the whole prompt in view). An experiment passes how its arm reads inputs instead:
    ``segment_length`` (memory written segment by segment, or only the last window without
    memory; see :func:`memllm.evaluation.teacher_forcing.teacher_forced_argmax`), ``chat`` (the chat
    template of
    :func:`memllm.data.prompting.format_example`) and ``add_special_tokens=False`` (as in training
    and generation). All questions of all examples are batched together, longest first.
    """
    from memllm.data.prompting import format_example

    nan = float("nan")
    queries: list[tuple[int, str, str, str]] = []  # (example, kind, prompt, answer)
    for i, ex in enumerate(examples):
        queries.append((i, "main", ex.prompt, ex.meta["answer"]))
        queries += [
            (i, "rephrase", p, ex.meta["answer"]) for p in ex.meta.get("rephrase_prompts", [])
        ]
        if ex.meta.get("loc_prompt") and ex.meta.get("loc_ans"):
            queries.append((i, "loc", ex.meta["loc_prompt"], ex.meta["loc_ans"]))
    texts = [format_example(tokenizer, p, answer_target(p, a), chat) for _, _, p, a in queries]
    prompts, targets = [t[0] for t in texts], [t[1] for t in texts]

    def argmax(m, rows: list[int], segment: int | None) -> list[tuple[list[int], list[int]]]:
        return teacher_forced_argmax(
            m,
            tokenizer,
            [prompts[k] for k in rows],
            [targets[k] for k in rows],
            segment_length=segment,
            batch_size=batch_size,
            add_special_tokens=add_special_tokens,
        )

    pairs = argmax(model, list(range(len(queries))), segment_length)
    per: dict[str, dict[int, list[float]]] = {}
    for (i, kind, _, _), (gold, pred) in zip(queries, pairs, strict=True):
        right = [g == p for g, p in zip(gold, pred, strict=True)]
        prefix = "" if kind == "main" else kind + "_"
        per.setdefault(prefix + "token_acc", {}).setdefault(i, []).append(sum(right) / len(right))
        per.setdefault(prefix + "seq_acc", {}).setdefault(i, []).append(float(all(right)))
    loc_rows = [k for k, q in enumerate(queries) if q[1] == "loc"]
    if reference_model is not None and loc_rows:
        # The reference reads the whole question: the backbone's own behaviour, unconstrained.
        # When it is the model itself and every locality question fits in the segment, that is
        # the pass just made (the base and window arms): no second pass.
        fits = segment_length is None or all(
            len(tokenizer(prompts[k], add_special_tokens=add_special_tokens)["input_ids"])
            <= segment_length
            for k in loc_rows
        )
        if reference_model is model and fits:
            reference = [pairs[k] for k in loc_rows]
        else:
            reference = argmax(reference_model, loc_rows, None)
        for k, (_, ref_pred) in zip(loc_rows, reference, strict=True):
            pred = pairs[k][1]
            same = sum(a == b for a, b in zip(pred, ref_pred, strict=True)) / len(pred)
            per.setdefault("loc_unchanged", {})[queries[k][0]] = [same]
    # in the order of the definitions the reports print (exact_match is generation-based)
    return {
        key: [sum(v) / len(v) if (v := per[key].get(i)) else nan for i in range(len(examples))]
        for key in ZSRE_DEFINITIONS
        if key in per
    }
