"""Choosing a memory arm on validation (``select``): only the chosen one and ``keep`` are tested,
the losers' controls never run, and the test split is not read while choosing."""

from __future__ import annotations

import json

import pytest
import yaml

from memllm.cli import main
from memllm.evaluation import experiment as experiment_module
from memllm.evaluation.experiment import Experiment
from memllm.evaluation.experiment_config import ExperimentSelect
from memllm.evaluation.selection import arms_to_test, choose, leader

LATENT = {"type": "latent", "num_slots": 4, "memory_dim": 16, "num_heads": 2}
EPISODIC = {"type": "episodic", "layer_ids": [-1], "num_heads": 2, "key_dim": 16}
KV = {"type": "kv_retrieval", "block_size": 16, "top_k": 2, "init_tokens": 8}

CONFIG = {
    "name": "tiny selection",
    "model": {"name": "tiny-llama"},
    "data": {
        "task": "babilong",
        "tasks": ["qa1"],
        "lengths": ["0k"],
        "prompt": "plain",
        "question_segment": "own",  # every question's facts lie before its last segment
        "num_train": 4,
        "num_validation": 4,
        "num_test": 2,
        "tokenizer": "tiny-llama",
    },
    "segment_length": 128,
    "train": {"max_steps": 1, "batch_size": 2, "save_every": 0, "mixed_precision": "no"},
    "validation": {"every": 0, "max_examples": 1, "generate": False},
    "log": {"every": 1, "tensorboard": False, "progress_bar": False},
    "eval": {"max_new_tokens": 2, "batch_size": 4},
    "arms": {
        "window": {"kind": "window"},
        "latent": {"kind": "memory", "memory": LATENT},
        "latent_no_carry": {"kind": "memory", "memory": LATENT, "carry": False},
        "episodic": {"kind": "memory", "memory": EPISODIC},
        "episodic_no_carry": {"kind": "memory", "memory": EPISODIC, "carry": False},
        "kv_retrieval": {"kind": "memory", "memory": KV, "untrained": True},
    },
    "select": {
        "among": ["latent", "episodic", "kv_retrieval"],
        "keep": ["latent"],
        "subset": "facts earlier",
    },
}


def test_choose_is_the_argmax_with_ties_to_the_earlier_name():
    among = ["a", "b", "c"]
    assert choose({"a": 0.2, "b": 0.5, "c": 0.1}, among) == "b"
    assert choose({"a": 0.5, "b": 0.5, "c": 0.5}, among) == "a"
    assert choose({"c": 0.9, "b": 0.9, "a": 0.1}, among) == "b"  # among's order, not the dict's
    assert choose({"a": 0.2, "b": 0.5}, among) is None  # c not scored yet: no choice
    assert leader({"a": 0.2, "b": 0.5}, among) == "b"


def test_only_the_chosen_the_kept_and_their_controls_are_tested():
    arms = list(CONFIG["arms"])
    select = ExperimentSelect(**CONFIG["select"])
    assert arms_to_test(arms, select, "episodic") == [
        "window",
        "latent",
        "latent_no_carry",
        "episodic",
        "episodic_no_carry",
    ]
    assert arms_to_test(arms, select, "kv_retrieval") == [
        "window",
        "latent",
        "latent_no_carry",
        "kv_retrieval",
    ]
    assert arms_to_test(arms, select, None) == ["window", "latent", "latent_no_carry"]


class Spy:
    """Records each arm prepared (trained / injected) and every set of examples answered."""

    def __init__(self, monkeypatch, validation: dict[str, list[float]]):
        self.prepared: list[str] = []
        self.answered: list[tuple[str, str]] = []  # (desc, split of the examples)
        real_prepare, real_predict = Experiment.prepare_arm, experiment_module.predict

        def prepare(exp, name, arm):
            self.prepared.append(name)
            return real_prepare(exp, name, arm)

        def predict(model, tokenizer, examples, **kwargs):
            splits = {ex.id.split("/")[-2] for ex in examples}
            assert len(splits) == 1, splits
            self.answered.append((kwargs["desc"], splits.pop()))
            return real_predict(model, tokenizer, examples, **kwargs)

        def validate(exp, name, arm, prepared, examples):
            assert all("/validation/" in ex.id for ex in examples)
            self.answered.append((f"validate {name}", "validation"))
            values = validation[name]
            return {"accuracy": (values * len(examples))[: len(examples)]}

        monkeypatch.setattr(Experiment, "prepare_arm", prepare)
        monkeypatch.setattr(experiment_module, "predict", predict)
        monkeypatch.setattr(Experiment, "validate_arm", validate)


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """The plots are not what these tests check; drawing them after every arm costs seconds."""
    monkeypatch.setattr("memllm.evaluation.report._plots.draw_plots", lambda results, out: [])


