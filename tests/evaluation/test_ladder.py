"""The recall ladder and the "does the memory carry?" table, end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memllm.cli import main
from memllm.evaluation.carry import control_pairs
from memllm.evaluation.experiment_config import ArmSettings
from memllm.evaluation.ladder import load_ladder

LADDER = Path(__file__).parents[2] / "configs" / "experiments" / "ladder.yaml"
TINY = [
    "model.name=tiny-llama",
    "data.tokenizer=tiny-llama",
    "segment_length=96",
    "rungs.recall_k2.data.num_values=10",
    "rungs.recall_k2.data.num_train=8",
    "rungs.recall_k2.data.num_test=30",
    "data.num_validation=4",
    "train.epochs=1",
    "train.max_steps=2",
    "train.batch_size=4",
    "train.mixed_precision='no'",
    "validation.max_examples=4",
    "log.progress_bar=false",
    "eval.max_new_tokens=3",
    "arms.latent.memory.memory_dim=16",
    "arms.latent.memory.num_heads=2",
    "arms.latent_no_carry.memory.memory_dim=16",
    "arms.latent_no_carry.memory.num_heads=2",
]


def test_controls_pair_by_name():
    arms = {
        "window": ArmSettings(kind="window"),
        "latent": ArmSettings(kind="memory", memory={"type": "latent"}),
        "latent_no_carry": ArmSettings(kind="memory", memory={"type": "latent"}, carry=False),
        "neural": ArmSettings(kind="memory", memory={"type": "neural"}),
        "kv": ArmSettings(kind="memory", memory={"type": "kv_retrieval"}, untrained=True),
    }
    assert control_pairs(arms) == {"latent": "latent_no_carry", "kv": "window"}


def test_the_shipped_ladder_has_the_promised_rungs_and_arms():
    settings, rungs = load_ladder(LADDER)
    assert settings["subset"] == "facts earlier"
    for name, cfg in rungs.items():
        assert cfg.data["question_segment"] == "own" and cfg.eval.closed_set, name
        per_task = cfg.data["num_test"] * len(cfg.data.get("tasks", [None]))
        assert per_task >= 300, name
    assert {"recall_k1", "recall_k8", "recall_k4_overwrite", "babilong_4k"} <= set(rungs)
    arms = rungs["recall_k1"].arms
    assert {"window", "finetuned", "episodic", "kv_retrieval", "neural_layer"} <= set(arms)
    assert set(control_pairs(arms)) == {
        "latent",
        "latent_delta",
        "neural_context",
        "neural_layer",
        "episodic",
        "kv_retrieval",
    }


def test_ladder_runs_end_to_end_and_window_is_at_chance(tmp_path, capsys):
    out = tmp_path / "ladder"
    args = ["ladder", "--config", str(LADDER), "--rungs", "recall_k2"]
    args += ["--arms", "window,latent,latent_no_carry", *TINY, f"output_dir={out}"]
    assert main(args) == 0
    ladder = json.loads((out / "ladder.json").read_text())
    assert ladder["rungs"] == ["recall_k2"] and ladder["subset"] == "facts earlier"
    assert ladder["arms"] == ["window", "latent", "latent_no_carry"]
    chance = ladder["rung_info"]["recall_k2"]["chance"]
    assert chance == pytest.approx(0.1)
    window = ladder["cells"]["window"]["recall_k2"]
    # the question is alone in its segment: window cannot see a fact, it is at chance
    low, high = window["closed_set_accuracy"]["ci95"]
    assert window["closed_set_accuracy"]["n"] == 30 and low <= chance <= high
    latent = ladder["cells"]["latent"]["recall_k2"]["accuracy"]
    assert (
        latent["control"] == "latent_no_carry" and latent["vs_control"]["test"] == "mcnemar_exact"
    )
    assert (out / "ladder.png").is_file()
    text = (out / "ladder.md").read_text()
    assert "| arm | recall_k2 |" in text and "*chance*" in text

    # the rung's own report: "Does the memory carry?" first, recall's metric text, chance
    report = (out / "recall_k2" / "results.md").read_text()
    assert report.index("## Does the memory carry?") < report.index("## How to read")
    assert "closed-set match: the first line" in report and "BabiLong's official" not in report
    assert "chance 10.0 %" in report
    results = json.loads((out / "recall_k2" / "results.json").read_text())
    rows = results["carry"]["rows"]
    assert results["carry"]["subset"] == "facts earlier"
    assert {(r["arm"], r["control"], r["metric"]) for r in rows} == {
        ("latent", "latent_no_carry", "accuracy"),
        ("latent", "latent_no_carry", "closed_set_accuracy"),
    }
    # the experiment passes its controls: the strongest is window or latent_no_carry
    assert {r["strongest_control"] for r in rows} <= {"window", "latent_no_carry"}
    assert all("carries_over_strongest" in r for r in rows)
    assert "report:" in capsys.readouterr().out


def test_shards_of_a_ladder_build_the_cells_of_one_run(tmp_path):
    """--shard passes to every rung; the second shard completes the arm, closed-set included."""
    cells = {}
    for folder, shards in (("whole", [None]), ("split", ["1/2", "2/2"])):
        out = tmp_path / folder
        for shard in shards:
            args = ["ladder", "--config", str(LADDER), "--rungs", "recall_k2", "--arms", "window"]
            args += [*TINY, f"output_dir={out}"] + (["--shard", shard] if shard else [])
            assert main(args) == 0
        cells[folder] = json.loads((out / "ladder.json").read_text())["cells"]["window"]
    assert cells["split"] == cells["whole"]
    assert cells["split"]["recall_k2"]["closed_set_accuracy"]["n"] == 30


def test_closed_set_needs_a_closed_answer_set(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(
        json.dumps(
            {
                "model": {"name": "tiny-llama"},
                "data": {
                    "task": "babilong",
                    "tasks": ["qa6"],
                    "lengths": ["0k"],
                    "num_train": 0,
                    "num_validation": 0,
                    "num_test": 2,
                    "tokenizer": "tiny-llama",
                },
                "eval": {"closed_set": True},
                "arms": {"window": {"kind": "window"}},
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    assert main(["experiment", "--config", str(path)]) == 2
    assert "eval.closed_set" in capsys.readouterr().err


def test_a_bad_rung_names_itself(tmp_path, capsys):
    args = ["ladder", "--config", str(LADDER), "rungs.babi_0k.segment_length=0"]
    assert main(args) == 2
    assert "rungs.babi_0k" in capsys.readouterr().err


def _cell(value: float, n: int = 150) -> dict:
    return {"accuracy": {"value": value, "ci95": [value - 0.05, value + 0.05], "n": n}}


def test_each_arm_is_drawn_across_the_rungs_when_it_has_two(tmp_path):
    from memllm.evaluation.ladder import write_ladder

    ladder = {
        "name": "lengths",
        "subset": "facts earlier",
        "alpha": 0.01,
        "rungs": ["2k", "4k"],
        "arms": ["window", "episodic"],
        "rung_info": {"2k": {"chance": 1 / 6}, "4k": {"chance": 1 / 6}},
        "cells": {
            "window": {"2k": _cell(0.1), "4k": _cell(0.1)},
            "episodic": {"2k": _cell(0.3)},  # one point: drawn as a marker, not a line
        },
    }
    paths = write_ladder(tmp_path / "two", ladder)
    assert paths["lines"].is_file()
    assert "![each arm across the rungs](ladder_lines.png)" in paths["markdown"].read_text()

    # one rung: nothing to draw across
    single = {**ladder, "rungs": ["2k"], "cells": {"episodic": {"2k": _cell(0.3)}}}
    paths = write_ladder(tmp_path / "one", single)
    assert "lines" not in paths and not (tmp_path / "one" / "ladder_lines.png").exists()


def test_a_ladder_given_to_experiment_says_to_run_the_ladder(capsys):
    assert main(["experiment", "--config", str(LADDER)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ladder.yaml" in err and "memllm ladder" in err, err


def test_a_rung_an_arm_lacks_is_a_gap_in_its_line():
    import numpy as np

    from memllm.evaluation.plots import _figure, draw_interval_lines

    ax = _figure(4, 3).subplots()
    series = {"episodic": {"2k": _cell(0.2)["accuracy"], "16k": _cell(0.3)["accuracy"]}}
    draw_interval_lines(ax, ["2k", "8k", "16k"], series, scale=100.0)
    (bars,) = ax.containers  # errorbar's: the data line, its caps and bars
    assert bars.get_label() == "episodic"
    y = np.asarray(bars.lines[0].get_ydata(), dtype=float)
    assert np.isnan(y[1]) and y[0] == pytest.approx(20.0) and y[2] == pytest.approx(30.0)
