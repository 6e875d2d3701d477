"""The neural memory's test-time update rule (Titans): a per-token reference and a chunked form.

The memory is a residual MLP ``M(x) = x + W_L σ(… σ(x W_1))`` (σ = SiLU) whose weights are fast
weights, one copy per example. Per token t, with key k_t, value v_t, query q_t, learning rate θ_t,
forgetting α_t and momentum η_t::

    S_t = η_t · S_{t−1} − θ_t · ∇_W ‖M(k_t) − v_t‖²      (momentum: the "surprise")
    M_t = (1 − α_t) · M_{t−1} + α_t · P + S_t             (forgetting, then the update)
    y_t = M_t(q_t)                                        (retrieval, after the update: ≤ t)

Forgetting decays the weights toward a prior ``P``: zero as written in Titans (``prior=None``),
or the memory's learned initial weights (memllm's default; see ``docs/neural_memory.md``: for a
bias-free MLP, zero is a point where every gradient vanishes, and decaying toward it kills the
memory on long inputs).

**Chunked form.** Within a chunk of ``chunk_size`` tokens the gradient is taken at the weights of
the chunk start (Titans Eq. 16/17), so every token's gradient is computed at once, in closed form
as a product of two factors (``∇W_l = a_{l−1}ᵀ δ_l``). The recurrence above is linear in (M, S)
once the gradients are fixed, so its effect over a chunk is a set of scalar coefficients (products
of gates) applied to the chunk-start state and to the gradients; the weights after every token are
never materialised: the retrieval ``M_t(q_t)`` uses them in "dual form", an attention-like sum
over the chunk's earlier tokens. Only chunks are looped over in Python; ``chunk_size=1`` is the
per-token rule exactly.

**State** (a dict, batch dimension first): ``weight{l}`` (current fast weights M, float32),
``momentum{l}`` (S), ``base{l}`` (the weights at the start of the chunk in progress, at which the
gradients of its remaining tokens are taken) and ``offset`` (how many real tokens of that chunk
are already written). Carrying the chunk in progress makes streaming exact: feeding a sequence in
pieces of any length gives the same result as feeding it at once, and each example's chunks are
counted in its own real tokens, so padding never shifts them.

**Padding.** A masked token is a no-op: θ = 0, α = 0, η = 1 and the step is skipped.

**Bounded steps.** With ``max_grad_norm``, θ_t is scaled by ``clip_factor(‖∇ℓ_t‖)`` (a soft
clip; the norm over all layers comes free from the factors: ‖aᵀδ‖ = ‖a‖·‖δ‖).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

State = dict[str, Tensor]


# -- the memory MLP ---------------------------------------------------------------------------
def depth_of(state: State) -> int:
    return sum(1 for key in state if key.startswith("weight"))


def unpack(state: State) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor]:
    depth = depth_of(state)
    return (
        [state[f"weight{i}"] for i in range(depth)],
        [state[f"momentum{i}"] for i in range(depth)],
        [state[f"base{i}"] for i in range(depth)],
        state["offset"],
    )


def pack(
    weights: list[Tensor], momentum: list[Tensor], base: list[Tensor], offset: Tensor
) -> State:
    state = {}
    for i, (w, s, b) in enumerate(zip(weights, momentum, base, strict=True)):
        state[f"weight{i}"], state[f"momentum{i}"], state[f"base{i}"] = w, s, b
    state["offset"] = offset
    return state


def mlp_apply(weights: list[Tensor], x: Tensor) -> Tensor:
    """``M(x) = x + f(x)``; weights (…, in, out), batched like ``x`` (…, tokens, dim) or not."""
    h = x
    for i, w in enumerate(weights):
        if i:
            h = F.silu(h)
        h = h @ w
    return x + h


def silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def gradient_factors(
    weights: list[Tensor], keys: Tensor, values: Tensor
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Per-token gradients of ``‖M(k) − v‖²`` in closed form, as factors.

    Args:
        weights: (B, in, out) per layer; keys, values: (B, N, dim).

    Returns:
        ``inputs[l]`` (B, N, in) and ``deltas[l]`` (B, N, out) such that the gradient of token n
        with respect to layer l is the outer product ``inputs[l][:, n]ᵀ deltas[l][:, n]``, and the
        residual ``M(k) − v`` (B, N, dim).
    """
    inputs, pre = [], []
    h = keys
    for i, w in enumerate(weights):
        if i:
            h = F.silu(pre[-1])
        inputs.append(h)
        pre.append(h @ w)
    residual = keys + pre[-1] - values
    delta = 2 * residual
    deltas = [delta]
    for i in range(len(weights) - 1, 0, -1):
        delta = (delta @ weights[i].transpose(-1, -2)) * silu_grad(pre[i - 1])
        deltas.append(delta)
    deltas.reverse()
    return inputs, deltas, residual