def _write(tmp_path, config: dict):
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump({**config, "output_dir": str(tmp_path / "out")}, sort_keys=False)
    )
    return path


def _results(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / "results.json").read_text())


def test_the_best_on_validation_is_tested_and_the_losers_are_not(tmp_path, monkeypatch, capsys):
    # episodic is best on validation; latent (kept) and kv_retrieval lose
    spy = Spy(monkeypatch, {"latent": [0.0], "episodic": [1.0, 1.0, 0.0], "kv_retrieval": [0.0]})
    assert main(["experiment", "--config", str(_write(tmp_path, CONFIG))]) == 0
    results = _results(tmp_path)
    selection = results["selection"]
    assert selection["chosen"] == "episodic" and selection["metric"] == "accuracy"
    assert selection["subset"] == "facts earlier" and selection["split"] == "validation"
    assert set(selection["scores"]) == {"latent", "episodic", "kv_retrieval"}
    assert selection["scores"]["episodic"]["n"] == 4
    assert selection["scores"]["episodic"]["method"] == "wilson"
    assert selection["scores"]["episodic"]["value"] == pytest.approx(0.75)
    # tested: every non-candidate, the chosen, the kept, and their controls; not kv_retrieval
    assert list(results["arms"]) == [
        "window",
        "latent",
        "latent_no_carry",
        "episodic",
        "episodic_no_carry",
    ]
    # each candidate prepared once (the chosen and kept are not trained again for the test); the
    # losers' control... kv_retrieval has window as its control, which is tested anyway
    assert sorted(spy.prepared) == sorted(
        ["latent", "episodic", "kv_retrieval", "window", "latent_no_carry", "episodic_no_carry"]
    )
    assert len(spy.prepared) == len(set(spy.prepared))
    # every validation happens before the first test example is read
    splits = [split for _, split in spy.answered]
    first_test = splits.index("test")
    assert set(splits[:first_test]) == {"validation"} and "validation" not in splits[first_test:]
    assert ("eval kv_retrieval", "test") not in spy.answered
    # the report: the section after "Does the memory carry?", the chosen arm marked
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.index("## Does the memory carry?") < md.index("## Chosen on validation")
    assert "Chosen: **episodic**" in md and "test split was run once" in md
    assert "- **episodic** (chosen on validation)" in md
    assert "episodic (chosen)" in md  # in the carry table, against episodic_no_carry
    assert "chosen on validation: episodic" in capsys.readouterr().out


def test_arms_runs_reuse_scores_and_never_train_a_losers_control(tmp_path, monkeypatch, caplog):
    # kv_retrieval is best; episodic, trained for its validation, loses
    spy = Spy(monkeypatch, {"latent": [0.0], "episodic": [0.0, 1.0], "kv_retrieval": [1.0]})
    path = _write(tmp_path, CONFIG)
    # first run: window and latent; latent is kept (tested), the choice waits for the others
    assert main(["experiment", "--config", str(path), "--arms", "window,latent"]) == 0
    first = _results(tmp_path)
    assert first["selection"]["chosen"] is None
    assert list(first["arms"]) == ["window", "latent"]
    assert "no validation score yet for episodic, kv_retrieval" in caplog.text
    # second run: the rest; latent's score is read back, latent is not trained again
    spy.prepared.clear()
    rest = "latent_no_carry,episodic,episodic_no_carry,kv_retrieval"
    assert main(["experiment", "--config", str(path), "--arms", rest]) == 0
    second = _results(tmp_path)
    assert second["selection"]["chosen"] == "kv_retrieval"
    assert second["selection"]["scores"]["latent"] == first["selection"]["scores"]["latent"]
    assert spy.prepared == ["episodic", "kv_retrieval", "latent_no_carry"]
    # the loser's control is neither trained nor tested, though --arms named it
    assert not (tmp_path / "out" / "arms" / "episodic_no_carry").exists()
    assert list(second["arms"]) == ["window", "latent", "latent_no_carry", "kv_retrieval"]
    assert ("eval episodic", "test") not in spy.answered
    # the carry table: the chosen training-free memory against window, the kept one its control
    rows = {r["arm"]: r["control"] for r in second["carry"]["rows"]}
    assert rows == {"latent": "latent_no_carry", "kv_retrieval": "window"}
    # the loser alone: its score is read back, nothing runs, the report keeps the tested arms
    spy.prepared.clear()
    assert main(["experiment", "--config", str(path), "--arms", "episodic"]) == 0
    assert spy.prepared == []
    third = _results(tmp_path)
    assert list(third["arms"]) == list(second["arms"])
    assert third["breakdowns"] == second["breakdowns"]
    # a full rerun with the same settings validates nothing again
    spy.answered.clear()
    assert main(["experiment", "--config", str(path)]) == 0
    assert not [d for d, split in spy.answered if split == "validation"]
    assert "episodic" not in spy.prepared and "episodic_no_carry" not in spy.prepared
    assert _results(tmp_path)["selection"]["chosen"] == "kv_retrieval"


