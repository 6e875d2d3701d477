"""HotpotQA experiments: answer, supporting-fact and joint metrics for every arm (tiny models)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import single_thread

from memllm.cli import main
from memllm.core.config import from_dict
from memllm.data import build_task
from memllm.errors import CheckpointError, ConfigError
from memllm.training.run_config import RunConfig
from memllm.training.sp_head import SP_HEAD_FILE, build_head, load_sp_head, save_sp_head

SMALL_LATENT = {
    "type": "latent",
    "layer_ids": [-1],
    "num_slots": 4,
    "memory_dim": 16,
    "num_heads": 2,
}
DATA = {
    "task": "hotpotqa",
    "num_paragraphs": 2,
    "instruction": False,
    "num_train": 8,
    "num_validation": 2,
    "num_test": 6,
}
SEGMENT = 160  # the window arm sees the question and the last few sentences
CONFIG = {
    "name": "tiny hotpotqa",
    "model": {"name": "tiny-llama"},
    "data": DATA,
    "segment_length": SEGMENT,
    "train": {
        "max_steps": 2,
        "batch_size": 4,
        "save_every": 0,
        "mixed_precision": "no",
        "supporting_facts_weight": 1.0,
    },
    "validation": {"every": 0, "max_examples": 2, "generate": False},
    "log": {"every": 1, "tensorboard": False, "progress_bar": False},
    "eval": {"max_new_tokens": 3, "batch_size": 4},
    "arms": {
        "base": {"kind": "base"},
        "window": {"kind": "window"},
        "latent": {"kind": "memory", "memory": SMALL_LATENT},
    },
}
METRICS = ("em", "f1", "sp_em", "sp_f1", "joint_em", "joint_f1")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():  # a busy 2-core machine slows two threads by 10-30×
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One experiment (base, window, latent, latent reloaded from its checkpoint)."""
    root = tmp_path_factory.mktemp("hotpot")
    out = root / "out"
    arms = {
        **CONFIG["arms"],
        "reloaded": {"kind": "memory", "checkpoint": str(out / "arms/latent/final")},
    }
    path = root / "exp.yaml"
    path.write_text(
        yaml.safe_dump({**CONFIG, "arms": arms, "output_dir": str(out)}, sort_keys=False)
    )
    with pytest.MonkeyPatch.context() as patch:  # plots are test_report's (and take seconds)
        patch.setattr("memllm.evaluation.plots.draw_plots", lambda *_args: [])
        assert main(["experiment", "--config", str(path)]) == 0
    return path, out, json.loads((out / "results.json").read_text())


def test_every_arm_reports_answer_sp_and_joint_metrics(run):
    _, out, results = run
    assert list(results["arms"]) == ["base", "window", "latent", "reloaded"]
    for name, arm in results["arms"].items():
        for metric in METRICS:
            summary = arm["metrics"][metric]
            assert summary["n"] == 6 and len(summary["ci95"]) == 2, (name, metric)
            assert summary["ci95"][0] <= summary["value"] <= summary["ci95"][1]
        # 0/1 metrics get Wilson intervals, fractions a bootstrap (whatever the values)
        assert arm["metrics"]["sp_em"]["method"] == "wilson"
        assert arm["metrics"]["sp_f1"]["method"] == "bootstrap"
        official = json.loads((out / "arms" / name / "hotpot_predictions.json").read_text())
        assert len(official["answer"]) == len(official["sp"]) == 6
    notes = " ".join(results["experiment"]["notes"])
    assert "base: supporting facts from a probe" in notes
    assert "latent: supporting facts from the SP head trained with the arm" in notes
    log = [json.loads(x) for x in (out / "arms/latent/log.jsonl").read_text().splitlines()]
    assert any("sp_loss" in r for r in log if r.get("kind", "train") == "train")
    assert "sp_f1" in (out / "results.md").read_text()


def test_sp_head_round_trips_through_the_checkpoint(run):
    _, out, results = run
    assert (out / "arms/latent/final" / SP_HEAD_FILE).is_file()
    latent, reloaded = results["arms"]["latent"], results["arms"]["reloaded"]
    for metric in METRICS:  # the reloaded memory and head predict exactly what the trained ones did
        assert reloaded["per_example"][metric] == latent["per_example"][metric]


