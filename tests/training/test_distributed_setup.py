"""The step module that accelerate wraps, in one process (fast): what DDP syncs and ignores, the
HF attributes accelerate's FSDP2 preparation reads from it, and the layouts refused."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from memllm.errors import ConfigError
from memllm.training import parallel
from memllm.training.forward import trainable_parameters
from memllm.training.parallel import StepModule, check_supported
from memllm.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_train import ToyTask, toy_config


@pytest.fixture
def model():
    import memllm

    model, _ = memllm.load_backbone("tiny-llama")
    memllm.inject_memory(model, {"type": "latent", "num_slots": 2, "memory_dim": 8, "num_heads": 2})
    model.requires_grad_(False)
    for p in trainable_parameters(model):
        p.requires_grad_(True)
    return model


def test_ddp_ignores_the_frozen_backbone_and_syncs_memory_and_plugin_heads(model):
    head = nn.Linear(4, 1)
    trainable = [*trainable_parameters(model), *head.parameters()]
    step = StepModule(model, [*trainable, trainable[0]], forward=lambda b, training: b)
    assert list(step.extra) == list(head.parameters())  # a memory parameter is not added twice
    parallel._ignore_frozen(step)
    ignored = set(step._ddp_params_and_buffers_to_ignore)
    names = dict(step.named_parameters())
    synced = [p for n, p in names.items() if n not in ignored]
    assert {id(p) for p in synced} == {id(p) for p in trainable}
    assert {n for n, _ in step.named_buffers()} <= ignored
    assert step("batch", training=True) == "batch"


def test_accelerates_fsdp2_preparation_finds_the_models_units(model):
    from accelerate.utils.fsdp_utils import _find_final_norm

    step = StepModule(model, [], forward=lambda b, training: b)
    assert _find_final_norm(step) is model.model.norm
    assert step.get_input_embeddings() is model.get_input_embeddings()
    assert step.get_output_embeddings() is model.get_output_embeddings()
    assert step._no_split_modules == model._no_split_modules


@pytest.mark.parametrize(
    ("kind", "version", "message"),
    [("DEEPSPEED", 2, "DeepSpeed is not supported"), ("FSDP", 1, "fsdp_version 1")],
)
def test_layouts_that_cannot_resume_exactly_are_one_line_errors(kind, version, message):
    from accelerate.utils import DistributedType

    acc = SimpleNamespace(distributed_type=DistributedType[kind], is_fsdp2=version == 2)
    with pytest.raises(ConfigError, match=message) as err:
        check_supported(acc, "run.yaml")
    assert str(err.value).startswith("run.yaml: accelerate config:")
    assert "\n" not in str(err.value)


def test_one_process_trains_through_the_unwrapped_step_module(tmp_path):
    trainer = Trainer(toy_config(tmp_path), task=ToyTask())
    assert type(trainer.step_module) is StepModule  # no DDP wrapper with one process
    assert trainer.step_module.model is trainer.model
    before = [p.detach().clone() for p in trainer.params]
    trainer.run()
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.params, strict=True))
