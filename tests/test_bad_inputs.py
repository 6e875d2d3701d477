"""A fuzz table of bad inputs: each one ends as one clear line, never a traceback or a quiet result.

Every CLI case runs ``memllm.cli.main(argv)`` in-process (fast) in a fresh folder that holds the
case's files, and asserts: exit code 2, exactly one ``memllm <cmd>: error: ...`` line on stderr
that contains the expected words, no traceback, and no pre-existing file changed or removed.
Python API cases assert the documented exception and message.

To add a case, append a row to a table: ``Cli(id, argv, files, expect)`` (``files`` maps a name
in the case's folder to its text or bytes) or ``Api(id, call, exception, expect)``.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from memllm.cli import main
from memllm.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
DEBUG = (ROOT / "configs" / "debug.yaml").read_text()
HOTPOT_GOLD = (FIXTURES / "hotpot_raw.json").read_text()
ZSRE_GOLD = (FIXTURES / "zsre_mend.json").read_text()
NOT_UTF8 = b"model:\n  name: caf\xe9\n\xff\xfe\n"

# A "billion laughs" document: nine levels of nine aliases, 9**9 values when expanded.
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)

GOOD_ANSWER = {"q-bridge-1": "Portugal", "q-compare-2": "yes", "q-bridge-3": "x"}


def js(value: Any) -> str:
    return json.dumps(value)


def hotpot_pred(answer: Any = None, sp: Any = None) -> str:
    out: dict[str, Any] = {}
    if answer is not None:
        out["answer"] = answer
    if sp is not None:
        out["sp"] = sp
    return js(out)


@dataclass
class Cli:
    """One command line that must fail with exit 2 and one error line containing ``expect``."""

    id: str
    argv: list[str]
    files: dict[str, str | bytes] | Callable[[], dict[str, str | bytes]] = field(
        default_factory=dict
    )
    expect: str = ""


@dataclass
class Api:
    """One Python call that must raise ``exception`` with ``expect`` in its message."""

    id: str
    call: Callable[[], Any]
    exception: type[BaseException]
    expect: str = ""


SHOW = ["config", "show", "run.yaml"]  # a run config check that needs no model
RUN = {"run.yaml": DEBUG}


def show(*overrides: str) -> list[str]:
    return [*SHOW, *overrides]


# --------------------------------------------------------------------------------------------
# config files
# --------------------------------------------------------------------------------------------

CONFIG_FILES = [
    Cli("config-missing", show(), {}, "config file not found"),
    Cli("config-is-folder", ["config", "show", "sub"], {"sub/x.txt": "x"}, "is a folder"),
    Cli("config-not-utf8", show(), {"run.yaml": NOT_UTF8}, "not UTF-8"),
    Cli("config-empty", show(), {"run.yaml": ""}, "empty"),
    Cli("config-only-comments", show(), {"run.yaml": "# nothing\n# here\n"}, "empty"),
    Cli("config-top-list", show(), {"run.yaml": "- a\n- b\n"}, "mapping"),
    Cli("config-top-scalar", show(), {"run.yaml": "hello\n"}, "mapping"),
    Cli("config-syntax", show(), {"run.yaml": "model: [a, b\n"}, "invalid YAML"),
    Cli("config-tab-indent", show(), {"run.yaml": "model:\n\tname: x\n"}, "invalid YAML"),
    Cli("config-dup-top", show(), {"run.yaml": DEBUG + "seed: 3\n"}, "duplicate key 'seed'"),
    Cli(
        "config-dup-nested",
        show(),
        {"run.yaml": DEBUG.replace("  lr: 3.0e-3\n", "  lr: 3.0e-3\n  lr: 1.0\n")},
        "duplicate key 'lr'",
    ),
    Cli("config-alias-bomb", show(), {"run.yaml": ALIAS_BOMB}, "aliases"),
    Cli("config-undefined-alias", show(), {"run.yaml": "a: *nothing\n"}, "invalid YAML"),
    Cli("config-unknown-key", show(), {"run.yaml": DEBUG + "colour: red\n"}, "unknown key colour"),
    Cli(
        "config-unknown-nested",
        show(),
        {"run.yaml": DEBUG.replace("  lr: 3.0e-3\n", "  learning_rate: 3.0e-3\n")},
        "train.learning_rate",
    ),
    Cli("config-binary-garbage", show(), {"run.yaml": bytes(range(256))}, "not UTF-8"),
    Cli("config-nul-bytes", show(), {"run.yaml": "seed: 1\x00\n"}, "invalid YAML"),
]

# --------------------------------------------------------------------------------------------
# run-config values (through key=value overrides of the debug config)
# --------------------------------------------------------------------------------------------

VALUES = [
    ("train.lr=abc", "train.lr"),
    ("train.lr=.inf", "train.lr: must be a finite"),
    ("train.lr=.nan", "train.lr: must be a finite"),
    ("train.lr=-1", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("train.lr=[1, 2]", "train.lr"),
    ("seed=-1", "seed"),
    ("seed=4294967296", "seed"),
    ("seed=x", "seed"),
    ("seed=1.5", "seed"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps"),
    ("train.epochs=0", "train.epochs"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.max_minutes=.inf", "train.max_minutes"),
    ("train.max_minutes=-2", "train.max_minutes"),
    ("train.weight_decay=-1", "train.weight_decay"),
    ("train.betas=[0.9]", "train.betas"),
    ("train.betas=[1.0, 0.5]", "train.betas"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.max_grad_norm=0", "train.max_grad_norm"),
    ("train.max_grad_norm=.inf", "train.max_grad_norm"),
    ("train.segment_length=0", "train.segment_length"),
    ("train.segment_length=-1", "train.segment_length"),
    ("train.bptt_segments=0", "train.bptt_segments"),
    ("train.max_length=1", "train.max_length"),
    ("train.save_every=-1", "train.save_every"),
    ("train.keep_last=0", "train.keep_last"),
    ("train.scheduler=bogus", "train.scheduler"),
    ("train.mixed_precision=int8", "train.mixed_precision"),
    ("train.supporting_facts_weight=1", "supporting_facts_weight"),
    ("eval.every=-1", "eval.every"),
    ("eval.max_examples=0", "eval.max_examples"),
    ("eval.patience=0", "eval.patience"),
    ("eval.min_delta=-1", "eval.min_delta"),
    ("eval.min_delta=.nan", "eval.min_delta"),
    ("eval.split=train", "eval.split"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("log.every=0", "log.every"),
    ("log.wandb=3", "wandb"),
    ("log.wandb.colour=red", "log.wandb.colour"),
    ("memory=5", "memory"),
    ("memory.type=bogus", "memory"),
    ("memory.num_slots=0", "memory.num_slots"),
    ("memory.num_slots=1000000000000", "memory.num_slots"),
    ("memory.memory_dim=1000000", "memory.memory_dim"),
    ("memory.num_heads=3", "memory.memory_dim"),
    ("memory.dropout=1.0", "memory.dropout"),
    ("memory.layer_ids=[]", "memory.layer_ids"),
    ("memory.layer_ids=[0, 0]", "memory.layer_ids"),
    ("memory.sparsity_weight=-1", "memory.sparsity_weight"),
    ("memory.entropy_weight=.inf", "memory.entropy_weight"),
    ("memory=null", "nothing to train"),
    ("data={}", "data.task"),
    ("data.num_train=0", "data.num_train"),
    ("output_dir=", "output_dir"),
    ("model.dtype=int8", "model.dtype"),
    ("model.name=3", "model.name"),
    ("lora=7", "lora"),
    ("no-equals-sign", "expected key=value"),
    ("=3", "empty key"),
    ("train..lr=3", "empty key"),
    ("seed.x=1", "seed"),
    ("train.lr=[&a [1,1,1,1,1,1,1,1,1,1], " + ", ".join(["*a"] * 9) + "]", "train.lr"),
]

NEURAL = {"run.yaml": DEBUG.replace("  type: latent\n", "  type: neural\n").split("  num_slots")[0]
          + "lora: null\n" + DEBUG.split("lora: null\n", 1)[1]}  # fmt: skip
NEURAL_VALUES = [
    ("memory.chunk_size=0", "memory.chunk_size"),
    ("memory.mlp_depth=0", "memory.mlp_depth"),
    ("memory.mlp_depth=1000", "memory.mlp_depth"),
    ("memory.mlp_expansion_factor=1e6", "memory.mlp_expansion_factor"),
    ("memory.forget_bias=.inf", "memory.forget_bias"),
    ("memory.memory_dim=10000000", "memory.memory_dim"),
]

CONFIG_VALUES = [Cli(f"value {o}", show(o), RUN, e) for o, e in VALUES] + [
    Cli(f"neural {o}", show(o), NEURAL, e) for o, e in NEURAL_VALUES
]

# Checks that need the model (tiny-llama: 2 layers, a 256-token context).
TRAIN = ["train", "--config", "run.yaml", "output_dir=out", "log.tensorboard=false"]
CONFIG_MODEL = [
    Cli("train-segment-past-context", [*TRAIN, "train.segment_length=1000"], RUN, "context"),
    Cli("train-layer-past-depth", [*TRAIN, "memory.layer_ids=[5]"], RUN, "memory.layer_ids"),
    Cli("train-config-missing", ["train", "--config", "nope.yaml"], {}, "not found"),
    Cli(
        "train-output-under-file",
        [*TRAIN[:-2], "output_dir=blocker/out"],
        {**RUN, "blocker": "x"},
        "not a folder (blocker/out)",
    ),
    Cli(
        "train-output-is-file",
        [*TRAIN[:-2], "output_dir=blocker"],
        {**RUN, "blocker": "x"},
        "is a file, not a folder (blocker)",
    ),
]

# --------------------------------------------------------------------------------------------
# command-line arguments
# --------------------------------------------------------------------------------------------

GEN = ["generate", "--model", "tiny-llama", "--prompt", "hi"]
MEM = "num_slots: 4\nmemory_dim: 16\nnum_heads: 2\n"
CLI_ARGS = [
    Cli("max-new-tokens-0", [*GEN, "--max-new-tokens", "0"], {}, "--max-new-tokens"),
    Cli("max-new-tokens-neg", [*GEN, "--max-new-tokens", "-1"], {}, "--max-new-tokens"),
    Cli("max-new-tokens-text", [*GEN, "--max-new-tokens", "many"], {}, "--max-new-tokens"),
    Cli("max-new-tokens-float", [*GEN, "--max-new-tokens", "2.5"], {}, "--max-new-tokens"),
    Cli("max-new-tokens-huge", [*GEN, "--max-new-tokens", "100000"], {}, "context of 256"),
    Cli("max-new-tokens-window", [*GEN, "--max-new-tokens", "256"], {}, "context of 256"),
    Cli("segment-length-0", [*GEN, "--segment-length", "0"], {}, "--segment-length"),
    Cli("segment-length-neg", [*GEN, "--segment-length", "-1"], {}, "--segment-length"),
    Cli("segment-length-past-context", [*GEN, "--segment-length", "300"], {}, "context"),
    Cli("device-bogus", [*GEN, "--device", "bogus"], {}, "--device"),
    Cli("device-tpu", [*GEN, "--device", "tpu"], {}, "--device"),
    Cli("device-cuda-99", [*GEN, "--device", "cuda:99"], {}, "--device"),
    Cli("dtype-int8", [*GEN, "--dtype", "int8"], {}, "--dtype"),
    Cli("dtype-info-int8", ["info", "--model", "tiny-llama", "--dtype", "int8"], {}, "--dtype"),
    Cli("prompt-empty", [*GEN[:-1], ""], {}, "prompt is empty"),
    Cli("prompt-blank", [*GEN[:-1], "  \n "], {}, "prompt is empty"),
    Cli(
        "prompt-file-empty",
        [*GEN[:-2], "--prompt-file", "p.txt"],
        {"p.txt": ""},
        "prompt is empty",
    ),
    Cli("prompt-file-missing", [*GEN[:-2], "--prompt-file", "p.txt"], {}, "not found"),
    Cli("prompt-file-folder", [*GEN[:-2], "--prompt-file", "d"], {"d/x": "x"}, "p"),
    Cli(
        "prompt-file-not-utf8", [*GEN[:-2], "--prompt-file", "p.txt"], {"p.txt": NOT_UTF8}, "UTF-8"
    ),
    Cli("memory-file-missing", [*GEN, "--memory", "m.yaml"], {}, "not found"),
    Cli("memory-file-empty", [*GEN, "--memory", "m.yaml"], {"m.yaml": ""}, "empty"),
    Cli("memory-file-bad-key", [*GEN, "--memory", "m.yaml"], {"m.yaml": MEM + "x: 1\n"}, "x"),
    Cli("memory-file-dup-key", [*GEN, "--memory", "m.yaml"], {"m.yaml": MEM + MEM}, "duplicate"),
    Cli(
        "memory-file-slots-huge",
        ["info", "--model", "tiny-llama", "--memory", "m.yaml"],
        {"m.yaml": "num_slots: 100000000\nmemory_dim: 16\nnum_heads: 2\n"},
        "num_slots",
    ),
    Cli("unknown-command", ["frobnicate"], {}, "invalid choice"),
    Cli("unknown-flag", [*GEN, "--frob"], {}, "unrecognized"),
    Cli("zsre-limit-0", ["score", "zsre", "g.json", "--limit", "0"], {}, "--limit"),
    Cli("zsre-limit-neg", ["score", "zsre", "g.json", "--limit", "-1"], {}, "--limit"),
    Cli("zsre-batch-0", ["score", "zsre", "g.json", "--batch-size", "0"], {}, "--batch-size"),
    Cli("preview-n-0", ["data", "preview", "babilong", "-n", "0"], {}, "-n"),
    Cli("preview-max-chars-neg", ["data", "preview", "babilong", "--max-chars", "-5"], {}, "chars"),
    Cli("preview-split-bogus", ["data", "preview", "babilong", "--split", "dev"], {}, "--split"),
    Cli(
        "export-tasks-on-zsre",
        ["data", "export", "zsre", "o.json", "--tasks", "qa1"],
        {},
        "BabiLong",
    ),
    Cli("export-into-file", ["data", "export", "corpus", "f/o.jsonl"], {"f": "x"}, "folder (f)"),
    Cli("export-onto-folder", ["data", "export", "babilong", "d"], {"d/x": "x"}, "is a folder"),
]

# --------------------------------------------------------------------------------------------
# score files
# --------------------------------------------------------------------------------------------

HP = ["score", "hotpotqa", "p.json", "g.json"]
GOLD = {"g.json": HOTPOT_GOLD}
BL = ["score", "babilong", "p_qa1.csv"]
CSV_HEAD = "target,output,question\n"
ZS = ["score", "zsre", "g.json", "--predictions", "p.json"]
ZGOLD = {"g.json": ZSRE_GOLD}

SCORE_FILES = [
    Cli("hp-pred-missing", HP, GOLD, "p.json: file not found"),
    Cli("hp-pred-folder", HP, {**GOLD, "p.json/x": "x"}, "is a folder"),
    Cli("hp-pred-not-utf8", HP, {**GOLD, "p.json": NOT_UTF8}, "UTF-8"),
    Cli("hp-pred-bad-json", HP, {**GOLD, "p.json": "{"}, "invalid JSON"),
    Cli("hp-pred-list", HP, {**GOLD, "p.json": "[]"}, "'answer'"),
    Cli("hp-pred-no-parts", HP, {**GOLD, "p.json": "{}"}, "'answer'"),
    Cli("hp-answer-not-map", HP, {**GOLD, "p.json": js({"answer": ["x"]})}, "'answer' must map"),
    Cli("hp-answer-int", HP, {**GOLD, "p.json": hotpot_pred({"q-bridge-1": 3})}, "string"),
    Cli("hp-answer-null", HP, {**GOLD, "p.json": hotpot_pred({"q-bridge-1": None})}, "string"),
    Cli("hp-answer-list", HP, {**GOLD, "p.json": hotpot_pred({"q-bridge-1": ["a"]})}, "string"),
    Cli("hp-sp-not-list", HP, {**GOLD, "p.json": hotpot_pred(sp={"q-bridge-1": "x"})}, "sp["),
    Cli("hp-sp-short", HP, {**GOLD, "p.json": hotpot_pred(sp={"q-bridge-1": [["t"]]})}, "sp["),
    Cli(
        "hp-sp-index-text",
        HP,
        {**GOLD, "p.json": hotpot_pred(sp={"q-bridge-1": [["t", "0"]]})},
        "sp[",
    ),
    Cli(
        "hp-dup-pred-id",
        HP,
        {**GOLD, "p.json": '{"answer": {"q-bridge-1": "a", "q-bridge-1": "b"}}'},
        "appears twice",
    ),
    Cli("hp-no-id-matches", HP, {**GOLD, "p.json": hotpot_pred({"other": "x"})}, "none of the 1"),
    Cli("hp-sp-no-id-matches", HP, {**GOLD, "p.json": hotpot_pred(sp={"z": []})}, "none of"),
    Cli("hp-empty-answers", HP, {**GOLD, "p.json": hotpot_pred({})}, "no predictions"),
    Cli("hp-gold-empty", HP, {"g.json": "[]", "p.json": hotpot_pred(GOOD_ANSWER)}, "no gold"),
    Cli(
        "hp-gold-dup-id",
        HP,
        {
            "g.json": js(json.loads(HOTPOT_GOLD) + json.loads(HOTPOT_GOLD)[:1]),
            "p.json": hotpot_pred(GOOD_ANSWER),
        },
        "appears twice",
    ),
    Cli("hp-gold-missing", HP, {"p.json": hotpot_pred(GOOD_ANSWER)}, "g.json: file not found"),
    Cli("hp-gold-not-utf8", HP, {"g.json": NOT_UTF8, "p.json": hotpot_pred(GOOD_ANSWER)}, "UTF-8"),
    Cli(
        "hp-gold-bad-record", HP, {"g.json": "[1]", "p.json": hotpot_pred(GOOD_ANSWER)}, "record 0"
    ),
    Cli("bl-header-only", BL, {"p_qa1.csv": CSV_HEAD}, "no prediction rows"),
    Cli("bl-empty-file", BL, {"p_qa1.csv": ""}, "missing column"),
    Cli("bl-missing-column", BL, {"p_qa1.csv": "target,output\nx,y\n"}, "question"),
    Cli("bl-short-row", BL, {"p_qa1.csv": CSV_HEAD + "kitchen,kitchen\n"}, "fewer fields"),
    Cli("bl-long-row", BL, {"p_qa1.csv": CSV_HEAD + "kitchen,kitchen,q,extra\n"}, "more fields"),
    Cli("bl-no-target", BL, {"p_qa1.csv": CSV_HEAD + ",kitchen,q\n"}, "no target"),
    Cli("bl-not-utf8", BL, {"p_qa1.csv": CSV_HEAD.encode() + b"k\xe9,x,q\n"}, "UTF-8"),
    Cli("bl-unclosed-quote", BL, {"p_qa1.csv": CSV_HEAD + '"k,x,q\n'}, "fewer fields"),
    Cli("bl-unknown-task", [*BL, "--task", "qa99"], {"p_qa1.csv": CSV_HEAD + "a,b,c\n"}, "qa99"),
    Cli("bl-no-task-in-name", ["score", "babilong", "p.csv"], {"p.csv": CSV_HEAD}, "--task"),
    Cli("bl-missing-file", BL, {}, "file not found"),
    Cli("zs-no-mode", ["score", "zsre", "g.json"], ZGOLD, "--predictions"),
    Cli("zs-none-match", ZS, {**ZGOLD, "p.json": js({"zz": "x"})}, "none of the 1"),
    Cli("zs-pred-not-string", ZS, {**ZGOLD, "p.json": js({"0": 5})}, "string"),
    Cli(
        "zs-jsonl-dup-id",
        ZS,
        {**ZGOLD, "p.json": '{"id": 0, "output": "a"}\n{"id": 0, "output": "b"}\n'},
        "appears twice",
    ),
    Cli("zs-dup-key", ZS, {**ZGOLD, "p.json": '{"0": "a", "0": "b"}'}, "appears twice"),
    Cli("zs-list-length", ZS, {**ZGOLD, "p.json": js(["a"])}, "1 outputs for 3"),
    Cli("zs-empty-preds", ZS, {**ZGOLD, "p.json": "{}"}, "no predictions"),
    Cli("zs-pred-bad-json", ZS, {**ZGOLD, "p.json": "{'a': 1}"}, "invalid JSON"),
    Cli("zs-pred-not-utf8", ZS, {**ZGOLD, "p.json": NOT_UTF8}, "UTF-8"),
    Cli("zs-gold-empty", ZS, {"g.json": "[]", "p.json": "{}"}, "g.json"),
    Cli("zs-gold-not-utf8", ZS, {"g.json": NOT_UTF8, "p.json": "{}"}, "UTF-8"),
]

# --------------------------------------------------------------------------------------------
# checkpoints (a tiny-llama memory checkpoint, saved once, then damaged per case)
# --------------------------------------------------------------------------------------------


@functools.cache
def _checkpoint_files() -> dict[str, bytes]:
    import tempfile

    folder = Path(tempfile.mkdtemp()) / "ck"
    _save_tiny_checkpoint(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _save_tiny_checkpoint(folder: Path) -> None:
    import memllm

    memllm.save_memory(_tiny_with_memory(), folder)


def ck(drop: tuple[str, ...] = (), **changed: Callable[[bytes], bytes]) -> Callable[[], dict]:
    """The checkpoint's files (under ck/), some changed or dropped: built when the case runs."""

    def files() -> dict[str, bytes]:
        out = {}
        for name, data in _checkpoint_files().items():
            key = name.replace(".", "_")
            if name not in drop:
                out[f"ck/{name}"] = changed[key](data) if key in changed else data
        return out

    return files


def flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return (
        data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 300]) + data[middle + 300 :]
    )


def heads(n: int) -> Callable[[bytes], bytes]:
    return lambda data: data.replace(b'"num_heads": 2', f'"num_heads": {n}'.encode())


CKGEN = [*GEN, "--checkpoint", "ck"]
NO_MANIFEST = ("manifest.json",)
CHECKPOINTS = [
    Cli("ck-bitflip-weights", CKGEN, ck(memory_safetensors=flip), "sha256 differs"),
    Cli("ck-bitflip-no-model", CKGEN[:1] + CKGEN[3:], ck(memory_safetensors=flip), "sha256"),
    Cli("ck-num-heads-edited", CKGEN, ck(memory_config_json=heads(4)), "sha256 differs"),
    Cli(
        "ck-num-heads-no-manifest",
        CKGEN,
        ck(NO_MANIFEST, memory_config_json=heads(4)),
        "does not match the config memory.safetensors was written with",
    ),
    Cli("ck-truncated-weights", CKGEN, ck(memory_safetensors=lambda d: d[:64]), "bytes"),
    Cli("ck-empty-weights", CKGEN, ck(memory_safetensors=lambda d: b""), "bytes"),
    Cli(
        "ck-truncated-no-manifest",
        CKGEN,
        ck(NO_MANIFEST, memory_safetensors=lambda d: d[:64]),
        "unreadable safetensors",
    ),
    Cli(
        "ck-empty-no-manifest",
        CKGEN,
        ck(NO_MANIFEST, memory_safetensors=lambda d: b""),
        "unreadable safetensors",
    ),
    Cli("ck-weights-missing", CKGEN, ck(("memory.safetensors",)), "missing"),
    Cli(
        "ck-config-garbled-no-manifest",
        CKGEN,
        ck(NO_MANIFEST, memory_config_json=lambda d: d[:40]),
        "invalid JSON",
    ),
    Cli(
        "ck-config-not-utf8-no-manifest",
        CKGEN,
        ck(NO_MANIFEST, memory_config_json=lambda d: b"\xff\xfe" + d),
        "not UTF-8",
    ),
    Cli("ck-manifest-garbled", CKGEN, ck(manifest_json=lambda d: d[:10]), "corrupt manifest"),
    Cli("ck-not-a-checkpoint", CKGEN, {"ck/notes.txt": "mine"}, "not a memory checkpoint"),
    Cli("ck-missing", CKGEN, {}, "not found"),
    Cli(
        "ck-other-backbone",
        ["generate", "--model", "tiny-qwen2", "--prompt", "hi", "--checkpoint", "ck"],
        ck(),
        "model_type",
    ),
]

