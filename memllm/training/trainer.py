"""``memllm train``: one accelerate loop that trains the memory (and LoRA) of a frozen backbone.

The same loop runs on a laptop CPU and on several GPUs (``accelerate launch``). Its pieces:

- **data** — the task's examples become prompt + target + EOS token ids; labels are -100 on the
  prompt (and on padding), so the loss is on the target only. Batches are left-padded.
- **steps** — one optimizer step takes a *global batch* of ``batch_size × grad_accum_steps ×
  processes`` examples, in a seeded per-epoch order; process ``r`` runs its share as
  ``grad_accum_steps`` micro-batches. The loss is normalised by the global number of target
  tokens, and the trainable gradients are summed over processes with one all-reduce, so a
  2-process run takes the same steps as a 1-process run with the same global batch. (The backbone
  is not wrapped in DDP: it is frozen, and only the memory's few MB of gradients need syncing.)
- **objective** — task loss (mean over target tokens) + the memory's regularisers (the latent
  memory's λ_s·sparsity − λ_e·entropy); every term is logged on its own.
- **checkpoints** — memory (+ LoRA) weights, optimizer, scheduler, RNG states, step; written to a
  temporary folder and renamed, so only complete checkpoints look like checkpoints. A rerun on the
  same output folder resumes from the latest one and ends bit-identical on CPU.

Outputs: ``output_dir/{config.yaml, log.jsonl, tensorboard/, checkpoints/step-N/, final/,
summary.json}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from memllm.core.inject import has_memory, memory_modules, memory_session
from memllm.core.segments import (
    SegmentOutput,
    _logits_to_keep,
    forward_segments,
    left_pad,
    positions_from_mask,
)
from memllm.errors import ConfigError, MemllmError
from memllm.training.run_config import (
    RunConfig,
    check_against_model,
    dump_yaml,
    with_file,
)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step-(\d+)")


class TrainingDiverged(MemllmError):
    """The loss or the gradient became NaN/inf; the run stopped before taking that step."""


# -- data ------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One tokenised example: ``ids`` = prompt + target (+ EOS), ``labels`` -100 on the prompt."""

    id: str
    ids: list[int]
    labels: list[int]
    prompt_len: int
    sp_spans: list[tuple[int, int]] | None = None  # HotpotQA: sentences kept whole, in ``ids``
    sp_labels: list[int] | None = None  # 1 = supporting fact, one per span


@dataclass
class Batch:
    ids: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    items: list[Item]

    @property
    def num_targets(self) -> int:
        """Tokens the loss averages over (labels are shifted by one in the forward pass)."""
        return int((self.labels[:, 1:] != -100).sum())


def build_task(cfg: RunConfig, source: str | Path | None):
    """The configured task; option errors name the key and the config file."""
    from memllm.data import build_task as build

    try:
        return build(
            cfg.data["task"],
            cfg.task_options,
            source_file=str(source) if source else None,
            key_prefix="data.",
        )
    except ConfigError as err:
        raise with_file(err, source) from None


def encode_examples(examples, tokenizer, max_length: int | None, chat: bool = False) -> list[Item]:
    """Prompt + target + EOS; prompts longer than ``max_length`` lose their beginning.

    With ``chat`` the prompt is the user turn of the tokenizer's chat template and the target
    the assistant's reply (see :mod:`memllm.data.prompting`).
    """
    from memllm.data.prompting import format_example

    # verbose=False: long prompts are the point, not a reason for a tokenizer warning
    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    pairs = [format_example(tokenizer, e.prompt, e.target, chat) for e in examples]
    prompts = encode([p for p, _ in pairs])
    targets = encode([t for _, t in pairs])
    items = []
    for ex, p, t in zip(examples, prompts, targets, strict=True):
        t = [*t, tokenizer.eos_token_id]
        if max_length is not None:
            if len(t) >= max_length:
                raise ConfigError(
                    f"train.max_length: {max_length} leaves no room for the prompt of {ex.id} "
                    f"(its target has {len(t)} tokens)"
                )
            p = p[max(0, len(p) - (max_length - len(t))) :]
        items.append(Item(ex.id, p + t, [-100] * len(p) + t, len(p)))
    return items


