"""Gated latent memory (G-MemLLM): learned slots, written by cross-attention through a GRU gate.

One :class:`LatentMemory` sits after a decoder layer. For each forward call (one segment):

1. **read** — every token's hidden state queries the slots written by *earlier* segments of the
   same example; the read-out is decoded to the model's width and added through a
   zero-initialised gate, so an untrained memory leaves the backbone exactly unchanged;
2. **write** — the slots (queries) attend to the encoded hidden states of this segment (keys and
   values, padding masked), and a GRU-style gate ``g = σ(W[m; a])`` mixes the candidate into
   each slot: ``m' = g·a + (1−g)·m``.

That write (``write: gmemllm``, the default, for faithful reproduction) cannot bind facts well:
a slot's query depends on the slot only, and its softmax over tokens averages every token that
matches it. ``write: slot_competition`` (tokens choose slots), ``write: delta`` (a delta-rule
key→value matrix) and ``write_recency`` (later tokens can win) are ablations of the same module;
their rules are in :mod:`memllm.memory.latent_write`. ``num_slots`` is the capacity knob of each.

Reading before writing keeps the layer causal inside a segment: token t never sees a memory
that holds tokens after t. It also means the memory does not learn within a call
(``learns_within_call = False``): every token of a segment reads the state the segment started
from, so generation can decode the last segment call by call against the committed state
(``session.decoding()`` passes it with ``write=False``) and still equal a teacher-forced pass.

Each slot carries an importance score ``σ(w·m)`` that scales its value in the read; the sparsity
(L1) and entropy regularisers act on it.
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
from memllm.memory.latent_write import (
    delta_keys,
    delta_rule,
    multihead_attention,
    relative_positions,
    slot_competition,
)
from memllm.memory.registry import register_memory

WRITE_RULES = ("gmemllm", "slot_competition", "delta")

MAX_SIZE = 65_536
"""Upper bound of ``num_slots`` and ``memory_dim`` (a config error beyond it)."""


@dataclass
class LatentMemoryConfig:
    """Gated latent memory bank (G-MemLLM)."""

    type: Literal["latent"] = "latent"
    layer_ids: list[int] = field(
        default_factory=lambda: [-1],
        metadata={"help": "decoder layers followed by a memory; -1 is the last (G-MemLLM)"},
    )
    num_slots: int = field(default=16, metadata={"help": "number of memory slots"})
    memory_dim: int = field(default=512, metadata={"help": "width of each slot"})
    num_heads: int = field(default=8, metadata={"help": "attention heads for read and write"})
    update_gate: bool = field(
        default=True, metadata={"help": "GRU-style update gate; false = plain overwrite (ablation)"}
    )
    sparsity_weight: float = field(
        default=0.01, metadata={"help": "λ_sparsity: weight of the L1 term on slot importance"}
    )
    entropy_weight: float = field(
        default=0.01, metadata={"help": "λ_entropy: weight of the slot-usage entropy bonus"}
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout on the read-out"})
    write: Literal["gmemllm", "slot_competition", "delta"] = field(
        default="gmemllm",
        metadata={
            "help": "write rule: gmemllm (slots attend over tokens, G-MemLLM); slot_competition "
            "(tokens choose slots, softmax over slots); delta (delta-rule key->value matrix)"
        },
    )
    write_recency: bool = field(
        default=False,
        metadata={"help": "learned recency term in the write, so later tokens can win"},
    )

    def __post_init__(self) -> None:
        check(len(self.layer_ids) > 0, "layer_ids", "needs at least one layer")
        check(len(set(self.layer_ids)) == len(self.layer_ids), "layer_ids", "has duplicates")
        check(self.num_slots > 0, "num_slots", f"must be > 0, got {self.num_slots}")
        check(self.memory_dim > 0, "memory_dim", f"must be > 0, got {self.memory_dim}")
        # bounds far above any real bank; past them the weights alone would not fit in memory
        check(
            self.num_slots <= MAX_SIZE, "num_slots", f"must be <= {MAX_SIZE}, got {self.num_slots}"
        )
        check(
            self.memory_dim <= MAX_SIZE,
            "memory_dim",
            f"must be <= {MAX_SIZE}, got {self.memory_dim}",
        )
        check(self.num_heads > 0, "num_heads", f"must be > 0, got {self.num_heads}")
        check(
            self.memory_dim % self.num_heads == 0,
            "memory_dim",
            f"{self.memory_dim} is not divisible by num_heads={self.num_heads}",
        )
        check(self.sparsity_weight >= 0, "sparsity_weight", "must be >= 0")
        check(self.entropy_weight >= 0, "entropy_weight", "must be >= 0")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        check(self.write in WRITE_RULES, "write", f"must be one of {', '.join(WRITE_RULES)}")


@register_memory("latent", LatentMemoryConfig)
class LatentMemory(nn.Module):
    """One gated latent memory bank attached after a decoder layer.

    State: a tensor (batch, num_slots, memory_dim) — the slots of each example, whatever the
    write rule (for ``delta``, per head the columns of its key→value matrix).
    """

    learns_within_call = False  # reads the state the call starts from, then writes
    post_layer = True  # works on the wrapped layer's output only (the feature cache applies)

    def __init__(self, config: LatentMemoryConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        d, slots, heads = config.memory_dim, config.num_slots, config.num_heads
        delta = config.write == "delta"
        self.initial_slots = nn.Parameter(torch.randn(slots, d) / math.sqrt(d))
        self.hidden_norm = nn.LayerNorm(hidden_size)
        # write path: hidden → memory space, then keys/values of the tokens
        self.encoder = nn.Linear(hidden_size, d)
        self.write_value = nn.Linear(d, d)
        # Layers are only built when the write rule uses them: a config must not count (or save)
        # weights it never trains.
        if delta:
            self.write_key = nn.Linear(d, heads * slots)  # a key over the slots, per head
            self.write_strength = nn.Linear(d, heads)  # logit of the step size β
            self.update_gate = None
        else:
            self.write_query = nn.Linear(d, d)
            self.write_key = nn.Linear(d, d)
            self.update_gate = nn.Linear(2 * d, d) if config.update_gate else None
        # per-head slope of the recency term (zero: no preference until trained)
        self.write_recency = nn.Parameter(torch.zeros(heads)) if config.write_recency else None
        # read path: hidden queries the slots, read-out decoded to hidden width
        if delta:
            self.read_query = nn.Linear(hidden_size, heads * slots)  # a key over the slots
        else:
            self.read_query = nn.Linear(hidden_size, d)
            self.read_key = nn.Linear(d, d)
            self.read_value = nn.Linear(d, d)
        self.decoder = nn.Linear(d, hidden_size)
        self.importance = nn.Linear(d, 1)
        self.dropout = nn.Dropout(config.dropout)
        # Zero-initialised mixing gate: the memory starts as the identity of the backbone.
        self.out_gate = nn.Parameter(torch.zeros(hidden_size))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        del dtype  # the memory computes in float32 whatever the backbone's dtype
        return self.initial_slots.to(device=device, dtype=torch.float32).expand(batch_size, -1, -1)

    def slot_importance(self, slots: Tensor) -> Tensor:
        """Importance of each slot in (0, 1): (B, num_slots)."""
        return torch.sigmoid(self.importance(slots)).squeeze(-1)

    def read(self, hidden: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Read-out (B, T, hidden) for every token from ``slots``, and the slot importance.

        Each slot's contribution is scaled by its importance, whatever the write rule.
        """
        importance = self.slot_importance(slots)
        heads = self.config.num_heads
        if self.config.write == "delta":
            # M q per head: the query is a key over the slots
            query = delta_keys(self.read_query(hidden), heads)
            weighted = rearrange(slots * importance.unsqueeze(-1), "b s (h d) -> b s h d", h=heads)
            out = rearrange(
                torch.einsum("bths,bshd->bthd", query, weighted), "b t h d -> b t (h d)"
            )
        else:
            values = self.read_value(slots) * importance.unsqueeze(-1)
            out, _ = multihead_attention(
                self.read_query(hidden), self.read_key(slots), values, heads
            )
        return self.decoder(self.dropout(out)), importance

    def recency(self, mask: Tensor) -> Tensor | None:
        """Log-weight of each token's write, ``r_h · position`` (B, heads, T), or None."""
        if self.write_recency is None:
            return None
        return self.write_recency[None, :, None] * relative_positions(mask)[:, None, :]

    def write(self, hidden: Tensor, slots: Tensor, mask: Tensor) -> Tensor:
        """New slots after writing this segment's hidden states (padding masked)."""
        encoded = self.encoder(hidden)
        values = self.write_value(encoded)
        recency = self.recency(mask)
        heads = self.config.num_heads
        if self.config.write == "delta":
            logit = self.write_strength(encoded)
            if recency is not None:
                logit = logit + recency.transpose(1, 2)
            beta = torch.sigmoid(logit) * mask[..., None]  # a padded token writes nothing
            split = "b n (h d) -> b n h d"
            new = delta_rule(
                rearrange(slots, split, h=heads),
                delta_keys(self.write_key(encoded), heads),
                rearrange(values, split, h=heads),
                beta,
            )
            new = rearrange(new, "b s h d -> b s (h d)")
        else:
            if self.config.write == "slot_competition":
                candidate, won = slot_competition(
                    self.write_query(slots),
                    self.write_key(encoded),
                    values,
                    heads,
                    mask,
                    recency,
                )
                # A slot that won no token keeps its content: strength 1 − e^(−tokens won).
                strength = 1 - torch.exp(-won)
                strength = strength.repeat_interleave(self.config.memory_dim // heads, dim=1)
                strength = rearrange(strength, "b d s -> b s d")
            else:
                candidate, _ = multihead_attention(
                    self.write_query(slots),
                    self.write_key(encoded),
                    values,
                    heads,
                    key_mask=mask,
                    key_bias=recency,
                )
                strength = 1.0
            if self.update_gate is not None:
                gate = torch.sigmoid(self.update_gate(torch.cat([slots, candidate], dim=-1)))
            else:
                gate = torch.ones_like(candidate)
            gate = gate * strength
            new = gate * candidate + (1 - gate) * slots
        # An example whose segment is all padding keeps its memory unchanged.
        has_tokens = mask.any(dim=1)[:, None, None]
        return torch.where(has_tokens, new, slots)

    def forward(
        self,
        call_layer: Callable[[Tensor], Tensor],
        hidden: Tensor,
        state: Tensor,
        *,
        mask: Tensor,
        write: bool,
        segment_state: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        del segment_state  # reads before writes: ``state`` is the segment-start state already
        layer_out = call_layer(hidden)
        h = self.hidden_norm(layer_out.float())
        read_out, importance = self.read(h, state)
        mixed = layer_out + (self.out_gate * read_out).to(layer_out.dtype)
        new_state = self.write(h, state, mask) if write else state
        sparsity = importance.abs().mean()
        usage = importance / importance.sum(-1, keepdim=True).clamp_min(1e-8)
        entropy = -(usage * usage.clamp_min(1e-8).log()).sum(-1).mean()
        sparsity_term = self.config.sparsity_weight * sparsity
        entropy_term = self.config.entropy_weight * entropy
        aux = {
            "loss": sparsity_term - entropy_term,
            # the named parts of "loss" (training logs each on its own, as ``<name>_loss``)
            "loss/sparsity": sparsity_term.detach(),
            "loss/entropy": -entropy_term.detach(),
            "sparsity": sparsity,
            "entropy": entropy,
            "gate_abs_mean": self.out_gate.detach().abs().mean(),
            "read_norm_ratio": (
                (self.out_gate * read_out).detach().norm(dim=-1).mean()
                / layer_out.detach().float().norm(dim=-1).mean().clamp_min(1e-8)
            ),
        }
        return mixed, new_state, aux
