"""Training-free retrieval of past keys/values at every attention layer (as InfLLM does).

After each segment, every attention layer's keys and values of the segment's real tokens are
stored (:mod:`memllm.memory.kv_store`: blocks of ``block_size`` tokens with ``repr_keys`` mean
keys each). A later segment's attention at each layer sees its own tokens, the example's first
``init_tokens`` tokens and the ``top_k`` stored blocks most relevant to its queries. There are no
trainable parameters: the backbone reads its own past keys and values.

**Where it acts.** Each decoder layer is wrapped in a ``MemoryLayer`` whose module (this one)
only opens a per-call context around the unchanged layer; the work happens in an attention
function registered with transformers' ``AttentionInterface`` under :data:`ATTENTION` and
selected with ``model.set_attn_implementation`` (:meth:`KVRetrievalMemory.attach`, called by
``inject_memory``). That function receives the query, key and value *after* RoPE, the 4-D
boolean mask transformers built (causal, padding, sliding window, KV cache) and the position
ids, and returns the attention output: the host's attention module is never copied.

**Positions.** Keys are stored un-rotated (RoPE undone with the position they were rotated at)
and re-rotated when read. A segment's tokens have local positions (0 at the segment's first real
token, as ``forward_segments`` and ``generate`` give them); its true positions are ``seen +
local`` where ``seen`` counts the example's earlier real tokens. While a query chunk lies inside
the model's trained context (``max_position_embeddings``), every retrieved key is rotated to its
true distance from the queries, so with ``top_k`` >= the number of blocks the layer computes
exactly full attention over the whole input. Beyond it, the retrieved tokens (initial tokens,
then the chosen blocks in their original order) are packed right before the segment: the last
retrieved token sits at distance 1 before the segment's first token, whatever its true
distance, so the positions the model sees stay within ``init_tokens + top_k·block_size +
segment`` (which must fit the trained context).

**Retrieval per query chunk, causal.** The queries of a segment are cut into chunks of
``query_chunk`` tokens by true position (chunk ``j`` holds positions ``[j·C, (j+1)·C)``); the
tokens of one chunk share one retrieved set. Block scores use the mean un-rotated query of the
chunk's ``C`` tokens *ending at its first token* (never later tokens: causality holds), clipped
to the current segment: score = Σ over query heads of the best sub-block dot product. Decoding
one token per call meets the same chunks, so generation equals a teacher-forced pass; the
queries the window needs across calls are carried in the state (``learns_within_call``).

**Sliding-window layers** (Gemma3's local layers, Mistral's window) keep their window: they read
the stored tokens within ``window`` of each query at true distance, never retrieved blocks nor
initial tokens, and store only their last ``window`` tokens.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memllm.core.config import check
from memllm.errors import BackboneError
from memllm.memory.kv_store import LayerStore, StoreSpec
from memllm.memory.registry import register_memory

log = logging.getLogger(__name__)

ATTENTION = "memllm_kv_retrieval"
"""The name the attention function is registered under (``config._attn_implementation``)."""

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class KVRetrievalConfig:
    """Training-free top-k retrieval of past key/value blocks at every attention layer."""

    type: Literal["kv_retrieval"] = "kv_retrieval"
    layer_ids: list[int] | None = field(
        default=None,
        metadata={"help": "layers whose attention retrieves; null = every layer (exactness)"},
    )
    block_size: int = field(default=64, metadata={"help": "tokens per stored block"})
    repr_keys: int = field(
        default=4, metadata={"help": "mean keys per block (sub-blocks); divides block_size"}
    )
    top_k: int = field(default=16, metadata={"help": "blocks retrieved per query chunk"})
    init_tokens: int = field(
        default=64, metadata={"help": "initial tokens of the input every segment attends to"}
    )
    query_chunk: int = field(
        default=64, metadata={"help": "queries sharing one retrieval (by true position)"}
    )
    max_blocks: int | None = field(
        default=None, metadata={"help": "complete blocks kept per layer; the oldest go first"}
    )
    offload: Literal["none", "cpu", "disk"] = field(
        default="none",
        metadata={
            "help": "where the store lives: with the model, in CPU RAM, or in memory-mapped "
            "files (keys/values; unlinked at once, gone with the state)"
        },
    )
    offload_dir: str | None = field(
        default=None,
        metadata={"help": "folder of offload: disk's files; null = the system temp folder"},
    )
    store_dtype: Literal["auto", "float16", "bfloat16", "float32"] = field(
        default="auto", metadata={"help": "dtype of stored keys/values; auto = the model's"}
    )

    def __post_init__(self) -> None:
        if self.layer_ids is not None:
            check(len(self.layer_ids) > 0, "layer_ids", "needs a layer (or null for all)")
        check(self.block_size > 0, "block_size", f"must be > 0, got {self.block_size}")
        check(self.repr_keys > 0, "repr_keys", f"must be > 0, got {self.repr_keys}")
        check(
            self.block_size % self.repr_keys == 0,
            "repr_keys",
            f"{self.repr_keys} does not divide block_size={self.block_size}",
        )
        check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        check(self.init_tokens >= 0, "init_tokens", f"must be >= 0, got {self.init_tokens}")
        check(self.query_chunk > 0, "query_chunk", f"must be > 0, got {self.query_chunk}")
        if self.max_blocks is not None:
            check(self.max_blocks > 0, "max_blocks", f"must be > 0, got {self.max_blocks}")


class KVState:
    """A layer's memory for a batch: one :class:`LayerStore` and recent queries per example.

    ``recent[b]`` holds the example's latest ``2·query_chunk`` un-rotated queries (H, ≤2C, D) and
    their true positions, for the scoring window of chunks that begin in an earlier call.
    Stores are versions over shared growing storage; holding an old state (``session.state()``)
    stays valid, see :mod:`memllm.memory.kv_store`.
    """

    def __init__(self, stores: list[LayerStore], recent: list | None = None) -> None:
        self.stores = stores
        self.recent = recent or [None] * len(stores)

    def __len__(self) -> int:
        return len(self.stores)


@dataclass
class _Call:
    """What one forward call of a wrapped layer hands its attention function."""

    memory: KVRetrievalMemory
    state: KVState
    segment_state: KVState
    mask: Tensor  # (B, T) bool, True on real tokens
    write: bool
    new_state: KVState | None = None


_ACTIVE: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("kv_call", default=None)


@register_memory("kv_retrieval", KVRetrievalConfig)
class KVRetrievalMemory(nn.Module):
    """Opens the per-call context that the registered attention function reads; no weights."""

    # the retrieval of a query chunk reads queries of earlier calls of the same segment
    learns_within_call = True
    post_layer = False  # changes what the layer computes (its attention)

    def __init__(self, config: KVRetrievalConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx: int | None = None
        self.window: int | None = None
        self.max_positions: int | None = None
        self.inv_freq: Tensor | None = None
        self.kv_heads = self.head_dim = None

    # -- installation (called by inject_memory / remove_memory) ----------------------------------
    def attach(self, model: nn.Module, layer: nn.Module, index: int) -> None:
        """Install the attention function on ``model`` and learn this layer's geometry."""
        from memllm.core.backbone import context_length, decoder_stack, text_config

        _register()
        cfg = text_config(model)
        owner, _ = decoder_stack(model)
        rotary = getattr(owner, "rotary_emb", None)
        attn = getattr(layer, "self_attn", None)
        if rotary is None or attn is None:
            raise BackboneError(
                f"kv_retrieval needs a rotary-position model with self_attn layers; "
                f"{cfg.model_type!r} has none"
            )
        layer_types = getattr(cfg, "layer_types", None)
        kind = layer_types[index] if layer_types else None
        inv_freq = getattr(rotary, f"{kind}_inv_freq", None) if kind else None
        self.inv_freq = (inv_freq if inv_freq is not None else rotary.inv_freq).detach().float()
        self.layer_idx = index
        sliding = getattr(attn, "sliding_window", None)
        if kind is not None and kind != "sliding_attention":
            sliding = None
        self.window = int(sliding) if sliding else None
        self.max_positions = context_length(model)
        self.head_dim = (
            getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        )
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        if model.config._attn_implementation != ATTENTION:
            object.__setattr__(model, "_memllm_attn_before", model.config._attn_implementation)
            model.set_attn_implementation(ATTENTION)

    def detach(self, model: nn.Module) -> None:
        """Give ``model`` back the attention implementation it had before :meth:`attach`."""
        before = getattr(model, "_memllm_attn_before", None)
        if before is not None:
            model.set_attn_implementation(before)
            object.__delattr__(model, "_memllm_attn_before")

    def store_dtype(self, backbone_dtype: torch.dtype) -> torch.dtype:
        kind = self.config.store_dtype
        return backbone_dtype if kind == "auto" else STORE_DTYPES[kind]

    def bytes_per_token(self, backbone_dtype: torch.dtype) -> int:
        """Bytes one stored token costs at this layer (keys, values, position, block means)."""
        item = torch.empty(0, dtype=self.store_dtype(backbone_dtype)).element_size()
        kv = 2 * (self.kv_heads or 0) * (self.head_dim or 0) * item
        means = 0 if self.window else kv // 2 * self.config.repr_keys // self.config.block_size
        return kv + 8 + means

    # -- the memory contract ----------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> KVState:
        offload, folder = self.config.offload, self.config.offload_dir
        check(
            offload != "disk" or not folder or os.path.isdir(folder),
            "offload_dir",
            f"{folder!r} is not a folder",
        )
        spec = StoreSpec(
            block_size=self.config.block_size,
            repr_keys=self.config.repr_keys,
            init_tokens=self.config.init_tokens,
            max_blocks=self.config.max_blocks,
            window=self.window,
            dtype=self.store_dtype(dtype),
            device=torch.device("cpu") if offload != "none" else torch.device(device),
            disk_dir=(self.config.offload_dir or "") if offload == "disk" else None,
        )
        return KVState([LayerStore(spec) for _ in range(batch_size)])

    def forward(
        self,
        call_layer: Callable[[Tensor], Tensor],
        hidden: Tensor,
        state: KVState,
        *,
        mask: Tensor,
        write: bool,
        segment_state: KVState | None = None,
    ) -> tuple[Tensor, KVState, dict[str, Tensor]]:
        if len(state) != hidden.shape[0]:
            raise ValueError(
                f"memory session holds state for batch size {len(state)}, but the model was "
                f"called with batch size {hidden.shape[0]}; use one session per batch"
            )
        call = _Call(self, state, segment_state or state, mask, write)
        token = _ACTIVE.set(call)
        try:
            out = call_layer(hidden)
        finally:
            _ACTIVE.reset(token)
        return out, (call.new_state or state) if write else state, {}


