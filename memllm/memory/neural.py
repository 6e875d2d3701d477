"""Titans neural memory (MemoryLlama / Hercules): an MLP whose weights learn at test time.

The memory is a residual MLP ``M(x) = x + W_L σ(… σ(x W_1))`` (σ = SiLU) whose weights are *fast
weights*: one copy per example, held in the session's state (never in ``nn.Parameter``s, never
averaged over the batch). From the normalised hidden state each token gets a query, a key and a
value (keys and queries L2-normalised) and three gates: forgetting α ∈ (0, 1), learning rate
θ ∈ (0, ``max_adaptive_lr``) and momentum η ∈ (0, 1). Writing a token is one step of gradient
descent with momentum on ``‖M(k) − v‖²`` (θ softly bounded by ``max_grad_norm`` so that the
inner loop cannot diverge), and forgetting decays the weights toward their learned initial values
(``forget_toward: init``; Titans decays toward zero, ``forget_toward: zero``, which for this
bias-free MLP is a point where every gradient vanishes: on long inputs the memory dies there).
Reading is ``M(q)``. The update rule, its per-token reference and its fast chunked form
are in :mod:`memllm.memory.neural_update`.

Three ways to attach it to a decoder layer (``arch``); each starts as the identity of the backbone:

- ``context`` (Hercules "memory as context", Titans MAC): the memory as written by *earlier
  segments* is read with the normalised hidden state; ``[norm(h); M(q)]`` is projected by a
  zero-initialised matrix and added to ``h``, and the decoder layer runs on that. The memory is
  then written with the layer's output, and read again at the updated weights; that read-out
  enters through a gate ``g = s ⊙ σ(W x + b)`` whose scale ``s`` starts at zero.
- ``layer`` (memory as a layer, before attention): the memory is written and read with the
  normalised layer input; the gated read-out is added to the input of the decoder layer.
- ``gate`` (Titans MAG): the decoder layer and the memory branch run side by side on the same
  input; the gated memory branch is added to the layer's output.

**Reads inside a call.** A call (one segment) writes its tokens chunk by chunk, and the read at
token t uses the memory after the update with token t (Titans: tokens ≤ t; every token's read
depends only on tokens ≤ t). The context read of ``context`` uses only earlier segments.

**Generation.** The memory learns within a call (``learns_within_call = True``): a token's
read depends on the earlier tokens of its own segment through the fast weights. Generation
decodes the last segment as many calls (the prefill of the prompt's last segment, then one call
per new token), inside ``session.decoding()``: each call gets the state the previous one
returned (a scratch copy, dropped at the end; the committed state is unchanged) and, as
``segment_state``, the state at the start of the segment, which the ``context`` read uses. The
update is exact in streaming (``base``/``offset`` carry the chunk in progress), so generation
computes what one teacher-forced call over the prompt's last segment and the generated tokens
computes, token for token. With ``write=False`` alone (``session.read_only()``) a call is a
segment of its own that reads the committed memory and whose writes are discarded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memllm.core.config import check
from memllm.memory.neural_update import State, chunked_update, pack, read
from memllm.memory.registry import register_memory

# The defaults before the retention diagnostic (memllm.memory.diagnostics; docs/neural_memory.md,
# "Retention"): with them one token's trace in M(k) peaks near 2e-3 of the value and is ~3e-7
# after 512 tokens. Pass them as config keys to reproduce earlier runs.
PREVIOUS_DEFAULTS = {
    "forget_bias": -4.0,
    "momentum_bias": 2.0,
    "max_adaptive_lr": 1e-2,
    "max_grad_norm": 1.0,
}


@dataclass
class NeuralMemoryConfig:
    """Titans neural memory (MemoryLlama)."""

    type: Literal["neural"] = "neural"
    layer_ids: list[int] = field(
        default_factory=lambda: [-2, -1],
        metadata={"help": "decoder layers that get a memory (MemoryLlama ALMA = [14, 15])"},
    )
    arch: Literal["context", "layer", "gate"] = field(
        default="context",
        metadata={
            "help": "context: memory as context (Hercules); layer: before attention; "
            "gate: gated branch beside the layer (Titans MAG)"
        },
    )
    memory_dim: int | None = field(
        default=None, metadata={"help": "width of keys, values and queries; null = hidden size"}
    )
    mlp_depth: int = field(default=2, metadata={"help": "weight matrices in the memory MLP"})
    mlp_expansion_factor: float = field(
        default=2.0, metadata={"help": "hidden width of the memory MLP / memory_dim"}
    )
    max_adaptive_lr: float = field(
        default=0.4, metadata={"help": "upper bound of the data-dependent learning rate θ"}
    )
    chunk_size: int = field(
        default=64,
        metadata={"help": "tokens whose gradients are taken at the same weights (1 = per token)"},
    )
    max_grad_norm: float | None = field(
        default=10.0,
        metadata={
            "help": "soft bound on each token's update gradient norm (keeps the inner loop "
            "from diverging); null = none, as written in Titans"
        },
    )
    forget_toward: Literal["init", "zero"] = field(
        default="init",
        metadata={
            "help": "forgetting decays the fast weights toward their learned initial "
            "values (init) or toward zero (zero, as written in Titans)"
        },
    )
    forget_bias: float = field(
        default=-9.0, metadata={"help": "initial bias of the forget gate's logit (α = σ(·))"}
    )
    momentum_bias: float = field(
        default=-2.0, metadata={"help": "initial bias of the momentum gate's logit (η = σ(·))"}
    )
    lr_bias: float = field(
        default=0.0, metadata={"help": "initial bias of the learning-rate logit (θ = max·σ(·))"}
    )

    def __post_init__(self) -> None:
        check(len(self.layer_ids) > 0, "layer_ids", "needs at least one layer")
        check(len(set(self.layer_ids)) == len(self.layer_ids), "layer_ids", "has duplicates")
        check(self.arch in ("context", "layer", "gate"), "arch", "must be context, layer or gate")
        check(
            self.memory_dim is None or self.memory_dim > 0,
            "memory_dim",
            f"must be > 0 or null, got {self.memory_dim}",
        )
        check(self.mlp_depth >= 1, "mlp_depth", f"must be >= 1, got {self.mlp_depth}")
        # bounds far above any real memory; past them the weights alone would not fit
        check(
            self.memory_dim is None or self.memory_dim <= 65_536,
            "memory_dim",
            f"must be <= 65536, got {self.memory_dim}",
        )
        check(self.mlp_depth <= 64, "mlp_depth", f"must be <= 64, got {self.mlp_depth}")
        check(
            self.mlp_expansion_factor <= 64,
            "mlp_expansion_factor",
            f"must be <= 64, got {self.mlp_expansion_factor}",
        )
        check(
            self.mlp_expansion_factor > 0,
            "mlp_expansion_factor",
            f"must be > 0, got {self.mlp_expansion_factor}",
        )
        check(
            self.max_adaptive_lr > 0,
            "max_adaptive_lr",
            f"must be > 0, got {self.max_adaptive_lr}",
        )
        check(self.chunk_size >= 1, "chunk_size", f"must be >= 1, got {self.chunk_size}")
        check(self.forget_toward in ("init", "zero"), "forget_toward", "must be init or zero")
        check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "max_grad_norm",
            f"must be > 0 or null, got {self.max_grad_norm}",
        )
        for key in ("forget_bias", "momentum_bias", "lr_bias"):
            check(math.isfinite(getattr(self, key)), key, "must be finite")


@register_memory("neural", NeuralMemoryConfig)
class NeuralMemory(nn.Module):
    """One Titans neural memory attached to a decoder layer (see the module docstring).

    State: the dict of :mod:`memllm.memory.neural_update` — fast weights ``weight{l}``, momentum
    ``momentum{l}``, chunk-start weights ``base{l}`` (B, in, out) and ``offset`` (B,), float32.
    """

    learns_within_call = True  # each token reads the fast weights after its own chunk's update
    post_layer = False  # "context" and "layer" change what goes into the layer

    def __init__(self, config: NeuralMemoryConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        width = config.memory_dim or hidden_size
        inner = int(width * config.mlp_expansion_factor)
        check(inner >= 1, "mlp_expansion_factor", f"gives a hidden width of {inner}")
        dims = [width, *([inner] * (config.mlp_depth - 1)), width]
        self.memory_dim = width
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.to_queries = nn.Linear(hidden_size, width, bias=False)
        self.to_keys = nn.Linear(hidden_size, width, bias=False)
        self.to_values = nn.Linear(hidden_size, width, bias=False)
        self.to_gates = nn.Linear(hidden_size, 3)  # forget, learning rate, momentum
        with torch.no_grad():
            self.to_gates.bias.copy_(
                torch.tensor([config.forget_bias, config.lr_bias, config.momentum_bias])
            )
        # The fast weights' starting point (learned), variance 1/fan_in.
        self.initial_weights = nn.ParameterList(
            nn.Parameter(torch.randn(d_in, d_out) * d_in**-0.5) for d_in, d_out in pairwise(dims)
        )
        self.to_output = nn.Linear(width, hidden_size, bias=False)
        self.to_gate = nn.Linear(hidden_size, hidden_size)
        # Zero-initialised scale of the mixing gate: the memory starts as the identity.
        self.gate_scale = nn.Parameter(torch.zeros(hidden_size))
        if config.arch == "context":
            self.context_norm = nn.RMSNorm(hidden_size, eps=1e-6)
            # [norm(h); M(q)] → hidden, added to h; zero at first, so h passes through unchanged.
            self.to_context = nn.Linear(hidden_size + width, hidden_size, bias=False)
            nn.init.zeros_(self.to_context.weight)

    # -- state ----------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> State:
        del dtype  # the memory computes in float32 whatever the backbone's dtype
        weights = [
            w.to(device=device, dtype=torch.float32).expand(batch_size, *w.shape)
            for w in self.initial_weights
        ]
        momentum = [torch.zeros_like(w) for w in weights]
        offset = torch.zeros(batch_size, dtype=torch.long, device=device)
        return pack(weights, momentum, list(weights), offset)

    # -- pieces ---------------------------------------------------------------------------------
    def queries(self, x: Tensor) -> Tensor:
        return F.normalize(self.to_queries(x), dim=-1)

    def project(self, x: Tensor) -> dict[str, Tensor]:
        """Queries, keys, values and gates of normalised hidden states ``x`` (B, T, hidden)."""
        forget, lr, momentum = self.to_gates(x).unbind(-1)
        return {
            "queries": self.queries(x),
            "keys": F.normalize(self.to_keys(x), dim=-1),
            "values": self.to_values(x),
            "lr": self.config.max_adaptive_lr * torch.sigmoid(lr),
            "forget_logit": forget,
            "momentum_logit": momentum,
        }

    def memorise(self, x: Tensor, state: State, mask: Tensor):
        """Write the tokens of ``x`` into a copy of ``state`` and read each token after its own
        update. Returns the read-out (B, T, memory_dim), the new state, and statistics."""
        p = {k: v.float() for k, v in self.project(x).items()}
        # the fast weights accumulate over the whole input: always float32, even under autocast
        with torch.autocast(x.device.type, enabled=False):
            retrieved, new_state, stats = chunked_update(
                state,
                p["keys"],
                p["values"],
                p["queries"],
                p["lr"],
                p["forget_logit"],
                p["momentum_logit"],
                mask,
                self.config.chunk_size,
                prior=self.prior(),
                max_grad_norm=self.config.max_grad_norm,
            )
        with torch.no_grad():
            stats["lr"] = p["lr"].detach()
            stats["forget"] = torch.sigmoid(p["forget_logit"].detach())
            stats["momentum"] = torch.sigmoid(p["momentum_logit"].detach())
        return retrieved, new_state, stats

    def prior(self) -> list[Tensor] | None:
        """What forgetting decays the fast weights toward (None: zero)."""
        if self.config.forget_toward == "zero":
            return None
        return [w.float() for w in self.initial_weights]

    def gate(self, x: Tensor) -> Tensor:
        return self.gate_scale * torch.sigmoid(self.to_gate(x))

    # -- the contract ---------------------------------------------------------------------------
    def forward(
        self,
        call_layer: Callable[[Tensor], Tensor],
        hidden: Tensor,
        state: State,
        *,
        mask: Tensor,
        write: bool,
        segment_state: State | None = None,
    ) -> tuple[Tensor, State, dict[str, Tensor]]:
        """Run the decoder layer with the memory attached (``arch``); see the module contract
        in :mod:`memllm.memory`. ``state`` is where this call's writes continue from;
        ``segment_state`` (default: ``state``) is the memory of earlier segments only, which
        the ``context`` read uses — they differ when a segment is decoded over several calls."""
        arch = self.config.arch
        if segment_state is None:
            segment_state = state
        dtype = hidden.dtype
        mask = mask.to(device=hidden.device, dtype=torch.bool)
        context = None
        if arch == "context":
            h = self.context_norm(hidden.float())
            with torch.autocast(hidden.device.type, enabled=False):
                # the memory of earlier segments only: the layer's output that writes this
                # segment does not exist yet when its input is built
                recalled = read(segment_state, self.queries(h).float())
            context = self.to_context(torch.cat([h, recalled], dim=-1))
            base = call_layer(hidden + context.to(dtype))
            x = self.norm(base.float())
        else:
            x = self.norm(hidden.float())
            base = call_layer(hidden) if arch == "gate" else hidden
        retrieved, new_state, stats = self.memorise(x, state, mask)
        gate = self.gate(x)
        added = gate * self.to_output(retrieved)
        out = base + added.to(dtype)
        if arch == "layer":
            out = call_layer(out)
        aux = _diagnostics(gate, added, base, mask, stats, context, hidden)
        return out, (new_state if write else state), aux


def _masked_mean(x: Tensor, weight: Tensor, count: Tensor) -> Tensor:
    return (x * weight).sum() / count


def _diagnostics(
    gate: Tensor,
    added: Tensor,
    base: Tensor,
    mask: Tensor,
    stats: dict[str, Tensor],
    context: Tensor | None,
    hidden: Tensor,
) -> dict[str, Tensor]:
    """Detached statistics over the real tokens of the call (no host sync)."""
    with torch.no_grad():
        real = mask.float()
        tokens = real.sum().clamp_min(1)
        g = gate.detach()
        entries = tokens * g.shape[-1]
        g_mean = (g * real[..., None]).sum() / entries
        g_var = ((g - g_mean).pow(2) * real[..., None]).sum() / entries
        big = torch.finfo(g.dtype).max
        any_real = mask.any()
        g_min = torch.where(any_real, g.masked_fill(~mask[..., None], big).amin(), 0.0)
        g_max = torch.where(any_real, g.masked_fill(~mask[..., None], -big).amax(), 0.0)
        added_norm = added.detach().norm(dim=-1) * real
        base_norm = base.detach().float().norm(dim=-1) * real
        per_token = added_norm / base_norm.clamp_min(1e-8)
        aux = {
            "loss": torch.zeros((), device=gate.device),
            "gate_mean": g_mean,
            "gate_std": g_var.sqrt(),
            "gate_min": g_min,
            "gate_max": g_max,
            "contribution_ratio": added_norm.sum() / base_norm.sum().clamp_min(1e-8),
            "contribution_per_token": per_token,
            "surprise": _masked_mean(stats["surprise"], real, tokens),
            "assoc_loss": _masked_mean(stats["assoc_loss"], real, tokens),
            "lr_mean": _masked_mean(stats["lr"], real, tokens),
            "forget_mean": _masked_mean(stats["forget"], real, tokens),
            "momentum_mean": _masked_mean(stats["momentum"], real, tokens),
        }
        if context is not None:
            ctx = context.detach().norm(dim=-1) * real
            h_norm = hidden.detach().float().norm(dim=-1) * real
            aux["context_ratio"] = ctx.sum() / h_norm.sum().clamp_min(1e-8)
    return aux


def neural_diagnostics(session: Any) -> dict[str, Any]:
    """The neural memories' diagnostics of the session's latest forward call, computed on demand.

    Returns ``layer{i}/{name}`` → float for the scalars (gate mean/std/min/max, contribution
    ratio, surprise, associative loss, mean learning rate / forget / momentum gates, and for
    ``context`` the context-injection ratio), ``layer{i}/contribution_per_token`` → a (B, T) CPU
    tensor, and ``mean/{name}`` → the scalars averaged over memory layers.
    """
    out: dict[str, Any] = {}
    sums: dict[str, list[float]] = {}
    for index, aux in sorted(session.aux.items()):
        if "surprise" not in aux:  # not a neural memory
            continue
        for name, value in aux.items():
            if name == "loss":
                continue
            if name == "contribution_per_token":
                out[f"layer{index}/{name}"] = value.detach().float().cpu()
                continue
            number = float(value.detach())
            out[f"layer{index}/{name}"] = number
            sums.setdefault(name, []).append(number)
    for name, values in sums.items():
        out[f"mean/{name}"] = sum(values) / len(values)
    return out


__all__ = ["PREVIOUS_DEFAULTS", "NeuralMemory", "NeuralMemoryConfig", "neural_diagnostics"]
