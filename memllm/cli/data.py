"""``memllm score …`` and ``memllm data …``: official scoring and data tools.

::

    memllm score hotpotqa PRED.json GOLD.json       # hotpot_evaluate_v1.py's twelve numbers
    memllm score babilong PRED.csv [--task qa1]     # BabiLong's compare_answers: accuracy
    memllm score zsre GOLD.json [--predictions PRED.json] [--model NAME]
    memllm data fetch [austen|kjv]                  # offline public-domain books into the cache
    memllm data preview TASK [--tasks qa1] [--lengths 4k] [-n 2] [--set key=value ...]
    memllm data export TASK OUT.json [--split test] # the examples' data in the official format
    memllm data export TASK OUT/ --format hf        # every example field, a datasets folder
    memllm data tasks                               # the registered tasks
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from memllm.cli.args import nonnegative_int, positive_int
from memllm.errors import DataError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    score = subparsers.add_parser(
        "score",
        help="score prediction files with the official metrics",
        description="Score prediction files from any system with the benchmarks' own metrics.",
    )
    score_sub = score.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)

    hp = score_sub.add_parser("hotpotqa", help="hotpot_evaluate_v1.py, reproduced")
    hp.add_argument("predictions", help='JSON {"answer": {_id: text}, "sp": {_id: [[title, k]]}}')
    hp.add_argument("gold", help="gold JSON (raw HotpotQA or the Hugging Face layout)")
    hp.set_defaults(func=score_hotpotqa)

    bl = score_sub.add_parser("babilong", help="BabiLong's compare_answers, reproduced")
    bl.add_argument("predictions", help="CSV with columns target,output,question")
    bl.add_argument("--task", help="qa1 … qa20 (default: read from the file name)")
    bl.set_defaults(func=score_babilong)

    zs = score_sub.add_parser("zsre", help="ZsRE exact match and teacher-forced accuracies")
    zs.add_argument("gold", help="ZsRE records (zsre_mend_eval.json layout or KnowEdit)")
    zs.add_argument(
        "--predictions",
        help="generated answers: JSON {id: text}, a JSON list in gold order, or JSON lines "
        "{id, output}; ids are the records' id/case_id or their index",
    )
    zs.add_argument("--model", help="a model to compute teacher-forced accuracies with")
    zs.add_argument("--template", default="{question}", help="prompt template for --model")
    zs.add_argument("--batch-size", type=positive_int, default=16)
    zs.add_argument("--limit", type=positive_int, help="score only the first N records")
    zs.set_defaults(func=score_zsre)

    data = subparsers.add_parser("data", help="fetch, preview and export task data")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    fetch = data_sub.add_parser(
        "fetch",
        help="fetch offline public-domain books (Jane Austen; King James Bible)",
        description="Download a Debian package with apt-get download (no install), unpack it "
        "in Python and write its text under memllm's cache "
        "(memllm.core.backbone.cache_dir()/data).",
    )
    fetch.add_argument("source", nargs="?", default="austen", choices=["austen", "kjv"])
    fetch.add_argument("--deb", help="use this downloaded .deb instead of apt-get download")
    fetch.add_argument("--text-deb", help="kjv: the bible-kjv-text .deb")
    fetch.add_argument("--force", action="store_true", help="fetch again even if cached")
    fetch.set_defaults(func=data_fetch)

    preview = data_sub.add_parser("preview", help="print a few formatted examples")
    _task_arguments(preview)
    preview.add_argument("-n", type=positive_int, default=2, help="how many examples (default 2)")
    preview.add_argument("--tokenizer", help="count tokens with this tokenizer")
    preview.add_argument(
        "--max-chars", type=nonnegative_int, default=0, help="cut long prompts (0: no)"
    )
    preview.set_defaults(func=data_preview)

    export = data_sub.add_parser(
        "export",
        help="write a split in the official format",
        description="hotpotqa: raw HotpotQA JSON (a gold file for `memllm score hotpotqa`); "
        "zsre: zsre_mend_eval.json layout; babilong: records {input, question, target}; "
        "corpus: JSON lines {text}. --format hf: the formatted examples (id, prompt, target, "
        "context_part, question_part, meta as JSON) as a datasets folder.",
    )
    _task_arguments(export)
    export.add_argument("output", help="file (json) or folder (hf) to write")
    export.add_argument(
        "--format",
        dest="export_format",
        default="json",
        choices=["json", "hf"],
        help="json: the official format (default); hf: every example field as a datasets "
        "folder for datasets.load_from_disk (needs memllm[hub])",
    )
    export.set_defaults(func=data_export)

    tasks = data_sub.add_parser("tasks", help="list the registered tasks")
    tasks.set_defaults(func=data_tasks)


def _task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", help="babilong, hotpotqa, zsre or corpus")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--tasks", nargs="+", help="babilong: qa1 qa2 … (or qa1,qa2)")
    parser.add_argument("--lengths", nargs="+", help="babilong, recall: 0k 1k 4k … (or 0k,4k)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task option, e.g. --set prompt=plain --set distractor=kjv",
    )


# --------------------------------------------------------------------------------------------
# score
# --------------------------------------------------------------------------------------------


def _print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, indent=1, ensure_ascii=False))


def _no_duplicate_keys(path: Path):
    """A ``json`` object hook that refuses a key given twice (json keeps the last silently)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise DataError(f"{path}: key {key!r} appears twice in one object")
            out[key] = value
        return out

    return hook


