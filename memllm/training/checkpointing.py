"""Training checkpoints: step folders, which ones are complete, and the files inside them.

A checkpoint is ``output_dir/checkpoints/step-NNNNNNNN/`` with the trained weights (memory and/or
LoRA, written by :func:`memllm.core.checkpoint.save_memory`, plus what trainer plug-ins save),
``trainer.pt`` (optimizer, scheduler, loss scaler), ``rng/rank{r}.pt`` (every RNG of process r,
and the carried memory state of persistent-memory runs) and ``state.json``;
``state.json`` (the run's step, and the run's settings, so that a resume compares against them
even when ``config.yaml`` is gone) and ``manifest.json`` (sha256 of every file, written last). The
trainer writes them into a temporary folder, fsyncs them and swaps it in, so a folder named
``step-N`` holding ``state.json`` is complete; anything else is the leftover of a crash and is
pruned. A resume verifies the newest checkpoint against its manifest and falls back to the newest
one that verifies (:func:`resume_point`), moving the others aside as ``step-N.unverified``.

A run that stopped on a NaN/inf writes ``diverged.json``; resuming its last good checkpoint may
then change :data:`DIVERGENCE_KEYS` (the advice of the stop message), and the change is recorded.
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

from memllm.core.integrity import replace_dir, verify_manifest, write_manifest, write_synced
from memllm.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from memllm.training.plugins import TrainerPlugin
    from memllm.training.run_config import RunConfig

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
DIVERGED_FILE = "diverged.json"
# What the resume of a run stopped by a NaN/inf may change: what its stop message advises.
DIVERGENCE_KEYS = ("train.lr", "train.max_grad_norm")
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
    """Swap the finished temporary folder in: the checkpoint exists, complete, or not at all."""
    replace_dir(tmp, final)


def plain_config(cfg: RunConfig) -> dict[str, Any]:
    """The run's settings as plain data (what each checkpoint's ``state.json`` records)."""
    import yaml

    from memllm.training.run_config import dump_yaml

    return yaml.safe_load(dump_yaml(cfg))


def _diverged_at(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / DIVERGED_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def write_diverged(output_dir: Path, record: dict[str, Any]) -> None:
    """``diverged.json``: where and why the run stopped, and its last good checkpoint's step."""
    write_synced(output_dir / DIVERGED_FILE, json.dumps(record, indent=2) + "\n")


def check_same_run(
    output_dir: Path, cfg: RunConfig, state: dict[str, Any] | None = None
) -> list[str]:
    """Refuse to resume a checkpoint trained with other settings: the run would continue
    (or, finished, just report) a memory its config does not describe.

    The settings compared are those the checkpoint's ``state.json`` recorded (``config.yaml``
    for checkpoints of memllm ≤ 0.2). Returns the allowed changes of :data:`DIVERGENCE_KEYS`
    when the checkpoint is the last good one of a run stopped by a NaN/inf (else none).
    """
    from memllm.core.config import load_yaml
    from memllm.training.run_config import resume_conflicts

    saved = (state or {}).get("config")
    if not isinstance(saved, dict):
        path = output_dir / "config.yaml"
        if not path.is_file():
            return []
        saved = load_yaml(path)
    changed = resume_conflicts(saved, cfg)
    allowed: list[str] = []
    diverged = _diverged_at(output_dir)
    if (
        diverged is not None
        and state is not None
        and diverged.get("checkpoint") == state.get("step")
    ):
        allowed = [c for c in changed if c.startswith(tuple(k + ":" for k in DIVERGENCE_KEYS))]
        changed = [c for c in changed if c not in allowed]
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(
            f"{output_dir} holds checkpoints of a run with other settings "
            f"({'; '.join(changed[:3])}{more}): use a new output_dir, or delete "
            f"{output_dir / CHECKPOINTS} to start over"
        )
    return allowed


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
        write_manifest(tmp)  # last: the checksum of every file above
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


def verify(path: Path) -> dict[str, Any]:
    """Check a checkpoint without loading it into anything: every file against its manifest,
    ``state.json``, the weights' configs (and, for a checkpoint without a manifest, that its
    tensor files parse). Returns ``state.json``; a one-line :class:`CheckpointError` otherwise."""
    from memllm.core.checkpoint import verify_checkpoint

    checked = verify_manifest(path)
    state = read_state(path)
    verify_checkpoint(path)
    if not checked:  # memllm ≤ 0.2: no checksums, so at least every file must parse
        for file in [path / "trainer.pt", *sorted((path / "rng").glob("*.pt"))]:
            _torch_load(file)
        for file in sorted(path.glob("*.safetensors")):
            _parse_safetensors(file)
    return state


def resume_point(output_dir: Path, *, move_aside: bool) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint that verifies, and its ``state.json`` (None: there are no
    checkpoints). Newer ones that do not verify are named in one warning and, with
    ``move_aside``, renamed ``step-N.unverified`` (kept for inspection, never pruned). Raises a
    :class:`CheckpointError` when checkpoints exist but none verifies."""
    found = complete_checkpoints(output_dir)
    if not found:
        return None
    failed: list[tuple[Path, str]] = []
    for _, path in reversed(found):
        try:
            state = verify(path)
        except CheckpointError as err:
            failed.append((path, str(err)))
            continue
        if failed:
            if move_aside:
                for bad, _ in failed:
                    bad.rename(_aside(bad))
            names = ", ".join(bad.name for bad, _ in failed)
            log.warning(
                "resuming from %s: the newer %s failed verification (%s)%s",
                path.name,
                names,
                failed[0][1],
                "; moved aside as *.unverified" if move_aside else "",
            )
        return path, state
    raise CheckpointError(
        f"none of the {len(found)} checkpoint(s) in {Path(output_dir) / CHECKPOINTS} verifies "
        f"(newest: {failed[0][1]}): move them away to start over"
    )


def _aside(path: Path) -> Path:
    target, n = path.with_name(f"{path.name}.unverified"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.unverified{n}")
    return target


def _torch_load(path: Path) -> Any:
    """``torch.load`` with anything unreadable as one line naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as err:  # truncated or garbled pickles raise many types
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from None


def _parse_safetensors(path: Path) -> None:
    from safetensors.torch import load_file

    try:
        load_file(path)
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None


def set_lr(optimizer, scheduler, lr: float) -> None:
    """Continue a loaded schedule from another peak lr (the resume of a diverged run): the
    scheduler's base lr and every group's current lr, at the step it stands at."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


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


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """``state.json``: written last, its presence marks the checkpoint complete."""
    write_synced(directory / "state.json", json.dumps(state, indent=2) + "\n")


def read_state(directory: Path) -> dict[str, Any]:
    path = directory / "state.json"
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt (not valid JSON)") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}: corrupt (no integer 'step')")
    return state


def save_optimizer_state(directory: Path, optimizer, scheduler, scaler) -> None:
    """``trainer.pt``: optimizer, lr scheduler and (fp16) loss scaler."""
    trainer = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    save_synced(trainer, directory / "trainer.pt")


def load_optimizer_state(directory: Path, optimizer, scheduler, scaler) -> None:
    trainer = _torch_load(directory / "trainer.pt")
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
    return _torch_load(path)


def to_device(state: Any, device) -> Any:
    """A (nested) memory state with every tensor moved to ``device``."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.to(device) if isinstance(x, Tensor) else x, state)
