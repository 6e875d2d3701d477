"""Several processes, as accelerate intends: the step module that DDP (or FSDP + DDP) wraps.

A training step calls the backbone once per segment while the memory carries its state from one
call to the next, and plug-in losses are computed from what their hooks saw. DDP's reducer expects
one forward per backward, so the module handed to ``accelerator.prepare`` is :class:`StepModule`,
whose ``forward`` is one micro-batch's *whole* forward (every segment, every plug-in loss): one DDP
forward covers all segments, and the backward that follows syncs the gradients once.

What is synced: only the trainable parameters (memory, LoRA, plug-in heads). The frozen backbone
is listed in DDP's ignore list, so DDP neither broadcasts it at start nor registers it with the
reducer; it broadcasts the trainable weights of process 0 once (every process starts alike).

Two layouts, chosen by the user's accelerate config (``accelerate launch``), not by memllm's:

- **DDP** (``accelerate launch --multi_gpu`` or ``configs/accelerate/ddp.yaml``): every process
  holds the whole model; :meth:`accelerate.Accelerator.prepare` wraps the step module in DDP.
- **FSDP** (``--use_fsdp --fsdp_version 2`` or ``configs/accelerate/fsdp.yaml``), for backbones
  that do not fit one device: accelerate's FSDP plugin shards the *frozen* backbone (each decoder
  layer its own unit) and the trainable parameters are left out of sharding (the plugin's
  ``ignored_modules``), so they stay whole, replicated tensors and a DDP wrapper on top syncs
  their gradients. The optimizer, the checkpoints (rank 0 writes the full memory) and resume are
  then exactly those of DDP: the checkpoint format does not depend on the layout.

DeepSpeed is refused with one clear error (:func:`check_supported`): its ZeRO stages partition
the optimizer state, which the checkpoint format (one ``trainer.pt`` written by rank 0) does not
hold, so a resume would silently lose state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from torch import nn

from memllm.errors import ConfigError

log = logging.getLogger(__name__)


class StepModule(nn.Module):
    """One micro-batch's whole forward (segment loop + plug-in losses) as one module call.

    Args:
        model: the backbone with its memory and/or LoRA.
        extra: trainable parameters outside ``model`` (plug-in heads); registered here so that
            DDP syncs them with the memory's.
        forward: ``forward(batch, training=...)`` that does the work (the trainer's); kept as a
            plain attribute, not a module.
    """

    def __init__(
        self, model: nn.Module, extra: list[nn.Parameter], forward: Callable[..., Any]
    ) -> None:
        super().__init__()
        self.model = model
        inside = {id(p) for p in model.parameters()}
        self.extra = nn.ParameterList([p for p in extra if id(p) not in inside])
        self._run = forward

    def forward(self, batch, training: bool = True):
        return self._run(batch, training=training)

    # accelerate's FSDP2 preparation reads these from the module it shards (HF model API)
    @property
    def _no_split_modules(self) -> list[str] | None:
        return getattr(self.model, "_no_split_modules", None)

    @property
    def base_model_prefix(self) -> str:
        return "backbone_base"

    @property
    def backbone_base(self) -> nn.Module:
        """The model's base (where its final norm is a direct child)."""
        prefix = getattr(self.model, "base_model_prefix", "")
        return getattr(self.model, prefix, self.model) if prefix else self.model

    def get_input_embeddings(self) -> nn.Module | None:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()


def check_supported(accelerator, source=None) -> None:
    """Refuse the accelerate layouts this trainer cannot checkpoint exactly (one line)."""
    from accelerate.utils import DistributedType

    from memllm.training.run_config import with_file

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise with_file(
            ConfigError(
                "accelerate config: DeepSpeed is not supported by memllm train (ZeRO partitions "
                "the optimizer state, which the checkpoint and resume do not hold); use "
                "configs/accelerate/ddp.yaml or configs/accelerate/fsdp.yaml"
            ),
            source,
        )
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise with_file(
            ConfigError(
                "accelerate config: fsdp_version 1 is not supported (it cannot leave the "
                "trainable memory out of sharding); set fsdp_version: 2 "
                "(accelerate launch --use_fsdp --fsdp_version 2)"
            ),
            source,
        )


def prepare(accelerator, step: StepModule, optimizer, params: list[nn.Parameter]):
    """Wrap ``step`` for the launched layout and prepare ``optimizer``; returns both.

    One process: the module unchanged (accelerate may add autocast). DDP: accelerate's own
    wrapper. FSDP2: accelerate's FSDP plugin shards the frozen backbone, then DDP syncs the
    trainable ``params`` (left whole). Gradients are *averaged* over processes by DDP.
    """
    from accelerate.utils import DistributedType

    world = accelerator.num_processes
    if world > 1:
        _ignore_frozen(step)
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        # the trainable parameters stay whole, replicated tensors: sharded are the frozen ones
        plugin.ignored_modules = [nn.ParameterList(params)]
        step, optimizer = accelerator.prepare(step, optimizer)
        sharded = sum(_is_dtensor(p) for p in step.parameters())
        if accelerator.is_main_process:
            log.info(
                "FSDP: %d frozen parameter tensors sharded over %d processes, %d trainable whole",
                sharded,
                world,
                len(params),
            )
        if world > 1:
            step = _ddp(step, accelerator)
        return step, optimizer
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # accelerate turns FSDP on for GPU-like devices only (its state.py): on CPU it runs DDP
        log.warning("accelerate ignored FSDP for %s: training with DDP", accelerator.device)
    if not params:  # nothing to sync (DDP refuses a module without trainable parameters)
        return step, accelerator.prepare_optimizer(optimizer)
    return accelerator.prepare(step), accelerator.prepare_optimizer(optimizer)


def allow_precision(mixed_precision: str) -> None:
    """Let one process train runs at different precisions, one after another.

    Accelerate keeps its state per process and refuses a second ``Accelerator`` with another
    ``mixed_precision``; an experiment whose arms differ in ``train.mixed_precision`` (or a
    notebook) would stop at its second run. In a single process nothing else holds that state,
    so it is cleared; under a distributed launch the processes share it and it is left alone.
    """
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if state and state.get("_mixed_precision") != mixed_precision and not launched:
        AcceleratorState._reset_state()


def ddp_kwargs():
    """What the trainer's :class:`accelerate.Accelerator` passes to DDP.

    ``find_unused_parameters``: a memory may leave some of its parameters out of a step's graph
    (an episodic read over an empty store, a first segment). Buffers are never synced: they are
    on DDP's ignore list with the frozen parameters (:func:`_ignore_frozen`).
    """
    from accelerate.utils import DistributedDataParallelKwargs

    return DistributedDataParallelKwargs(find_unused_parameters=True)


def _is_dtensor(p) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def _ignore_frozen(step: nn.Module) -> None:
    """Leave every frozen parameter and every buffer out of DDP (no broadcast, no reducer)."""
    from torch.nn.parallel import DistributedDataParallel

    names = [n for n, p in step.named_parameters() if not p.requires_grad]
    names += [n for n, _ in step.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, names)


def _ddp(step: nn.Module, accelerator) -> nn.Module:
    """DDP over an FSDP-sharded step module (syncs the unsharded trainable parameters)."""
    from torch.nn.parallel import DistributedDataParallel

    device = accelerator.device
    ids = [device.index] if device.type not in ("cpu", "meta") else None
    wrapped = DistributedDataParallel(step, device_ids=ids, **ddp_kwargs().to_kwargs())
    log.debug("FSDP: trainable parameters replicated under DDP")
    return wrapped


__all__ = ["StepModule", "check_supported", "ddp_kwargs", "prepare"]
