"""Every shipped config loads and validates offline (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from memllm.cli.model import memory_config_from_file
from memllm.core.config import load_yaml
from memllm.evaluation.experiment import arm_run_config, load_experiment_config, quickstart_config
from memllm.training.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [*sorted((ROOT / "configs").rglob("*.yaml")), quickstart_config()]
EXPERIMENTS = ROOT / "configs" / "experiments"

# The arms the paper experiment configs promise (their names are what the docs and make-target
# tables refer to).
MEMORYLLAMA_ARMS = ["pt_ew_alma", "pt_ew_elma", "baseline", "baseline_ft", "no_ft"]
EVERY_ARM = [
    "base",
    "window",
    "finetuned",
    "latent",
    "latent_no_reg",
    "latent_no_gate",
    "latent_no_carry",
    "neural_context",
    "neural_layer",
    "neural_gate",
    "neural_context_lora",
    "neural_no_ft",
]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_config_loads(path):
    data = load_yaml(path)
    if "rungs" in data:  # a ladder: every rung is an experiment config
        from memllm.evaluation.ladder import load_ladder

        assert all(cfg.arms for cfg in load_ladder(path)[1].values())
    elif "arms" in data:
        cfg = load_experiment_config(path)  # also builds every trained arm's run config
        assert cfg.arms
    elif set(data) == {"memory"}:
        assert memory_config_from_file(path).type in ("latent", "neural")
    elif "distributed_type" in data:  # an accelerate config (configs/accelerate): its own loader
        from accelerate.commands.config.config_args import load_config_from_file

        assert load_config_from_file(str(path)).num_processes > 1
    else:
        cfg = load_run_config(path)
        assert cfg.output_dir


def test_there_are_configs_for_both_memories():
    kinds = {
        load_yaml(p).get("memory", {}).get("type") for p in CONFIGS if "memory" in load_yaml(p)
    }
    assert {"latent", "neural"} <= kinds


@pytest.mark.parametrize(
    ("name", "arms"),
    [
        ("memoryllama.yaml", MEMORYLLAMA_ARMS),
        ("smollm2_memoryllama.yaml", MEMORYLLAMA_ARMS),
        ("smollm2_babilong_arms.yaml", EVERY_ARM),
    ],
)
def test_paper_experiments_name_their_arms(name, arms):
    cfg = load_experiment_config(EXPERIMENTS / name)
    assert list(cfg.arms) == arms


@pytest.mark.parametrize("name", ["memoryllama.yaml", "smollm2_memoryllama.yaml"])
def test_memoryllama_pretrains_on_a_corpus_and_evaluates_on_babilong(name):
    cfg = load_experiment_config(EXPERIMENTS / name)
    assert cfg.data["task"] == "babilong" and cfg.train_data["task"] == "corpus"
    alma, elma = (arm_run_config(cfg, a, cfg.arms[a]) for a in ("pt_ew_alma", "pt_ew_elma"))
    assert alma.data["task"] == "corpus" and alma.eval.metric == "loss"
    assert alma.memory.arch == elma.memory.arch == "context"
    assert alma.lora is not None and elma.lora is not None
    assert max(alma.memory.layer_ids) > max(elma.memory.layer_ids)  # late vs early layers
    assert cfg.arms["baseline"].kind == "base" and cfg.arms["baseline_ft"].kind == "finetuned"
    assert cfg.arms["no_ft"].untrained and cfg.arms["no_ft"].memory == cfg.arms["pt_ew_alma"].memory


def test_override_of_an_aliased_section_changes_only_that_arm():
    # The arms share their train/memory sections through YAML anchors.
    cfg = load_experiment_config(
        EXPERIMENTS / "smollm2_babilong_arms.yaml",
        ["arms.neural_context.train.max_steps=99", "arms.neural_no_ft.memory.layer_ids=[1]"],
    )
    assert cfg.arms["neural_context"].train["max_steps"] == 99
    assert cfg.arms["neural_layer"].train["max_steps"] == 15
    assert cfg.arms["neural_no_ft"].memory["layer_ids"] == [1]
    assert cfg.arms["neural_context"].memory["layer_ids"] == [26, 27]


def test_unquoted_no_in_yaml_means_the_word_not_false(tmp_path):
    # YAML 1.1 reads `mixed_precision: no` as False; the setting's choices say what was meant
    from memllm.core.config import ConfigError, from_dict
    from memllm.training.run_config import TrainSettings

    assert from_dict(TrainSettings, {"mixed_precision": False}).mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision: must be one of"):
        from_dict(TrainSettings, {"mixed_precision": True})  # no choice reads as yes
