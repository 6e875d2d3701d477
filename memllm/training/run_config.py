"""The run config of ``memllm train``: typed sections, loaded strictly from YAML + overrides.

A run config is one YAML file::

    model:  {name, gguf_file, dtype}          # the frozen backbone
    memory: {type: latent|neural, ...}        # null = no memory (LoRA-only baseline)
    lora:   null | {rank, alpha, dropout, target_modules}
    data:   {task: babilong|hotpotqa|zsre|corpus, ...task options}
    train:  {...}   eval: {...}   log: {...}
    output_dir: runs/x
    seed: 0

Loading goes through :func:`memllm.core.config.from_dict`, so an unknown key, a wrong type or an
impossible value is one :class:`ConfigError` line that names the key — and here also the file.
Checks that need the model (a layer index past its depth, a segment longer than its context)
run in :func:`check_against_model` once the model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from memllm.core.config import (
    apply_overrides,
    check,
    field_help,
    from_dict,
    load_yaml,
    to_dict,
)
from memllm.errors import ConfigError
from memllm.training.curriculum import CurriculumStage, check_curriculum
from memllm.training.distill import DistillSettings


@dataclass
class ModelSettings:
    """The frozen backbone."""

    name: str = field(
        default="smollm2-135m",
        metadata={
            "help": "bundled alias (smollm2-135m), tiny-llama, ..., a local folder, .gguf or hub id"
        },
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file inside `name` (a folder or hub repo)"}
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "dtype of the backbone weights (float32 on CPU)"}
    )
    chat_template: bool = field(
        default=False,
        metadata={
            "help": "wrap prompts in the tokenizer's chat template (instruct models); "
            "the target is the assistant's reply"
        },
    )


@dataclass
class TrainSettings:
    """The optimisation loop. Steps count optimizer updates."""

    epochs: int = field(
        default=1, metadata={"help": "passes over the train split (ignored when max_steps is set)"}
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "optimizer steps to run; null = epochs × steps/epoch"}
    )
    max_minutes: float | None = field(
        default=None,
        metadata={
            "help": "stop after this many minutes of training wall time (this run; the final "
            "validation and checkpoint follow); null = no limit"
        },
    )
    batch_size: int = field(default=4, metadata={"help": "examples per micro-batch, per process"})
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas"}
    )
    scheduler: Literal["constant", "cosine", "linear"] = field(
        default="cosine",
        metadata={"help": "learning-rate schedule after warm-up (linear decays to 0)"},
    )
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps from 0 to lr"})
    max_grad_norm: float | None = field(
        default=1.0,
        metadata={"help": "clip the trainable parameters' gradient norm; null = no clipping"},
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto",
        metadata={
            "help": "autocast: auto = bf16 on GPUs that have it, fp16 on older GPUs, none on CPU"
        },
    )
    segment_length: int = field(
        default=512, metadata={"help": "tokens per forward call; longer inputs go through memory"}
    )
    bptt_segments: int | None = field(
        default=None,
        metadata={
            "help": "truncated backprop: gradients cross at most this many segments; null = all"
        },
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "cut prompts from the left to fit prompt+target (also the corpus row length)"
        },
    )
    persistent_memory: bool = field(
        default=False,
        metadata={"help": "carry the (detached) memory into the next batch; off = fresh per batch"},
    )
    shuffle: bool = field(
        default=True, metadata={"help": "shuffle the train split every epoch (seeded)"}
    )
    feature_cache: bool = field(
        default=False,
        metadata={
            "help": "record what the frozen layers below the lowest memory (or LoRA) layer "
            "compute, once per distinct segment; later steps run only the layers from there up"
        },
    )
    supporting_facts_weight: float = field(
        default=0.0,
        metadata={
            "help": "hotpotqa: also train a supporting-fact head on the final hidden states; "
            "loss += weight × its BCE (0 = no head)"
        },
    )
    curriculum: list[CurriculumStage] = field(
        default_factory=list,
        metadata={
            "help": "stages [{steps | until: {metric, value}, data: {...}, segments | "
            "max_length}], easy to hard; needs max_steps (docs/training.md)"
        },
    )
    distill: Any = field(
        default=None,
        metadata={
            "help": "null, or {teacher: base | checkpoint folder, weight, temperature, top_k}: "
            "loss += weight × T²·KL(teacher ‖ memory) on the last segment"
        },
    )
    save_every: int = field(
        default=100, metadata={"help": "checkpoint every N steps (0 = only at the end)"}
    )
    keep_last: int = field(
        default=2, metadata={"help": "checkpoints to keep (plus the best by validation)"}
    )

    def __post_init__(self) -> None:
        check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        if self.max_steps is not None:
            check(self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        if self.max_minutes is not None:
            check(self.max_minutes > 0, "max_minutes", f"must be > 0, got {self.max_minutes}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        check(self.grad_accum_steps > 0, "grad_accum_steps", "must be > 0")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(len(self.betas) == 2, "betas", f"needs two values, got {self.betas}")
        check(all(0 <= b < 1 for b in self.betas), "betas", "must be in [0, 1)")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        if self.max_grad_norm is not None:
            check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0 (or null)")
        check(self.segment_length > 0, "segment_length", f"must be > 0, got {self.segment_length}")
        if self.bptt_segments is not None:
            check(self.bptt_segments > 0, "bptt_segments", "must be > 0 (or null)")
        if self.max_length is not None:
            check(self.max_length > 1, "max_length", f"must be > 1, got {self.max_length}")
        check(self.supporting_facts_weight >= 0, "supporting_facts_weight", "must be >= 0")
        check(self.save_every >= 0, "save_every", "must be >= 0")
        check(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")
        check_curriculum(self.curriculum, self.max_steps)
        # parsed here (not by the type) so that an error names train.distill.<key>
        if isinstance(self.distill, dict):
            self.distill = from_dict(DistillSettings, self.distill, prefix="distill.")
        elif self.distill is not None and not isinstance(self.distill, DistillSettings):
            raise ConfigError(f"distill: expected null or a mapping, got {self.distill!r}")


@dataclass
class EvalSettings:
    """Validation during training, best checkpoint and early stopping."""

    every: int = field(
        default=100, metadata={"help": "validate every N steps (0 = only at the end)"}
    )
    split: Literal["validation", "test"] = field(
        default="validation", metadata={"help": "held-out split to validate on"}
    )
    max_examples: int | None = field(
        default=64, metadata={"help": "validate on the first N examples; null = all"}
    )
    batch_size: int | None = field(
        default=None, metadata={"help": "per process; null = train.batch_size"}
    )
    generate: bool = field(
        default=True,
        metadata={
            "help": "also generate answers and compute the task metric (when the task has one)"
        },
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "generation length; null = the task's"}
    )
    metric: str = field(
        default="loss",
        metadata={
            "help": "picks the best checkpoint, early-stops: loss or a task metric (e.g. accuracy)"
        },
    )
    patience: int | None = field(
        default=None,
        metadata={"help": "stop after this many validations without improvement; null = never"},
    )
    min_delta: float = field(
        default=0.0, metadata={"help": "smallest change that counts as an improvement"}
    )

    def __post_init__(self) -> None:
        check(self.every >= 0, "every", "must be >= 0")
        if self.max_examples is not None:
            check(self.max_examples > 0, "max_examples", "must be > 0 (or null)")
        if self.batch_size is not None:
            check(self.batch_size > 0, "batch_size", "must be > 0 (or null)")
        if self.max_new_tokens is not None:
            check(self.max_new_tokens > 0, "max_new_tokens", "must be > 0 (or null)")
        if self.patience is not None:
            check(self.patience > 0, "patience", "must be > 0 (or null)")
        check(self.min_delta >= 0, "min_delta", "must be >= 0")

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "loss"


@dataclass
class WandbSettings:
    """Weights & Biases (optional; needs ``pip install wandb``). Credentials come from wandb's
    own login, never from files read by memllm."""

    project: str = field(default="memllm", metadata={"help": "W&B project"})
    entity: str | None = field(default=None, metadata={"help": "W&B entity (team or user)"})
    name: str | None = field(
        default=None, metadata={"help": "run name; null = the output folder's name"}
    )
    mode: Literal["online", "offline", "disabled"] = field(
        default="online", metadata={"help": "W&B mode"}
    )


@dataclass
class LogSettings:
    """Where progress goes: JSONL always, TensorBoard by default, W&B when configured."""

    every: int = field(
        default=10,
        metadata={"help": "log losses, lr, grad norm and memory diagnostics every N steps"},
    )
    tensorboard: bool = field(
        default=True, metadata={"help": "write TensorBoard events to output_dir/tensorboard"}
    )
    wandb: Any = field(
        default=None, metadata={"help": "null, or a mapping {project, entity, name, mode}"}
    )
    progress_bar: bool = field(
        default=True, metadata={"help": "show a progress bar (loss, tokens/s, ETA)"}
    )

    def __post_init__(self) -> None:
        check(self.every > 0, "every", f"must be > 0, got {self.every}")
        if self.wandb is not None and not isinstance(self.wandb, (dict, WandbSettings)):
            raise ConfigError(f"wandb: expected null or a mapping, got {self.wandb!r}")


@dataclass
class RunConfig:
    """One training run."""

    model: ModelSettings = field(
        default_factory=ModelSettings, metadata={"help": "the frozen backbone"}
    )
    memory: Any = field(
        default_factory=lambda: {"type": "latent"},
        metadata={"help": "memory config (type: latent|neural, ...); null = no memory (baseline)"},
    )
    lora: Any = field(
        default=None,
        metadata={"help": "null, or LoRA on the backbone {rank, alpha, dropout, target_modules}"},
    )
    data: dict[str, Any] = field(
        default_factory=lambda: {"task": "babilong"},
        metadata={"help": "task: babilong|hotpotqa|zsre|corpus, plus that task's options"},
    )
    train: TrainSettings = field(default_factory=TrainSettings, metadata={"help": "optimisation"})
    eval: EvalSettings = field(
        default_factory=EvalSettings, metadata={"help": "validation and early stopping"}
    )
    log: LogSettings = field(default_factory=LogSettings, metadata={"help": "logging"})
    output_dir: str = field(
        default="runs/memllm",
        metadata={"help": "resolved config, logs, checkpoints/ and final/ go here"},
    )
    seed: int = field(default=0, metadata={"help": "seeds weights init, data order and dropout"})

    def __post_init__(self) -> None:
        from memllm.core.lora import LoraSettings
        from memllm.memory import memory_config_from_dict

        if isinstance(self.memory, dict):
            self.memory = memory_config_from_dict(self.memory, prefix="memory.")
        elif self.memory is not None and not dataclasses.is_dataclass(self.memory):
            raise ConfigError(f"memory: expected null or a mapping, got {self.memory!r}")
        if isinstance(self.lora, dict):
            self.lora = from_dict(LoraSettings, self.lora, prefix="lora.")
        elif self.lora is not None and not isinstance(self.lora, LoraSettings):
            raise ConfigError(f"lora: expected null or a mapping, got {self.lora!r}")
        if isinstance(self.log.wandb, dict):  # parsed here so that errors read log.wandb.<key>
            self.log.wandb = from_dict(WandbSettings, self.log.wandb, prefix="log.wandb.")
        check(
            self.memory is not None or self.lora is not None,
            "memory",
            "nothing to train: set a memory, or lora for the no-memory baseline",
        )
        check(
            isinstance(self.data.get("task"), str),
            "data.task",
            "name the task (babilong, hotpotqa, zsre or corpus)",
        )
        check(bool(self.output_dir), "output_dir", "must not be empty")
        # numpy's seeding takes 0 … 2**32 - 1; anything else would fail deep in the trainer
        check(0 <= self.seed < 2**32, "seed", f"must be in 0 … 2**32 - 1, got {self.seed}")
        check(
            self.data.get("num_train") != 0,
            "data.num_train",
            "must be > 0 (or null for all): training needs examples",
        )
        check(
            self.train.supporting_facts_weight == 0 or self.data["task"] == "hotpotqa",
            "train.supporting_facts_weight",
            f"supporting facts are HotpotQA's; data.task is {self.data['task']!r} (set it to 0)",
        )
        if self.train.feature_cache:
            check(self.memory is not None, "train.feature_cache", "needs a memory")
        if self.train.distill is not None:
            check(
                self.memory is not None,
                "train.distill",
                "needs a memory: the student reads the input segment by segment",
            )

    @property
    def task_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k != "task"}


def with_file(err: ConfigError, source: str | Path | None) -> ConfigError:
    """The same error, prefixed with the config file it came from (once)."""
    msg = str(err)
    if source is None or msg.startswith(f"{source}:"):
        return err
    return ConfigError(f"{source}: {msg}")


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path``, apply dotted ``key=value`` overrides, and validate; errors name the file."""
    data = load_yaml(path)
    try:
        return from_dict(RunConfig, apply_overrides(data, list(overrides or [])))
    except ConfigError as err:
        raise with_file(err, path) from None


