"""The experiment runner end to end on a tiny model, and chat-template prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from memllm.cli import main
from memllm.core.tiny import byte_tokenizer
from memllm.data.prompting import format_example
from memllm.evaluation.experiment import ArmSettings, Experiment
from memllm.evaluation.results import ARM_DESCRIPTIONS

CONFIG = {
    "name": "tiny experiment",
    "model": {"name": "tiny-llama"},
    "data": {
        "task": "babilong",
        "tasks": ["qa1"],
        "lengths": ["0k"],
        "prompt": "plain",
        "num_train": 8,
        "num_validation": 4,
        "num_test": 6,
        "tokenizer": "tiny-llama",
    },
    "segment_length": 64,
    "train": {"max_steps": 2, "batch_size": 4, "save_every": 0, "mixed_precision": "no"},
    "validation": {"every": 0, "max_examples": 4, "generate": False},
    "log": {"every": 1, "tensorboard": False, "progress_bar": False},
    "eval": {"max_new_tokens": 3, "batch_size": 4},
    "arms": {
        "base": {"kind": "base"},
        "window": {"kind": "window"},
        "latent": {
            "kind": "memory",
            "memory": {"type": "latent", "num_slots": 4, "memory_dim": 16, "num_heads": 2},
        },
    },
}


def test_experiment_writes_results_with_intervals(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump({**CONFIG, "output_dir": str(tmp_path / "out")}, sort_keys=False)
    )
    assert main(["experiment", "--config", str(path)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["arms"]) == ["base", "window", "latent"]
    for arm in results["arms"].values():
        acc = arm["metrics"]["accuracy"]
        assert acc["n"] == 6 and len(acc["ci95"]) == 2
        assert acc["ci95"][0] <= acc["value"] <= acc["ci95"][1]
    assert results["arms"]["latent"]["trainable_params"] > 0
    assert "vs_window" in results["arms"]["latent"]["comparisons"]
    # BabiLong built offline knows where its facts are: accuracy split by reach
    sizes = results["breakdowns"]["where the supporting facts are"]["sizes"]
    assert set(sizes) <= {"facts in window", "facts earlier"} and sum(sizes.values()) == 6
    assert "where the supporting facts are" in results["arms"]["latent"]["comparisons_by"]
    assert (tmp_path / "out" / "results.md").is_file()
    rows = (tmp_path / "out" / "arms" / "latent" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 6
    assert "report:" in capsys.readouterr().out


def test_unknown_arm_is_one_line(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump({**CONFIG, "output_dir": str(tmp_path / "out")}, sort_keys=False)
    )
    assert main(["experiment", "--config", str(path), "--arms", "magic"]) == 2
    assert "no arm named 'magic'" in capsys.readouterr().err


def test_bad_arm_config_names_the_key(tmp_path, capsys):
    bad = {**CONFIG, "arms": {"ft": {"kind": "finetuned"}}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["experiment", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "exp.yaml" in err and "arms.ft.lora" in err


def test_chat_template_wraps_prompt_and_target():
    tokenizer = byte_tokenizer()
    assert format_example(tokenizer, "Q?", " A", chat=False) == ("Q?", " A")
    with pytest.raises(ValueError, match="no chat template"):
        format_example(tokenizer, "Q?", " A", chat=True)
    tokenizer.chat_template = (
        "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}"
    )
    assert format_example(tokenizer, "Q?", " A", chat=True) == ("<u>Q?</u><a>", "A")


BOOKS = Path(__file__).parents[1] / "fixtures" / "books"


def _run(tmp_path, config: dict, *extra: str) -> dict:
    path = tmp_path / "exp.yaml"
    out = tmp_path / "out"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(out)}, sort_keys=False))
    assert main(["experiment", "--config", str(path), *extra]) == 0
    return json.loads((out / "results.json").read_text())


def _outputs(tmp_path, arm: str) -> list[str]:
    rows = (tmp_path / "out" / "arms" / arm / "predictions.jsonl").read_text().splitlines()
    return [json.loads(r)["output"] for r in rows]


NEURAL = {"type": "neural", "layer_ids": [-1], "mlp_depth": 2, "chunk_size": 16}
LORA = {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}


def test_cross_task_pretrains_on_a_corpus_and_evaluates_on_babilong(tmp_path):
    # MemoryLlama's shape: the memory learns language modelling on text, then answers BabiLong.
    config = {
        **CONFIG,
        "train_data": {
            "task": "corpus",
            "source": str(BOOKS),
            "max_doc_chars": 400,
            "validation_fraction": 0.2,
            "test_fraction": 0.0,
        },
        "train": {**CONFIG["train"], "max_length": 64},
        # MemoryLlama's recipe: a neural memory co-trained with LoRA
        "arms": {"neural": {"kind": "memory", "memory": NEURAL, "lora": LORA}},
    }
    arm = _run(tmp_path, config)["arms"]["neural"]
    assert arm["metrics"]["accuracy"]["n"] == 6  # scored on BabiLong
    assert arm["trainable_params"] > 0 and arm["description"].endswith("+ LoRA")
    run = yaml.safe_load((tmp_path / "out" / "arms" / "neural" / "config.yaml").read_text())
    assert run["data"] == {**config["train_data"]}  # the run config says what was trained
    assert run["eval"]["metric"] == "loss" and run["eval"]["generate"] is False
    assert run["lora"]["rank"] == 2
    log = (tmp_path / "out" / "arms" / "neural" / "log.jsonl").read_text().splitlines()
    evals = [r for r in map(json.loads, log) if r["kind"] == "eval"]
    assert evals and all(set(r) >= {"loss"} and "accuracy" not in r for r in evals)


def test_untrained_memory_equals_window(tmp_path):
    config = {
        **CONFIG,
        "arms": {
            "window": {"kind": "window"},
            "no_ft": {"kind": "memory", "untrained": True, "memory": NEURAL},
            "latent_no_ft": {
                "kind": "memory",
                "untrained": True,
                "memory": CONFIG["arms"]["latent"]["memory"],
            },
        },
    }
    results = _run(tmp_path, config)
    window = _outputs(tmp_path, "window")
    assert any(window)  # not a vacuous comparison of empty answers
    # The inputs span several segments, so the memory is written (and, neural, learns at test
    # time); its zero-initialised gates keep the backbone's outputs exactly.
    assert _outputs(tmp_path, "no_ft") == window
    assert _outputs(tmp_path, "latent_no_ft") == window
    arm = results["arms"]["no_ft"]
    assert arm["trainable_params"] == 0 and arm["train_time_s"] is None
    assert "equals window by construction" in arm["description"]


def test_latent_ablations_run(tmp_path):
    latent = CONFIG["arms"]["latent"]["memory"]
    config = {
        **CONFIG,
        "train": {**CONFIG["train"], "max_steps": 1},
        "eval": {**CONFIG["eval"], "max_examples": 2},
        "arms": {
            "latent_no_reg": {
                "kind": "memory",
                "memory": {**latent, "sparsity_weight": 0, "entropy_weight": 0},
            },
            "latent_no_gate": {"kind": "memory", "memory": {**latent, "update_gate": False}},
        },
    }
    arms = _run(tmp_path, config)["arms"]
    assert all(a["trainable_params"] > 0 for a in arms.values())
    # without the update gate the memory has no gate weights to train
    assert arms["latent_no_gate"]["trainable_params"] < arms["latent_no_reg"]["trainable_params"]
    assert "no sparsity/entropy" in arms["latent_no_reg"]["description"]
    assert "no update gate" in arms["latent_no_gate"]["description"]
    log = (tmp_path / "out" / "arms" / "latent_no_reg" / "log.jsonl").read_text()
    assert all(r.get("aux_loss", 0) == 0 for r in map(json.loads, log.splitlines()))


def test_no_carry_control_trains_and_answers_on_the_last_segment(tmp_path):
    from memllm.evaluation.experiment import arm_run_config, load_experiment_config

    latent = CONFIG["arms"]["latent"]
    config = {
        **CONFIG,
        "train": {**CONFIG["train"], "max_steps": 1},
        "eval": {**CONFIG["eval"], "max_examples": 2},
        "arms": {
            "window": {"kind": "window"},
            "latent": latent,
            "latent_no_carry": {**latent, "carry": False},
        },
        "compare_with": ["window", "latent_no_carry"],
    }
    results = _run(tmp_path, config)
    arms = results["arms"]
    assert set(arms["latent"]["comparisons"]) == {"vs_window", "vs_latent_no_carry"}
    assert set(arms["latent_no_carry"]["comparisons"]) == {"vs_window"}
    assert ARM_DESCRIPTIONS["no_carry"] in arms["latent_no_carry"]["description"]
    # it trains on what it answers from: each input cut to its last segment (64 tokens)
    cfg = load_experiment_config(tmp_path / "exp.yaml")
    run = arm_run_config(cfg, "latent_no_carry", cfg.arms["latent_no_carry"])
    assert run.train.max_length == 64
    assert arm_run_config(cfg, "latent", cfg.arms["latent"]).train.max_length is None


def test_arms_at_one_place_record_the_backbone_once(tmp_path):
    """With train.feature_cache the arms that train at the same place share what was recorded:
    after the latent arm, the episodic arm and the no-carry control (its segments are the last
    ones of the same inputs) replay everything."""
    latent = CONFIG["arms"]["latent"]
    episodic = {"kind": "memory", "memory": {"type": "episodic", "num_heads": 2, "key_dim": 16}}
    config = {
        **CONFIG,
        "train": {**CONFIG["train"], "max_steps": 4, "feature_cache": True},  # 2 epochs: logged
        "eval": {**CONFIG["eval"], "max_examples": 2},
        "arms": {
            "latent": latent,
            "latent_no_carry": {**latent, "carry": False},
            "episodic": episodic,
        },
        "compare_with": ["latent_no_carry"],
    }
    _run(tmp_path, config)

    def cache_log(arm: str) -> list[dict]:
        lines = (tmp_path / "out" / "arms" / arm / "log.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "feature_cache"]

    assert cache_log("latent")[-1]["misses"] > 0
    for arm in ("latent_no_carry", "episodic"):
        assert cache_log(arm) and all(r["misses"] == 0 for r in cache_log(arm)), arm


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"train_data": {"task": "babylong"}}, "train_data.task"),
        ({"train_data": {"task": 3}}, "train_data.task"),
        ({"data": {"task": "corpus"}}, "data.task"),
        (
            {"train_data": {"task": "corpus"}, "validation": {"metric": "accuracy"}},
            "validation.metric",
        ),
        ({"train_data": {"task": "corpus"}}, "train.max_length"),
        (
            {"arms": {"x": {"kind": "memory", "untrained": True, "memory": NEURAL, "lora": {}}}},
            "arms.x.lora",
        ),
        ({"arms": {"x": {"kind": "window", "untrained": True}}}, "arms.x.untrained"),
        ({"arms": {"x": {"kind": "window", "carry": False}}}, "arms.x.carry"),
        ({"compare_with": ["window", "ghost"]}, "compare_with"),
        (
            {
                "data": {"task": "zsre"},
                "arms": {"x": {**CONFIG["arms"]["latent"], "carry": False}},
            },
            "arms.x.carry",
        ),
        (
            {
                "arms": {
                    "x": {
                        "kind": "memory",
                        "untrained": True,
                        "memory": {"type": "neural", "arch": "x"},
                    }
                }
            },
            "arms.x.memory.arch",
        ),
    ],
)
def test_bad_experiment_config_is_one_line_naming_the_key(tmp_path, capsys, change, key):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, **change}))
    assert main(["experiment", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exp.yaml" in err and key in err, err


def test_a_missing_checkpoint_is_one_line_before_any_arm_runs(tmp_path, capsys):
    arms = {
        "window": {"kind": "window"},
        "trained": {"kind": "memory", "checkpoint": str(tmp_path / "nowhere" / "final")},
    }
    path = tmp_path / "exp.yaml"
    config = {**CONFIG, "arms": arms, "output_dir": str(tmp_path / "out")}
    path.write_text(yaml.safe_dump(config))
    assert main(["experiment", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "exp.yaml" in err and "arms.trained.checkpoint" in err and "not found" in err
    assert not (tmp_path / "out" / "results.json").exists()  # window did not run first
    # an arm that is not selected is not checked
    assert main(["experiment", "--config", str(path), "--arms", "window"]) == 0


def test_memory_arms_are_described_by_their_config():
    def describe(**arm):
        return Experiment._describe("x", ArmSettings(kind="memory", **arm))

    assert "gated branch (Titans MAG), layers [2, 3]" in describe(
        memory={**NEURAL, "arch": "gate", "layer_ids": [2, 3]}
    )
    assert describe(memory={"type": "latent"}) == ARM_DESCRIPTIONS["latent"]
    assert describe(memory={"type": "latent"}, lora={"rank": 2}).endswith("+ LoRA")
    text = describe(memory={"type": "latent", "update_gate": False}, untrained=True)
    assert ARM_DESCRIPTIONS["no_gate"] in text and text.endswith(ARM_DESCRIPTIONS["untrained"])


def test_arms_run_one_at_a_time_build_one_report(tmp_path, caplog):
    """--arms keeps the other arms' results when their settings are unchanged (no lost work)."""
    config = {**CONFIG, "train": {**CONFIG["train"], "max_steps": 1}}
    first = _run(tmp_path, config, "--arms", "window,latent")
    second = _run(tmp_path, config, "--arms", "base")
    assert list(second["arms"]) == ["base", "window", "latent"]
    assert second["arms"]["latent"]["per_example"] == first["arms"]["latent"]["per_example"]
    assert "vs_base" in second["arms"]["latent"]["comparisons"]  # paired with the new arm
    # a copied folder keeps its arms: where a report is written is not a setting
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    path = tmp_path / "copy.yaml"
    path.write_text(
        yaml.safe_dump({**config, "output_dir": str(tmp_path / "copy")}, sort_keys=False)
    )
    assert main(["experiment", "--config", str(path), "--arms", "window"]) == 0
    copied = json.loads((tmp_path / "copy" / "results.json").read_text())
    assert list(copied["arms"]) == ["base", "window", "latent"]
    # another evaluation: the kept arms would not pair with it, so they are dropped, loudly
    changed = {**config, "eval": {**config["eval"], "max_new_tokens": 2}}
    third = _run(tmp_path, changed, "--arms", "window")
    assert list(third["arms"]) == ["window"]
    assert "ran with other settings" in caplog.text


