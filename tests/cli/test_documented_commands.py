"""Every ``memllm`` command in README.md's bash blocks runs, offline, on a tiny model.

The commands are parsed from the README itself, so the test fails when the docs drift: a new
documented command needs an entry in ``HOW`` (how to run it small, or why it is skipped), and an
entry whose command left the README fails too. Each command runs in-process through
``memllm.cli.main`` in one shared folder, in README order (``generate --checkpoint`` reads what
``train`` wrote), with the bundled model swapped for ``tiny-llama`` and sizes made tiny.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from memllm.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FIXTURES = ROOT / "tests" / "fixtures"
PREDICTIONS = ROOT.parent / "shared" / "data" / "babilong-predictions"
if not PREDICTIONS.is_dir():
    PREDICTIONS = ROOT.parents[1] / "shared" / "data" / "babilong-predictions"


def documented_commands() -> list[str]:
    """The ``memllm ...`` lines of the README's bash blocks, comments removed."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if re.match(r"(memllm|python -m memllm|accelerate launch .* -m memllm) ", line):
                commands.append(line)
    return commands


def _key(command: str) -> str:
    """What identifies a documented command in HOW: its words before the first option."""
    words = shlex.split(command)
    if words[0] == "accelerate":
        return "accelerate launch"
    words = words[words.index("memllm") + 1 :] if "memllm" in words else words
    head = []
    for word in words:
        if word[0] in "-[" or "=" in word or "/" in word or "." in word:
            break
        head.append(word)
    return " ".join(head)


def _babi_missing() -> str | None:
    from memllm.data.babi import find_babi
    from memllm.errors import DataError

    try:
        find_babi()
    except DataError:
        return "bAbI data (shared/data/babi) not found"
    return None


# -- how each documented command runs small ------------------------------------------------------
# Each adapter takes the README's argv and the working folder and returns the argv to run, or a
# string: the reason the command is skipped.


def _paths(argv: list[str]) -> list[str]:
    """Repository paths (configs/..., memllm/presets/...) as absolute ones: the run's cwd is
    the shared temporary folder."""
    return [str(ROOT / a) if (ROOT / a).is_file() and "/" in a else a for a in argv]


def _tiny_model(argv: list[str]) -> list[str]:
    if "--model" in argv:
        argv = list(argv)
        argv[argv.index("--model") + 1] = "tiny-llama"
        return argv
    return [*argv, "--model", "tiny-llama"]


# configs/debug.yaml is already tiny (tiny-llama); fewer steps and examples keep it to seconds
SMALL_RUN = [
    "train.save_every=2",
    "eval.every=2",
    "data.num_train=8",
    "data.num_validation=4",
    "data.num_test=4",
    "log.tensorboard=false",
]


def _train(argv, work):
    argv = [a.replace("train.max_steps=20", "train.max_steps=2") for a in argv]
    return _babi_missing() or [*_paths(argv), *SMALL_RUN]


def _resume(argv, work):
    at = argv.index("--resume")  # key=value overrides go before the flag
    return _babi_missing() or [*_paths(argv[:at]), "train.max_steps=2", *SMALL_RUN, *argv[at:]]


def _generate_memory(argv, work):
    # the tiny byte tokenizer has no chat template: --chat would be refused (a one-line error)
    argv = [a for a in argv if a != "--chat"]
    return [*_tiny_model(_paths(argv)), "--max-new-tokens", "4"]


def _generate_checkpoint(argv, work):
    if not (work / "runs" / "debug" / "final").is_dir():
        return "needs the checkpoint of the `memllm train` example, which did not run"
    (work / "long.txt").write_text("Mary went to the kitchen. " * 20 + "Where is Mary?")
    argv = [("64" if a == "512" else a) for a in argv]  # tiny-llama's window is 256 tokens
    return [*_tiny_model(argv), "--max-new-tokens", "4"]


def _preview(argv, work):
    books = FIXTURES / "books"
    more = ["-n", "1", "--set", f"distractor={books}", "--set", "tokenizer=tiny-llama"]
    return _babi_missing() or [*argv, *more]


def _score_babilong(argv, work):
    dump = PREDICTIONS / "gpt2_qa1_0k.csv"
    if not dump.is_file():
        return "BabiLong prediction dumps (shared/data/babilong-predictions) not found"
    return [str(dump) if a == "preds.csv" else a for a in argv]


def _score_hotpotqa(argv, work):
    gold = FIXTURES / "hotpot_hf.jsonl"
    rows = [json.loads(line) for line in gold.read_text().splitlines() if line.strip()]
    sp = {
        r["id"]: [list(f) for f in zip(*r["supporting_facts"].values(), strict=True)] for r in rows
    }
    pred = {"answer": {r["id"]: r["answer"] for r in rows}, "sp": sp}
    (work / "pred.json").write_text(json.dumps(pred))
    return [str(gold) if a == "hotpot_dev_distractor_v1.json" else a for a in argv]


def _export_hf(argv, work):
    try:
        import datasets  # noqa: F401 (the export needs memllm[hub])
    except ImportError:
        return "--format hf needs datasets (memllm[hub])"
    return [a if a != "num_test=10" else "num_test=2" for a in argv]


def _skip(reason: str) -> Callable:
    return lambda argv, work: reason


HOW: dict[str, Callable] = {
    "quickstart": _skip(
        "trains and evaluates on the bundled SmolLM2 for minutes (make quickstart)"
    ),
    "experiment": _skip("runs arms on the bundled SmolLM2 for minutes"),
    "ladder": _skip(
        "runs arms on the bundled SmolLM2 for hours (tests/evaluation/test_ladder.py runs the "
        "ladder on a tiny model)"
    ),
    "train": _train,  # both documented train lines; --resume is told apart below
    "config show": lambda argv, work: _paths(argv),
    "info": lambda argv, work: _tiny_model(_paths(argv)),
    "generate": None,  # --memory or --checkpoint, below
    "data fetch austen": _skip("downloads a Debian package (needs the network)"),
    "data preview babilong": _preview,
    "score babilong": _score_babilong,
    "score hotpotqa": _score_hotpotqa,
    "eval-harness": _skip(
        "runs lm-evaluation-harness on the bundled model (tests/evaluation/test_harness.py "
        "runs it on a tiny one)"
    ),
    "data export babilong": _export_hf,
    "accelerate launch": _skip("launches several processes (tests/training/test_distributed.py)"),
}


def _adapter(argv: list[str]) -> Callable:
    key = _key(shlex.join(argv))
    if key == "train" and "--resume" in argv:
        return _resume
    if key == "generate":
        return _generate_checkpoint if "--checkpoint" in argv else _generate_memory
    return HOW[key]


COMMANDS = documented_commands()


def test_every_documented_command_has_a_way_to_run():
    keys = {_key(c) for c in COMMANDS}
    unknown = sorted(keys - set(HOW))
    assert not unknown, f"README documents commands this test does not know: {unknown}"
    stale = sorted(set(HOW) - keys)
    assert not stale, f"commands no longer in the README: {stale}"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_command_runs(command, work, monkeypatch, capsys, one_thread):
    argv = shlex.split(command)
    if argv[0] == "python":
        argv = argv[2:]  # python -m memllm ...
    argv = argv[1:] if argv[0] == "memllm" else argv
    adapter = _adapter(argv)
    run = adapter(argv, work)
    if isinstance(run, str):
        pytest.skip(run)
    monkeypatch.chdir(work)
    code = main(run)
    err = capsys.readouterr().err
    assert code == 0, f"memllm {shlex.join(run)} exited {code}: {err.strip()[-500:]}"
