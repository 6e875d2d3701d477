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
    """
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
    bounds = segment_bounds(input_ids.shape[1], segment_length)
    # targets[t] is the token that the logits at t predict (labels shifted by one over the whole
    # input), so a token that opens a segment is still predicted, by the previous segment's end
    targets = None
    if labels is not None:
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]
    total_loss = None
    total_tokens = 0
    aux_losses = []
    logits = None
    for k, (start, end) in enumerate(bounds):
        if bptt_segments and k > 0 and k % bptt_segments == 0:
            session.detach()
        ids = input_ids[:, start:end]
        mask = attention_mask[:, start:end]
        seg_targets = targets[:, start:end] if targets is not None else None
        is_last = k == len(bounds) - 1
        keep = _logits_to_keep(seg_targets, full=keep_logits and is_last)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions_from_mask(mask),
            use_cache=False,
            **logits_to_keep_kwargs(model, keep),
        )
        aux_losses.append(session.aux_loss())
        if seg_targets is not None:
            seg_targets = seg_targets[:, -out.logits.shape[1] :]
            n = int((seg_targets != -100).sum())
            if n:
                loss = nn.functional.cross_entropy(
                    out.logits.float().reshape(-1, out.logits.shape[-1]),
                    seg_targets.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                total_loss = loss if total_loss is None else total_loss + loss
                total_tokens += n
        logits = out.logits if (keep_logits and is_last) else None
    mean_loss = total_loss / total_tokens if total_loss is not None else None
    aux = sum(aux_losses) / len(aux_losses)
    return SegmentOutput(mean_loss, logits, aux, len(bounds), total_tokens)
