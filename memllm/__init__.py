"""memllm: trainable long-term memory for Hugging Face causal language models.

Public API::

    model, tokenizer = memllm.load_backbone("smollm2-135m")      # frozen, eval mode
    memllm.inject_memory(model, {"type": "latent", "num_slots": 16})
    with memllm.memory_session(model) as mem:                     # one example's memory
        out = memllm.forward_segments(model, ids, mask, labels, segment_length=512, session=mem)
    text = memllm.generate(model, tokenizer, long_prompt, segment_length=512)
    memllm.save_checkpoint(model, "out/final"); memllm.load_checkpoint(other_model, "out/final")

or the same through one object, in PEFT's style::

    model = memllm.MemoryModel.from_config("smollm2-135m", {"type": "latent", "num_slots": 16})
    model.save_pretrained("out/final")          # memory + PEFT-format LoRA adapter, if any
    model = memllm.MemoryModel.from_pretrained("smollm2-135m", "out/final")
    text = model.generate(long_prompt, segment_length=512)
"""

__version__ = "0.1.0"

from memllm import _compat
from memllm.core.backbone import load_backbone, load_tokenizer
from memllm.core.checkpoint import (
    load_checkpoint,
    load_memory,
    read_checkpoint,
    save_checkpoint,
    save_memory,
)
from memllm.core.config import ConfigError
from memllm.core.generation import generate, generate_ids
from memllm.core.inject import (
    get_controller,
    has_memory,
    inject_memory,
    memory_config,
    memory_parameters,
    memory_session,
    remove_memory,
)
from memllm.core.lora import LoraSettings, apply_lora, lora_parameters
from memllm.core.model import MemoryModel
from memllm.core.segments import forward_segments, segment_bounds
from memllm.core.session import MemorySession
from memllm.errors import BackboneError, CheckpointError, DataError, MemllmError
from memllm.memory import LatentMemoryConfig, memory_config_from_dict

_compat.install()  # old flat import paths, deprecated

__all__ = [
    "BackboneError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LatentMemoryConfig",
    "LoraSettings",
    "MemllmError",
    "MemoryModel",
    "MemorySession",
    "__version__",
    "apply_lora",
    "forward_segments",
    "generate",
    "generate_ids",
    "get_controller",
    "has_memory",
    "inject_memory",
    "load_backbone",
    "load_checkpoint",
    "load_memory",
    "load_tokenizer",
    "lora_parameters",
    "memory_config",
    "memory_config_from_dict",
    "memory_parameters",
    "memory_session",
    "read_checkpoint",
    "remove_memory",
    "save_checkpoint",
    "save_memory",
    "segment_bounds",
]