# --------------------------------------------------------------------------------------------
# experiment configs: choosing an arm on validation (select), checked before any model loads
# --------------------------------------------------------------------------------------------

EXPERIMENT = {
    "exp.yaml": """\
model: {name: tiny-llama}
data: {task: babilong, tasks: [qa1], lengths: [0k], num_validation: 4, tokenizer: tiny-llama}
segment_length: 64
arms:
  window: {kind: window}
  latent: {kind: memory, memory: {type: latent, num_slots: 4, memory_dim: 16, num_heads: 2}}
  latent_no_carry:
    kind: memory
    carry: false
    memory: {type: latent, num_slots: 4, memory_dim: 16, num_heads: 2}
  kv: {kind: memory, untrained: true, memory: {type: kv_retrieval}}
select: {among: [latent, kv], keep: [latent], subset: facts earlier}
output_dir: out
"""
}
EXP = ["experiment", "--config", "exp.yaml"]
SELECT = [
    ("select.among=[]", "select.among: name at least one"),
    ("select.among=[ghost, latent]", "select.among: no arm named 'ghost'"),
    ("select.among=[window, latent]", "select.among: 'window' is not a memory arm"),
    (
        "select.among=[latent_no_carry, latent]",
        "select.among: 'latent_no_carry' is a no-carry control",
    ),
    ("select.among=[kv, kv]", "select.among: 'kv' is named twice"),
    ("select.keep=[window]", "select.keep: 'window' is not a candidate"),
    ("select.keep=[ghost]", "select.keep: 'ghost' is not a candidate"),
    ("select.subset=facts_earlier", "select.subset: 'facts_earlier': babilong labels"),
    ("select.max_examples=0", "select.max_examples"),
    ("select.among=latent", "select.among"),
    ("select.pick=best", "unknown key select.pick"),
    ("train_data.num_validation=2", "train_data.num_validation"),
    ("eval.split=validation", "eval.split: select chooses on the validation split"),
]
EXPERIMENT_SELECT = [Cli(f"experiment {o}", [*EXP, o], EXPERIMENT, e) for o, e in SELECT] + [
    Cli(
        "experiment select on zsre facts",
        [*EXP, "data={task: zsre}", "arms.latent_no_carry.carry=true"],
        EXPERIMENT,
        "select.subset: 'facts earlier': zsre labels no subsets",
    ),
]