# -- the attention function ---------------------------------------------------------------------
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def boolean_mask(*args, **kwargs):
        # always a 4-D boolean mask (sdpa's may be None when it is purely causal): the stored
        # keys are concatenated before the segment's, so the segment's part must exist
        kwargs["allow_is_causal_skip"] = False
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(ATTENTION, kv_retrieval_attention)
    AttentionMaskInterface.register(ATTENTION, boolean_mask)


def rotate(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Apply RoPE (the rotate-half form of Llama, Qwen2, Mistral, Gemma) at ``positions``.

    ``x`` is (..., T, D) and ``positions`` (T,) may be negative; a partial rotary (fewer
    frequencies than D/2) rotates the leading dimensions only. Rotating by ``-p`` undoes ``p``.
    """
    freqs = positions.to(inv_freq.device, torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1).to(x.device)
    cos, sin = emb.cos(), emb.sin()
    width = emb.shape[-1]
    xr, rest = x[..., :width].float(), x[..., width:]
    half = width // 2
    turned = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    out = (xr * cos + turned * sin).to(x.dtype)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scaling, softcap) -> Tensor:
    """Attention of q ([B,] H, Tq, D) over k, v ([B,] Hkv, Tk, D) with a ([B,] Tq, Tk) bool mask."""
    if q.dim() == 3:
        return _attend(q[None], k[None], v[None], mask[None], scaling, softcap)[0]
    mask = mask | ~mask.any(-1, keepdim=True)  # rows with no key (padding): finite junk, no NaN
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), mask[:, None], scale=scaling, enable_gqa=True
        )
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1).to(q.dtype)
    v = v.repeat_interleave(group, 1).to(q.dtype)
    logits = q @ k.transpose(-1, -2) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    logits = softcap * torch.tanh(logits / softcap)
    logits = logits.masked_fill(~mask[:, None], torch.finfo(logits.dtype).min)
    return logits.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


def kv_retrieval_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """The attention function registered as :data:`ATTENTION` (transformers' interface).

    Outside a wrapped layer's call (or with nothing stored yet) it is transformers' SDPA
    attention, so a fresh memory is the bare model.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    call = _ACTIVE.get()
    if call is None or call.memory.layer_idx != getattr(module, "layer_idx", None):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    memory = call.memory
    batch, _, tq, _ = query.shape
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(key.shape[2] - tq, key.shape[2], device=query.device)
    positions = positions.expand(batch, tq)
    real = call.mask.to(query.device)
    if attention_mask is None or attention_mask.dtype != torch.bool:
        attention_mask = _causal_mask(attention_mask, batch, tq, key.shape[2], query.device)
    read = call.segment_state
    empty = all(store.n == 0 for store in read.stores)
    if empty:
        out = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )[0]
    else:
        out = torch.empty(
            batch, tq, query.shape[1], query.shape[3], dtype=query.dtype, device=query.device
        )
        for b in range(batch):
            rows = _example_attention(
                memory,
                call,
                b,
                query[b],
                key[b],
                value[b],
                attention_mask[b if attention_mask.shape[0] > 1 else 0, 0],
                positions[b],
                real[b],
                scaling,
                kwargs.get("softcap"),
            )
            out[b] = rows.transpose(0, 1)
    if call.write:
        call.new_state = _written(
            memory, call, key[:, :, -tq:], value[:, :, -tq:], query, positions, real
        )
    # an on-disk store: unmap what this call wrote or read, so that the resident set holds
    # one layer's working set at a time (the data stays in the file)
    touched = [*read.stores, *(call.new_state.stores if call.new_state else [])]
    for store in {id(s.storage): s for s in touched if s.storage is not None}.values():
        store.release()
    return out, None


def _causal_mask(mask: Tensor | None, batch: int, tq: int, tk: int, device) -> Tensor:
    if mask is not None:  # an additive float mask: 0 where allowed
        return mask >= 0 if mask.dtype.is_floating_point else mask.bool()
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)
    return (torch.arange(tk, device=device)[None, :] <= i).expand(batch, 1, tq, tk)