def run_config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return to_dict(cfg)


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as plain YAML (what is written next to the outputs; loads back)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


# Settings a run may change when it resumes from a checkpoint: how long it goes on, how often it
# saves, validates and logs, and where. Everything else decides what the checkpoint holds.
RESUMABLE_KEYS = (
    "output_dir",
    "train.epochs",
    "train.max_steps",
    "train.max_minutes",
    "train.save_every",
    "train.keep_last",
    "train.feature_cache",  # a faster path to the same numbers (tested equal)
    "eval.",
    "log.",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def resume_conflicts(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """``"key: saved → now"`` for each setting that differs from the config a checkpoint's run
    was written with (``saved``, its ``config.yaml``), other than :data:`RESUMABLE_KEYS`."""
    old, new = _flat(saved), _flat(yaml.safe_load(dump_yaml(cfg)))
    changed = []
    for key in [*old, *(k for k in new if k not in old)]:
        if key.startswith(RESUMABLE_KEYS) or old.get(key) == new.get(key):
            continue
        changed.append(f"{key}: {old.get(key)!r} → {new.get(key)!r}")
    return changed


def check_against_model(cfg: RunConfig, model, source: str | Path | None = None) -> None:
    """Checks that need the loaded model: memory layer indices and the segment length."""
    from memllm.core.backbone import context_length, decoder_stack
    from memllm.core.inject import resolve_layer_ids

    _, layers = decoder_stack(model)
    try:
        # layer_ids None: every layer (kv_retrieval)
        if cfg.memory is not None and cfg.memory.layer_ids is not None:
            resolve_layer_ids(list(cfg.memory.layer_ids), len(layers), key="memory.layer_ids")
        window = context_length(model)
        if window is not None:
            check(
                cfg.train.segment_length <= window,
                "train.segment_length",
                f"{cfg.train.segment_length} exceeds {cfg.model.name}'s context of {window} tokens",
            )
    except ConfigError as err:
        raise with_file(err, source) from None


# -- memllm config show --------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _render(obj: Any, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    values = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    helps = field_help(type(obj)) if dataclasses.is_dataclass(obj) else {}
    for key, value in values.items():
        child = getattr(obj, key, None) if dataclasses.is_dataclass(obj) else value
        note = f"  # {helps[key]}" if helps.get(key) else ""
        if dataclasses.is_dataclass(child) or (isinstance(child, dict) and child):
            lines.append(f"{pad}{key}:{note}")
            _render(child, indent + 1, lines)
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}{note}")


def render_with_help(cfg: RunConfig) -> str:
    """The resolved config as YAML, each field followed by its help as a comment."""
    lines: list[str] = []
    _render(cfg, 0, lines)
    return "\n".join(lines) + "\n"
