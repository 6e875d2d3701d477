"""Diagnostics of memory modules: how long a neural memory keeps one written key.

:func:`retention_curve` writes one key→value pair into a Titans neural memory
(:mod:`memllm.memory.neural`) and then ``N`` distractor tokens, with the gates at their initial
values (the config's biases: what an untrained memory does), and measures after every token
how much of the pair is left in ``M(k)``. The imprint is measured against a counterfactual: the
same tokens with the pair's write switched off (θ = 0 at its position, everything else equal),
so what the distractors do to ``M(k)`` on their own cancels out::

    Δ_N = M_N(k) − M'_N(k)                  (M' = the same stream without the write)
    imprint_N = ‖Δ_N‖ / ‖v‖                 (how big the trace is, relative to the value)
    alignment_N = cos(Δ_N, v − M_0(k))      (whether it points from M_0(k) toward v)

A key is *recoverable* after N tokens when ``imprint_N ≥ RECOVERABLE_IMPRINT`` and
``alignment_N ≥ RECOVERABLE_ALIGNMENT``. ``benchmarks/neural_retention.py`` prints the curve for
the old and the new defaults of :class:`~memllm.memory.neural.NeuralMemoryConfig`
(``docs/neural_memory.md``, "Retention").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memllm.memory.neural import NeuralMemory, NeuralMemoryConfig
from memllm.memory.neural_update import chunked_update, mlp_apply

RECOVERABLE_IMPRINT = 0.1
"""Smallest trace ‖Δ‖/‖v‖ that counts as recoverable (a tenth of the value)."""
RECOVERABLE_ALIGNMENT = 0.5
"""Smallest cosine between the trace and the direction from ``M_0(k)`` to ``v``."""


@dataclass
class RetentionPoint:
    """The written pair's trace after ``tokens`` distractors (means over trials)."""

    tokens: int
    imprint: float
    alignment: float

    @property
    def recoverable(self) -> bool:
        return self.imprint >= RECOVERABLE_IMPRINT and self.alignment >= RECOVERABLE_ALIGNMENT


def retention_curve(
    config: NeuralMemoryConfig,
    distances: Sequence[int],
    *,
    width: int = 64,
    trials: int = 8,
    seed: int = 0,
) -> list[RetentionPoint]:
    """The trace of one written key after each of ``distances`` distractor tokens.

    Args:
        config: the memory's config; its gate biases, ``max_adaptive_lr``, ``max_grad_norm``,
            ``chunk_size``, ``forget_toward`` and MLP shape are used (``memory_dim`` defaults
            to ``width``).
        distances: numbers of distractor tokens after the write (0 = right after it).
        width: the hidden width of the memory (a memory of a model this wide).
        trials: independent streams (random memory, pair and distractors), averaged.
        seed: seeds the memory's initial weights and the streams.

    Returns:
        One :class:`RetentionPoint` per distance, in the given order.
    """
    torch.manual_seed(seed)
    memory = NeuralMemory(config, width)
    dim = memory.memory_dim
    tokens = 1 + max(distances)
    gen = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(trials, tokens, dim, generator=gen), dim=-1)
    # values as the module makes them: a linear map (init variance 1/(3·width)) of an
    # RMS-normalised hidden state, so each coordinate has variance ~1/3
    values = torch.randn(trials, tokens, dim, generator=gen) / 3**0.5
    queries = keys[:, :1].expand(-1, tokens, -1)  # read M_t(k) after every token
    ones = torch.ones(trials, tokens)
    lr = ones * config.max_adaptive_lr * torch.sigmoid(torch.tensor(config.lr_bias))
    forget, momentum = ones * config.forget_bias, ones * config.momentum_bias
    mask = torch.ones(trials, tokens, dtype=torch.bool)
    prior = memory.prior()
    with torch.no_grad():
        prior = None if prior is None else [w.detach() for w in prior]

        def stream(step: torch.Tensor) -> torch.Tensor:
            state = memory.init_state(trials, keys.device, torch.float32)
            state = {k: v.detach() for k, v in state.items()}
            read, _, _ = chunked_update(
                state,
                keys,
                values,
                queries,
                step,
                forget,
                momentum,
                mask,
                config.chunk_size,
                prior=prior,
                max_grad_norm=config.max_grad_norm,
            )
            return read

        with_write = stream(lr)
        without = lr.clone()
        without[:, 0] = 0.0  # the pair's write switched off
        trace = with_write - stream(without)
        start = mlp_apply([w.detach() for w in memory.initial_weights], keys[:, 0])
        target = values[:, 0] - start
        imprint = trace.norm(dim=-1) / values[:, :1].norm(dim=-1)
        alignment = F.cosine_similarity(trace, target[:, None], dim=-1)
    return [
        RetentionPoint(n, imprint[:, n].mean().item(), alignment[:, n].mean().item())
        for n in distances
    ]


__all__ = [
    "RECOVERABLE_ALIGNMENT",
    "RECOVERABLE_IMPRINT",
    "RetentionPoint",
    "retention_curve",
]