def _safe_sqrt(x: Tensor) -> Tensor:
    return x.clamp_min(1e-30).sqrt()  # a finite gradient at 0 (padding has zero gradients)


def clip_factor(norm: Tensor, max_norm: float) -> Tensor:
    """Soft clipping: ``max·tanh(n/max)/n`` (≈ 1 for small norms, ``max/n`` for large ones)."""
    return max_norm * torch.tanh(norm / max_norm) / norm


# -- the per-token reference ------------------------------------------------------------------
def reference_update(
    state: State,
    keys: Tensor,
    values: Tensor,
    queries: Tensor,
    lr: Tensor,
    forget_logit: Tensor,
    momentum_logit: Tensor,
    mask: Tensor,
    chunk_size: int = 1,
    prior: list[Tensor] | None = None,
    max_grad_norm: float | None = None,
) -> tuple[Tensor, State]:
    """The update rule one token at a time, with autograd gradients (slow; for tests and benches).

    Args:
        state: see the module docstring.
        keys, values, queries: (B, T, dim).
        lr: θ (B, T); forget_logit, momentum_logit: (B, T), α = σ(·), η = σ(·).
        mask: (B, T) bool, True on real tokens.
        chunk_size: gradients are taken at the weights of the start of each chunk of this many
            real tokens (1: the plain per-token rule).
        prior: weights that forgetting decays toward (``M_t = (1 − α)·M_{t−1} + α·prior + S_t``),
            (in, out) per layer; None: toward zero, as written in Titans.
        max_grad_norm: soft bound on each token's gradient norm (all layers together):
            θ_t is scaled by ``clip_factor(‖∇ℓ_t‖, max_grad_norm)``; None: no bound.

    Returns:
        Retrievals ``M_t(q_t)`` (B, T, dim), zero on masked tokens, and the new state.
    """
    from torch.func import grad, vmap

    weights, momentum, base, count = unpack(state)

    def loss(ws: list[Tensor], k: Tensor, v: Tensor) -> Tensor:
        return (mlp_apply(ws, k) - v).pow(2).sum()

    per_example_grad = vmap(grad(loss))
    keep = torch.sigmoid(-forget_logit)  # 1 − α
    eta = torch.sigmoid(momentum_logit)
    outputs = []
    for t in range(keys.shape[1]):
        real = mask[:, t, None, None]
        grads = per_example_grad(base, keys[:, t], values[:, t])
        step = lr[:, t]
        if max_grad_norm is not None:
            norm = _safe_sqrt(torch.stack([g.pow(2).sum((-2, -1)) for g in grads]).sum(0))
            step = step * clip_factor(norm, max_grad_norm)
        for i, g in enumerate(grads):
            s = eta[:, t, None, None] * momentum[i] - step[:, None, None] * g
            w = keep[:, t, None, None] * weights[i] + s
            if prior is not None:
                w = w + (1 - keep[:, t, None, None]) * prior[i]
            momentum[i] = torch.where(real, s, momentum[i])
            weights[i] = torch.where(real, w, weights[i])
        count = count + mask[:, t].long()
        full = (count == chunk_size)[:, None, None]
        base = [torch.where(full, w, b) for w, b in zip(weights, base, strict=True)]
        count = torch.where(count == chunk_size, 0, count)
        y = mlp_apply(weights, queries[:, t : t + 1])[:, 0]
        outputs.append(torch.where(mask[:, t, None], y, torch.zeros_like(y)))
    return torch.stack(outputs, 1), pack(weights, momentum, base, count)


