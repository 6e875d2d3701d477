"""lm-evaluation-harness integration: the ``memllm`` model class and ``memllm eval-harness``.

Skipped when lm-eval is not installed (``pip install 'memllm[harness]'``). Everything is local:
a tiny random backbone saved to a temporary folder, tasks from YAML over JSON files in
``tests/fixtures/harness``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

lm_eval = pytest.importorskip("lm_eval")

from memllm.core.tiny import build_tiny_model  # noqa: E402
from tests.conftest import SMALL_LATENT  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "harness"
TASKS = ["memllm_tiny_mc", "memllm_tiny_gen"]


@pytest.fixture
def backbone(tmp_path, monkeypatch):
    """A tiny Llama and its tokenizer saved as a folder (as the harness's ``hf`` model loads
    it), an untrained latent memory config, and the fixtures folder as working directory (the
    task YAMLs name their JSON files relative to it)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    model, tokenizer = build_tiny_model("llama")
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    memory = tmp_path / "memory.yaml"
    memory.write_text(yaml.safe_dump(SMALL_LATENT))
    monkeypatch.chdir(FIXTURES)
    return SimpleNamespace(folder=folder, memory=memory, model=model, tokenizer=tokenizer)


def _evaluate(model: str, model_args: str):
    from lm_eval.tasks import TaskManager

    import memllm.evaluation.harness  # noqa: F401 (registers "memllm")

    manager = TaskManager(include_path=str(FIXTURES), include_defaults=False)
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASKS,
        task_manager=manager,
        device="cpu",
        batch_size=2,
        log_samples=True,
    )


def test_untrained_memory_scores_equal_the_harness_hf_model(backbone, one_thread):
    hf = _evaluate("hf", f"pretrained={backbone.folder},dtype=float32")
    mem = _evaluate("memllm", f"pretrained={backbone.folder},memory={backbone.memory}")
    for task in TASKS:
        for metric, value in hf["results"][task].items():
            if isinstance(value, float):
                assert mem["results"][task][metric] == pytest.approx(value, abs=1e-9), metric
        hf_samples = hf["samples"][task]
        mem_samples = mem["samples"][task]
        assert len(hf_samples) == len(mem_samples) > 0
        for a, b in zip(hf_samples, mem_samples, strict=True):
            for ra, rb in zip(a["resps"], b["resps"], strict=True):
                if task == "memllm_tiny_gen":
                    assert ra == rb  # the same generated text, cut at the same stop
                else:
                    (lp_a, greedy_a), (lp_b, greedy_b) = ra[0], rb[0]
                    assert lp_b == pytest.approx(lp_a, abs=1e-3)
                    assert greedy_a == greedy_b


def _bare_logprob(model, tokens: list[int], scored: int) -> float:
    """The bare model's summed log-probability of the last ``scored`` tokens, computed here."""
    ids = torch.tensor([tokens[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    targets = torch.tensor(tokens[1:])
    picked = logprobs[torch.arange(len(targets)), targets]
    return float(picked[-scored:].sum())


def test_rolling_loglikelihood_and_batches(backbone, one_thread):
    from memllm.evaluation.harness import MemllmLM

    lm = MemllmLM(pretrained=str(backbone.folder), memory=str(backbone.memory), batch_size=3)
    texts = ["Mary went to the kitchen.", "A short one", "Where is the milk? In the hallway."]
    rolling = lm.loglikelihood_rolling(
        [SimpleNamespace(args=(t,)) for t in texts], disable_tqdm=True
    )
    for text, value in zip(texts, rolling, strict=True):
        row = [lm.prefix_token_id, *lm.tok_encode(text)]
        assert value == pytest.approx(_bare_logprob(backbone.model, row, len(row) - 1), abs=1e-3)
    # a batch gives what each request gives alone
    one = MemllmLM(pretrained=str(backbone.folder), memory=str(backbone.memory), batch_size=1)
    alone = one.loglikelihood_rolling([SimpleNamespace(args=(t,)) for t in texts], True)
    assert alone == pytest.approx(rolling, abs=1e-4)


def test_long_inputs_are_read_segment_by_segment(backbone, one_thread):
    """Past one segment, an untrained memory (the identity) adds nothing to what the last
    segment sees: the score is the bare model's on the last segment's tokens."""
    from memllm.evaluation.harness import MemllmLM

    lm = MemllmLM(pretrained=str(backbone.folder), memory=str(backbone.memory), segment_length=16)
    context = "Sandra took the milk. Sandra went to the hallway. Where is the milk?"
    [(logprob, _)] = lm.loglikelihood([SimpleNamespace(args=(context, " hallway"))], True)
    ctx, cont = lm._encode_pair(context, " hallway")
    inputs = (ctx + cont)[:-1]
    assert len(inputs) > 16
    last = (ctx + cont)[-17:]  # the last segment of the inputs and the token after it
    expected = _bare_logprob(backbone.model, last, len(cont))
    assert math.isfinite(logprob) and logprob == pytest.approx(expected, abs=1e-3)
    [text] = lm.generate_until(
        [SimpleNamespace(args=(context, {"until": ["\n"], "max_gen_toks": 5}))], True
    )
    assert isinstance(text, str) and "\n" not in text


def test_bad_model_args_are_one_line_errors(backbone):
    from memllm.errors import ConfigError
    from memllm.evaluation.harness import MemllmLM

    with pytest.raises(ConfigError, match="segment_length"):
        MemllmLM(pretrained=str(backbone.folder), segment_length=100000)
    with pytest.raises(ConfigError, match="memory"):
        MemllmLM(pretrained=str(backbone.folder), memory="no/such/checkpoint")


def test_cli_writes_the_harness_results_json(backbone, tmp_path, one_thread):
    from memllm.cli import main

    out = tmp_path / "results.json"
    code = main(
        [
            "eval-harness",
            "--model",
            str(backbone.folder),
            "--memory",
            str(backbone.memory),
            "--tasks",
            "memllm_tiny_mc",
            "--include-path",
            str(FIXTURES),
            "--limit",
            "2",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"memllm_tiny_mc"}
    assert "acc,none" in results["results"]["memllm_tiny_mc"]
    assert results["config"]["model_args"]["memory_type"] == "latent"
