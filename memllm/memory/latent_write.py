"""The latent memory's write rules (``LatentMemoryConfig.write``), as plain functions.

All three turn one segment's encoded tokens into new slots of the same shape (B, S, D), so the
state, the read and the checkpoint format do not depend on the write rule:

- ``gmemllm`` (G-MemLLM, the default): the slots are the queries of a cross-attention over the
  segment's tokens, softmax over *tokens*. A slot's query depends on the slot only, never on the
  segment, and the softmax averages every token that matches it: two facts whose tokens match
  the same slot blend into one. Kept for faithful reproduction.
- ``slot_competition`` (slot attention): the same scores, softmax over *slots*, so each token
  proposes a write and the slots compete for it: different tokens go to different slots, and a
  slot that wins no token keeps its content. A slot's candidate is the weighted mean of the
  tokens it won.
- ``delta`` (associative delta rule, as in DeltaNet): per head the slots are the columns of a
  key→value matrix ``M`` (key width ``num_slots``, value width ``memory_dim / num_heads``);
  token t writes ``M += β_t (v_t − M k_t) k_tᵀ`` in order, so a key written again is
  overwritten rather than averaged. Solved for the whole segment at once (below).

**Recency** (``write_recency``): a learned per-head slope ``r`` times the token's relative
position in the segment (0 for its first real token, 1 for its last) is added to the log-weight
of every token's write — to the scores before the softmax over tokens (``gmemllm``), to the
weights of the tokens a slot won (``slot_competition``) and to the logit of the delta rule's
step size β (``delta``) — so that a later binding of a key can win over an earlier one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def relative_positions(mask: Tensor) -> Tensor:
    """Each token's position among the real tokens of its row, scaled to [0, 1]: (B, T).

    Counted in real tokens, so left padding does not shift it (a batch equals its examples one
    at a time); padding gets 0, and a row's only token gets 0.
    """
    mask = mask.to(torch.bool)
    index = (mask.long().cumsum(1) - 1).clamp_min(0)
    last = (mask.sum(1, keepdim=True) - 1).clamp_min(1)
    return (index / last).masked_fill(~mask, 0.0)


def multihead_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    key_mask: Tensor | None = None,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention over ``num_heads`` heads.

    Args:
        query: (B, Q, D); key, value: (B, K, D).
        key_mask: (B, K) bool, True where a key may be attended to.
        key_bias: (B, heads, K), added to every query's score of that key (recency).

    Returns:
        The output (B, Q, D) and the attention weights (B, heads, Q, K). A query whose keys are
        all masked gets a zero output and zero weights instead of NaN.
    """
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=num_heads) for t in (query, key, value))
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if key_bias is not None:
        scores = scores + key_bias[:, :, None, :]
    if key_mask is not None:
        allowed = key_mask[:, None, None, :]
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = scores.softmax(-1) * allowed
    else:
        weights = scores.softmax(-1)
    out = torch.einsum("bhqk,bhkd->bhqd", weights, v)
    return rearrange(out, "b h n d -> b n (h d)"), weights


def slot_competition(
    slot_queries: Tensor,
    keys: Tensor,
    values: Tensor,
    num_heads: int,
    mask: Tensor,
    recency: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Slots compete for tokens: softmax over slots, then each slot averages what it won.

    Args:
        slot_queries: (B, S, D); keys, values: (B, T, D) of the segment's tokens.
        mask: (B, T) bool, True on real tokens (padding is won by no slot).
        recency: (B, heads, T) log-weight added to each token within the slot's average.

    Returns:
        The candidate of each slot (B, S, D) and how much of a token each slot won per head,
        ``won`` (B, heads, S) (0: nothing; a slot's write strength grows with it).
    """
    q, k, v = (
        rearrange(t, "b n (h d) -> b h n d", h=num_heads) for t in (slot_queries, keys, values)
    )
    scores = torch.einsum("bhsd,bhtd->bhst", q, k) / math.sqrt(q.shape[-1])
    share = scores.softmax(dim=2) * mask[:, None, None, :]  # each token split among the slots
    won = share.sum(-1)
    weights = share if recency is None else share * recency[:, :, None, :].exp()
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-8)
    candidate = torch.einsum("bhst,bhtd->bhsd", weights, v)
    return rearrange(candidate, "b h s d -> b s (h d)"), won


def delta_rule(slots: Tensor, keys: Tensor, values: Tensor, beta: Tensor) -> Tensor:
    """A segment of delta-rule writes ``M += β_t (v_t − M k_t) k_tᵀ``, all at once.

    Writing ``M_T = M_0 + Σ_t u_t k_tᵀ``, token t's write is
    ``u_t = β_t (v_t − M_0 k_t − Σ_{s<t} (k_s·k_t) u_s)``: a unit lower-triangular system
    ``(I + diag(β) L) U = diag(β) (V − K M_0ᵀ)`` with ``L`` the strictly lower part of ``K Kᵀ``,
    solved exactly (and differentiably) by one triangular solve per head instead of a loop over
    tokens. :func:`delta_rule_reference` is that loop.

    Args:
        slots: (B, S, heads, d): per head, row s is column s of ``M`` (key width S).
        keys: (B, T, heads, S), L2-normalised; values: (B, T, heads, d).
        beta: (B, T, heads) in [0, 1]; 0 on padding (a padded token writes nothing).

    Returns:
        The new slots (B, S, heads, d).
    """
    k = rearrange(keys, "b t h s -> b h t s")
    b = rearrange(beta, "b t h -> b h t")[..., None]
    recalled = torch.einsum("bhts,bshd->bhtd", k, slots)  # M_0 k_t
    target = b * (rearrange(values, "b t h d -> b h t d") - recalled)
    lower = torch.tril(k @ k.transpose(-1, -2), diagonal=-1)
    system = torch.eye(k.shape[2], device=k.device, dtype=k.dtype) + b * lower
    writes = torch.linalg.solve_triangular(system, target, upper=False, unitriangular=True)
    return slots + torch.einsum("bhts,bhtd->bshd", k, writes)


def delta_rule_reference(slots: Tensor, keys: Tensor, values: Tensor, beta: Tensor) -> Tensor:
    """:func:`delta_rule` one token at a time (slow; for tests)."""
    memory = slots
    for t in range(keys.shape[1]):
        k, v, b = keys[:, t], values[:, t], beta[:, t, :, None]
        recalled = torch.einsum("bhs,bshd->bhd", k, memory)
        memory = memory + torch.einsum("bhs,bhd->bshd", k, b * (v - recalled))
    return memory


def delta_keys(projected: Tensor, num_heads: int) -> Tensor:
    """(B, T, heads·S) → per-head L2-normalised keys (B, T, heads, S)."""
    return F.normalize(rearrange(projected, "b t (h s) -> b t h s", h=num_heads), dim=-1)
