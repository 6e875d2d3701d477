"""Training checkpoints: step folders, which ones are complete, and the files inside them.

A checkpoint is ``output_dir/checkpoints/step-NNNNNNNN/`` with the trained weights (memory and/or
LoRA, written by :func:`memllm.core.checkpoint.save_memory`, plus what trainer plug-ins save),
``trainer.pt`` (optimizer, scheduler, loss scaler), ``rng/rank{r}.pt`` (every RNG of process r,
and the carried memory state of persistent-memory runs) and ``state.json``;
``output_dir/config.yaml`` says which run they belong to. The trainer writes them into a
temporary folder and renames it last, and ``state.json`` is the last file written, so a folder
named ``step-N`` holding ``state.json`` is complete; anything else is the leftover of a crash and
is pruned. Files are fsynced before the rename.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from memllm.errors import ConfigError

if TYPE_CHECKING:
    from memllm.training.plugins import TrainerPlugin
    from memllm.training.run_config import RunConfig

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step-(\d+)")


# -- step folders ----------------------------------------------------------------------------------


def step_dir(output_dir: str | Path, step: int | None) -> Path:
    """The folder of the checkpoint of ``step``."""
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Finished checkpoints (a ``state.json`` is the last file written), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.fullmatch(path.name)
        if m and (path / "state.json").is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def latest_step(output_dir: str | Path) -> int | None:
    found = complete_checkpoints(output_dir)
    return found[-1][0] if found else None


def prune_checkpoints(output_dir: Path, keep_last: int, best_step: int | None) -> None:
    """Keep the newest ``keep_last`` checkpoints and the best one; drop leftovers of crashes."""
    found = complete_checkpoints(output_dir)
    keep = {step for step, _ in found[-keep_last:]} | {best_step}
    for step, path in found:
        if step not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for path in (Path(output_dir) / CHECKPOINTS).glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def commit(tmp: Path, final: Path) -> None:
    """Rename the finished temporary folder: the checkpoint exists, complete, or not at all."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def check_same_run(output_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume a checkpoint trained with other settings: the run would continue
    (or, finished, just report) a memory its config does not describe."""
    from memllm.core.config import load_yaml
    from memllm.training.run_config import resume_conflicts

    path = output_dir / "config.yaml"
    if not path.is_file():
        return
    changed = resume_conflicts(load_yaml(path), cfg)
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(
            f"{output_dir} holds checkpoints of a run with other settings "
            f"({'; '.join(changed[:3])}{more}): use a new output_dir, or delete "
            f"{output_dir / CHECKPOINTS} to start over"
        )


def write_run_config(output_dir: Path, cfg: RunConfig) -> None:
    """``output_dir/config.yaml``: the resolved config (a changed one is overwritten, loudly)."""
    from memllm.training.run_config import dump_yaml

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "config.yaml"
    text = dump_yaml(cfg)
    if path.is_file() and path.read_text() != text:
        log.warning("%s differs from the config of this run; overwriting it", path)
    path.write_text(text)


def write_checkpoint(
    output_dir: Path,
    step: int,
    accelerator,
    *,
    model: nn.Module,
    plugins: Iterable[TrainerPlugin],
    optimizer,
    scheduler,
    state: dict[str, Any],
    memory_state: Any,
    keep_last: int,
    best_step: int | None,
) -> Path:
    """Write the checkpoint of ``step`` atomically (every process calls this): temporary
    folder, weights and optimizer (main process), each process's RNG file, ``state.json``
    last, one rename; then prune old checkpoints."""
    final = step_dir(output_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        save_weights(model, tmp, plugins)
    accelerator.wait_for_everyone()
    (tmp / "rng").mkdir(exist_ok=True)
    rng = rng_state() | {"memory_state": memory_state}
    save_synced(rng, rng_file(tmp, accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_optimizer_state(tmp, optimizer, scheduler, accelerator.scaler)
        write_state(tmp, state)
        commit(tmp, final)
        prune_checkpoints(output_dir, keep_last, best_step)
    accelerator.wait_for_everyone()
    return final


def read_checkpoint(
    path: Path,
    accelerator,
    *,
    model: nn.Module,
    plugins: Iterable[TrainerPlugin],
    optimizer,
    scheduler,
) -> tuple[dict[str, Any], Any]:
    """Load a checkpoint into a run built from the same config: weights (strictly, plug-ins
    included), optimizer, scheduler, scaler and this process's RNGs. Returns ``state.json`` and
    the carried memory state (None unless the run has persistent memory)."""
    load_weights(model, path)
    for plugin in plugins:  # strict: a run that trains a plug-in needs its weights
        plugin.load(path)
    load_optimizer_state(path, optimizer, scheduler, accelerator.scaler)
    rng = load_rng(path, accelerator.process_index)
    set_rng_state(rng)
    return read_state(path), to_device(rng.get("memory_state"), accelerator.device)


# -- trained weights -------------------------------------------------------------------------------


def save_weights(model: nn.Module, directory: Path, plugins: Iterable[TrainerPlugin] = ()) -> None:
    """Memory and/or LoRA via :func:`memllm.save_memory`; each plug-in's weights beside them."""
    from memllm.core.checkpoint import save_memory

    save_memory(model, directory)
    for plugin in plugins:
        plugin.save(directory)


def load_weights(model: nn.Module, directory: Path) -> None:
    """Load a checkpoint's trained weights into a model already built with the same config
    (strictly: the model must carry exactly the checkpoint's memory and/or LoRA)."""
    from memllm.core.checkpoint import load_checkpoint

    load_checkpoint(model, directory, attach=False)


# -- optimizer, progress and RNG files -------------------------------------------------------------


def save_synced(obj: Any, path: Path) -> None:
    """``torch.save``, flushed to disk before returning (the rename that follows is the commit)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """``state.json``: written last, its presence marks the checkpoint complete."""
    write_synced(directory / "state.json", json.dumps(state, indent=2) + "\n")


def read_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "state.json").read_text())


def save_optimizer_state(directory: Path, optimizer, scheduler, scaler) -> None:
    """``trainer.pt``: optimizer, lr scheduler and (fp16) loss scaler."""
    trainer = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    save_synced(trainer, directory / "trainer.pt")


def load_optimizer_state(directory: Path, optimizer, scheduler, scaler) -> None:
    trainer = torch.load(directory / "trainer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    if trainer.get("scaler") and scaler is not None:
        scaler.load_state_dict(trainer["scaler"])


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from (Python, NumPy, torch CPU and CUDA)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def rng_file(directory: Path, rank: int) -> Path:
    return directory / "rng" / f"rank{rank}.pt"


def load_rng(directory: Path, rank: int) -> dict[str, Any]:
    """Process ``rank``'s RNG file (rank 0's, with a warning, when the process count changed)."""
    path = rng_file(directory, rank)
    if not path.is_file():
        log.warning("%s missing (other process count?); using rank 0's RNG state", path)
        path = rng_file(directory, 0)
    return torch.load(path, map_location="cpu", weights_only=False)


def to_device(state: Any, device) -> Any:
    """A (nested) memory state with every tensor moved to ``device``."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.to(device) if isinstance(x, Tensor) else x, state)