def test_an_interrupted_experiment_keeps_its_finished_arms(tmp_path, monkeypatch):
    config = {**CONFIG, "train": {**CONFIG["train"], "max_steps": 1}}
    real = Experiment.run_arm

    def crash_on_latent(self, name, arm):
        if name == "latent":
            raise KeyboardInterrupt
        return real(self, name, arm)

    monkeypatch.setattr(Experiment, "run_arm", crash_on_latent)
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump({**config, "output_dir": str(tmp_path / "out")}, sort_keys=False)
    )
    assert main(["experiment", "--config", str(path)]) == 130  # Ctrl-C during the latent arm
    partial = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(partial["arms"]) == ["base", "window"]
    monkeypatch.setattr(Experiment, "run_arm", real)
    assert list(_run(tmp_path, config, "--arms", "latent")["arms"]) == ["base", "window", "latent"]


def test_experiments_running_other_arms_into_one_folder_build_one_report(tmp_path):
    """Two runs started together (e.g. one per GPU) with other --arms and one output folder:
    each report write reads the folder's results again, so neither loses the other's arms."""
    from memllm.evaluation.experiment_config import load_experiment_config

    config = {**CONFIG, "train": {**CONFIG["train"], "max_steps": 1}}
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump({**config, "output_dir": str(tmp_path / "out")}, sort_keys=False)
    )
    cfg = load_experiment_config(path)
    first = Experiment(cfg, source=path, arms=["window", "latent"])
    second = Experiment(cfg, source=path, arms=["base"])  # started before the first wrote
    first.run()
    assert list(second.run()["arms"]) == ["base", "window", "latent"]
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(written["arms"]) == ["base", "window", "latent"]
    assert "vs_base" in written["arms"]["latent"]["comparisons"]  # paired with the other's arm
