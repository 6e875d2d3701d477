"""Training data: examples as token ids, left-padded batches, and the order they come in.

- **encoding** — a task's examples become prompt + target + EOS token ids; labels are -100 on the
  prompt (and on padding), so the loss is on the target only;
- **batches** — rows left-padded to the longest (every row's last token in the last column,
  where segments are aligned);
- **order** — the example order of an epoch is a function of (seed, epoch) only, and a process's
  micro-batches of a global batch are a slice of it, so resuming needs no sampler state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from memllm.errors import ConfigError
from memllm.training.run_config import RunConfig, with_file


@dataclass
class Item:
    """One tokenised example: ``ids`` = prompt + target (+ EOS), ``labels`` -100 on the prompt."""

    id: str
    ids: list[int]
    labels: list[int]
    prompt_len: int
    # what trainer plug-ins attach per example (the supporting-fact head: sentence spans, labels)
    extras: dict[str, Any] = field(default_factory=dict)
    # data.question_segment: own (memllm.data.layout): 0 on the padding inside ``ids``, and the
    # prompt as generation reads it (ids, mask); None: all real, ``ids[:prompt_len]``
    mask: list[int] | None = None
    prompt_row: tuple[list[int], list[int]] | None = None


@dataclass
class Batch:
    """Left-padded tensors of some items (and the items, for what plug-ins attached)."""

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


def encode_examples(
    examples, tokenizer, max_length: int | None, chat: bool = False, segment_length=None
) -> list[Item]:
    """Prompt + target + EOS; prompts longer than ``max_length`` lose their beginning.

    With ``chat`` the prompt is the user turn of the tokenizer's chat template and the target
    the assistant's reply (see :mod:`memllm.data.prompting`). Examples with their question in
    its own segment are laid out by :mod:`memllm.data.layout` for ``segment_length``.
    """
    from memllm.data.layout import has_own_question
    from memllm.data.prompting import format_example

    if has_own_question(examples):
        return _encode_laid_out(examples, tokenizer, max_length, chat, segment_length)

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


def _encode_laid_out(examples, tokenizer, max_length, chat, segment_length) -> list[Item]:
    """:func:`encode_examples` for examples with interior padding (their rows keep a mask)."""
    from memllm.data.layout import encode_rows

    items = []
    for ex, row in zip(
        examples,
        encode_rows(examples, tokenizer, segment_length=segment_length, chat=chat),
        strict=True,
    ):
        target = len(row.ids) - row.prompt_len
        if max_length is not None and target >= max_length:
            raise ConfigError(
                f"train.max_length: {max_length} leaves no room for the prompt of {ex.id} "
                f"(its target has {target} tokens)"
            )
        cut = slice(-max_length, None) if max_length is not None else slice(None)
        ids, mask = row.ids[cut], row.mask[cut]
        labels = [-100] * (len(ids) - target) + row.ids[row.prompt_len :]
        prompt = (row.prompt_ids[cut], row.prompt_mask[cut])
        items.append(Item(ex.id, ids, labels, len(ids) - target, mask=mask, prompt_row=prompt))
    return items


def encode_split(
    task, tokenizer, split: str, max_length: int | None, limit=None, chat=False, segment_length=None
):
    """Items (and the task's examples, for scoring) of one split."""
    if hasattr(task, "token_sequences"):  # a text corpus: every token is a target
        if max_length is None:
            raise ConfigError("train.max_length: the corpus task needs a sequence length")
        seqs = task.token_sequences(tokenizer, max_length, split)[:limit]
        return [Item(f"{split}/{i}", list(s), list(s), 0) for i, s in enumerate(seqs)], None
    examples = task.examples(split)[:limit]
    return encode_examples(examples, tokenizer, max_length, chat, segment_length), examples


def collate(items: list[Item], pad_id: int, device, *, prompt_only: bool = False) -> Batch:
    """Left-padded tensors (padding masked out, labels -100 on padding)."""
    from memllm.data.layout import left_pad_rows

    if prompt_only:
        rows = [it.prompt_row or (it.ids[: it.prompt_len], None) for it in items]
    else:
        rows = [(it.ids, it.mask) for it in items]
    ids, mask = left_pad_rows([r for r, _ in rows], [m for _, m in rows], pad_id)
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


def encode_run(task, tokenizer, cfg: RunConfig, has_memory: bool):
    """``(train_items, train_examples, eval_items, eval_examples)`` of a run.

    Without memory the model sees one window: inputs are cut to it once, here.
    """
    t = cfg.train
    limits = [x for x in (t.max_length, None if has_memory else t.segment_length) if x]
    max_len = min(limits) if limits else None
    segment = {"chat": cfg.model.chat_template, "segment_length": t.segment_length}
    train_items, train_examples = encode_split(task, tokenizer, "train", max_len, **segment)
    eval_items, eval_examples = encode_split(
        task, tokenizer, cfg.eval.split, max_len, cfg.eval.max_examples, **segment
    )
    return train_items, train_examples, eval_items, eval_examples