# -- the chunked form -------------------------------------------------------------------------
def _layout(mask: Tensor, offset: Tensor, counts: Tensor, host: list[list[int]], chunk_size: int):
    """Where each token goes so that every example's chunks start on its own chunk boundary.

    Example b's real tokens are placed contiguously from position ``offset[b]`` (the tokens of its
    chunk in progress that earlier calls already wrote occupy 0..offset−1, as no-ops); ``host``
    holds ``[offsets, counts]`` as lists. Returns ``None`` when the layout is the
    identity (no padding, no chunk in progress), else the gather index into the original positions
    (B, L), the validity mask (B, L) and the scatter index back (B, T); and the length L.
    """
    tokens = mask.shape[1]
    offsets, lengths = host
    if not any(offsets) and all(n == tokens for n in lengths):
        return None, max(1, math.ceil(tokens / chunk_size)) * chunk_size
    need = max(o + n for o, n in zip(offsets, lengths, strict=True))
    length = max(1, math.ceil(need / chunk_size)) * chunk_size
    rank = torch.arange(length, device=mask.device)[None] - offset[:, None]
    valid = (rank >= 0) & (rank < counts[:, None])
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # real positions first
    gather = order.gather(1, rank.clamp(0, tokens - 1))
    back = (offset[:, None] + mask.long().cumsum(1) - 1).clamp(0, length - 1)
    return (gather, valid, back), length


def _take(x: Tensor, index: Tensor) -> Tensor:
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


# Coefficients below this are set to exactly zero. They are products of many gates; left alone
# they reach the subnormal range, where CPU arithmetic is 10-100x slower, and next to an O(1)
# term they are far below float32 resolution anyway.
TINY = 1e-20
LOG_TINY = math.log(TINY)


def _flush(x: Tensor) -> Tensor:
    return x.masked_fill(x.abs() < TINY, 0.0)


def _decay_matrix(log_gate: Tensor) -> tuple[Tensor, Tensor]:
    """For per-token log-gates (…, C): ``P[i, r] = Π_{r<w≤i} gate_w`` (lower-triangular, (…, C, C))
    and ``Π_{w≤i} gate_w`` (…, C)."""
    cum = log_gate.cumsum(-1)
    size = log_gate.shape[-1]
    upper = torch.ones(size, size, dtype=torch.bool, device=log_gate.device).triu(1)
    diff = cum[..., :, None] - cum[..., None, :]
    diff = diff.masked_fill(upper | (diff < LOG_TINY), -math.inf)
    return diff.exp(), cum.masked_fill(cum < LOG_TINY, -math.inf).exp()


