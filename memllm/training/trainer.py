"""``memllm train``: one accelerate loop that trains the memory (and LoRA) of a frozen backbone.

The same loop runs on a laptop CPU and on several GPUs (``accelerate launch``). Its pieces, each
in a module of its own:

- **data** (:mod:`~memllm.training.data`) — prompt + target + EOS token ids, loss on the target
  only, left-padded batches, a seeded per-epoch order;
- **steps** (here) — one optimizer step takes a *global batch* of ``batch_size ×
  grad_accum_steps × processes`` examples; process ``r`` runs its share as ``grad_accum_steps``
  micro-batches. The loss is normalised by the global number of target tokens, so a 2-process
  run takes the same steps as a 1-process run with the same global batch. Each micro-batch's
  whole forward (all its segments) is one call of the step module that accelerate prepared
  (DDP, or FSDP for the frozen backbone + DDP for the trainable part:
  :mod:`~memllm.training.parallel`); the gradients are synced once, after the last micro-batch
  (``accelerator.no_sync`` before). The lr follows :mod:`~memllm.training.schedule`;
- **objective** — task loss (mean over target tokens) + the memory's regulariser (whatever the
  memory type reports, :mod:`~memllm.training.forward`) + each plug-in's weighted loss
  (:mod:`~memllm.training.plugins`, e.g. the supporting-fact head); every term is logged on its
  own;
- **checkpoints** (:mod:`~memllm.training.checkpointing`) — trained weights, optimizer,
  scheduler, RNG states, step; written to a temporary folder and renamed, so only complete
  checkpoints look like checkpoints. A rerun on the same output folder resumes from the latest
  one and ends bit-identical on CPU.

Outputs: ``output_dir/{config.yaml, log.jsonl, tensorboard/, checkpoints/step-N/, final/,
summary.json}``.

Why this module is ~700 lines: :class:`Trainer` is the one place where the loop's stateful parts
meet (curriculum stages that rebuild the data, the NaN stop, resume with fallback and the
output-folder lock); the stateless parts already live in the modules above and in
:mod:`~memllm.training.divergence`, :mod:`~memllm.training.curriculum`,
:mod:`~memllm.training.lock`. Splitting the class further would spread one step's logic over
several files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from memllm.core.inject import has_memory
from memllm.core.segments import SegmentOutput
from memllm.errors import ConfigError, MemllmError
from memllm.training import checkpointing as ckpt
from memllm.training import parallel
from memllm.training.checkpointing import CHECKPOINTS, latest_step, step_dir
from memllm.training.curriculum import stage_config, stage_steps_done, stage_threshold_met
from memllm.training.data import (
    Batch,
    Item,
    build_task,
    collate,
    encode_run,
    epoch_order,
    micro_batches,
)
from memllm.training.divergence import (
    TrainingDiverged,
    diverged_error,
    first_nonfinite,
    first_nonfinite_param,
)
from memllm.training.forward import (
    build_model,
    generate_texts,
    memory_forward,
    set_train_mode,
    split_loss_terms,
    trainable_parameters,
    window_forward,
)
from memllm.training.lock import OutputLock
from memllm.training.plugins import TrainerPlugin, build_plugins
from memllm.training.progress import RunState, time_is_up, window_record
from memllm.training.run_config import RunConfig, with_file
from memllm.training.schedule import lr_factor

if TYPE_CHECKING:
    from memllm.training.feature_cache import SharedFeatures

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: nn.Module
    tokenizer: Any
    output_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    plugins: dict[str, TrainerPlugin] = field(default_factory=dict)  # trained with the memory


class Trainer:
    """Holds what one run needs; :meth:`run` is the loop.

    Args:
        cfg: the run config.
        source: the config file (named in errors).
        resume: require a checkpoint to resume from (otherwise resuming is automatic).
        task: a task object to use instead of building ``cfg.data``.
        plugins: the auxiliary objectives to train with the memory; None: those ``cfg`` asks
            for (:func:`memllm.training.plugins.build_plugins`).
        shared_features: recorded features to share with other runs of this process
            (``train.feature_cache``; an experiment's arms).
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        source=None,
        resume: bool = False,
        task=None,
        plugins: list[TrainerPlugin] | None = None,
        shared_features: SharedFeatures | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.source, self.resume = cfg, source, resume
        precision = _mixed_precision(cfg.train.mixed_precision)
        parallel.allow_precision(precision)
        self.accelerator = acc = Accelerator(
            mixed_precision=precision,
            kwargs_handlers=[parallel.ddp_kwargs()],
        )
        parallel.check_supported(acc, source)
        self.world, self.rank = acc.num_processes, acc.process_index
        self.out = Path(cfg.output_dir)
        # one run per output folder: refused here, before anything is built or written
        self._lock = OutputLock(self.out).acquire() if acc.is_main_process else None
        set_seed(cfg.seed)
        self._given_task = task is not None
        self.task = task if task is not None else build_task(cfg, source)

        model, tokenizer = build_model(cfg, source)
        self.model, self.tokenizer = model.to(acc.device), tokenizer
        self._order_key: tuple[int, int] | None = None  # (stage, epoch) of the example order
        self.has_memory = has_memory(model)
        model.requires_grad_(False)
        if plugins is None:
            plugins = build_plugins(cfg, model, tokenizer, acc.device, source=source)
        self.plugins = plugins
        self.params = trainable_parameters(model)
        for plugin in plugins:
            self.params += plugin.parameters()
        for p in self.params:
            p.requires_grad_(True)

        t = cfg.train
        optimizer = torch.optim.AdamW(
            self.params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay
        )
        # The step module is what DDP/FSDP wraps (one forward per micro-batch, all segments);
        # the optimizer is prepared so that fp16 loss scaling and unscaling before clipping work.
        # The scheduler is stepped by hand (accelerate's wrapper would step it once per process).
        # DDP broadcasts process 0's trainable weights here: every process starts alike.
        step = parallel.StepModule(model, self.params, self.forward)
        self.step_module, self.optimizer = parallel.prepare(acc, step, optimizer, self.params)

        self.global_batch = t.batch_size * t.grad_accum_steps * self.world
        self.state = RunState()  # (set here too: the curriculum stage picks the data)
        self._check_stages()
        self._build_data()
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_factor(s, t.scheduler, t.warmup_steps, self.total_steps),
        )
        self.cache = self._feature_cache(shared_features)
        self.state = RunState()
        self.window: list[dict[str, float]] = []  # step stats since the last log record
        self.setting_changes: list[dict[str, Any]] = []  # allowed on resumes after a NaN stop
        self.memory_state = None  # carried across batches only with train.persistent_memory
        self.timed_out = False  # set when train.max_minutes stops the run
        self._check_eval_metric()

    # -- setup helpers -----------------------------------------------------------------------
    def _info(self, message: str, *args) -> None:
        if self.accelerator.is_main_process:  # one line per event, not one per process
            log.info(message, *args)

    def _build_data(self) -> None:
        """Encode the train and validation data of the current curriculum stage (the run's
        data when there is no curriculum)."""
        cfg, task = self.cfg, self.task
        if cfg.train.curriculum:
            cfg = stage_config(self.cfg, self.state.stage)
            task = self._stage_task(self.state.stage, cfg)
        self.train_items, train_examples, self.eval_items, self.eval_examples = encode_run(
            task, self.tokenizer, cfg, self.has_memory
        )
        self.stage_task = task
        for plugin in self.plugins:
            plugin.prepare(self.train_items, train_examples)
            plugin.prepare(self.eval_items, self.eval_examples)
        self.steps_per_epoch = len(self.train_items) // self.global_batch
        if self.steps_per_epoch == 0:
            raise with_file(
                ConfigError(
                    f"train.batch_size: one global batch is {self.global_batch} examples "
                    f"(batch_size × grad_accum_steps × {self.world} processes) but the train "
                    f"split has {len(self.train_items)}"
                ),
                self.source,
            )

    def _stage_task(self, index: int, cfg: RunConfig):
        """The task of curriculum stage ``index`` (the run's own when the stage changes no data
        option; a task object passed in must offer ``with_options`` to be changed)."""
        overrides = self.cfg.train.curriculum[index].data
        if not overrides:
            return self.task
        if self._given_task:
            if not hasattr(self.task, "with_options"):
                raise with_file(
                    ConfigError(
                        f"train.curriculum[{index}].data: the task was passed in as an object "
                        "without with_options; build it from the data section"
                    ),
                    self.source,
                )
            return self.task.with_options(overrides)
        try:
            return build_task(cfg, self.source)
        except ConfigError as err:  # name the stage, not only data.<key>
            detail = str(err).removeprefix(f"{self.source}: ") if self.source else str(err)
            raise with_file(
                ConfigError(f"train.curriculum[{index}]: {detail}"), self.source
            ) from None

    def _check_stages(self) -> None:
        """Build every stage's task once up front, so a bad option fails before training."""
        for index in range(len(self.cfg.train.curriculum)):
            self._stage_task(index, stage_config(self.cfg, index))

    def _advance_stage(self, logger, why: str) -> None:
        """Start the next curriculum stage: new data, its own example order from step 0."""
        self.state.stage += 1
        self.state.stage_start = self.state.step
        self._build_data()
        # the best validation so far was measured on easier data: the new stage starts afresh
        self.state.best_metric, self.state.bad_evals = None, 0
        self._order_key = None
        logger.log(
            self.state.step,
            {"stage": self.state.stage, "reason": why, "train_examples": len(self.train_items)},
            kind="curriculum",
        )
        self._info("curriculum: stage %d from step %d (%s)", self.state.stage, self.state.step, why)

    def _feature_cache(self, shared: SharedFeatures | None):
        if not self.cfg.train.feature_cache:
            return None
        from memllm.training.feature_cache import FeatureCache, unsupported_reason

        if reason := unsupported_reason(self.model):
            raise with_file(ConfigError(f"train.feature_cache: {reason}"), self.source)
        table = shared.table(self.cfg, self.model) if shared is not None else None
        cache = FeatureCache(self.model, table)
        cache.full_hidden = any(p.reads_all_positions for p in self.plugins)
        return cache

    def _check_eval_metric(self) -> None:
        e = self.cfg.eval
        if e.metric != "loss" and not (e.generate and self.eval_examples is not None):
            raise with_file(
                ConfigError(
                    f"eval.metric: {e.metric!r} needs eval.generate: true and a task with a "
                    "metric; use loss"
                ),
                self.source,
            )

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self, batch: Batch, *, training: bool
    ) -> tuple[SegmentOutput, dict[str, float], list[Tensor]]:
        """Loss of one batch, its memory diagnostics and each plug-in's loss (in order)."""
        with contextlib.ExitStack() as stack:
            observed = [stack.enter_context(p.observe(self.model)) for p in self.plugins]
            out, diagnostics = self._forward_model(batch, training=training)
        # plug-ins that compare the student's last-segment logits (distillation) get those
        seen = [
            out.logits if getattr(p, "needs_last_logits", False) else o
            for p, o in zip(self.plugins, observed, strict=True)
        ]
        losses = [p.loss(batch, o) for p, o in zip(self.plugins, seen, strict=True)]
        return out, diagnostics, losses

    def _forward_model(self, batch: Batch, *, training: bool):
        """The model's loss in a fresh memory session (or the carried one, if persistent)."""
        if not self.has_memory:
            return window_forward(self.model, batch), {}
        carry = self.cfg.train.persistent_memory and training
        state = self.memory_state if carry else None
        keep = any(getattr(p, "needs_last_logits", False) for p in self.plugins)
        out, diagnostics, session = memory_forward(
            self.model, batch, self.cfg.train, cache=self.cache, state=state, keep_logits=keep
        )
        if carry:
            session.detach()
            self.memory_state = session.state()
        return out, diagnostics

    def _collate(self, items: list[Item], **kwargs) -> Batch:
        return collate(items, self.tokenizer.pad_token_id, self.accelerator.device, **kwargs)

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self, batches: list[Batch]) -> dict[str, float]:
        """Forward/backward over this process's micro-batches, sync gradients, clip, step."""
        acc = self.accelerator
        local = torch.tensor(float(sum(b.num_targets for b in batches)), device=acc.device)
        global_tokens = acc.reduce(local, "sum")
        # task loss × tokens, aux loss, input tokens, then each plug-in's loss
        sums = torch.zeros(3 + len(self.plugins), device=acc.device)
        diagnostics: dict[str, float] = {}
        share = len(batches) * self.world
        for i, batch in enumerate(batches):
            # one gradient sync per step: after the last micro-batch's backward
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.step_module):
                out, diag, extra = self._micro_batch(batch, global_tokens, share)
            aux = _aux_tensor(out)
            parts = [out.loss.detach().float() * out.num_tokens, aux.detach().float()]
            parts += [batch.attention_mask.sum().float(), *(x.detach().float() for x in extra)]
            sums += torch.stack([x.to(acc.device) for x in parts])
            for k, v in diag.items():
                diagnostics[k] = diagnostics.get(k, 0.0) + v / len(batches)
        sums = acc.reduce(sums, "sum")
        task_loss = float(sums[0] / global_tokens)
        aux_loss = float(sums[1] / share)
        extra_terms = {
            f"{p.name}_loss": float(sums[3 + i] / share) for i, p in enumerate(self.plugins)
        }
        total = task_loss + aux_loss
        for plugin in self.plugins:
            total = total + plugin.weight * extra_terms[f"{plugin.name}_loss"]
        if not math.isfinite(total):
            what = first_nonfinite(self.memory_state, diagnostics, task_loss, aux_loss, extra_terms)
            self._diverged(what)
        for p in self.params:  # a parameter outside this step's graph: a zero gradient, as
            if p.grad is None:  # AdamW then still decays it (the same on every process)
                p.grad = torch.zeros_like(p)
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        grad_norm = float(acc.clip_grad_norm_(self.params, max_norm))
        if acc.scaler is None and not math.isfinite(grad_norm):
            name = first_nonfinite_param(self.model, self.params, grad=True)
            self._diverged(f"the gradient of {name} is non-finite")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        if not all(bool(p.isfinite().all()) for p in self.params):  # never checkpoint NaN weights
            name = first_nonfinite_param(self.model, self.params, grad=False)
            self._diverged(f"the update made {name} non-finite", updated=True)
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: no update, no schedule step
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1 and diagnostics:
            keys = sorted(diagnostics)
            mean = acc.reduce(torch.tensor([diagnostics[k] for k in keys], device=acc.device))
            diagnostics = dict(zip(keys, mean.tolist(), strict=True))
        loss_terms, diagnostics = split_loss_terms(diagnostics)
        return {
            "loss": total,
            "task_loss": task_loss,
            "aux_loss": aux_loss,
            **extra_terms,
            **loss_terms,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": float(sums[2]),
            **{f"memory/{k}": v for k, v in diagnostics.items()},
        }

    def _micro_batch(self, batch: Batch, global_tokens: Tensor, share: int):
        """Forward (through the prepared step module) and backward of one micro-batch."""
        acc = self.accelerator
        with acc.autocast():
            out, diag, extra = self.step_module(batch, True)
        # Sums over micro-batches and processes give the global token mean of the task loss
        # and the means of the regulariser and the plug-in losses, whatever the batch split.
        objective = out.loss * out.num_tokens / global_tokens + _aux_tensor(out) / share
        for plugin, loss in zip(self.plugins, extra, strict=True):
            objective = objective + plugin.weight * loss / share
        # DDP averages the gradients over processes; the objective is this process's share of
        # the global sum, so it is scaled up by the process count (× 1 with one process)
        acc.backward(objective * self.world)
        return out, diag, extra

    def _diverged(self, what: str, *, updated: bool = False) -> None:
        raise diverged_error(
            self.cfg,
            self.out,
            self.state.step + 1,
            what,
            updated=updated,
            is_main=self.accelerator.is_main_process,
        )

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (token mean), each plug-in's loss (row mean) and, when configured,
        the task metric (generation)."""
        from accelerate.utils import gather_object

        acc, e = self.accelerator, self.cfg.eval
        set_train_mode(self.model, False)
        size = e.batch_size or self.cfg.train.batch_size
        mine = list(range(self.rank, len(self.eval_items), self.world))
        # loss × tokens, tokens, rows, then each plug-in's loss × rows
        sums = torch.zeros(3 + len(self.plugins), device=acc.device)
        outputs: list[tuple[int, str]] = []
        for i in range(0, len(mine), size):
            chunk = [self.eval_items[j] for j in mine[i : i + size]]
            batch = self._collate(chunk)
            with acc.autocast():  # through the step module: FSDP's root unit runs its hooks
                out, _, extra = self.step_module(batch, False)
            row = [float(out.loss) * out.num_tokens, out.num_tokens, len(chunk)]
            sums += torch.tensor(row + [float(x) * len(chunk) for x in extra], device=acc.device)
            if e.generate and self.eval_examples is not None:
                outputs.extend(zip(mine[i : i + size], self._generate(chunk), strict=True))
        sums = acc.reduce(sums, "sum")
        result = {"loss": float(sums[0] / sums[1].clamp_min(1))}
        for k, plugin in enumerate(self.plugins):
            result[f"{plugin.name}_loss"] = float(sums[3 + k] / sums[2].clamp_min(1))
        if e.generate and self.eval_examples is not None:
            gathered = sorted(gather_object(outputs)) if self.world > 1 else sorted(outputs)
            texts = [text for _, text in gathered]
            scores = self.task.score(self.eval_examples, texts)
            result.update({k: float(np.mean(v)) for k, v in scores.items() if len(v)})
        set_train_mode(self.model, True)
        if e.metric not in result:
            raise with_file(
                ConfigError(f"eval.metric: {e.metric!r} is not one of {sorted(result)}"),
                self.source,
            )
        return result

    def _generate(self, items: list[Item]) -> list[str]:
        batch = self._collate(items, prompt_only=True)
        max_new = self.cfg.eval.max_new_tokens or getattr(self.task, "max_new_tokens", 20)
        with self.accelerator.autocast():
            return generate_texts(self.model, self.tokenizer, batch, self.cfg, max_new)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to the end (resuming the folder's newest good checkpoint); the output folder's
        lock is held until this returns or raises."""
        try:
            return self._run()
        finally:
            if self._lock is not None:
                self._lock.release()

    def _run(self) -> TrainResult:
        from tqdm.auto import tqdm

        from memllm.training.logging_utils import RunLogger

        acc, cfg = self.accelerator, self.cfg
        self._resume_from_checkpoint()
        if acc.is_main_process:
            ckpt.write_run_config(self.out, cfg)
        logger = RunLogger(
            self.out, cfg.log, _plain(cfg), enabled=acc.is_main_process, resume_step=self.state.step
        )
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            # None: tqdm shows the bar only on a terminal
            disable=None if cfg.log.progress_bar and acc.is_main_process else True,
            unit="step",
            desc="train",
            dynamic_ncols=True,
        )
        set_train_mode(self.model, True)
        started, order = time.time(), []
        try:
            while (
                self.state.step < self.total_steps
                and not self.state.stopped_early
                and not self._out_of_time(started)
            ):
                # epochs count from the stage's first step (0 without a curriculum)
                stage = self.state.stage
                epoch, position = divmod(
                    self.state.step - self.state.stage_start, self.steps_per_epoch
                )
                if self._order_key != (stage, epoch):
                    self._order_key = (stage, epoch)
                    # stage 0 keeps the order a run without a curriculum has
                    seed = cfg.seed + 7_919 * stage
                    order = epoch_order(len(self.train_items), seed, epoch, cfg.train.shuffle)
                    self._log_cache(logger)
                t = cfg.train
                indices = micro_batches(
                    order, position, t.batch_size, t.grad_accum_steps, self.world, self.rank
                )
                batches = [self._collate([self.train_items[i] for i in mb]) for mb in indices]
                tick = time.perf_counter()
                stats = self.train_step(batches)
                stats["seconds"] = time.perf_counter() - tick  # excludes validation and saving
                self.state.step += 1
                self.state.tokens_seen += int(stats["tokens"])
                self.window.append(stats)
                bar.update(1)
                if self.state.step % cfg.log.every == 0 or self.state.step == self.total_steps:
                    self._log_train(logger, bar, self.window)
                    self.window = []
                self._after_step(logger)
            if self.state.last_eval_step != self.state.step:
                self._evaluate_and_log(logger)
            if latest_step(self.out) != self.state.step:
                self.save_checkpoint()
        finally:
            bar.close()
            logger.close()
        return self._finish(time.time() - started)

    def _out_of_time(self, started: float) -> bool:
        """Whether ``train.max_minutes`` is spent (every process agrees: the main one decides)."""
        limit = self.cfg.train.max_minutes
        if limit is None or self.timed_out:
            return self.timed_out
        self.timed_out = time_is_up(started, limit, self.accelerator)
        if self.timed_out:
            self._info(
                "train.max_minutes=%g reached at step %d of %d: stopping",
                limit,
                self.state.step,
                self.total_steps,
            )
        return self.timed_out

    def _log_train(self, logger, bar, window: list[dict[str, float]]) -> None:
        record = window_record(window) | {"epoch": self.state.step / self.steps_per_epoch}
        logger.log(self.state.step, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")

    def _after_step(self, logger) -> None:
        """Validate and checkpoint when due."""
        cfg, step = self.cfg, self.state.step
        improved = False
        eval_due = cfg.eval.every and step % cfg.eval.every == 0
        result = None
        if eval_due or step == self.total_steps:
            improved, result = self._evaluate_and_log(logger, with_result=True)
        if cfg.train.curriculum and step < self.total_steps:
            index, done = self.state.stage, step - self.state.stage_start
            if result is not None and stage_threshold_met(cfg, index, result):
                until = cfg.train.curriculum[index].until
                self._advance_stage(logger, f"{until.metric} reached {until.value}")
            elif stage_steps_done(cfg, index, done):
                self._advance_stage(logger, f"{done} steps")
        save_due = cfg.train.save_every and step % cfg.train.save_every == 0
        # the best checkpoint must exist on disk, so an improving validation saves one
        if save_due or improved or self.state.stopped_early or step == self.total_steps:
            self.save_checkpoint()
        if self.state.stopped_early:
            self._info(
                "early stop at step %d: no %s improvement in %d validations (best %.4f at %s)",
                step,
                cfg.eval.metric,
                self.state.bad_evals,
                self.state.best_metric,
                self.state.best_step,
            )

    def _evaluate_and_log(self, logger, with_result: bool = False):
        result = self.evaluate()
        improved = self.state.record_eval(result[self.cfg.eval.metric], self.cfg.eval)
        logger.log(self.state.step, {**result, "best": improved}, kind="eval")
        self._info(
            "step %d validation: %s",
            self.state.step,
            ", ".join(f"{k} {v:.4f}" for k, v in result.items()),
        )
        return (improved, result) if with_result else improved

    def _log_cache(self, logger) -> None:
        if self.cache is not None and len(self.cache):
            logger.log(self.state.step, self.cache.stats(), kind="feature_cache")

    def _finish(self, seconds: float) -> TrainResult:
        acc = self.accelerator
        set_train_mode(self.model, False)  # hand back a model ready for inference
        summary = {
            "steps": self.state.step,
            "total_steps": self.total_steps,
            "stopped_early": self.state.stopped_early,
            "stopped_at_time_limit": self.timed_out,
            "best_metric": self.state.best_metric,
            "best_step": self.state.best_step,
            "best_checkpoint": str(step_dir(self.out, self.state.best_step))
            if self.state.best_step is not None
            else None,
            "metric": self.cfg.eval.metric,
            "seconds_this_run": round(seconds, 3),
            "tokens_seen": self.state.tokens_seen,
            "processes": self.world,
            "global_batch": self.global_batch,
            "setting_changes": self.setting_changes,
        }
        if acc.is_main_process:
            ckpt.save_weights(self.model, self.out / "final", self.plugins)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        acc.wait_for_everyone()
        plugins = {plugin.name: plugin for plugin in self.plugins}
        return TrainResult(self.model, self.tokenizer, self.out, summary, plugins)

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write this step's checkpoint atomically (see :mod:`~memllm.training.checkpointing`)."""
        step = self.state.step
        state = vars(self.state) | {
            "epoch": step // self.steps_per_epoch,
            "batch_in_epoch": step % self.steps_per_epoch,
            "processes": self.world,
            "global_batch": self.global_batch,
            # the run's settings, compared on resume even if config.yaml is gone
            "config": ckpt.plain_config(self.cfg),
            "setting_changes": self.setting_changes,
            "log_window": self.window,  # so the first record after a resume spans log.every
        }
        return ckpt.write_checkpoint(
            self.out,
            step,
            self.accelerator,
            model=self.model,
            plugins=self.plugins,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=state,
            memory_state=self.memory_state,
            keep_last=self.cfg.train.keep_last,
            best_step=self.state.best_step,
        )

    def load_checkpoint(self, path: Path) -> None:
        saved, self.memory_state = ckpt.read_checkpoint(
            path,
            self.accelerator,
            model=self.model,
            plugins=self.plugins,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
        )
        if saved.get("global_batch") != self.global_batch:
            log.warning(
                "%s was written with a global batch of %s, this run uses %s: data positions differ",
                path,
                saved.get("global_batch"),
                self.global_batch,
            )
        self.state = RunState(**{k: saved[k] for k in vars(RunState()) if k in saved})
        if self.state.stage:  # a later curriculum stage: its data, as when it began
            self._build_data()
        self.window = list(saved.get("log_window") or [])
        self.setting_changes = list(saved.get("setting_changes") or [])

    def _resume_from_checkpoint(self) -> None:
        """Continue from the newest checkpoint that verifies (if any), with the same settings,
        or with the changes a NaN stop allows (recorded in every later checkpoint)."""
        acc = self.accelerator
        found = ckpt.resume_point(self.out, move_aside=acc.is_main_process)
        acc.wait_for_everyone()
        if found is None:
            if self.resume:
                raise MemllmError(f"--resume: no complete checkpoint in {self.out / CHECKPOINTS}")
            return
        path, saved = found
        changes = ckpt.check_same_run(self.out, self.cfg, saved)
        self.load_checkpoint(path)
        if not changes:
            self._info("resuming from %s (step %d)", path, self.state.step)
            return
        if any(c.startswith("train.lr:") for c in changes):
            ckpt.set_lr(self.scheduler.optimizer, self.scheduler, self.cfg.train.lr)
        self.setting_changes.append({"step": self.state.step, "changes": changes})
        self._info(
            "resuming from %s (step %d) after the NaN/inf stop, with %s",
            path,
            self.state.step,
            "; ".join(changes),
        )


# -- small helpers ---------------------------------------------------------------------------------


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _aux_tensor(out: SegmentOutput) -> Tensor:
    return out.aux_loss if isinstance(out.aux_loss, Tensor) else torch.tensor(out.aux_loss)


def _plain(cfg: RunConfig) -> dict[str, Any]:
    from memllm.core.config import to_dict

    return to_dict(cfg)


def train(
    cfg: RunConfig,
    *,
    source: str | Path | None = None,
    resume: bool = False,
    task=None,
    plugins: list[TrainerPlugin] | None = None,
    shared_features: SharedFeatures | None = None,
) -> TrainResult:
    """Train ``cfg``'s memory; resumes from ``cfg.output_dir``'s latest checkpoint if any.

    Args:
        cfg: the run config.
        source: the config file (named in errors).
        resume: require a checkpoint to resume from (otherwise resuming is automatic).
        task: a task object to use instead of building ``cfg.data`` (tests, notebooks).
        plugins: auxiliary objectives to train instead of those ``cfg`` asks for.
        shared_features: recorded features shared with other runs of this process.
    """
    trainer = Trainer(
        cfg,
        source=source,
        resume=resume,
        task=task,
        plugins=plugins,
        shared_features=shared_features,
    )
    return trainer.run()


__all__ = ["TrainResult", "Trainer", "TrainingDiverged", "train"]