def _read_text(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not a file")
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{p}: not UTF-8 text (offset {err.start})") from None


def _read_json(path: str) -> Any:
    p = Path(path)
    text = _read_text(p)
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys(p))
    except json.JSONDecodeError as err:
        raise DataError(f"{p}: invalid JSON at line {err.lineno} ({err.msg})") from None


def _check_hotpot_prediction(path: str, prediction: Any) -> None:
    """Types of a HotpotQA prediction file; a wrong one would silently score 0."""
    if not isinstance(prediction, dict) or not ({"answer", "sp"} & set(prediction)):
        raise DataError(f"{path}: expected an object with 'answer' and/or 'sp'")
    for key in ("answer", "sp"):
        if not isinstance(prediction.get(key, {}), dict):
            raise DataError(f"{path}: '{key}' must map question ids to predictions")
    for qid, answer in prediction.get("answer", {}).items():
        if not isinstance(answer, str):
            raise DataError(f"{path}: answer[{qid!r}] must be a string, got {answer!r}")
    for qid, facts in prediction.get("sp", {}).items():
        ok = isinstance(facts, list) and all(
            isinstance(f, list)
            and len(f) == 2
            and isinstance(f[0], str)
            and isinstance(f[1], int)
            and not isinstance(f[1], bool)
            for f in facts
        )
        if not ok:
            raise DataError(f"{path}: sp[{qid!r}] must be a list of [title, sentence index] pairs")


def _check_ids(what: str, predicted: set[str], gold: list[str], pred_path: str) -> None:
    """Refuse predictions that match no gold id; warn with counts where only some match
    (the official scripts count an unanswered question 0 and ignore extra ids)."""
    gold_set = set(gold)
    matched = predicted & gold_set
    if predicted and not matched:
        raise DataError(
            f"{pred_path}: none of the {len(predicted)} predicted {what} ids is in the gold file "
            f"(e.g. {sorted(predicted)[0]!r}; gold ids look like {gold[0]!r})"
        )
    if not predicted:
        raise DataError(f"{pred_path}: no predictions")
    extra = len(predicted - gold_set)
    missing = len(gold_set - predicted)
    if extra:
        log.warning(
            "%s: %d predicted %s id(s) are not in the gold file (ignored)", pred_path, extra, what
        )
    if missing:
        log.warning(
            "%s: %d of %d gold question(s) have no %s prediction (scored 0, as the official "
            "script does)",
            pred_path,
            missing,
            len(gold_set),
            what,
        )


def _duplicate(ids: list[str]) -> str | None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


def score_hotpotqa(args) -> int:
    from memllm.data.hotpotqa import load_hotpot_file
    from memllm.data.hotpotqa_metric import hotpot_evaluate

    prediction = _read_json(args.predictions)
    _check_hotpot_prediction(args.predictions, prediction)
    gold = load_hotpot_file(args.gold)
    if not gold:
        raise DataError(f"{args.gold}: no gold records")
    gold_ids = [str(dp["_id"]) for dp in gold]
    dup = _duplicate(gold_ids)
    if dup is not None:
        raise DataError(f"{args.gold}: question id {dup!r} appears twice")
    for key in ("answer", "sp"):
        if key in prediction:
            _check_ids(key, set(prediction[key]), gold_ids, args.predictions)
    _print_json(hotpot_evaluate(prediction, gold))
    return 0


def score_babilong(args) -> int:
    from memllm.data.babilong_metric import (
        babilong_score,
        infer_babilong_task,
        read_babilong_predictions,
    )

    task = args.task or infer_babilong_task(args.predictions)
    if task is None:
        raise DataError(f"{args.predictions}: cannot tell the task from the name; pass --task qaN")
    rows = read_babilong_predictions(args.predictions)
    if not rows:
        raise DataError(f"{args.predictions}: no prediction rows (only a header?)")
    result = babilong_score(
        task,
        [r["target"] for r in rows],
        [r["output"] for r in rows],
        [r["question"] for r in rows],
    )
    result["checker"] = "BabiLong compare_answers (babilong/metrics.py)"
    _print_json(result)
    return 0