def test_window_probe_never_predicts_outside_the_window(run):
    _, out, _ = run
    task = build_task("hotpotqa", {k: v for k, v in DATA.items() if k != "task"})
    official = json.loads((out / "arms/window/hotpot_predictions.json").read_text())
    predicted = 0
    for ex in task.examples("test"):
        # byte tokenizer: one token per UTF-8 byte, so the window starts this many bytes in
        window_start = len(ex.prompt.encode()) - SEGMENT
        starts = {(t, k): len(ex.prompt[:c].encode()) for t, k, c, _ in ex.meta["sentences"]}
        for title, sid in official["sp"][ex.meta["_id"]]:
            assert starts[(title, sid)] >= window_start
            predicted += 1
    assert predicted > 0


def test_missing_sp_head_in_checkpoint_is_one_line(run, tmp_path, capsys):
    _, out, _ = run
    folder = tmp_path / "ckpt"
    shutil.copytree(out / "arms/latent/final", folder)
    (folder / SP_HEAD_FILE).unlink()
    cfg = {
        **CONFIG,
        "arms": {"mem": {"kind": "memory", "checkpoint": str(folder)}},
        "output_dir": str(tmp_path / "o"),
    }
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(cfg))
    assert main(["experiment", "--config", str(exp)]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval mem" not in err  # refused before generating
    assert err.startswith("memllm experiment: error:") and SP_HEAD_FILE in err
    assert "\n" not in err


def test_resume_needs_the_sp_head(run):
    from memllm.evaluation.experiment import load_experiment_config
    from memllm.training.checkpointing import latest_checkpoint
    from memllm.training.trainer import train

    path, out, _ = run
    cfg = load_experiment_config(path)
    from memllm.evaluation.experiment import arm_run_config

    run_cfg = arm_run_config(cfg, "latent", cfg.arms["latent"])
    checkpoint = latest_checkpoint(out / "arms/latent")
    (checkpoint / SP_HEAD_FILE).unlink()
    with pytest.raises(CheckpointError, match=SP_HEAD_FILE):
        train(run_cfg)


def test_head_file_is_strict(tmp_path):
    head = build_head(32, seed=1)
    save_sp_head(head, tmp_path)
    loaded = load_sp_head(tmp_path, 32)
    x = torch.randn(3, 32)
    assert torch.equal(head.score_features(x), loaded.score_features(x))
    with pytest.raises(CheckpointError, match="hidden size 32"):
        load_sp_head(tmp_path, 48)
    with pytest.raises(CheckpointError, match="missing"):
        load_sp_head(tmp_path / "nowhere")


def test_supporting_facts_weight_needs_hotpotqa():
    data = {
        "model": {"name": "tiny-llama"},
        "data": {"task": "babilong"},
        "train": {"supporting_facts_weight": 1.0},
    }
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, data)
    assert "train.supporting_facts_weight" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="must be >= 0"):
        from_dict(RunConfig, {**data, "data": DATA, "train": {"supporting_facts_weight": -1.0}})


def test_feature_cache_gives_the_same_sp_loss(tmp_path):
    from memllm.training.trainer import train

    losses = {}
    for cache in (False, True):
        cfg = from_dict(
            RunConfig,
            {
                "model": {"name": "tiny-llama"},
                "memory": SMALL_LATENT,
                "data": DATA,
                "train": {
                    "epochs": 2,
                    "batch_size": 4,
                    "save_every": 0,
                    "mixed_precision": "no",
                    "segment_length": SEGMENT,
                    "supporting_facts_weight": 1.0,
                    "feature_cache": cache,
                },
                "eval": {"every": 0, "max_examples": 2, "generate": False},
                "log": {"every": 1, "tensorboard": False, "progress_bar": False},
                "output_dir": str(tmp_path / str(cache)),
            },
        )
        train(cfg)
        log = (tmp_path / str(cache) / "log.jsonl").read_text().splitlines()
        losses[cache] = [json.loads(r)["sp_loss"] for r in log if '"sp_loss"' in r]
    assert len(losses[True]) == len(losses[False]) >= 4  # 2 epochs of 2 steps (+ validation)
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