CLI_CASES = (
    CONFIG_FILES
    + CONFIG_VALUES
    + CONFIG_MODEL
    + CLI_ARGS
    + SCORE_FILES
    + CHECKPOINTS
    + EXPERIMENT_SELECT
)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _write(folder: Path, files) -> None:
    for name, content in (files() if callable(files) else files).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code: int, err: str, expect: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, err
    assert code == 2, err
    line = lines[0]
    assert line.startswith("memllm") and ": error: " in line, line
    assert expect in line, line
    return line


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return folder


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_bad_cli_input(case: Cli, workdir, capsys):
    _write(workdir, case.files)
    _write(workdir, {"keep/marker.txt": "user data"})
    before = _snapshot(workdir)
    code, _, err = run_cli(case.argv, capsys)
    assert_one_error(code, err, case.expect)
    after = _snapshot(workdir)
    assert {k: after.get(k) for k in before} == before  # nothing changed or removed


# --------------------------------------------------------------------------------------------
# OS errors (simulated: the tests run as any user, so a read-only folder may still be writable)
# --------------------------------------------------------------------------------------------

OS_ERRORS = [
    (errno.EROFS, "read-only filesystem"),
    (errno.ENOSPC, "no space left"),
    (errno.EACCES, "permission denied"),
    (errno.EDQUOT, "disk quota"),
    (errno.EIO, "input/output error"),
]