def _read_zsre_predictions(path: str, ids: list[str]) -> dict[str, str]:
    p = Path(path)
    text = _read_text(p)
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys(p))
    except json.JSONDecodeError as err:
        if err.msg != "Extra data":
            raise DataError(f"{p}: invalid JSON at line {err.lineno} ({err.msg})") from None
        data = []  # several JSON values: JSON lines
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    data.append(json.loads(line, object_pairs_hook=_no_duplicate_keys(p)))
                except json.JSONDecodeError as line_err:
                    raise DataError(f"{p}: line {n}: invalid JSON ({line_err.msg})") from None
    if isinstance(data, dict):
        for key, value in data.items():
            if not isinstance(value, str):
                raise DataError(f"{p}: the prediction of {key!r} must be a string, got {value!r}")
        return dict(data)
    if not isinstance(data, list):
        raise DataError(
            f"{p}: expected {{id: text}}, a list of texts, or JSON lines {{id, output}}"
        )
    if data and all(isinstance(x, str) for x in data):
        if len(data) != len(ids):
            raise DataError(f"{p}: {len(data)} outputs for {len(ids)} gold records")
        return dict(zip(ids, data, strict=True))
    out: dict[str, str] = {}
    for i, row in enumerate(data):
        if not (isinstance(row, dict) and "id" in row and isinstance(row.get("output"), str)):
            raise DataError(f"{p}: record {i}: expected {{id, output}} with a string output")
        key = str(row["id"])
        if key in out:
            raise DataError(f"{p}: record {i}: id {key!r} appears twice")
        out[key] = row["output"]
    return out


def score_zsre(args) -> int:
    from memllm.data.zsre import ZsREOptions, ZsRETask, teacher_forced_metrics
    from memllm.data.zsre_metric import ZSRE_DEFINITIONS, mean

    if not args.predictions and not args.model:
        raise DataError("give --predictions (exact match) and/or --model (teacher-forced)")
    task = ZsRETask(ZsREOptions(test_file=args.gold, num_test=args.limit, template=args.template))
    examples = task.examples("test")
    if not examples:
        raise DataError(f"{args.gold}: no gold records")
    result: dict[str, Any] = {"n": len(examples)}
    per: dict[str, list[float]] = {}
    if args.predictions:
        ids = [ex.meta["id"] for ex in examples]
        dup = _duplicate(ids)
        if dup is not None:
            raise DataError(f"{args.gold}: record id {dup!r} appears twice")
        preds = _read_zsre_predictions(args.predictions, ids)
        _check_ids("answer", set(preds), ids, args.predictions)
        missing = sum(i not in preds for i in ids)
        outputs = [preds.get(i, "") for i in ids]  # a missing prediction counts 0
        per.update(task.score(examples, outputs))
        result["missing_predictions"] = missing
    if args.model:
        from memllm.core.backbone import load_backbone

        model, tokenizer = load_backbone(args.model)
        per.update(teacher_forced_metrics(model, tokenizer, examples, batch_size=args.batch_size))
        result["model"] = args.model
    for key, values in per.items():
        finite = [v for v in values if v == v]  # nan: the record has no such question
        result[key] = mean(finite) if finite else None  # None: no record has one (not NaN)
        if len(finite) != len(values):
            result[f"{key}_n"] = len(finite)
    result["definitions"] = {k: ZSRE_DEFINITIONS[k] for k in per if k in ZSRE_DEFINITIONS}
    _print_json(result)
    return 0


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def data_fetch(args) -> int:
    from memllm.data.distractors import fetch_austen, fetch_kjv

    if args.source == "austen":
        folder = fetch_austen(deb=args.deb, force=args.force)
    else:
        folder = fetch_kjv(deb=args.deb, text_deb=args.text_deb, force=args.force)
    files = sorted(p for p in folder.glob("*.txt") if p.name != "SOURCE.txt")
    chars = sum(p.stat().st_size for p in files)
    print(f"{args.source}: {len(files)} texts, {chars:,} bytes in {folder}")
    return 0


def _split_list(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v for item in values for v in item.split(",") if v]


