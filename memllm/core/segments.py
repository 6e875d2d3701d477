"""Inputs longer than a segment: split, run segment by segment, carry the memory.

Segments are aligned to the *end* of the input: the last segment holds the last
``segment_length`` tokens (the question, the answer), earlier ones step back from there. With
left padding this gives every example of a batch the same segments it would get alone, which is
what keeps a batch equal to its examples run one at a time.

Each segment is a separate forward call of the backbone: positions restart at 0 and the backbone
sees only that segment; what it knows of earlier segments comes through the memory.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from memllm.core.inject import memory_session
from memllm.core.session import MemorySession


def segment_bounds(length: int, segment_length: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each segment of a ``length``-token input, aligned to the end."""
    if segment_length <= 0:
        raise ValueError(f"segment_length must be > 0, got {segment_length}")
    bounds = []
    end = length
    while end > 0:
        bounds.append((max(0, end - segment_length), end))
        end -= segment_length
    return bounds[::-1] or [(0, 0)]


def _logits_to_keep(targets: Tensor | None, full: bool) -> int:
    """How many trailing positions need logits (0 = all, as in transformers).

    The LM head over a 50k vocabulary is a fifth of a small model's forward; segments without
    labels need none of it, and QA targets sit at the end of the input.
    """
    if full:
        return 0
    if targets is None:
        return 1
    labelled = (targets != -100).any(0).nonzero()
    if labelled.numel() == 0:
        return 1
    return targets.shape[1] - int(labelled[0])


@functools.cache
def _accepts_logits_to_keep(model_cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_cls.forward).parameters


def logits_to_keep_kwargs(model: nn.Module, keep: int) -> dict[str, int]:
    """``{"logits_to_keep": keep}`` for a model whose forward takes it; ``{}`` for the others
    and for ``keep == 0`` (all positions, the default)."""
    return {"logits_to_keep": keep} if keep and _accepts_logits_to_keep(type(model)) else {}


def positions_from_mask(mask: Tensor) -> Tensor:
    """Position ids that count only real tokens (left padding gets position 0)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token rows as one left-padded batch: ``(input_ids, attention_mask)``, both (B, longest).

    Left padding keeps every row's last token in the last column, where segments are aligned.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask


@dataclass
class SegmentOutput:
    """Outputs of a segment-by-segment forward pass.

    Attributes:
        loss: mean token loss over every labelled token of every segment (None without labels).
        logits: the logits of the last segment (B, T_last, vocab).
        aux_loss: the memory regularisers, averaged over segments.
        num_segments: how many segments were run.
        num_tokens: how many labelled tokens the loss averages over.
    """

    loss: Tensor | None
    logits: Tensor
    aux_loss: Tensor | float
    num_segments: int
    num_tokens: int


# What a segment runner is given and returns: ``(start, end, keep) -> logits | None``. ``keep``
# None: the segment has no labels and its logits are not wanted (the runner only has to update
# the memory); 0: logits at every position; n > 0: at the last n positions at least.
SegmentRunner = Callable[[int, int, int | None], Tensor | None]


def shifted_targets(labels: Tensor) -> Tensor:
    """``targets[t]`` = the token the logits at t predict: labels shifted left by one over the
    whole input, so a token that opens a segment is still predicted, by the previous segment's
    last position."""
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    return targets


def segment_loss(
    run_segment: SegmentRunner,
    labels: Tensor | None,
    *,
    length: int,
    segment_length: int,
    session: MemorySession | None = None,
    bptt_segments: int | None = None,
    keep_logits: bool = False,
) -> SegmentOutput:
    """The one segment loop: run ``run_segment`` on each segment, sum the token losses.

    Everything that computes a loss segment by segment goes through here (a memory model's
    :func:`forward_segments`, the trainer's plain-window forward, the feature cache's cached
    forward), so segment bounds, target shifting, truncated back-propagation, the logits kept
    and the loss normalisation are one piece of code; the runner only says how one segment's
    logits are made.

    Args:
        run_segment: computes segment ``[start, end)`` (see :data:`SegmentRunner`); the logits
            it returns cover the segment's last positions (their count is what is scored).
        labels: (B, length), -100 for tokens without loss; None for no loss.
        length: tokens of the input.
        segment_length: tokens per segment (aligned to the end of the input).
        session: the memory session the runner's model writes into: its regulariser loss is
            averaged over segments and its state detached every ``bptt_segments`` segments.
            None for a model without memory (no regulariser).
        bptt_segments: gradients flow through the memory across at most this many segments.
        keep_logits: ask for (and return) the last segment's logits at every position.
    """
    bounds = segment_bounds(length, segment_length)
    targets = shifted_targets(labels) if labels is not None else None
    total_loss = None
    total_tokens = 0
    aux_losses = []
    logits = None
    for k, (start, end) in enumerate(bounds):
        if session is not None and bptt_segments and k > 0 and k % bptt_segments == 0:
            session.detach()
        seg_targets = targets[:, start:end] if targets is not None else None
        full = keep_logits and k == len(bounds) - 1
        labelled = seg_targets is not None and bool((seg_targets != -100).any())
        out = run_segment(
            start, end, _logits_to_keep(seg_targets, full) if full or labelled else None
        )
        if session is not None:
            aux_losses.append(session.aux_loss())
        if labelled and out is not None:
            seg_targets = seg_targets[:, -out.shape[1] :]
            total_loss = _add(total_loss, _token_loss_sum(out, seg_targets))
            total_tokens += int((seg_targets != -100).sum())
        logits = out if full else None
    mean_loss = total_loss / total_tokens if total_loss is not None else None
    aux = sum(aux_losses) / len(aux_losses) if aux_losses else 0.0
    return SegmentOutput(mean_loss, logits, aux, len(bounds), total_tokens)


def _token_loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy over the labelled positions (float32 whatever the logits' dtype)."""
    return nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total + value


