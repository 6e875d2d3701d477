"""Trainer plug-ins: auxiliary heads trained beside the memory, with a loss of their own.

The trainer knows plug-ins only through :class:`TrainerPlugin`: it adds their parameters to the
optimizer, lets them attach what they need to each example, wraps every forward pass in their
:meth:`~TrainerPlugin.observe` block (hooks that see what they need of the model), adds
``weight × loss`` to the objective, logs the loss as ``{name}_loss`` in training and validation,
and saves and loads their weights with every checkpoint. The HotpotQA supporting-fact head
(:class:`memllm.training.sp_head.SupportingFactPlugin`) is one.

:func:`build_plugins` is the one place that maps a run config to its plug-ins.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor, nn

from memllm.errors import ConfigError
from memllm.training.run_config import RunConfig, with_file

if TYPE_CHECKING:
    from memllm.training.data import Batch, Item


@runtime_checkable
class TrainerPlugin(Protocol):
    """An auxiliary objective trained with the memory.

    Attributes:
        name: short name; its loss is logged as ``{name}_loss``.
        weight: the loss's weight in the objective (> 0).
        reads_all_positions: whether :meth:`observe` needs the final hidden state of every
            position (the feature cache then final-norms whole segments, not only the labelled
            tail).

    A plug-in with ``needs_last_logits = True`` (optional attribute; the distillation loss)
    gets the student's last-segment logits at every position as ``observed`` instead of what
    :meth:`observe` yields.
    """

    name: str
    weight: float
    reads_all_positions: bool

    def parameters(self) -> list[nn.Parameter]:
        """Its trainable parameters (optimised with the memory's)."""
        ...

    def prepare(self, items: list[Item], examples: Sequence[Any] | None) -> None:
        """Attach what the loss needs to each item (in ``item.extras``); ``examples`` are the
        task's examples the items were encoded from (None for a text corpus)."""
        ...

    def observe(self, model: nn.Module) -> AbstractContextManager[Any]:
        """A block around one batch's forward pass; what it yields goes to :meth:`loss`."""
        ...

    def loss(self, batch: Batch, observed: Any) -> Tensor:
        """The plug-in's loss of ``batch`` (a scalar, mean over the batch's rows)."""
        ...

    def save(self, directory: Path) -> None:
        """Write its weights into a checkpoint folder."""
        ...

    def load(self, directory: Path) -> None:
        """Load its weights from a checkpoint folder, strictly (a missing file is an error)."""
        ...


def build_plugins(
    cfg: RunConfig, model: nn.Module, tokenizer, device, *, source=None
) -> list[TrainerPlugin]:
    """The plug-ins ``cfg`` asks for, built for ``model`` (errors name the config file)."""
    plugins: list[TrainerPlugin] = []
    try:
        if cfg.train.supporting_facts_weight > 0:
            from memllm.training.sp_head import SupportingFactPlugin

            plugins.append(
                SupportingFactPlugin(
                    model,
                    tokenizer,
                    weight=cfg.train.supporting_facts_weight,
                    seed=cfg.seed,
                    chat=cfg.model.chat_template,
                    device=device,
                )
            )
        if cfg.train.distill is not None:
            from memllm.training.distill import DistillPlugin

            plugins.append(
                DistillPlugin(
                    model,
                    cfg.train.distill,
                    segment_length=cfg.train.segment_length,
                    model_name=cfg.model.name,
                    dtype=cfg.model.dtype,
                )
            )
    except ConfigError as err:
        raise with_file(err, source) from None
    return plugins


__all__ = ["TrainerPlugin", "build_plugins"]