def encode_split(task, tokenizer, split: str, max_length: int | None, limit=None, chat=False):
    """Items (and the task's examples, for scoring) of one split."""
    if hasattr(task, "token_sequences"):  # a text corpus: every token is a target
        if max_length is None:
            raise ConfigError("train.max_length: the corpus task needs a sequence length")
        seqs = task.token_sequences(tokenizer, max_length, split)[:limit]
        return [Item(f"{split}/{i}", list(s), list(s), 0) for i, s in enumerate(seqs)], None
    examples = task.examples(split)[:limit]
    return encode_examples(examples, tokenizer, max_length, chat), examples


def collate(items: list[Item], pad_id: int, device, *, prompt_only: bool = False) -> Batch:
    """Left-padded tensors (padding masked out, labels -100 on padding)."""
    rows = [it.ids[: it.prompt_len] if prompt_only else it.ids for it in items]
    ids, mask = left_pad(rows, pad_id)
    labels = torch.full_like(ids, -100)
    if not prompt_only:
        width = ids.shape[1]
        for i, item in enumerate(items):
            labels[i, width - len(item.labels) :] = torch.tensor(item.labels)
    return Batch([it.id for it in items], ids.to(device), mask.to(device), labels.to(device), items)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The example order of one epoch: a function of (seed, epoch) only, so resuming needs no
    sampler state."""
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def micro_batches(order, position: int, batch: int, accum: int, world: int, rank: int):
    """This process's micro-batches (lists of indices) of global batch number ``position``."""
    start = position * batch * accum * world
    return [
        order[start + (a * world + rank) * batch : start + (a * world + rank + 1) * batch]
        for a in range(accum)
    ]


# -- schedule --------------------------------------------------------------------------------------


def lr_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the peak lr for the update with index ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


# -- forward ---------------------------------------------------------------------------------------