def check_segment_inputs(
    input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor | None, segment_length: int
) -> None:
    """Refuse inputs of mismatched shapes with a ValueError that names them."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor is not None and tensor.shape != input_ids.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}; it must match input_ids "
                f"{tuple(input_ids.shape)}"
            )
    if (
        isinstance(segment_length, bool)
        or not isinstance(segment_length, int)
        or segment_length < 1
    ):
        raise ValueError(f"segment_length must be a positive integer, got {segment_length!r}")


def forward_segments(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    segment_length: int,
    session: MemorySession | None = None,
    bptt_segments: int | None = None,
    keep_logits: bool = True,
) -> SegmentOutput:
    """Run ``model`` over a long input segment by segment, the memory carrying what came before.

    Args:
        input_ids, attention_mask, labels: (B, T); labels use -100 for tokens without loss.
        segment_length: tokens per forward call.
        session: an open memory session to use (and leave holding the final state); a fresh one
            is opened and closed otherwise.
        bptt_segments: truncated back-propagation: gradients flow through the memory across at
            most this many segments (None: through all of them).
        keep_logits: return the last segment's full logits; when False, logits are computed only
            where there are labels (much faster for QA training).

    Raises:
        ValueError: ``input_ids`` is not (B, T), ``attention_mask`` or ``labels`` is not the
            same shape (a shorter one would silently cover only part of the input), or
            ``segment_length`` is not positive.
    """
    check_segment_inputs(input_ids, attention_mask, labels, segment_length)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if session is None:
        with memory_session(model) as own:
            return forward_segments(
                model,
                input_ids,
                attention_mask,
                labels,
                segment_length=segment_length,
                session=own,
                bptt_segments=bptt_segments,
                keep_logits=keep_logits,
            )

    def run(start: int, end: int, keep: int | None) -> Tensor:
        # a segment without labels still runs (it writes the memory), with one position's logits
        return model_logits(model, input_ids[:, start:end], attention_mask[:, start:end], keep)

    return segment_loss(
        run,
        labels,
        length=input_ids.shape[1],
        segment_length=segment_length,
        session=session,
        bptt_segments=bptt_segments,
        keep_logits=keep_logits,
    )


def model_logits(model: nn.Module, ids: Tensor, mask: Tensor, keep: int | None) -> Tensor:
    """One plain forward call of ``model`` on a (segment of a) left-padded batch: its logits at
    the last ``keep`` positions (0: all; None: one, when none are needed)."""
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions_from_mask(mask),
        use_cache=False,
        **logits_to_keep_kwargs(model, 1 if keep is None else keep),
    )
    return out.logits
