"""Distillation from the full context (``train.distill``): a dense signal for the memory.

The task loss scores the answer tokens only, and a read-out can lower it by learning the answer
format alone. Distillation asks more: on every token of the last segment, the student (the
memory arm, reading the input segment by segment) should predict what a teacher predicts that
sees everything — by default the frozen backbone with the whole input in its window (``base``),
or a trained memory checkpoint for inputs past the window. Its loss,

    T² · KL(teacher_T ‖ student_T)   (softmax at temperature T, mean over the last segment's real
                                       tokens of a row, then over rows),

is added to the objective with ``weight`` by the trainer as a plug-in
(:class:`memllm.training.plugins.TrainerPlugin`). With ``top_k`` the teacher keeps its k most
likely tokens per position and both distributions are renormalised over them (zero when the
student equals the teacher); ``top_k: null`` keeps full logits (small vocabularies).

Teacher outputs are computed once per example and cached on the CPU under the example's id, so
later epochs (and repeated validations) need no teacher pass.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from memllm.core.config import check
from memllm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DistillSettings:
    """``train.distill``: distillation from a full-context teacher."""

    teacher: str = field(
        default="base",
        metadata={
            "help": "base (the frozen backbone, whole input in its window) or a memory "
            "checkpoint folder (read segment by segment, for inputs past the window)"
        },
    )
    weight: float = field(default=1.0, metadata={"help": "loss += weight × T² · KL"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature T"})
    top_k: int | None = field(
        default=64,
        metadata={"help": "teacher tokens kept per position (cached); null = full logits"},
    )

    def __post_init__(self) -> None:
        check(bool(self.teacher), "teacher", "base or a checkpoint folder")
        check(self.weight > 0, "weight", f"must be > 0, got {self.weight}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        if self.top_k is not None:
            check(self.top_k > 0, "top_k", f"must be > 0 (or null), got {self.top_k}")


@contextlib.contextmanager
def bare_backbone(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` as the frozen backbone alone: memory layers swapped for the layers they wrap
    and LoRA adapters disabled, for the duration of the block."""
    from peft.tuners.lora import LoraLayer

    from memllm.core.backbone import decoder_stack
    from memllm.core.inject import MemoryLayer

    _, layers = decoder_stack(model)
    wrapped = {i: layer for i, layer in enumerate(layers) if isinstance(layer, MemoryLayer)}
    adapters = [m for m in model.modules() if isinstance(m, LoraLayer)]
    try:
        for i, layer in wrapped.items():
            layers[i] = layer.layer
        for m in adapters:
            m.enable_adapters(False)
        yield model
    finally:
        for i, layer in wrapped.items():
            layers[i] = layer
        for m in adapters:
            m.enable_adapters(True)


class DistillPlugin:
    """The distillation loss as a trainer plug-in (see the module docstring).

    It asks the trainer for the student's last-segment logits (``needs_last_logits``) instead
    of hooking the model.

    Attributes:
        teacher_calls: teacher forward passes run (rows of examples not cached yet).
        cache: example id → ``(indices or None, teacher logits)`` of the example's real tokens
            in its last segment.
    """

    name = "distill"
    reads_all_positions = False
    needs_last_logits = True

    def __init__(
        self,
        model: nn.Module,
        settings: DistillSettings,
        *,
        segment_length: int,
        model_name: str | None = None,
        dtype: str | None = None,
    ) -> None:
        self.model, self.settings = model, settings
        self.weight = settings.weight
        self.segment_length = segment_length
        self.teacher_model: nn.Module | None = None
        if settings.teacher != "base":
            self.teacher_model = _load_teacher(model, settings.teacher, model_name, dtype)
        self.cache: dict[str, tuple[Tensor | None, Tensor]] = {}
        self.teacher_calls = 0

    # -- the plug-in protocol ----------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return []

    def prepare(self, items, examples) -> None:
        return None

    def observe(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def save(self, directory: Path) -> None:
        return None  # nothing trains; the teacher cache is rebuilt on resume

    def load(self, directory: Path) -> None:
        return None

    def loss(self, batch, student: Tensor) -> Tensor:
        """``T² · KL(teacher ‖ student)`` over the last segment's real tokens (row mean)."""
        width = student.shape[1]
        mask = batch.attention_mask[:, -width:].bool()
        self._fill_cache(batch, width)
        t = self.settings.temperature
        rows = []
        for row, example_id in enumerate(batch.ids):
            indices, teacher = self.cache[example_id]
            s = student[row, mask[row]].float() / t
            teacher = teacher.to(s.device).float() / t
            if indices is not None:
                s = s.gather(-1, indices.to(s.device))
            log_p = torch.log_softmax(teacher, -1)
            log_q = torch.log_softmax(s, -1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            rows.append(kl.mean() if kl.numel() else kl.sum())
        return torch.stack(rows).mean() * t * t

    # -- the teacher -------------------------------------------------------------------------
    @torch.no_grad()
    def _fill_cache(self, batch, width: int) -> None:
        missing = [r for r, i in enumerate(batch.ids) if i not in self.cache]
        if not missing:
            return
        self.teacher_calls += 1
        ids, mask = batch.input_ids[missing], batch.attention_mask[missing]
        logits = self._teacher_logits(ids, mask, width)
        k = self.settings.top_k
        for j, row in enumerate(missing):
            real = logits[j, mask[j, -width:].bool()]
            if k is not None and k < real.shape[-1]:
                values, indices = real.topk(k, dim=-1)
                self.cache[batch.ids[row]] = (indices.cpu(), values.cpu())
            else:
                self.cache[batch.ids[row]] = (None, real.cpu())

    def _teacher_logits(self, ids: Tensor, mask: Tensor, width: int) -> Tensor:
        """The teacher's logits at the last ``width`` positions of each row."""
        from memllm.core.backbone import context_length
        from memllm.core.segments import logits_to_keep_kwargs, positions_from_mask

        if self.teacher_model is not None:
            from memllm.core.segments import forward_segments

            out = forward_segments(
                self.teacher_model, ids, mask, segment_length=self.segment_length
            )
            return out.logits[:, -width:]
        window = context_length(self.model)
        if window is not None and ids.shape[1] > window:
            raise ConfigError(
                f"train.distill.teacher: base reads the whole input ({ids.shape[1]} tokens) in "
                f"one window of {window}; use a memory checkpoint as the teacher"
            )
        with bare_backbone(self.model) as model:
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions_from_mask(mask),
                use_cache=False,
                **logits_to_keep_kwargs(model, width),
            ).logits
        return logits[:, -width:]


def _load_teacher(model: nn.Module, folder: str, name: str | None, dtype: str | None):
    """A second backbone with the memory checkpoint in ``folder`` (frozen, eval mode)."""
    import memllm

    if not Path(folder).is_dir():
        raise ConfigError(f"train.distill.teacher: {folder!r} is neither base nor a folder")
    teacher, _ = memllm.load_backbone(name, dtype=dtype) if name else (None, None)
    try:
        memllm.load_checkpoint(teacher, folder)
    except Exception as err:  # a checkpoint error names the folder; say which key led there
        raise ConfigError(f"train.distill.teacher: {err}") from None
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher.to(next(model.parameters()).device)


__all__ = ["DistillPlugin", "DistillSettings", "bare_backbone"]