def test_the_real_scorer_scores_the_validation_subset(tmp_path):
    """No monkeypatching: each candidate generates answers to the validation questions (two
    training-free candidates: what is checked here is the scoring, not training)."""
    config = {
        **CONFIG,
        "arms": {
            "window": CONFIG["arms"]["window"],
            "latent": {**CONFIG["arms"]["latent"], "untrained": True},
            "kv_retrieval": CONFIG["arms"]["kv_retrieval"],
        },
        "select": {"among": ["latent", "kv_retrieval"], "max_examples": 2},
        "eval": {**CONFIG["eval"], "closed_set": True},
    }
    assert main(["experiment", "--config", str(_write(tmp_path, config))]) == 0
    selection = _results(tmp_path)["selection"]
    assert selection["chosen"] in ("latent", "kv_retrieval")
    assert {s["n"] for s in selection["scores"].values()} == {2}
    assert selection["subset"] == "all" and selection["max_examples"] == 2


@pytest.mark.parametrize(
    ("select", "expect"),
    [
        ({"among": []}, "select.among"),
        ({"among": ["ghost"]}, "select.among: no arm named 'ghost'"),
        ({"among": ["window"]}, "select.among: 'window' is not a memory arm"),
        ({"among": ["latent_no_carry"]}, "select.among: 'latent_no_carry' is a no-carry"),
        ({"among": ["latent", "latent"]}, "select.among"),
        ({"among": ["latent"], "keep": ["episodic"]}, "select.keep"),
        ({"among": ["latent"], "subset": "facts later"}, "select.subset"),
        ({"among": ["latent"], "max_examples": 0}, "select.max_examples"),
        ({"among": ["latent"], "colour": 1}, "select.colour"),
    ],
)
def test_bad_select_is_one_line_naming_the_key(tmp_path, capsys, select, expect):
    path = _write(tmp_path, {**CONFIG, "select": select})
    assert main(["experiment", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exp.yaml" in err and expect in err, err


def test_a_subset_the_task_does_not_label(tmp_path, capsys):
    config = {
        **CONFIG,
        "data": {"task": "zsre", "num_validation": 2, "num_test": 2},
        "select": {"among": ["latent"], "subset": "facts earlier"},
    }
    config["arms"] = {k: v for k, v in CONFIG["arms"].items() if "carry" not in v}
    assert main(["experiment", "--config", str(_write(tmp_path, config))]) == 2
    assert "select.subset: 'facts earlier': zsre labels no subsets" in capsys.readouterr().err


def _summary(value: float, n: int = 40) -> dict:
    return {"value": value, "ci95": [max(value - 0.1, 0.0), min(value + 0.1, 1.0)], "n": n,
            "method": "wilson"}  # fmt: skip


def test_the_report_section_and_the_console_line():
    from memllm.evaluation.markdown import chosen_line, selection_section

    info = {
        "split": "validation",
        "subset": "facts earlier",
        "max_examples": None,
        "metric": "accuracy",
        "among": ["latent", "episodic", "kv_retrieval"],
        "keep": ["latent"],
        "scores": {"latent": _summary(0.05), "episodic": _summary(0.5)},
        "chosen": None,
        "tested": ["latent"],
    }
    text = "\n".join(selection_section({"selection": info}))
    assert "No arm chosen yet: `kv_retrieval` not validated" in text
    assert "| kv_retrieval | – | not validated yet | – | no |" in text
    assert chosen_line({"selection": info}).endswith("(no validation score for kv_retrieval)")
    info.update(
        scores={**info["scores"], "kv_retrieval": _summary(0.8)},
        chosen="kv_retrieval",
        tested=["latent", "kv_retrieval"],
    )
    text = "\n".join(selection_section({"selection": info}))
    assert "Chosen: **kv_retrieval**" in text and "`keep` arms (latent)" in text
    assert "| kv_retrieval | 40 | 80.0 [70.0, 90.0] | chosen | yes |" in text
    assert "| latent | 40 | 5.0 [0.0, 15.0] | kept | yes |" in text
    assert "| episodic | 40 | 50.0 [40.0, 60.0] | – | no |" in text
    assert chosen_line({"selection": info}) == (
        "chosen on validation: kv_retrieval (accuracy 80.0 [70.0, 90.0] %, n=40, facts earlier; "
        "others: latent 5.0, episodic 50.0)"
    )
    assert selection_section({}) == [] and chosen_line({}) is None
