"""Where training records go: a JSONL file always, TensorBoard by default, W&B when configured.

Only the main process writes. Every sink is optional except the JSONL log; a sink that cannot be
opened (TensorBoard not installed) is skipped with a warning, never a failure. W&B credentials are
wandb's own business (``wandb login`` or its environment variable): memllm never reads .env files.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the record stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records after ``last_step`` (written by a run that was killed after its checkpoint),
    so that a resumed run's log reads as if it had never stopped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    path.write_text("".join(f"{line}\n" for line in kept))


class RunLogger:
    """Writes step records to every configured sink.

    Args:
        output_dir: the run's folder; ``log.jsonl`` and ``tensorboard/`` go there.
        settings: the run config's ``log`` section.
        config: the resolved run config (stored with the W&B run).
        enabled: False on processes other than the main one.
        resume_step: the step a resumed run continues from (later records are dropped).
    """

    def __init__(
        self,
        output_dir: str | Path,
        settings,
        config: dict[str, Any],
        *,
        enabled: bool = True,
        resume_step: int = 0,
    ) -> None:
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.start = time.time()
        if not enabled:
            return
        output_dir = Path(output_dir)
        self.path = output_dir / LOG_FILE
        truncate_jsonl(self.path, resume_step)
        self.file = self.path.open("a")
        if settings.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(
                    str(output_dir / "tensorboard"), purge_step=resume_step or None
                )
            except ImportError as err:
                log.warning("TensorBoard logging skipped (%s); pip install tensorboard", err)
        if settings.wandb is not None:
            self.wandb = _init_wandb(settings.wandb, output_dir, config)

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        """One record: ``{"kind", "step", "time_s", **values}``; numbers also go to TB/W&B."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time_s": round(time.time() - self.start, 3)}
        record.update({k: _clean(v) for k, v in values.items()})
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numbers = {
            f"{kind}/{k}": float(v)
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _init_wandb(settings, output_dir: Path, config: dict[str, Any]):
    from memllm.errors import ConfigError

    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "log.wandb is set but wandb is not installed: pip install 'memllm[wandb]' "
            "(or set log.wandb: null)"
        ) from None
    return wandb.init(
        project=settings.project,
        entity=settings.entity,
        name=settings.name or output_dir.name,
        mode=settings.mode,
        dir=str(output_dir),
        config=config,
        resume="allow",
    )