@pytest.mark.parametrize(("code", "words"), OS_ERRORS, ids=[w for _, w in OS_ERRORS])
def test_os_errors_are_one_line(code, words, workdir, capsys, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "write_text", refuse)
    rc, _, err = run_cli(["data", "export", "babilong", "out.json", "--tasks", "qa1"], capsys)
    line = assert_one_error(rc, err, words)
    assert "out.json" in line


def test_checkpoint_without_model_is_checked_before_any_backbone_loads(
    workdir, capsys, monkeypatch
):
    """--checkpoint without --model converted SmolLM2 (75 s) before reporting a mismatch: now a
    bad checkpoint is refused first, and a good one brings the backbone it was trained on."""
    import memllm

    _write(workdir, ck(memory_safetensors=flip)())
    loaded = []
    real = memllm.load_backbone
    monkeypatch.setattr(memllm, "load_backbone", lambda *a, **k: loaded.append(a) or real(*a, **k))
    code, _, err = run_cli(["generate", "--prompt", "hi", "--checkpoint", "ck"], capsys)
    assert_one_error(code, err, "sha256 differs")
    assert loaded == []
    _write(workdir, ck()())
    code, _, err = run_cli(
        ["generate", "--prompt", "hi", "--checkpoint", "ck", "--max-new-tokens", "2"], capsys
    )
    assert code == 0, err
    assert loaded == [("tiny-llama",)]