def chunked_update(
    state: State,
    keys: Tensor,
    values: Tensor,
    queries: Tensor,
    lr: Tensor,
    forget_logit: Tensor,
    momentum_logit: Tensor,
    mask: Tensor,
    chunk_size: int,
    prior: list[Tensor] | None = None,
    max_grad_norm: float | None = None,
) -> tuple[Tensor, State, dict[str, Tensor]]:
    """The same rule as :func:`reference_update`, chunk by chunk, vectorised within each chunk.

    Returns the retrievals (B, T, dim) (zero on masked tokens), the new state, and per-token
    statistics on the original positions: ``surprise`` (the update's norm ‖θ_t ∇ℓ_t‖) and
    ``assoc_loss`` (‖M(k_t) − v_t‖² at the gradient's weights), both (B, T), detached.
    """
    batch, tokens, _ = keys.shape
    size = chunk_size
    weights, momentum, base, offset = unpack(state)
    counts = mask.sum(1)
    # the one host sync: the layout's length and the chunk bookkeeping depend on the data
    host = torch.stack([offset, counts]).tolist()
    ends = [o + n for o, n in zip(*host, strict=True)]
    plan, length = _layout(mask, offset, counts, host, size)
    keep_log = F.logsigmoid(-forget_logit)  # log(1 − α)
    eta_log = F.logsigmoid(momentum_logit)  # log η
    if plan is None:
        pad = length - tokens

        def place(x: Tensor) -> Tensor:
            if not pad:
                return x
            return torch.cat([x, x.new_zeros((batch, pad, *x.shape[2:]))], 1)

        valid = place(mask)
    else:
        gather, valid, back = plan

        def place(x: Tensor) -> Tensor:
            return _take(x, gather)

    keys, values, queries = place(keys), place(values), place(queries)
    zero = torch.zeros((), device=keys.device, dtype=keys.dtype)
    theta = torch.where(valid, place(lr), zero)
    keep_log = torch.where(valid, place(keep_log), zero)
    eta_log = torch.where(valid, place(eta_log), zero)
    real = valid.to(keys.dtype)

    # scalar coefficients of every chunk at once: (B, n, C, C) and (B, n, C)
    n = length // size
    decay, decay0 = _decay_matrix(keep_log.view(batch, n, size))
    carry, carry0 = _decay_matrix(eta_log.view(batch, n, size))
    decay_real = decay * real.view(batch, n, 1, size)
    mix = _flush(decay_real @ carry)  # weight of token s's gradient in M_i
    mix0 = _flush((decay_real @ carry0[..., None])[..., 0])  # weight of S_start in M_i
    theta_c = _flush(theta).view(batch, n, size)

    outputs, surprise, assoc = [], [], []
    chunk_bases = []
    for j in range(n):
        part = slice(j * size, (j + 1) * size)
        grad_at = base if j == 0 else weights
        chunk_bases.append(grad_at)
        inputs, deltas, residual = gradient_factors(grad_at, keys[:, part], values[:, part])
        # ‖∇ℓ_s‖ over all layers, from the factors: ‖aᵀδ‖ = ‖a‖·‖δ‖
        norm = _safe_sqrt(
            sum(a.pow(2).sum(-1) * d.pow(2).sum(-1) for a, d in zip(inputs, deltas, strict=True))
        )
        th = theta_c[:, j]
        if max_grad_norm is not None:
            th = _flush(th * clip_factor(norm, max_grad_norm))
        # retrieval M_i(q_i) in dual form:
        #   M_i = d0_i·M + (1 − d0_i)·prior + m0_i·S − Σ_{s≤i} mix_is θ_s ∇ℓ_s
        scale = _flush(mix[:, j] * th[:, None, :])
        d0 = decay0[:, j, :, None]
        u = queries[:, part]
        for i in range(len(weights)):
            z = d0 * (u @ weights[i]) + mix0[:, j, :, None] * (u @ momentum[i])
            if prior is not None:
                z = z + (1 - d0) * (u @ prior[i])
            scores = (u @ inputs[i].transpose(-1, -2)) * scale
            z = z - scores @ deltas[i]
            u = F.silu(z) if i < len(weights) - 1 else queries[:, part] + z
        outputs.append(u)
        # the state at the chunk end: M' = d·M + (1 − d)·prior + m·S − Σ_s c_s ∇ℓ_s and
        # S' = e·S − Σ_s c'_s ∇ℓ_s: both sums in one product, the rest in fused multiply-adds
        # (this part is memory-bound)
        to_m = _flush(mix[:, j, -1] * th)[..., None]
        to_s = _flush(carry[:, j, -1] * th)[..., None]
        d_end = decay0[:, j, -1, None, None]
        m_end = mix0[:, j, -1, None, None]
        s_end = carry0[:, j, -1, None, None]
        new_weights, new_momentum = [], []
        for i, (a, d) in enumerate(zip(inputs, deltas, strict=True)):
            width = d.shape[-1]
            both = a.transpose(-1, -2) @ torch.cat([to_m * d, to_s * d], -1).neg_()
            m_new = torch.addcmul(both[..., :width], d_end, weights[i]).addcmul_(m_end, momentum[i])
            if prior is not None:
                m_new = m_new.addcmul_(1 - d_end, prior[i])
            new_weights.append(m_new)
            new_momentum.append(torch.addcmul(both[..., width:], s_end, momentum[i]))
        weights, momentum = new_weights, new_momentum
        with torch.no_grad():
            surprise.append(th * norm)
            assoc.append(residual.pow(2).sum(-1))

    retrieved = torch.cat(outputs, 1)
    surprise_t, assoc_t = torch.cat(surprise, 1), torch.cat(assoc, 1)
    if plan is None:
        retrieved = retrieved[:, :tokens]
        surprise_t, assoc_t = surprise_t[:, :tokens], assoc_t[:, :tokens]
    else:
        keep = mask[..., None]
        retrieved = torch.where(keep, _take(retrieved, back), torch.zeros_like(retrieved[:, :1]))
        surprise_t = _take(surprise_t, back) * mask
        assoc_t = _take(assoc_t, back) * mask

    # the chunk in progress after this call, per example
    new_offset = (offset + counts) % size
    last_chunk = [max(e - 1, 0) // size for e in ends]
    complete = [e % size == 0 for e in ends]
    sources = [
        None if done else chunk_bases[j] for done, j in zip(complete, last_chunk, strict=True)
    ]
    if all(s is None for s in sources):
        new_base = weights
    elif all(s is sources[0] for s in sources):
        new_base = sources[0]
    else:
        new_base = [
            torch.stack([(weights if s is None else s)[i][b] for b, s in enumerate(sources)])
            for i in range(len(weights))
        ]
    stats = {"surprise": surprise_t, "assoc_loss": assoc_t}
    return retrieved, pack(weights, momentum, new_base, new_offset), stats


def read(state: State, queries: Tensor) -> Tensor:
    """Retrieve ``M(q)`` with the current fast weights, without writing."""
    weights, _, _, _ = unpack(state)
    return mlp_apply(weights, queries)