def _task_options(args, *, limit: int | None = None) -> dict[str, Any]:
    from memllm.core.config import apply_overrides

    options: dict[str, Any] = {}
    if args.task == "babilong":
        if args.tasks:
            options["tasks"] = _split_list(args.tasks)
        if args.lengths:
            options["lengths"] = _split_list(args.lengths)
    elif args.task == "recall" and args.lengths and not args.tasks:
        options["lengths"] = _split_list(args.lengths)
    elif args.tasks or args.lengths:
        raise DataError("--tasks and --lengths are BabiLong options")
    if limit is not None and args.task != "corpus":
        key = {"train": "num_train", "validation": "num_validation", "test": "num_test"}
        options[key[args.split]] = limit
    # dotted keys reach nested options: --set source.path=data.jsonl (task qa)
    return apply_overrides(options, args.overrides)


def _build(args, *, limit: int | None = None):
    from memllm.data import build_task

    return build_task(args.task, _task_options(args, limit=limit))


def data_preview(args) -> int:
    from memllm.data.base import tokenizer_for

    task = _build(args, limit=args.n)
    examples = task.examples(args.split)[: args.n]
    name = args.tokenizer or getattr(task.options, "tokenizer", None) or "smollm2-135m"
    tokenizer = tokenizer_for(name)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    if not examples:
        print(f"{args.task}: no {args.split} examples")
        return 0
    for ex in examples:
        text = ex.meta["text"] if args.task == "corpus" else ex.prompt
        shown = text
        if args.max_chars and len(text) > args.max_chars:
            half = args.max_chars // 2
            shown = f"{text[:half]}\n[… {len(text) - 2 * half:,} characters …]\n{text[-half:]}"
        head = f"=== {ex.id} — prompt {count(text):,} tokens ({name})"
        if ex.target:
            head += f", target {ex.target!r} ({count(ex.target)} tokens)"
        print(head + " ===")
        print(shown)
        if args.task in ("babilong", "recall") and "facts" in ex.meta:
            print(
                f"--- {len(ex.meta['facts'])} facts at characters "
                f"{[s for s, _ in ex.meta['fact_spans']]} of a {ex.meta['context_tokens']:,}-token "
                f"context (target {ex.meta['target_context_tokens']:,}); supporting "
                f"{ex.meta['supporting']}"
            )
        elif args.task == "hotpotqa":
            print(f"--- supporting facts {ex.meta['supporting_facts']} ({ex.meta['type']})")
        elif args.task == "zsre":
            loc = f"{ex.meta['loc']!r} → {ex.meta['loc_ans']!r}"
            print(f"--- paraphrases {ex.meta['rephrase']}; locality {loc}")
        print()
    sys.stdout.flush()
    return 0


def data_export(args) -> int:
    task = _build(args)
    examples = task.examples(args.split)
    out = Path(args.output)
    if args.export_format == "hf":
        from memllm.data.hf_source import export_examples

        if out.exists() and not out.is_dir():
            raise DataError(f"{out}: exists and is not a folder (--format hf writes a folder)")
        export_examples(examples, out)
        print(f"wrote {len(examples)} {args.split} examples to {out} (datasets.load_from_disk)")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.task == "hotpotqa":
        records = task.records(args.split)
        payload: Any = [{k: v for k, v in r.items() if k != "index"} for r in records]
    elif args.task == "zsre":
        payload = [
            {
                "id": r["id"],
                "subject": r["subject"],
                "src": r["question"],
                "pred": "",
                "rephrase": r["rephrase"][0] if r["rephrase"] else "",
                "rephrases": r["rephrase"],
                "alt": r["alt"],
                "answers": r["answers"],
                "loc": r["loc"],
                "loc_ans": r["loc_ans"],
                "cond": f"{r['answers'][0]} >> {r['alt']} || {r['question']}",
                "relation": r["relation"],
            }
            for r in task.records(args.split)
        ]
    elif args.task in ("babilong", "recall"):
        payload = [
            {
                "id": ex.id,
                "task": ex.meta["task"],
                "length": ex.meta["length"],
                "input": _babilong_context(ex),
                "question": ex.meta["question"],
                "target": ex.meta["answer"],
            }
            for ex in examples
        ]
    else:
        with out.open("w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps({"text": ex.meta["text"]}, ensure_ascii=False) + "\n")
        print(f"wrote {len(examples)} {args.split} documents to {out}")
        return 0
    out.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(payload)} {args.split} records to {out}")
    return 0


def _babilong_context(ex) -> str:
    prompt = ex.prompt
    start = prompt.find("<context>\n")
    end = prompt.rfind("\n</context>")
    if start >= 0 and end > start:
        return prompt[start + len("<context>\n") : end]
    return prompt.rsplit("\n\nQuestion:", 1)[0]


def data_tasks(args) -> int:
    from memllm.data import TASKS

    for spec in TASKS.values():
        print(f"{spec.name:10s} {spec.summary}")
    return 0