def _save_into(make_folder: Callable[[Path], Path]):
    import tempfile

    import memllm

    root = Path(tempfile.mkdtemp())
    (root / "mine.txt").write_text("user data")
    try:
        memllm.save_memory(_tiny_with_memory(), make_folder(root))
    finally:
        assert (root / "mine.txt").read_text() == "user data"


def test_bom_csv_scores(workdir, capsys):
    """A CSV saved with a byte-order mark reads like any other (it said 'missing column')."""
    (workdir / "p_qa1.csv").write_bytes(b"\xef\xbb\xbf" + b"target,output,question\nx,x,q\n")
    code, out, err = run_cli(["score", "babilong", "p_qa1.csv"], capsys)
    assert code == 0, err
    assert json.loads(out)["n"] == 1


def test_partial_predictions_warn_with_counts(workdir, capsys, caplog):
    """Some ids unmatched: scored (missing = 0, as the official script) with a warning."""
    _write(workdir, {"g.json": HOTPOT_GOLD, "p.json": hotpot_pred({"q-bridge-1": "x", "zz": ""})})
    code, _, err = run_cli(HP, capsys)
    assert code == 0, err
    assert "1 predicted answer id(s) are not in the gold file" in caplog.text
    assert "2 of 3 gold question(s) have no answer prediction" in caplog.text