def _example_attention(
    memory, call, b, query, key, value, own_mask, positions, real, scaling, softcap
) -> Tensor:
    """One example's attention: stored tokens plus its own, query chunk by query chunk."""
    store: LayerStore = call.segment_state.stores[b]
    inv_freq = memory.inv_freq
    start = store.seen  # true position of local position 0
    true_q = positions + start
    if store.n == 0:
        return _attend(query, key, value, own_mask, scaling, softcap)
    if memory.window:
        k_mem, v_mem, p_mem = store.last_rows(memory.window)
        k_mem = rotate(k_mem.to(query.device), p_mem.to(query.device) - start, inv_freq)
        near = (true_q[:, None] - p_mem.to(query.device)[None, :]) < memory.window
        mem_mask = near & real[:, None]
        keys = torch.cat([k_mem.to(key.dtype), key], 1)
        values = torch.cat([v_mem.to(value.device, value.dtype), value], 1)
        return _attend(query, keys, values, torch.cat([mem_mask, own_mask], 1), scaling, softcap)
    cfg = memory.config
    size = cfg.query_chunk
    chunk_of = torch.where(real, true_q // size, -1)
    # pad queries ride with the first chunk (their output is never read)
    first_real = chunk_of[real][0] if real.any() else torch.tensor(start // size)
    chunk_of = torch.where(real, chunk_of, first_real)
    unrotated_q = rotate(query, -positions, inv_freq) if cfg.top_k < store.num_blocks else None
    chunks = torch.unique(chunk_of).tolist()
    chosen = _choose_blocks(memory, call, b, store, chunks, start, unrotated_q, true_q, real)
    index = [store.block_rows(blocks.to(store.spec.device)) for blocks in chosen]
    # chunks attend in groups, one batched call each: per-chunk calls cost a dozen small ops
    # apiece, and each chunk repeats the segment's keys, so a group's keys stay within a budget
    width = max(rows.numel() for rows in index) + key.shape[1]
    group = max(1, KEY_BUDGET // width)
    out = torch.empty_like(query)
    for g in range(0, len(chunks), group):
        at = slice(g, g + group)
        rows = [(chunk_of == j).nonzero().squeeze(1) for j in chunks[at]]
        beyond = [
            memory.max_positions is not None and (j + 1) * size > memory.max_positions
            for j in chunks[at]
        ]
        q_rows, q_ok = _padded(rows)
        got = _chunk_attention(
            memory, store, index[at], beyond, q_rows, q_ok, query, key, value, own_mask, real,
            start, scaling, softcap,
        )  # fmt: skip
        out[:, q_rows[q_ok]] = got.transpose(0, 1)[:, q_ok]
    return out


KEY_BUDGET = 16384
"""Keys (retrieved plus the segment's, per chunk) one batched attention call of a layer reads."""


def _padded(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Index lists of different lengths as one (n, longest) tensor (0-padded) and its mask."""
    lengths = torch.tensor([r.numel() for r in rows], device=rows[0].device)
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    ok = torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths[:, None]
    return padded, ok


def _chunk_attention(
    memory, store, index, beyond, q_rows, q_ok, query, key, value, own_mask, real, start,
    scaling, softcap,
) -> Tensor:  # fmt: skip
    """Attention of several query chunks (rows ``q_rows``), each over its retrieved rows.

    Returns (chunks, H, rows, D). Chunk ``c`` reads stored rows ``index[c]`` (rotated to their
    true distance, or packed right before the segment when ``beyond[c]``) and the segment.
    """
    device = query.device
    m_rows, m_ok = _padded(index)
    chunks, width = m_rows.shape
    k_mem, v_mem, p_mem = store.rows(m_rows.flatten())
    p_mem = p_mem.to(device).view(chunks, width)
    m_ok = m_ok.to(device)
    packed = torch.arange(width, device=device)[None, :] - m_ok.sum(1, keepdim=True)
    far = torch.tensor(beyond, device=device)[:, None]
    # true distances (exact full attention when all blocks are chosen), or packed
    target = torch.where(far, packed, p_mem - start)
    k_mem = rotate(k_mem.to(device), target.flatten(), memory.inv_freq)
    k_mem = k_mem.to(key.dtype).unflatten(1, (chunks, width)).transpose(0, 1)
    v_mem = v_mem.to(device, value.dtype).unflatten(1, (chunks, width)).transpose(0, 1)
    keys = torch.cat([k_mem, key[None].expand(chunks, -1, -1, -1)], 2)
    values = torch.cat([v_mem, value[None].expand(chunks, -1, -1, -1)], 2)
    q_real = real[q_rows] & q_ok
    mem_mask = m_ok[:, None, :] & q_real[:, :, None]
    own = own_mask[q_rows] & q_ok[:, :, None]
    mask = torch.cat([mem_mask, own], 2)
    return _attend(query[:, q_rows].transpose(0, 1), keys, values, mask, scaling, softcap)


def _choose_blocks(
    memory, call, b, store, chunks: list[int], start, unrotated_q, true_q, real
) -> list[Tensor]:
    """The ``top_k`` blocks for each query chunk in ``chunks``, sorted (all when they fit).

    The stored blocks are the same for every chunk of a call (the store is the committed state
    before the segment), so their representatives are built once and all chunks are scored in
    one matmul: per chunk the work is then bounded, and the O(blocks) part is paid once per
    layer call instead of once per chunk.
    """
    cfg = memory.config
    count = store.num_blocks
    device = store.spec.device
    if cfg.top_k >= count:
        return [torch.arange(count, device=device)] * len(chunks)
    if cfg.top_k == 0:
        return [torch.zeros(0, dtype=torch.long, device=device)] * len(chunks)
    size = cfg.query_chunk
    queries, where = [unrotated_q], [torch.where(real, true_q, -1)]
    recent = call.state.recent[b]
    if recent is not None:
        queries.insert(0, recent[0].to(unrotated_q.device, unrotated_q.dtype))
        where.insert(0, recent[1].to(true_q.device))
    queries_all, where_all = torch.cat(queries, 1), torch.cat(where)
    means = []
    for chunk in chunks:
        hi = max(start, chunk * size)
        lo = max(start, hi - size + 1)
        pick = (where_all >= lo) & (where_all <= hi)
        if not pick.any():  # cannot happen for real queries; keep padding rows harmless
            pick = where_all == where_all.max()
        means.append(queries_all[:, pick].float().mean(1))  # (Hq, D)
    reprs, present = store.block_reprs()
    heads = reprs.shape[1]
    grouped = torch.stack(means).to(device).unflatten(1, (heads, -1))  # (C, Hkv, group, D)
    scores = torch.einsum("chgd,nhrd->cnhgr", grouped, reprs.float())
    scores = scores.masked_fill(~present[None, :, None, None, :], float("-inf"))
    best = scores.amax(-1).sum((2, 3))  # (C, nb)
    return list(torch.topk(best, cfg.top_k).indices.sort().values.unbind(0))


def _written(memory, call, key, value, query, positions, real) -> KVState:
    """The new state: this call's real keys/values appended (un-rotated), recent queries kept.

    A decoding call after the first (``state`` is the scratch, not the committed state)
    appends nothing: the segment's own keys live in the model's KV cache, and stores are only
    ever read from the committed state.
    """
    state, inv_freq = call.state, memory.inv_freq
    decoding = call.state is not call.segment_state
    stores, recent = [], []
    for b, store in enumerate(state.stores):
        keep = real[b]
        pos = positions[b][keep]
        start = call.segment_state.stores[b].seen
        if decoding:
            stores.append(store)
        else:
            k = rotate(key[b][:, keep], -pos, inv_freq)
            stores.append(store.append(k, value[b][:, keep], pos + store.seen))
        if memory.window or memory.config.top_k == 0:
            recent.append(None)
            continue
        q = rotate(query[b][:, keep], -pos, inv_freq)
        where = pos + start
        old = state.recent[b]
        if old is not None:
            q, where = torch.cat([old[0].to(q.device), q], 1), torch.cat([old[1], where])
        # a chunk's window ends at its first token, up to query_chunk - 1 tokens back
        keep_last = 2 * memory.config.query_chunk
        recent.append((q[:, -keep_last:], where[-keep_last:]))
    return KVState(stores, recent)
