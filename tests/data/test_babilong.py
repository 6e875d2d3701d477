"""bAbI parsing (the real archive), the BabiLong builder, layouts, and the offline books."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from memllm.cli import main
from memllm.data import build_task
from memllm.data.babi import find_babi, load_babi, parse_babi
from memllm.data.babilong import context_budget, parse_length
from memllm.data.babilong_prompts import OFFICIAL_PROMPTS, format_official
from memllm.data.distractors import (
    AUSTEN_RDATA,
    AUSTEN_TITLES,
    extract_deb,
    fetch_austen,
    lines_to_paragraphs,
    load_documents,
    split_sentences,
)
from memllm.data.rdata import read_lazyload_db, unserialize
from memllm.errors import ConfigError, DataError

FIXTURES = Path(__file__).parents[1] / "fixtures"
BOOKS = str(FIXTURES / "books")

try:
    BABI = find_babi()
except DataError:
    BABI = None
needs_babi = pytest.mark.skipif(BABI is None, reason="bAbI data (shared/data/babi) not found")


def small_babilong(**overrides):
    options = {
        "tasks": ["qa1", "qa2"],
        "lengths": ["2k"],
        "num_train": 3,
        "num_validation": 2,
        "num_test": 3,
        "distractor": BOOKS,
        "tokenizer": "tiny-llama",  # byte-level: one token per byte
    }
    options.update(overrides)
    return build_task("babilong", options)


# -- bAbI --------------------------------------------------------------------------------------


@needs_babi
def test_babi_archive_counts():
    for n in range(1, 21):
        test = load_babi(f"qa{n}", "test")
        assert len(test) == 1000, n
        assert len(load_babi(f"qa{n}", "train")) == 1000, n
        for s in test[:50]:
            assert s.facts and s.question.endswith("?") and s.answer
            assert all(0 <= i < len(s.facts) for i in s.supporting)
    assert len(load_babi("qa1", "train", lang="en-10k")) == 10000
    with pytest.raises(DataError, match=r"en-10k/qa3_three-supporting-facts_train\.txt"):
        load_babi("qa3", "train", lang="en-10k")


@needs_babi
def test_babi_first_sample_of_qa2():
    first = load_babi("qa2", "test")[0]
    assert first.facts == (
        "Mary got the milk there.",
        "John moved to the bedroom.",
        "Sandra went back to the kitchen.",
        "Mary travelled to the hallway.",
    )
    assert (first.question, first.answer, first.supporting) == (
        "Where is the milk?",
        "hallway",
        (0, 3),
    )


def test_babi_parser_drops_earlier_questions_and_rejects_garbage():
    text = (
        "1 A went home.\n2 Where is A? \thome\t1\n3 B went out.\n4 Where is B?\tout\t3\n1 C sat.\n"
    )
    samples = parse_babi(text, "qa1", "x.txt")
    assert [s.facts for s in samples] == [("A went home.",), ("A went home.", "B went out.")]
    assert samples[1].supporting == (1,)
    with pytest.raises(DataError, match=r"bad.txt:2: expected 'ID text'"):
        parse_babi("1 A went home.\nno id here\n", "qa1", "bad.txt")
    with pytest.raises(DataError, match=r"bad.txt:2: supporting fact IDs"):
        parse_babi("1 A went home.\n2 Where?\thome\t7\n", "qa1", "bad.txt")


# -- lengths and prompts ------------------------------------------------------------------


def test_lengths():
    assert [parse_length(x) for x in ("0k", "1k", "4k", "128k", "1M", "1.5k", "3000")] == [
        0,
        1024,
        4096,
        131072,
        1048576,
        1536,
        3000,
    ]
    assert context_budget("4k") == 4096 - 300
    assert context_budget("0k") == 0
    with pytest.raises(DataError):
        parse_length("4q")


def test_official_prompt_format():
    bare = format_official(
        "qa1",
        " facts here ",
        "Where is John?",
        instruction=False,
        examples=False,
        post_prompt=False,
    )
    assert bare == "<context>\nfacts here\n</context>\n\nQuestion: Where is John?"
    full = format_official("qa1", "ctx", "Where is John?")
    parts = OFFICIAL_PROMPTS["qa1"]
    assert full.startswith(parts["instruction"] + "\n\n" + parts["examples"] + "\n\n")
    assert "’person’ is ’location’" in full
    assert set(OFFICIAL_PROMPTS) == {f"qa{i}" for i in range(1, 21)}


# -- the builder -------------------------------------------------------------------------


@needs_babi
def test_builder_facts_in_order_length_and_answer():
    task = small_babilong()
    for split in ("test", "train", "validation"):
        examples = task.examples(split)
        assert len(examples) == {"test": 3, "train": 3, "validation": 2}[split] * 2
        for ex in examples:
            meta = ex.meta
            context = ex.prompt.split("<context>\n", 1)[1].split("\n</context>", 1)[0]
            # every fact appears, intact and in order
            starts = [s for s, _ in meta["fact_spans"]]
            assert starts == sorted(starts)
            assert [context[s:e] for s, e in meta["fact_spans"]] == meta["facts"]
            # the length in tokens is within 2% of the target
            target = context_budget("2k")
            assert meta["target_context_tokens"] == target
            assert abs(meta["context_tokens"] - target) <= 0.02 * target
            assert len(context.encode()) == meta["context_tokens"]  # byte tokenizer
            # question and answer intact, the prompt ends where the answer begins
            assert ex.prompt.endswith(f"Question: {meta['question']}\nAnswer:")
            assert ex.target == " " + meta["answer"]
            assert meta["group"] == f"{meta['task']}/2k"


@needs_babi
def test_builder_is_reproducible_and_seeded():
    a = [ex.prompt for ex in small_babilong().examples("test")]
    b = [ex.prompt for ex in small_babilong().examples("test")]
    c = [ex.prompt for ex in small_babilong(seed=7).examples("test")]
    assert a == b
    assert a != c


@needs_babi
def test_splits_come_from_the_right_files():
    task = small_babilong(lengths=["0k"], num_train=20, num_validation=10, num_test=5)
    sources = {s: {ex.meta["babi_source"] for ex in task.examples(s)} for s in SPLITS}
    assert all("_test.txt" in src for src in sources["test"])
    for split in ("train", "validation"):
        # en-10k train files (qa1, qa2 have them), never a test file
        assert all("en-10k/" in src and "_train.txt" in src for src in sources[split])
    assert not sources["train"] & sources["validation"]
    ex = task.examples("test")[0]
    assert ex.meta["context_tokens"] == len(" ".join(ex.meta["facts"]).encode())  # 0k: facts


SPLITS = ("train", "validation", "test")


@needs_babi
def test_distractor_regions_differ_between_train_and_test():
    task = small_babilong()
    train, test = task.pool("train"), task.pool("test")
    assert not set(train.sentences) & set(test.sentences)


@needs_babi
def test_plain_prompt_and_scoring():
    task = small_babilong(prompt="plain", lengths=["0k"], answer_prefix="\nA:")
    ex = task.examples("test")[0]
    assert ex.prompt == " ".join(ex.meta["facts"]) + f"\n\nQuestion: {ex.meta['question']}\nA:"
    right = f"The {ex.meta['answer']}."
    scores = task.score(task.examples("test")[:2], [right, "no idea"])
    assert scores == {"accuracy": [1.0, 0.0]}


def test_options_are_strict():
    with pytest.raises(ConfigError, match="unknown key lenghts"):
        build_task("babilong", {"lenghts": ["1k"]}, source_file="run.yaml")
    with pytest.raises(ConfigError, match=r"run.yaml: babilong options: tasks\[1\]"):
        build_task("babilong", {"tasks": ["qa1", "qa21"]}, source_file="run.yaml")


# -- published layouts ---------------------------------------------------------------------


def test_local_layout_and_malformed_records(tmp_path):
    task = build_task(
        "babilong",
        {"source": str(FIXTURES / "babilong"), "lengths": ["0k"], "num_test": 2, "prompt": "plain"},
    )
    examples = task.examples("test")
    assert [ex.meta["answer"] for ex in examples] == ["bathroom", "kitchen"]
    assert examples[0].prompt.startswith("Mary moved to the bathroom.")
    bad = tmp_path / "data" / "qa1"
    bad.mkdir(parents=True)
    (bad / "0k.json").write_text(json.dumps([{"input": "x", "question": "q", "target": "a"}, {}]))
    task = build_task("babilong", {"source": str(tmp_path), "lengths": ["0k"]})
    with pytest.raises(DataError, match=r"0k.json: record 1: missing or non-text field 'input'"):
        task.examples("test")
    task = build_task("babilong", {"source": str(tmp_path), "lengths": ["1k"]})
    with pytest.raises(DataError, match="no file for qa1 at 1k"):
        task.examples("test")


# -- distractor text: sentences, R data, the .deb fetch --------------------------------------


def test_split_sentences_protects_abbreviations():
    text = 'Mr. Darcy bowed. "Indeed!" said Mrs. Bennet. It was 3 p.m. when J. Smith came. Done'
    assert split_sentences(text) == [
        "Mr. Darcy bowed.",
        '"Indeed!" said Mrs. Bennet.',
        "It was 3 p.m. when J. Smith came.",
        "Done",
    ]


def test_lines_to_paragraphs_drops_headings():
    lines = ["EMMA", "", "CHAPTER I", "", "It was a _fine_ day,", "said she.", "", "Chapter 2", ""]
    assert lines_to_paragraphs(lines) == ["It was a fine day, said she."]


def _int(v: int) -> bytes:
    return struct.pack(">i", v)


def _chars(s: str) -> bytes:
    raw = s.encode()
    return _int(9 | (8 << 12)) + _int(len(raw)) + raw  # CHARSXP, UTF-8


def _strsxp(items: list[str]) -> bytes:
    return _int(16) + _int(len(items)) + b"".join(_chars(s) for s in items)


def _named_list(items: dict[str, bytes]) -> bytes:
    body = _int(19 | (1 << 9)) + _int(len(items)) + b"".join(items.values())
    names = _int(2 | (1 << 10)) + _int(1) + _chars("names") + _strsxp(list(items)) + _int(254)
    return body + names


def _serialize(obj: bytes) -> bytes:
    return b"X\n" + _int(3) + _int(0x040201) + _int(0x030500) + _int(5) + b"UTF-8" + obj


def _lazyload_db(objects: dict[str, list[str]]) -> tuple[bytes, bytes]:
    rdb, where = b"", {}
    for name, lines in objects.items():
        data = _serialize(_strsxp(lines))
        record = struct.pack(">I", len(data)) + zlib.compress(data)
        where[name] = _int(13) + _int(2) + _int(len(rdb)) + _int(len(record))
        rdb += record
    index = _named_list(
        {
            "variables": _named_list(where),
            "references": _int(19) + _int(0),
            "compressed": _int(10) + _int(1) + _int(1),
        }
    )
    return rdb, gzip.compress(_serialize(index))


def test_rdata_reader(tmp_path):
    rdb, rdx = _lazyload_db({"emma": ["EMMA", "", "Emma Woodhouse, handsome.", "é"]})
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(rdx)
    objects = read_lazyload_db(tmp_path / "Rdata")
    assert objects["emma"].values == ["EMMA", "", "Emma Woodhouse, handsome.", "é"]
    with pytest.raises(DataError, match="binary XDR"):
        unserialize(b"A\n1\n", "x")


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def _fake_austen_deb(path: Path) -> Path:
    lines = ["", "CHAPTER I", "", "Mr. Knightley read {} aloud.", "It was long.", ""]
    lines.append("Miss Bates laughed.")
    books = {
        name: [title.upper()] + [line.format(title) for line in lines]
        for name, title in AUSTEN_TITLES.items()
    }
    rdb, rdx = _lazyload_db(books)
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for suffix, blob in ((".rdb", rdb), (".rdx", rdx)):
            info = tarfile.TarInfo("./" + AUSTEN_RDATA + suffix)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    path.write_bytes(_ar({"debian-binary": b"2.0\n", "data.tar.xz": data.getvalue()}))
    return path


def test_fetch_austen_from_a_deb_offline(tmp_path):
    deb = _fake_austen_deb(tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb")
    extract_deb(deb, tmp_path / "x")
    assert (tmp_path / "x" / (AUSTEN_RDATA + ".rdb")).is_file()
    folder = fetch_austen(deb=deb)
    assert folder.parent.parent.name == "memllm-cache"  # inside cache_dir()
    docs = load_documents("austen")
    assert [d.name for d in docs] == sorted(AUSTEN_TITLES)
    assert docs[0].paragraphs == (
        "Mr. Knightley read Emma aloud. It was long.",
        "Miss Bates laughed.",
    )


def test_missing_books_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("memllm.data.distractors.shutil.which", lambda name: None)  # no apt
    monkeypatch.setattr("memllm.data.distractors.AUSTEN_RDATA", "no/such/janeaustenr/Rdata")
    with pytest.raises(DataError, match="memllm data fetch austen"):
        load_documents("austen")


@pytest.mark.slow
def test_fetch_austen_with_apt():
    """Opt-in (-m slow): the real fetch through apt-get download."""
    folder = fetch_austen(force=True)
    docs = load_documents(str(folder))
    assert len(docs) == 6
    assert sum(len(p) for d in docs for p in d.paragraphs) > 3_500_000


@needs_babi
def test_preview_command(capsys):
    argv = ["data", "preview", "babilong", "--tasks", "qa1", "--lengths", "1k", "-n", "1"]
    argv += ["--set", f"distractor={BOOKS}", "--set", "tokenizer=tiny-llama"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("=== babilong/qa1/1k/test/0")
    assert "Question: Where is" in out and "facts at characters" in out


def test_supporting_facts_in_window():
    from memllm.core.tiny import byte_tokenizer
    from memllm.data.babilong import supporting_facts_in_window
    from memllm.data.base import Example

    tok = byte_tokenizer()  # one token per byte: positions are easy to count
    facts = ["Mary went to the hall.", "John went to the garden.", "Mary went to the hall."]
    text = "Filler. " * 10 + " ".join(facts) + " Where is John? Answer:"
    ex = Example("x", text, " garden", {"facts": facts, "supporting": [1]})
    after_john = len(text) - text.index("John went")
    assert supporting_facts_in_window(text, ex, tok, after_john)
    assert not supporting_facts_in_window(text, ex, tok, after_john - 1)
    # the repeated fact is found after the earlier one, not at its first occurrence
    last = Example("y", text, " hall", {"facts": facts, "supporting": [2]})
    assert supporting_facts_in_window(text, last, tok, after_john - 10)
    assert supporting_facts_in_window(text, Example("z", text, "", {}), tok, 10) is None