def test_zsre_limit_counts_records(workdir, capsys):
    _write(workdir, {"g.json": ZSRE_GOLD, "p.json": js({"0": "Portugal"})})
    code, out, err = run_cli([*ZS, "--limit", "1"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 1 and result["exact_match"] == 1.0


# --------------------------------------------------------------------------------------------
# bugs versus bad input
# --------------------------------------------------------------------------------------------


def _broken(exc: BaseException):
    def func(args):
        raise exc

    return func


def test_a_bug_exits_1_asking_for_a_report(workdir, capsys, monkeypatch):
    import memllm.cli.data as data_cli

    monkeypatch.setattr(data_cli, "data_tasks", _broken(KeyError("oops")))
    code, _, err = run_cli(["data", "tasks"], capsys)
    assert code == 1
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert "internal error: KeyError" in err and "report" in err and "-v" in err
    code, _, err = run_cli(["-v", "data", "tasks"], capsys)
    assert code == 1 and "Traceback" in err


def test_internal_missing_file_is_a_bug_not_bad_input(workdir, capsys, monkeypatch):
    """A file memllm expected (not one the user named) is reported as a bug (it was printed as a
    user error)."""
    import memllm.cli.data as data_cli

    missing = FileNotFoundError(errno.ENOENT, "No such file", "/tmp/.memllm-internal/tmp-ckpt")
    monkeypatch.setattr(data_cli, "data_tasks", _broken(missing))
    code, _, err = run_cli(["data", "tasks"], capsys)
    assert code == 1 and "internal error" in err
    named = FileNotFoundError(errno.ENOENT, "No such file", str(workdir / "mine.txt"))
    monkeypatch.setattr(data_cli, "data_tasks", _broken(named))
    code, _, err = run_cli(["data", "tasks", "mine.txt"][:2], capsys)
    assert code == 1  # not on the command line: still memllm's
    monkeypatch.setattr(data_cli, "data_export", _broken(named))
    code, _, err = run_cli(["data", "export", "corpus", "mine.txt"], capsys)
    assert_one_error(code, err, "file not found")


def test_serialisation_errors_are_bad_input(workdir, capsys, monkeypatch):
    import pickle

    import memllm.cli.data as data_cli

    monkeypatch.setattr(data_cli, "data_tasks", _broken(pickle.UnpicklingError("bad pickle")))
    code, _, err = run_cli(["data", "tasks"], capsys)
    assert_one_error(code, err, "pickle")
    monkeypatch.setattr(data_cli, "data_tasks", _broken(json.JSONDecodeError("x", "{", 1)))
    code, _, err = run_cli(["data", "tasks"], capsys)
    assert_one_error(code, err, "invalid JSON")


# --------------------------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------------------------


def _tiny_with_memory():
    import memllm
    from memllm.core.tiny import build_tiny_model

    model, _ = build_tiny_model("llama")
    memllm.inject_memory(
        model, {"type": "latent", "num_slots": 4, "memory_dim": 16, "num_heads": 2}
    )
    return model


def _forward(mask=None, labels=None, ids_shape=(2, 20), segment_length=8):
    from memllm.core.segments import forward_segments

    model = _tiny_with_memory()
    ids = torch.randint(3, 200, ids_shape)
    return forward_segments(model, ids, mask, labels, segment_length=segment_length)


def _session_twice():
    from memllm.core.inject import memory_session

    model = _tiny_with_memory()
    block = memory_session(model)
    with block:
        pass
    with block:
        pass


def _sessions_nested():
    from memllm.core.inject import memory_session

    model = _tiny_with_memory()
    with memory_session(model), memory_session(model):
        pass


def _config(cls_path: str, **values):
    import importlib

    from memllm.core.config import from_dict

    module, name = cls_path.rsplit(".", 1)
    return from_dict(getattr(importlib.import_module(module), name), values)


def _load_yaml(text: str | bytes, tmp: Path | None = None):
    import tempfile

    from memllm.core.config import load_yaml

    folder = Path(tempfile.mkdtemp())
    path = folder / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return load_yaml(path)


LATENT = "memllm.memory.latent.LatentMemoryConfig"
NEURAL_CFG = "memllm.memory.neural.NeuralMemoryConfig"
API_CASES = [
    Api("mask-wrong-shape", lambda: _forward(mask=torch.ones(2, 10)), ValueError, "attention_mask"),
    Api("labels-short", lambda: _forward(labels=torch.ones(2, 10).long()), ValueError, "labels"),
    Api("labels-long", lambda: _forward(labels=torch.ones(2, 30).long()), ValueError, "labels"),
    Api("labels-batch", lambda: _forward(labels=torch.ones(1, 20).long()), ValueError, "labels"),
    Api("ids-1d", lambda: _forward(ids_shape=(20,)), ValueError, "input_ids"),
    Api("segment-length-0", lambda: _forward(segment_length=0), ValueError, "segment_length"),
    Api("session-entered-twice", _session_twice, RuntimeError, "already entered"),
    Api("sessions-nested", _sessions_nested, RuntimeError, "don't nest"),
    Api("latent-slots-huge", lambda: _config(LATENT, num_slots=10**12), ConfigError, "num_slots"),
    Api("latent-dim-huge", lambda: _config(LATENT, memory_dim=2**20), ConfigError, "memory_dim"),
    Api(
        "latent-dropout-nan", lambda: _config(LATENT, dropout=float("nan")), ConfigError, "dropout"
    ),
    Api("latent-float-overflow", lambda: _config(LATENT, dropout=10**400), ConfigError, "dropout"),
    Api("neural-depth", lambda: _config(NEURAL_CFG, mlp_depth=10**6), ConfigError, "mlp_depth"),
    Api("yaml-bomb", lambda: _load_yaml(ALIAS_BOMB), ConfigError, "aliases"),
    Api("yaml-dup", lambda: _load_yaml("a: 1\na: 2\n"), ConfigError, "duplicate key 'a'"),
    Api("yaml-empty", lambda: _load_yaml(""), ConfigError, "empty"),
    Api("yaml-not-utf8", lambda: _load_yaml(NOT_UTF8), ConfigError, "not UTF-8"),
    Api("save-into-user-folder", lambda: _save_into(lambda r: r), CheckpointError, "not a memllm"),
    Api(
        "save-through-dotdot",
        lambda: _save_into(lambda r: r / "inner" / ".."),
        CheckpointError,
        "not a memllm checkpoint",
    ),
    Api(
        "save-onto-a-file",
        lambda: _save_into(lambda r: r / "mine.txt"),
        CheckpointError,
        "not a folder",
    ),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_bad_api_input(case: Api):
    with pytest.raises(case.exception) as info:
        case.call()
    assert case.expect in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_merge_keys_still_override():
    """Strict loading keeps YAML merges: a mapping's own key overrides a merged one."""
    data = _load_yaml("base: &b {lr: 1, wd: 2}\narm:\n  <<: *b\n  lr: 3\n")
    assert data["arm"] == {"lr": 3, "wd": 2}


def test_the_table_is_large_enough():
    assert len(CLI_CASES) + len(API_CASES) + len(OS_ERRORS) >= 100
