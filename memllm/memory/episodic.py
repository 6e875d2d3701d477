"""Episodic memory: store the hidden states of earlier segments, read them back by attention.

One :class:`EpisodicMemory` sits after a decoder layer. It calls the layer unchanged and works on
its output only (so the training feature cache applies). For each forward call (one segment):

1. **read** — every token's hidden state queries the stored hidden states of the *earlier*
   segments of the same example by multi-head attention with learned projections (query from
   the token, key and value from the stored state), plus a learned per-head **recency** term, a
   bias linear in the distance in tokens between the query and the stored token, so that the
   latest of several bindings of a key can win. The read-out is projected to the model's width
   and added through a zero-initialised gate: an untrained memory is exactly the backbone;
2. **write** — the segment's real tokens (padding never) are appended to the store with their
   absolute token index (counting real tokens from the start of the example).

Reading before writing keeps a segment causal (its own tokens are seen by the backbone's
attention, not by the memory) and means the memory does not learn within a call
(``learns_within_call = False``): generation reads the committed store from the first new token.

**Recency without the query's position.** The bias is ``-slope_h · (q_pos - k_pos)``. For a given
query, ``-slope_h · q_pos`` is the same for every stored token, and softmax ignores a constant
added to all of a query's scores, so the read equals one with the bias ``slope_h · (k_pos -
seen)`` where ``seen`` counts the tokens stored so far. That form needs no query position, which
decoding (one call per new token) does not have.

**Bounded.** At most ``max_tokens`` tokens are kept per example; when a write overflows, the
oldest are evicted (first in, first out, no compression). The store keeps the backbone's dtype
(``store_dtype: auto``) or the one configured; ``float16`` halves it for a float32 backbone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from memllm.core.config import check
from memllm.memory.registry import register_memory

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Per stored token beside its hidden state: the absolute index (int64) and the mask (bool).
BOOKKEEPING_BYTES = 8 + 1


@dataclass
class EpisodicMemoryConfig:
    """Episodic memory: attention over earlier segments' hidden states, with recency."""

    type: Literal["episodic"] = "episodic"
    layer_ids: list[int] = field(
        default_factory=lambda: [-1],
        metadata={"help": "decoder layers followed by a memory; -1 is the last"},
    )
    num_heads: int = field(default=8, metadata={"help": "attention heads of the read"})
    key_dim: int = field(
        default=512, metadata={"help": "width of the query/key/value projections (all heads)"}
    )
    max_tokens: int = field(
        default=2048, metadata={"help": "tokens stored per example; the oldest are evicted"}
    )
    recency: bool = field(
        default=True, metadata={"help": "learned per-head bias linear in the token distance"}
    )
    store_dtype: Literal["auto", "float16", "bfloat16", "float32"] = field(
        default="auto", metadata={"help": "dtype of the stored hidden states; auto = backbone's"}
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout on the read-out"})

    def __post_init__(self) -> None:
        check(len(self.layer_ids) > 0, "layer_ids", "needs at least one layer")
        check(len(set(self.layer_ids)) == len(self.layer_ids), "layer_ids", "has duplicates")
        check(self.num_heads > 0, "num_heads", f"must be > 0, got {self.num_heads}")
        check(self.key_dim > 0, "key_dim", f"must be > 0, got {self.key_dim}")
        check(
            self.key_dim % self.num_heads == 0,
            "key_dim",
            f"{self.key_dim} is not divisible by num_heads={self.num_heads}",
        )
        check(self.max_tokens > 0, "max_tokens", f"must be > 0, got {self.max_tokens}")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


@register_memory("episodic", EpisodicMemoryConfig)
class EpisodicMemory(nn.Module):
    """One episodic store attached after a decoder layer.

    State: a dict, batch dimension first, ``N`` stored columns (``N ≤ max_tokens``; columns whose
    mask is False hold nothing and are never read):

    - ``hidden`` (B, N, hidden_size): the layer's output for each stored token, in the store dtype;
    - ``mask`` (B, N) bool; ``position`` (B, N) int64: absolute index of each stored token;
    - ``seen`` (B,) int64: how many real tokens the example has written so far.
    """

    learns_within_call = False  # reads the store the call starts from, then appends to it
    post_layer = True  # works on the wrapped layer's output only (the feature cache applies)

    def __init__(self, config: EpisodicMemoryConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        d = config.key_dim
        self.hidden_norm = nn.LayerNorm(hidden_size)
        self.query = nn.Linear(hidden_size, d)
        self.key = nn.Linear(hidden_size, d)
        self.value = nn.Linear(hidden_size, d)
        self.output = nn.Linear(d, hidden_size)
        # Only built when used, so that the no-recency ablation saves no weight it never trains.
        # Zero: no preference at first; positive slopes favour recent tokens.
        self.recency_slope = nn.Parameter(torch.zeros(config.num_heads)) if config.recency else None
        self.dropout = nn.Dropout(config.dropout)
        # Zero-initialised mixing gate: the memory starts as the identity of the backbone.
        self.out_gate = nn.Parameter(torch.zeros(hidden_size))

    def store_dtype(self, backbone_dtype: torch.dtype) -> torch.dtype:
        return STORE_DTYPES.get(self.config.store_dtype, backbone_dtype)

    def bytes_per_token(self, backbone_dtype: torch.dtype) -> int:
        """Bytes one stored token costs (hidden state at the store dtype, index and mask)."""
        width = self.out_gate.shape[0]
        return width * self.store_dtype(backbone_dtype).itemsize + BOOKKEEPING_BYTES

    def init_state(
        self, batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Tensor]:
        width = self.out_gate.shape[0]
        return {
            "hidden": torch.zeros(
                batch_size, 0, width, device=device, dtype=self.store_dtype(dtype)
            ),
            "mask": torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
            "position": torch.zeros(batch_size, 0, dtype=torch.long, device=device),
            "seen": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def read(self, h: Tensor, state: dict[str, Tensor]) -> Tensor:
        """Read-out (B, T, hidden) for every (normed, float32) token ``h`` from the store."""
        heads = self.config.num_heads
        stored = self.hidden_norm(state["hidden"].float())
        q = rearrange(self.query(h), "b t (h d) -> b h t d", h=heads)
        k = rearrange(self.key(stored), "b n (h d) -> b h n d", h=heads)
        v = rearrange(self.value(stored), "b n (h d) -> b h n d", h=heads)
        scores = torch.einsum("bhtd,bhnd->bhtn", q, k) / math.sqrt(q.shape[-1])
        if self.recency_slope is not None:
            # slope · (k_pos − seen) ≡ −slope · (q_pos − k_pos) under softmax (module docstring)
            age = (state["seen"][:, None] - state["position"]).float()  # (B, N), ≥ 1
            scores = scores - self.recency_slope[None, :, None, None] * age[:, None, None, :]
        allowed = state["mask"][:, None, None, :]
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        # `* allowed`: an empty store (or one holding only padding) reads zero, not a uniform mix
        weights = scores.softmax(-1) * allowed
        out = torch.einsum("bhtn,bhnd->bhtd", weights, v)
        return self.output(self.dropout(rearrange(out, "b h t d -> b t (h d)")))

    def write(self, layer_out: Tensor, state: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        """The store with this segment's real tokens appended, the oldest evicted past the cap."""
        seen = state["seen"]
        position = seen[:, None] + mask.long().cumsum(1) - 1  # padding's entries are masked
        hidden = torch.cat([state["hidden"], layer_out.to(state["hidden"].dtype)], 1)
        stored = torch.cat([state["mask"], mask], 1)
        position = torch.cat([state["position"], position], 1)
        if hidden.shape[1] > self.config.max_tokens:
            # Stable sort on the mask moves padding to the front and keeps real tokens in order,
            # so the last max_tokens columns are each example's newest real tokens.
            order = torch.sort(stored.to(torch.uint8), dim=1, stable=True).indices
            keep = order[:, -self.config.max_tokens :]
            hidden = hidden.gather(1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
            stored, position = stored.gather(1, keep), position.gather(1, keep)
        return {
            "hidden": hidden,
            "mask": stored,
            "position": position,
            "seen": seen + mask.sum(1),
        }

    def forward(
        self,
        call_layer: Callable[[Tensor], Tensor],
        hidden: Tensor,
        state: dict[str, Tensor],
        *,
        mask: Tensor,
        write: bool,
        segment_state: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        del segment_state  # reads before writes: ``state`` is the segment-start state already
        layer_out = call_layer(hidden)
        read_out = self.read(self.hidden_norm(layer_out.float()), state)
        gated = self.out_gate * read_out
        mixed = layer_out + gated.to(layer_out.dtype)
        new_state = self.write(layer_out, state, mask.bool()) if write else state
        aux = {
            "gate_abs_mean": self.out_gate.detach().abs().mean(),
            "read_norm_ratio": (
                gated.detach().norm(dim=-1).mean()
                / layer_out.detach().float().norm(dim=-1).mean().clamp_min(1e-8)
            ),
            "stored_tokens": state["mask"].sum(1).float().mean(),
        }
        if self.recency_slope is not None:
            aux["recency_slope_mean"] = self.recency_slope.detach().mean()
        return mixed, new_state, aux
