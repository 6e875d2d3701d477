"""Results schema, Markdown report, plots and console table on synthetic arms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memllm.errors import DataError
from memllm.evaluation.groups import group_sort_key, parse_length
from memllm.evaluation.markdown import format_table
from memllm.evaluation.plots import log_series, read_train_log
from memllm.evaluation.report import write_results
from memllm.evaluation.results import (
    add_comparisons,
    build_arm_result,
    experiment_info,
    load_results,
    make_results,
)

FAST = {"n_resamples": 200}
TASKS, LENGTHS, PER_GROUP = ("qa1", "qa2"), ("1k", "2k"), 12
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _examples():
    ids, groups = [], []
    for task in TASKS:
        for length in LENGTHS:
            for k in range(PER_GROUP):
                ids.append(f"{task}-{length}-{k}")
                groups.append(f"{task}/{length}")
    return ids, groups


def _train_log(path, memory: bool):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for step in range(0, 60):
            record = {"step": step, "loss": 2.0 / (1 + step / 10) + 0.05 * rng.random()}
            record.update({"loss/task": record["loss"] * 0.9, "lr": 1e-4, "grad_norm": 1.0})
            if memory:
                record["loss/aux"] = 0.01 * rng.random()
                for layer in (3, 7):
                    record[f"memory/layer{layer}/entropy"] = 1.0 + step / 60
                    record[f"memory/layer{layer}/gate_abs_mean"] = 0.001 * step
            f.write(json.dumps(record) + "\n")
            if step % 20 == 0:  # memllm's logger: eval records carry kind "eval"
                evaluation = {"kind": "eval", "step": step, "accuracy": 0.3 + step / 200}
                f.write(json.dumps(evaluation) + "\n")


def _arm(name, p_correct, ids, groups, seed, **info):
    rng = np.random.default_rng(seed)
    accuracy = (rng.random(len(ids)) < p_correct).astype(float).tolist()
    f1 = np.clip(np.asarray(accuracy) * 0.8 + rng.random(len(ids)) * 0.2, 0, 1).tolist()
    return build_arm_result(
        name, {"accuracy": accuracy, "f1": f1}, groups, example_ids=ids, seed=seed, **info, **FAST
    )


@pytest.fixture
def results(tmp_path):
    ids, groups = _examples()
    _train_log(tmp_path / "latent.jsonl", memory=True)
    arms = [
        _arm("base", 0.5, ids, groups, 0, eval_time_s=12.0, trainable_params=0),
        _arm("window", 0.3, ids, groups, 1, eval_time_s=5.0, trainable_params=0),
        _arm(
            "latent",
            0.7,
            ids,
            groups,
            2,
            train_time_s=4000.0,
            eval_time_s=20.0,
            trainable_params=123_456,
            train_log=tmp_path / "latent.jsonl",
        ),
    ]
    exp = experiment_info(
        "synthetic babilong",
        {"model": "tiny"},
        0,
        device="cpu",
        notes=["base: inputs above the window truncated from the left, question kept"],
    )
    return add_comparisons(make_results(exp, arms), **FAST)


def _check_summary(s):
    assert set(s) >= {"value", "ci95", "n"}
    low, high = s["ci95"]
    assert low <= s["value"] <= high and s["n"] > 0


def test_results_json_schema(results, tmp_path):
    paths = write_results(tmp_path / "out", results, plots=False)
    data = json.loads(paths["json"].read_text())
    assert set(data) == {"experiment", "arms"}
    exp = data["experiment"]
    assert {"name", "config", "seed", "created", "memllm_version", "device", "notes"} <= set(exp)
    assert list(data["arms"]) == ["base", "window", "latent"]
    n = len(TASKS) * len(LENGTHS) * PER_GROUP
    for name, arm in data["arms"].items():
        for key in ("wall_time_s", "train_time_s", "eval_time_s", "trainable_params", "seed"):
            assert key in arm
        assert set(arm["metrics"]) == {"accuracy", "f1"}
        for s in arm["metrics"].values():
            _check_summary(s)
            assert s["n"] == n
        assert arm["metrics"]["accuracy"]["method"] == "wilson"
        assert arm["metrics"]["f1"]["method"] == "bootstrap"
        assert list(arm["groups"]) == ["qa1/1k", "qa1/2k", "qa2/1k", "qa2/2k"]
        for group in arm["groups"].values():
            for s in group.values():
                _check_summary(s)
                assert s["n"] == PER_GROUP
        assert list(arm["lengths"]) == ["1k", "2k"]
        assert len(arm["per_example"]["accuracy"]) == len(arm["example_ids"]) == n
        expected_refs = {"base": set(), "window": {"vs_base"}, "latent": {"vs_base", "vs_window"}}
        assert set(arm["comparisons"]) == expected_refs[name]
        for tests in arm["comparisons"].values():
            for metric, t in tests.items():
                assert {"diff", "ci95", "p_value", "test", "significant"} <= set(t)
                assert t["test"] == (
                    "mcnemar_exact" if metric == "accuracy" else "sign_flip_permutation"
                )
                assert 0.0 < t["p_value"] <= 1.0 and len(t["ci95"]) == 2
    latent = data["arms"]["latent"]
    diff = (
        latent["metrics"]["accuracy"]["value"]
        - data["arms"]["base"]["metrics"]["accuracy"]["value"]
    )
    assert latent["comparisons"]["vs_base"]["accuracy"]["diff"] == pytest.approx(diff)
    assert set(latent["comparisons_by_length"]["vs_base"]) == {"1k", "2k"}
    assert load_results(tmp_path / "out") == data


def test_markdown_and_plots(results, tmp_path):
    out = tmp_path / "out"
    paths = write_results(out, results)
    md = paths["markdown"].read_text()
    for heading in (
        "# Results: synthetic babilong",
        "## How to read this report",
        "## Main results",
        "## Paired comparisons",
        "## accuracy by input length",
        "## Per group",
        "## Cost",
        "## Notes",
        "## Plots",
    ):
        assert heading in md
    assert "| latent | 48 |" in md  # main table row
    assert "inputs above the window truncated from the left" in md
    assert "123 k (123,456)" in md and "1 h 06 min" in md
    names = {p.name for p in paths["plots"]}
    assert names == {
        "metrics.png",
        "heatmap.png",
        "by_length.png",
        "training.png",
        "memory_latent.png",
    }
    for png in paths["plots"]:
        assert png.stat().st_size > 5000
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"](plots/{png.name})" in md


def test_plots_skipped_cleanly_without_their_data(tmp_path):
    arms = [
        build_arm_result("base", {"em": [1, 0, 1, 1]}, **FAST),
        build_arm_result("latent", {"em": [1, 1, 1, 0]}, **FAST),
    ]
    res = add_comparisons(make_results(experiment_info("plain", device="cpu"), arms), **FAST)
    paths = write_results(tmp_path, res)
    assert [p.name for p in paths["plots"]] == ["metrics.png"]
    md = paths["markdown"].read_text()
    assert "heatmap" not in md and "## Per group" not in md and "## Notes" not in md
    assert "| latent | base | em |" in md


def test_mismatched_example_ids_are_a_clear_error():
    a = build_arm_result("base", {"accuracy": [1, 0, 1]}, example_ids=["a", "b", "c"], **FAST)
    b = build_arm_result("latent", {"accuracy": [1, 1, 1]}, example_ids=["a", "b", "x"], **FAST)
    res = make_results(experiment_info("x", device="cpu"), [a, b])
    with pytest.raises(DataError, match=r"'latent' and 'base'.*same examples.*'x'"):
        add_comparisons(res, **FAST)


def test_examples_are_aligned_by_id():
    values = [1, 0, 1, 1, 0, 0, 1]
    ids = list("abcdefg")
    ref = build_arm_result("base", {"accuracy": values}, example_ids=ids, **FAST)
    other = [1, 1, 1, 1, 0, 1, 1]
    same = build_arm_result("latent", {"accuracy": other}, example_ids=ids, **FAST)
    order = [6, 2, 0, 5, 1, 3, 4]
    shuffled = build_arm_result(
        "latent",
        {"accuracy": [other[i] for i in order]},
        example_ids=[ids[i] for i in order],
        **FAST,
    )
    exp = experiment_info("x", device="cpu")
    one = add_comparisons(make_results(exp, [ref, same]), **FAST)["arms"]["latent"]
    two = add_comparisons(make_results(exp, [ref, shuffled]), **FAST)["arms"]["latent"]
    t1, t2 = one["comparisons"]["vs_base"]["accuracy"], two["comparisons"]["vs_base"]["accuracy"]
    assert (t1["a_only"], t1["b_only"]) == (t2["a_only"], t2["b_only"]) == (2, 0)
    assert t1["p_value"] == t2["p_value"] == pytest.approx(0.5)


def test_build_arm_result_validates():
    with pytest.raises(DataError, match="'f1' has 2 values"):
        build_arm_result("a", {"accuracy": [1, 0, 1], "f1": [0.5, 0.5]})
    with pytest.raises(DataError, match="appears more than once"):
        build_arm_result("a", {"accuracy": [1, 0]}, example_ids=["x", "x"])
    with pytest.raises(DataError, match="groups"):
        build_arm_result("a", {"accuracy": [1, 0]}, ["qa1/1k"])
    with pytest.raises(DataError, match="example 1"):
        build_arm_result("a", {"f1": [0.5, float("nan")]})
    arm = build_arm_result("a", {"accuracy": [1, 0]}, [("qa1", "1k"), ("qa1", "2k")], **FAST)
    assert list(arm["groups"]) == ["qa1/1k", "qa1/2k"]


def test_natural_order_of_groups_and_lengths():
    lengths = ["16k", "1M", "0k", "128k", "1k", "2k", "4k", "512"]
    assert sorted(lengths, key=group_sort_key) == [
        "0k",
        "512",
        "1k",
        "2k",
        "4k",
        "16k",
        "128k",
        "1M",
    ]
    groups = ["qa10/1k", "qa2/16k", "qa2/2k", "qa1/128k"]
    assert sorted(groups, key=group_sort_key) == ["qa1/128k", "qa2/2k", "qa2/16k", "qa10/1k"]
    assert parse_length("1M") == 1e6 and parse_length("qa1") is None


def test_format_table(results):
    text = format_table(results)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["arm", "n", "accuracy"]
    assert any(line.startswith("latent") and "123 k" in line for line in lines)
    assert "mcnemar_exact" in text
    header_len = len(lines[0])
    assert all(len(line) <= header_len + 20 for line in lines[:5])


def test_train_log_reading(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n\n{"step": 1, "loss": 0.9}\n{"step": 2, "lo')
    assert [r["step"] for r in read_train_log(path)] == [0, 1]
    path.write_text('{"step": 0, "loss": 1.0}\nnot json\n{"step": 1}\n')
    with pytest.raises(DataError, match=r"log.jsonl:2"):
        read_train_log(path)


def test_load_results_rejects_other_files(tmp_path):
    (tmp_path / "results.json").write_text('{"arms": []}')
    with pytest.raises(DataError, match="not a memllm results file"):
        load_results(tmp_path)


def test_log_series_follows_the_training_logger_format():
    records = [
        {"kind": "train", "step": 1, "time_s": 0.1, "loss": 2.0, "task_loss": 1.9, "lr": 1e-4},
        {"kind": "train", "step": 2, "time_s": 0.2, "loss": 1.5, "task_loss": 1.4, "lr": 1e-4},
        {"kind": "eval", "step": 2, "loss": 1.7, "accuracy": 0.4, "best": True},
        {"kind": "feature_cache", "step": 0, "hits": 10},
        {"step": 3, "memory/layer2/entropy": 1.2, "note": "text"},
    ]
    series = log_series(records)
    assert set(series) == {
        "loss",
        "task_loss",
        "lr",
        "eval/loss",
        "eval/accuracy",
        "memory/layer2/entropy",
    }
    steps, values = series["loss"]
    assert steps.tolist() == [1.0, 2.0] and values.tolist() == [2.0, 1.5]
    assert series["eval/loss"][1].tolist() == [1.7]


def test_breakdown_summarises_and_pairs_each_subset(results, tmp_path):
    from memllm.evaluation.results import add_breakdown
    from memllm.evaluation.stats import paired_test

    latent = results["arms"]["latent"]
    ids = latent["example_ids"]
    labels = {i: ("near" if k % 3 else "far") for k, i in enumerate(ids)}
    add_breakdown(results, "distance", labels, "where the facts are", order=["near"], **FAST)
    far = [k for k, i in enumerate(ids) if labels[i] == "far"]
    sizes = results["breakdowns"]["distance"]["sizes"]
    assert list(sizes.items()) == [("near", len(ids) - len(far)), ("far", len(far))]
    acc = latent["breakdowns"]["distance"]["far"]["accuracy"]
    assert acc["n"] == len(far)
    assert acc["value"] == pytest.approx(
        np.mean([latent["per_example"]["accuracy"][k] for k in far])
    )
    test = latent["comparisons_by"]["distance"]["vs_window"]["far"]["accuracy"]
    window = results["arms"]["window"]["per_example"]["accuracy"]
    expected = paired_test(
        np.asarray(latent["per_example"]["accuracy"])[far],
        np.asarray(window)[far],
        "binary",
        **FAST,
    )
    assert test["p_value"] == pytest.approx(expected["p_value"])
    assert set(results["arms"]["window"]["comparisons_by"]["distance"]) == {"vs_base"}
    paths = write_results(tmp_path / "run", results)
    text = paths["markdown"].read_text()
    assert "by distance" in text and f"far (n={len(far)})" in text
    assert tmp_path / "run" / "plots" / "breakdown_0.png" in paths["plots"]