def window_forward(model: nn.Module, batch: Batch) -> SegmentOutput:
    """Plain forward of a model without memory (its inputs are already cut to one window)."""
    targets = torch.full_like(batch.labels, -100)
    targets[:, :-1] = batch.labels[:, 1:]
    keep = _logits_to_keep(targets, full=False)
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=positions_from_mask(batch.attention_mask),
        use_cache=False,
        logits_to_keep=keep,
    )
    targets = targets[:, -out.logits.shape[1] :]
    n = int((targets != -100).sum())
    loss = nn.functional.cross_entropy(
        out.logits.float().reshape(-1, out.logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return SegmentOutput(loss / max(n, 1), None, 0.0, 1, n)


@contextlib.contextmanager
def collect_diagnostics(model: nn.Module) -> Iterator[dict[str, float]]:
    """Memory diagnostics (``layer{i}/{name}``) averaged over every segment of the block.

    ``MemorySession.diagnostics()`` holds only the latest segment; the regulariser in the loss is
    the mean over segments, so its logged terms must be averaged the same way.
    """
    calls: dict[int, list[dict[str, Tensor]]] = {}
    handles = []
    for index, module in memory_modules(model).items():
        calls[int(index)] = []

        def hook(_module, _args, output, seen=calls[int(index)]):
            seen.append({k: v.detach() for k, v in output[2].items() if v.numel() == 1})

        handles.append(module.register_forward_hook(hook))
    result: dict[str, float] = {}
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()
    for index, seen in sorted(calls.items()):
        for name in seen[0] if seen else ():
            values = torch.stack([aux[name].float() for aux in seen])
            result[f"layer{index}/{name}"] = float(values.mean())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Memory + LoRA parameters, found by structure (never by name)."""
    from memllm.core.lora import lora_parameters

    params = list(memory_modules(model).parameters()) if has_memory(model) else []
    return params + lora_parameters(model)


def set_train_mode(model: nn.Module, training: bool) -> None:
    """Backbone always in eval mode; memory and LoRA layers follow ``training`` (dropout)."""
    from peft.tuners.lora import LoraLayer

    model.eval()
    if has_memory(model):
        memory_modules(model).train(training)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for sub in (module.lora_A, module.lora_B, module.lora_dropout):
                sub.train(training)


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class RunState:
    """What a checkpoint's ``state.json`` holds besides tensors."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    last_eval_step: int | None = None
    stopped_early: bool = False
    tokens_seen: int = 0


@dataclass
class TrainResult:
    model: nn.Module
    tokenizer: Any
    output_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    sp_head: nn.Module | None = None  # the supporting-fact head, when trained with the memory


class Trainer:
    """Holds what one run needs; :meth:`run` is the loop."""

    def __init__(self, cfg: RunConfig, *, source=None, resume: bool = False, task=None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        import memllm

        self.cfg, self.source, self.resume = cfg, source, resume
        self.accelerator = acc = Accelerator(
            mixed_precision=_mixed_precision(cfg.train.mixed_precision)
        )
        self.world, self.rank = acc.num_processes, acc.process_index
        self.out = Path(cfg.output_dir)
        set_seed(cfg.seed)
        self.task = task if task is not None else build_task(cfg, source)

        model, tokenizer = memllm.load_backbone(
            cfg.model.name, gguf_file=cfg.model.gguf_file, dtype=cfg.model.dtype
        )
        check_against_model(cfg, model, source)
        try:
            if cfg.memory is not None:
                set_seed(cfg.seed)  # the memory's initial weights depend on the seed only
                memllm.inject_memory(model, cfg.memory)
            if cfg.lora is not None:
                memllm.apply_lora(model, cfg.lora)
        except ConfigError as err:
            raise with_file(err, source) from None
        self.model, self.tokenizer = model.to(acc.device), tokenizer
        self.has_memory = has_memory(model)
        model.requires_grad_(False)
        self.params = trainable_parameters(model)
        self.sp_head = None
        if cfg.train.supporting_facts_weight > 0:
            from memllm.core.backbone import hidden_size
            from memllm.training.sp_head import build_head, final_norm

            try:
                final_norm(model)  # fail before training if the hidden states cannot be read
            except ConfigError as err:
                raise with_file(err, source) from None
            self.sp_head = build_head(hidden_size(model), cfg.seed).to(acc.device)
            self.params += list(self.sp_head.parameters())
        for p in self.params:
            p.requires_grad_(True)
        self._sync_initial_weights()

        t = cfg.train
        optimizer = torch.optim.AdamW(
            self.params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay
        )
        # Prepared so that fp16 loss scaling and unscaling before clipping work; the scheduler is
        # stepped by hand (accelerate's wrapper would step it once per process).
        self.optimizer = acc.prepare_optimizer(optimizer)

        # Without memory the model sees one window: cut inputs to it once, at encoding time.
        limits = [x for x in (t.max_length, None if self.has_memory else t.segment_length) if x]
        max_len = min(limits) if limits else None
        chat = cfg.model.chat_template
        self.train_items, train_examples = encode_split(
            self.task, tokenizer, "train", max_len, chat=chat
        )
        self.eval_items, self.eval_examples = encode_split(
            self.task, tokenizer, cfg.eval.split, max_len, cfg.eval.max_examples, chat=chat
        )
        if self.sp_head is not None:
            from memllm.training.sp_head import attach_sentence_spans

            attach_sentence_spans(self.train_items, train_examples, tokenizer, chat=chat)
            attach_sentence_spans(self.eval_items, self.eval_examples, tokenizer, chat=chat)
        self.global_batch = t.batch_size * t.grad_accum_steps * self.world
        self.steps_per_epoch = len(self.train_items) // self.global_batch
        if self.steps_per_epoch == 0:
            raise with_file(
                ConfigError(
                    f"train.batch_size: one global batch is {self.global_batch} examples "
                    f"(batch_size × grad_accum_steps × {self.world} processes) but the train "
                    f"split has {len(self.train_items)}"
                ),
                source,
            )
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_factor(s, t.scheduler, t.warmup_steps, self.total_steps),
        )
        self.cache = self._feature_cache()
        self.state = RunState()
        self.memory_state = None  # carried across batches only with train.persistent_memory
        self.timed_out = False  # set when train.max_minutes stops the run
        self._check_eval_metric()

    # -- setup helpers -----------------------------------------------------------------------
    def _info(self, message: str, *args) -> None:
        if self.accelerator.is_main_process:  # one line per event, not one per process
            log.info(message, *args)

    def _sync_initial_weights(self) -> None:
        """Every process starts from process 0's trainable weights (seeded alike anyway)."""
        if self.world > 1:
            from accelerate.utils import broadcast

            for p in self.params:
                p.data.copy_(broadcast(p.data.contiguous(), from_process=0))

    def _feature_cache(self):
        if not self.cfg.train.feature_cache:
            return None
        from memllm.training.feature_cache import FeatureCache, unsupported_reason

        reason = unsupported_reason(self.model, has_lora=self.cfg.lora is not None)
        if reason:
            raise with_file(ConfigError(f"train.feature_cache: {reason}"), self.source)
        cache = FeatureCache(self.model)
        cache.full_hidden = self.sp_head is not None  # the SP head reads every position
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
    def forward(self, batch: Batch, *, training: bool) -> tuple[SegmentOutput, dict[str, float]]:
        """Loss of one batch, in a fresh memory session (or the carried one, if persistent)."""
        t = self.cfg.train
        if not self.has_memory:
            return window_forward(self.model, batch), {}
        carry = t.persistent_memory and training
        with (
            memory_session(self.model, self.memory_state if carry else None) as session,
            collect_diagnostics(self.model) as diagnostics,
        ):
            args = (batch.input_ids, batch.attention_mask, batch.labels)
            kwargs = {
                "segment_length": t.segment_length,
                "session": session,
                "bptt_segments": t.bptt_segments,
            }
            # validation batches use the cache too: their backbone features never change either
            if self.cache is not None and self.cache.has(batch.ids):
                out = self.cache.forward(batch.ids, *args[1:], **kwargs)
            elif self.cache is not None:
                with self.cache.record(batch.ids, batch.attention_mask):
                    out = forward_segments(self.model, *args, keep_logits=False, **kwargs)
            else:
                out = forward_segments(self.model, *args, keep_logits=False, **kwargs)
            if carry:
                session.detach()
                self.memory_state = session.state()
        return out, diagnostics

    def forward_with_sp(
        self, batch: Batch, *, training: bool
    ) -> tuple[SegmentOutput, dict[str, float], Tensor | None]:
        """:meth:`forward`, plus the supporting-fact loss when the run trains the SP head.

        The head reads the final hidden states of every segment (sentences sit in early ones),
        concatenated back into the whole left-padded input.
        """
        if self.sp_head is None:
            return (*self.forward(batch, training=training), None)
        from memllm.data.supporting_facts import pad_labels, shift_spans
        from memllm.training.sp_head import capture_final_hidden

        with capture_final_hidden(self.model) as seen:
            out, diagnostics = self.forward(batch, training=training)
        hidden = torch.cat(seen, dim=1)
        width = batch.input_ids.shape[1]
        spans = [shift_spans(it.sp_spans or [], width - len(it.ids)) for it in batch.items]
        labels = pad_labels([it.sp_labels or [] for it in batch.items], device=hidden.device)
        scores = self.sp_head(hidden, spans)
        return out, diagnostics, self.sp_head.loss(scores.float(), labels)

    def _collate(self, items: list[Item], **kwargs) -> Batch:
        return collate(items, self.tokenizer.pad_token_id, self.accelerator.device, **kwargs)

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self, batches: list[Batch]) -> dict[str, float]:
        """Forward/backward over this process's micro-batches, sync gradients, clip, step."""
        acc = self.accelerator
        local = torch.tensor(float(sum(b.num_targets for b in batches)), device=acc.device)
        global_tokens = acc.reduce(local, "sum")
        # task loss × tokens, aux loss, input tokens, supporting-fact loss
        sums = torch.zeros(4, device=acc.device)
        diagnostics: dict[str, float] = {}
        sp_weight = self.cfg.train.supporting_facts_weight
        share = len(batches) * self.world
        for batch in batches:
            with acc.autocast():
                out, diag, sp_loss = self.forward_with_sp(batch, training=True)
            aux = out.aux_loss if isinstance(out.aux_loss, Tensor) else torch.tensor(out.aux_loss)
            sp = sp_loss if sp_loss is not None else torch.zeros((), device=acc.device)
            # Sums over micro-batches and processes give the global token mean of the task loss
            # and the means of the regulariser and the SP loss, whatever the split of the batch.
            objective = out.loss * out.num_tokens / global_tokens + aux / share
            if sp_loss is not None:
                objective = objective + sp_weight * sp_loss / share
            acc.backward(objective)
            sums += torch.stack(
                [
                    out.loss.detach().float() * out.num_tokens,
                    aux.detach().float().to(acc.device),
                    batch.attention_mask.sum().float(),
                    sp.detach().float().to(acc.device),
                ]
            )
            for k, v in diag.items():
                diagnostics[k] = diagnostics.get(k, 0.0) + v / len(batches)
        sums = acc.reduce(sums, "sum")
        task_loss = float(sums[0] / global_tokens)
        aux_loss = float(sums[1] / share)
        sp_terms = {"sp_loss": float(sums[3] / share)} if self.sp_head is not None else {}
        total = task_loss + aux_loss + sp_weight * sp_terms.get("sp_loss", 0.0)
        if not math.isfinite(total):
            self._diverged(f"the loss is {total} (task {task_loss}, memory {aux_loss}, {sp_terms})")
        self._all_reduce_gradients()
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        grad_norm = float(acc.clip_grad_norm_(self.params, max_norm))
        if acc.scaler is None and not math.isfinite(grad_norm):
            self._diverged(f"the gradient norm is {grad_norm}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: no update, no schedule step
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1 and diagnostics:
            keys = sorted(diagnostics)
            mean = acc.reduce(torch.tensor([diagnostics[k] for k in keys], device=acc.device))
            diagnostics = dict(zip(keys, mean.tolist(), strict=True))
        return {
            "loss": total,
            "task_loss": task_loss,
            "aux_loss": aux_loss,
            **sp_terms,
            **self._regulariser_terms(diagnostics),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": float(sums[2]),
            **{f"memory/{k}": v for k, v in diagnostics.items()},
        }

    def _regulariser_terms(self, diagnostics: dict[str, float]) -> dict[str, float]:
        """The weighted sparsity and entropy terms of the objective (latent memory)."""
        memory = self.cfg.memory
        terms = {}
        for name, sign in (("sparsity", 1.0), ("entropy", -1.0)):
            weight = getattr(memory, f"{name}_weight", None)
            values = [v for k, v in diagnostics.items() if k.endswith(f"/{name}")]
            if weight is not None and values:
                terms[f"{name}_loss"] = sign * weight * sum(values)
        return terms

    def _all_reduce_gradients(self) -> None:
        """Sum the trainable gradients over processes (one flat all-reduce)."""
        for p in self.params:
            if p.grad is None:  # keep every process's flat buffer the same shape
                p.grad = torch.zeros_like(p)
        if self.world == 1:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in self.params])
        flat = self.accelerator.reduce(flat, "sum")
        offset = 0
        for p in self.params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def _diverged(self, what: str) -> None:
        last = latest_checkpoint(self.out)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"{what} at step {self.state.step + 1}; stopped before updating the weights — {kept} "
            "(try a lower train.lr or train.max_grad_norm)"
        )

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (token mean) and, when configured, the task metric (generation)."""
        from accelerate.utils import gather_object

        acc, e = self.accelerator, self.cfg.eval
        set_train_mode(self.model, False)
        size = e.batch_size or self.cfg.train.batch_size
        mine = list(range(self.rank, len(self.eval_items), self.world))
        sums = torch.zeros(4, device=acc.device)  # loss × tokens, tokens, SP loss × rows, rows
        outputs: list[tuple[int, str]] = []
        for i in range(0, len(mine), size):
            chunk = [self.eval_items[j] for j in mine[i : i + size]]
            batch = self._collate(chunk)
            with acc.autocast():
                out, _, sp_loss = self.forward_with_sp(batch, training=False)
            sp = float(sp_loss) if sp_loss is not None else 0.0
            sums += torch.tensor(
                [float(out.loss) * out.num_tokens, out.num_tokens, sp * len(chunk), len(chunk)],
                device=acc.device,
            )
            if e.generate and self.eval_examples is not None:
                outputs.extend(zip(mine[i : i + size], self._generate(chunk), strict=True))
        sums = acc.reduce(sums, "sum")
        result = {"loss": float(sums[0] / sums[1].clamp_min(1))}
        if self.sp_head is not None:
            result["sp_loss"] = float(sums[2] / sums[3].clamp_min(1))
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
        from memllm.core.generation import generate_ids

        batch = self._collate(items, prompt_only=True)
        max_new = self.cfg.eval.max_new_tokens or getattr(self.task, "max_new_tokens", 20)
        with self.accelerator.autocast():
            new = generate_ids(
                self.model,
                batch.input_ids,
                batch.attention_mask,
                segment_length=self.cfg.train.segment_length,
                max_new_tokens=max_new,
            )
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def _record_eval(self, result: dict[str, float]) -> bool:
        """Update best / patience; True when the metric improved."""
        e, s = self.cfg.eval, self.state
        value = result[e.metric]
        if s.best_metric is None:
            improved = True
        elif e.higher_is_better:
            improved = value > s.best_metric + e.min_delta
        else:
            improved = value < s.best_metric - e.min_delta
        s.last_eval_step = s.step
        if improved:
            s.best_metric, s.best_step, s.bad_evals = value, s.step, 0
        else:
            s.bad_evals += 1
            if e.patience is not None and s.bad_evals >= e.patience:
                s.stopped_early = True
        return improved

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        from memllm.training.logging_utils import RunLogger

        acc, cfg = self.accelerator, self.cfg
        checkpoint = latest_checkpoint(self.out)
        if self.resume and checkpoint is None:
            raise MemllmError(f"--resume: no complete checkpoint in {self.out / CHECKPOINTS}")
        if checkpoint is not None:
            self._check_same_run()
            self.load_checkpoint(checkpoint)
            self._info("resuming from %s (step %d)", checkpoint, self.state.step)
        self._write_config()
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
        window: list[dict[str, float]] = []  # step stats since the last log record
        started, order_epoch, order = time.time(), -1, []
        try:
            while (
                self.state.step < self.total_steps
                and not self.state.stopped_early
                and not self._out_of_time(started)
            ):
                epoch, position = divmod(self.state.step, self.steps_per_epoch)
                if epoch != order_epoch:
                    order_epoch = epoch
                    order = epoch_order(len(self.train_items), cfg.seed, epoch, cfg.train.shuffle)
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
                window.append(stats)
                bar.update(1)
                if self.state.step % cfg.log.every == 0 or self.state.step == self.total_steps:
                    self._log_train(logger, bar, window)
                    window = []
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
        over = torch.tensor(
            float(time.time() - started >= 60 * limit), device=self.accelerator.device
        )
        if self.world > 1:
            from accelerate.utils import broadcast

            over = broadcast(over, from_process=0)
        self.timed_out = bool(over)
        if self.timed_out:
            self._info(
                "train.max_minutes=%g reached at step %d of %d: stopping",
                limit,
                self.state.step,
                self.total_steps,
            )
        return self.timed_out

    def _log_train(self, logger, bar, window: list[dict[str, float]]) -> None:
        """One record: means over the steps since the last one, the current lr, tokens/s."""
        rate = sum(w["tokens"] for w in window) / max(sum(w["seconds"] for w in window), 1e-9)
        record = {
            k: float(np.mean([w[k] for w in window]))
            for k in window[-1]
            if k not in ("tokens", "seconds")
        }
        record |= {
            "lr": window[-1]["lr"],
            "tokens_per_s": rate,
            "epoch": self.state.step / self.steps_per_epoch,
        }
        logger.log(self.state.step, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{rate:,.0f}")

    def _after_step(self, logger) -> None:
        """Validate and checkpoint when due."""
        cfg, step = self.cfg, self.state.step
        improved = False
        eval_due = cfg.eval.every and step % cfg.eval.every == 0
        if eval_due or step == self.total_steps:
            improved = self._evaluate_and_log(logger)
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

    def _evaluate_and_log(self, logger) -> bool:
        result = self.evaluate()
        improved = self._record_eval(result)
        logger.log(self.state.step, {**result, "best": improved}, kind="eval")
        self._info(
            "step %d validation: %s",
            self.state.step,
            ", ".join(f"{k} {v:.4f}" for k, v in result.items()),
        )
        return improved

    def _log_cache(self, logger) -> None:
        if self.cache is not None and len(self.cache):
            logger.log(
                self.state.step,
                {"examples": len(self.cache), "megabytes": self.cache.nbytes / 2**20},
                kind="feature_cache",
            )

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
            "best_checkpoint": str(_step_dir(self.out, self.state.best_step))
            if self.state.best_step is not None
            else None,
            "metric": self.cfg.eval.metric,
            "seconds_this_run": round(seconds, 3),
            "tokens_seen": self.state.tokens_seen,
            "processes": self.world,
            "global_batch": self.global_batch,
        }
        if acc.is_main_process:
            save_weights(self.model, self.out / "final", self.sp_head)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        acc.wait_for_everyone()
        return TrainResult(self.model, self.tokenizer, self.out, summary, sp_head=self.sp_head)

    def _check_same_run(self) -> None:
        """Refuse to resume a checkpoint trained with other settings: the run would continue
        (or, finished, just report) a memory its config does not describe."""
        from memllm.core.config import load_yaml
        from memllm.training.run_config import resume_conflicts

        path = self.out / "config.yaml"
        if not path.is_file():
            return
        changed = resume_conflicts(load_yaml(path), self.cfg)
        if changed:
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            raise ConfigError(
                f"{self.out} holds checkpoints of a run with other settings "
                f"({'; '.join(changed[:3])}{more}): use a new output_dir, or delete "
                f"{self.out / CHECKPOINTS} to start over"
            )

    def _write_config(self) -> None:
        if not self.accelerator.is_main_process:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "config.yaml"
        text = dump_yaml(self.cfg)
        if path.is_file() and path.read_text() != text:
            log.warning("%s differs from the config of this run; overwriting it", path)
        path.write_text(text)

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write a checkpoint atomically: temporary folder, every file, then one rename."""
        acc, step = self.accelerator, self.state.step
        final = _step_dir(self.out, step)
        tmp = final.with_name(f".tmp-{final.name}")
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            save_weights(self.model, tmp, self.sp_head)
        acc.wait_for_everyone()
        (tmp / "rng").mkdir(exist_ok=True)
        _save(
            _rng_state() | {"memory_state": self.memory_state}, tmp / "rng" / f"rank{self.rank}.pt"
        )
        acc.wait_for_everyone()
        if acc.is_main_process:
            trainer = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            }
            _save(trainer, tmp / "trainer.pt")
            state = vars(self.state) | {
                "epoch": step // self.steps_per_epoch,
                "batch_in_epoch": step % self.steps_per_epoch,
                "processes": self.world,
                "global_batch": self.global_batch,
            }
            _write_synced(tmp / "state.json", json.dumps(state, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)  # the checkpoint exists, complete, or not at all
            prune_checkpoints(self.out, self.cfg.train.keep_last, self.state.best_step)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        load_weights(self.model, path)
        if self.sp_head is not None:  # strict: a run that trains the head needs its weights
            from memllm.training.sp_head import load_sp_head

            load_sp_head(path, into=self.sp_head)
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        if trainer.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(trainer["scaler"])
        saved = json.loads((path / "state.json").read_text())
        if saved.get("global_batch") != self.global_batch:
            log.warning(
                "%s was written with a global batch of %s, this run uses %s: data positions differ",
                path,
                saved.get("global_batch"),
                self.global_batch,
            )
        self.state = RunState(**{k: saved[k] for k in vars(RunState()) if k in saved})
        rng_file = path / "rng" / f"rank{self.rank}.pt"
        if not rng_file.is_file():
            log.warning("%s missing (other process count?); using rank 0's RNG state", rng_file)
            rng_file = path / "rng" / "rank0.pt"
        rng = torch.load(rng_file, map_location="cpu", weights_only=False)
        _set_rng_state(rng)
        self.memory_state = _to_device(rng.get("memory_state"), self.accelerator.device)


# -- checkpoint files ------------------------------------------------------------------------------


def _step_dir(output_dir: Path, step: int | None) -> Path:
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


def save_weights(model: nn.Module, directory: Path, sp_head: nn.Module | None = None) -> None:
    """Memory (+ LoRA) via :func:`memllm.save_memory`; a LoRA-only model writes its adapter.
    A supporting-fact head goes beside them (``sp_head.safetensors``)."""
    from memllm.core.checkpoint import ADAPTER_FILE, save_memory

    if has_memory(model):
        save_memory(model, directory)
    else:
        from safetensors.torch import save_file

        from memllm.core.lora import adapter_state_dict, lora_config_dict

        directory.mkdir(parents=True, exist_ok=True)
        save_file(adapter_state_dict(model), directory / ADAPTER_FILE)
        (directory / "lora_config.json").write_text(json.dumps(lora_config_dict(model), indent=2))
    if sp_head is not None:
        from memllm.training.sp_head import save_sp_head

        save_sp_head(sp_head, directory)


def load_weights(model: nn.Module, directory: Path) -> None:
    """Load a checkpoint's trained weights into a model already built with the same config."""
    from safetensors.torch import load_file

    from memllm.core.checkpoint import ADAPTER_FILE, WEIGHTS_FILE, read_memory_config
    from memllm.core.inject import memory_config_dict
    from memllm.core.lora import has_lora, load_adapter_state
    from memllm.errors import CheckpointError

    if has_memory(model):
        if read_memory_config(directory).get("memory") != memory_config_dict(model):
            raise CheckpointError(f"{directory}: memory config differs from this run's memory")
        weights = load_file(directory / WEIGHTS_FILE)
        memory_modules(model).load_state_dict(
            {k.removeprefix("layers."): v for k, v in weights.items()}, strict=True
        )
    if has_lora(model):
        load_adapter_state(model, load_file(directory / ADAPTER_FILE), source=directory)


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _to_device(state: Any, device) -> Any:
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.to(device) if isinstance(x, Tensor) else x, state)


# -- small helpers ---------------------------------------------------------------------------------


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _plain(cfg: RunConfig) -> dict[str, Any]:
    from memllm.core.config import to_dict

    return to_dict(cfg)


def train(
    cfg: RunConfig, *, source: str | Path | None = None, resume: bool = False, task=None
) -> TrainResult:
    """Train ``cfg``'s memory; resumes from ``cfg.output_dir``'s latest checkpoint if any.

    Args:
        cfg: the run config.
        source: the config file (named in errors).
        resume: require a checkpoint to resume from (otherwise resuming is automatic).
        task: a task object to use instead of building ``cfg.data`` (tests, notebooks).
    """
    return Trainer(cfg, source=source, resume=resume, task=task).run()


__all__ = ["Trainer", "TrainingDiverged", "train"]
