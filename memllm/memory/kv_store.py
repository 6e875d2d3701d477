"""The key/value store behind :mod:`memllm.memory.kv_retrieval`: one example, one attention layer.

A :class:`LayerStore` holds an example's past keys (un-rotated: RoPE undone, so that they can be
placed at any position later), values and true positions (the index of the token among the
example's real tokens), split into blocks of ``block_size`` tokens after ``init_tokens`` initial
tokens, with ``repr_keys`` representative keys per complete block.

**Representative keys: means of sub-blocks.** A block of ``block_size`` keys is cut into
``repr_keys`` consecutive sub-blocks and each is represented by its mean key. A query's dot
product with a mean is the mean of its dot products with the sub-block's keys, so the score is an
average attention logit; taking the best sub-block lets one sentence in a block of filler win.
InfLLM's alternative (the keys that received most attention inside their segment) needs the
attention weights, which the fused attention kernels never materialise; the means cost one pass.

**Growing without quadratic copies.** Writes append one segment at a time. Concatenating the
whole store per segment would copy O(N²/segment) bytes over an input (hundreds of GB at 128k
tokens), so the tensors live in a :class:`_Storage` with spare capacity that doubles when full,
and a :class:`LayerStore` is a *version*: a view of the first ``n`` rows of a storage. Appending
writes past ``n`` in place only when this version is the storage's newest (``n == tip``);
appending to an older version (a snapshot taken by ``session.state()``, the committed state
after a generation's scratch appended to it) copies first, so versions never clobber each other.

**On disk** (``offload: disk``). Keys and values, the bulk of the store (the block means and
positions stay in RAM: they are small and the means are read for every query chunk), live in a
shared memory-mapped file that is unlinked as soon as it is mapped, so nothing is left on disk
when the state is dropped or the process dies. Pages a call wrote or read stay mapped, and count
in the resident set, until :meth:`LayerStore.release` unmaps them (``madvise(MADV_DONTNEED)``:
for a shared file mapping this drops the process's page-table entries only, the data stays in
the page cache, which the kernel writes back and evicts under memory pressure). So the process
holds one layer's working set of the store at a time; the store itself costs page cache, not
resident memory.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StoreSpec:
    """How a layer stores: block geometry, bounds and placement."""

    block_size: int
    repr_keys: int
    init_tokens: int
    max_blocks: int | None  # complete blocks kept (the oldest are evicted); None: unbounded
    window: int | None  # a sliding-window layer keeps only its last ``window`` tokens
    dtype: torch.dtype
    device: torch.device
    disk_dir: str | None = None  # keys/values memory-mapped in a file there (CPU); None: RAM


class _Storage:
    """Preallocated rows for keys (H, cap, D), values, true positions (cap,), block means."""

    def __init__(self, heads: int, dim: int, cap: int, spec: StoreSpec, repr_cap: int) -> None:
        kw = {"dtype": spec.dtype, "device": spec.device}
        self.mapped: mmap.mmap | None = None
        if spec.disk_dir is None:
            self.keys = torch.empty(heads, cap, dim, **kw)
            self.values = torch.empty(heads, cap, dim, **kw)
        else:
            self.mapped = _mapped_file(2 * heads * cap * dim * spec.dtype.itemsize, spec.disk_dir)
            both = torch.frombuffer(self.mapped, dtype=spec.dtype).view(2, heads, cap, dim)
            self.keys, self.values = both[0], both[1]
        self.positions = torch.empty(cap, dtype=torch.long, device=spec.device)
        self.reprs = torch.empty(repr_cap, heads, spec.repr_keys, dim, **kw)
        self.tip = 0  # rows written by the newest version
        self.repr_tip = 0


def _mapped_file(nbytes: int, folder: str) -> mmap.mmap:
    """A shared read/write mapping of a fresh sparse file of ``nbytes``, already unlinked."""
    fd, path = tempfile.mkstemp(prefix="memllm-kv-", suffix=".bin", dir=folder or None)
    try:
        os.unlink(path)  # the mapping keeps the data; the name never outlives this call
        os.ftruncate(fd, nbytes)
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


class LayerStore:
    """One example's stored keys/values at one layer (an immutable version; see module doc).

    Attributes:
        n: stored tokens (rows ``[0, n)``); rows ``[0, n_init)`` are the initial tokens.
        seen: real tokens the example has written so far (the next token's true position).
        full: complete blocks whose representative keys are in ``storage.reprs[:full]``.
    """

    def __init__(self, spec: StoreSpec, storage: _Storage | None = None, n=0, seen=0, full=0):
        self.spec = spec
        self.storage = storage
        self.n = n
        self.seen = seen
        self.full = full

    # -- reading ------------------------------------------------------------------------------
    @property
    def n_init(self) -> int:
        return 0 if self.spec.window else min(self.spec.init_tokens, self.n)

    @property
    def num_blocks(self) -> int:
        """Candidate blocks: the complete ones and a trailing partial one."""
        rest = self.n - self.n_init
        return -(-rest // self.spec.block_size) if rest > 0 else 0

    def rows(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Un-rotated keys (H, k, D), values (H, k, D) and true positions (k,) of rows ``index``."""
        s = self.storage
        return s.keys[:, index], s.values[:, index], s.positions[index]

    def last_rows(self, count: int) -> tuple[Tensor, Tensor, Tensor]:
        """The latest ``count`` stored tokens (a sliding-window layer's reach)."""
        start = max(0, self.n - count)
        s = self.storage
        return s.keys[:, start : self.n], s.values[:, start : self.n], s.positions[start : self.n]

    def block_reprs(self) -> tuple[Tensor, Tensor]:
        """Representative keys of every candidate block (nb, H, r, D) and which exist (nb, r).

        The trailing partial block's means cover the sub-blocks it has begun (others absent).
        """
        spec, s = self.spec, self.storage
        reprs = s.reprs[: self.full]
        present = torch.ones(self.full, spec.repr_keys, dtype=torch.bool, device=spec.device)
        start = self.n_init + self.full * spec.block_size
        if start < self.n:
            sub = spec.block_size // spec.repr_keys
            keys = s.keys[:, start : self.n]
            count = keys.shape[1]
            parts = -(-count // sub)
            pad = parts * sub - count
            padded = torch.nn.functional.pad(keys.float(), (0, 0, 0, pad))
            sums = padded.unflatten(1, (parts, sub)).sum(2)  # (H, parts, D)
            sizes = torch.full((parts,), float(sub), device=keys.device)
            sizes[-1] = sub - pad
            means = (sums / sizes[None, :, None]).to(spec.dtype)
            tail = torch.zeros(1, *reprs.shape[1:], dtype=spec.dtype, device=spec.device)
            tail[0, :, :parts] = means
            mask = torch.zeros(1, spec.repr_keys, dtype=torch.bool, device=spec.device)
            mask[0, :parts] = True
            reprs, present = torch.cat([reprs, tail]), torch.cat([present, mask])
        return reprs, present

    def block_rows(self, blocks: Tensor) -> Tensor:
        """Row indices of the initial tokens then of ``blocks`` (sorted), in stored order."""
        spec = self.spec
        offsets = torch.arange(spec.block_size, device=blocks.device)
        rows = (self.n_init + blocks[:, None] * spec.block_size + offsets).flatten()
        rows = rows[rows < self.n]
        init = torch.arange(self.n_init, device=blocks.device)
        return torch.cat([init, rows])

    def release(self) -> None:
        """Unmap the pages of an on-disk store that this process touched (no-op in RAM).

        The data stays in the file (page cache); the next read maps the pages it needs again.
        """
        if self.storage is not None and self.storage.mapped is not None:
            self.storage.mapped.madvise(mmap.MADV_DONTNEED)

    def nbytes_per_token(self) -> int:
        """Bytes each stored token costs (keys, values, position, its share of the means)."""
        s = self.storage
        if s is None:
            return 0
        kv = 2 * s.keys.shape[0] * s.keys.shape[2] * s.keys.element_size()
        means = 0 if self.spec.window else kv // 2 * self.spec.repr_keys // self.spec.block_size
        return kv + 8 + means

    # -- writing ------------------------------------------------------------------------------
    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> LayerStore:
        """A new version with ``keys``/``values`` (H, t, D, un-rotated) at true ``positions``."""
        spec = self.spec
        t = keys.shape[1]
        if t == 0:
            return self
        keys = keys.to(spec.device, spec.dtype)
        values = values.to(spec.device, spec.dtype)
        positions = positions.to(spec.device)
        storage = self.storage
        needs_copy = storage is None or storage.tip != self.n or storage.repr_tip != self.full
        if storage is not None and not needs_copy and self.n + t > storage.keys.shape[1]:
            needs_copy = True
        if needs_copy:
            storage = self._grown(keys.shape[0], keys.shape[2], self.n + t)
        s = storage
        s.keys[:, self.n : self.n + t] = keys
        s.values[:, self.n : self.n + t] = values
        s.positions[self.n : self.n + t] = positions
        n = self.n + t
        s.tip = n
        out = LayerStore(spec, s, n, int(positions[-1]) + 1, self.full)
        if spec.window:
            if n > 2 * spec.window:  # keep the window only: a bounded copy, now and then
                out = out._compacted(keep_from=n - spec.window)
            return out
        out._add_reprs()
        if spec.max_blocks is not None and out.full > spec.max_blocks:
            drop = out.full - spec.max_blocks
            out = out._compacted(keep_from=out.n_init + drop * spec.block_size, drop_reprs=drop)
        return out

    def _grown(self, heads: int, dim: int, need: int) -> _Storage:
        """A fresh storage holding this version's rows, with room for ``need`` rows and more."""
        spec = self.spec
        cap = max(need, 2 * (self.storage.keys.shape[1] if self.storage else 0), 64)
        repr_need = cap // spec.block_size + 1
        fresh = _Storage(heads, dim, cap, spec, repr_need)
        if self.storage is not None and self.n:
            s = self.storage
            fresh.keys[:, : self.n] = s.keys[:, : self.n]
            fresh.values[:, : self.n] = s.values[:, : self.n]
            fresh.positions[: self.n] = s.positions[: self.n]
            fresh.reprs[: self.full] = s.reprs[: self.full]
        fresh.tip, fresh.repr_tip = self.n, self.full
        return fresh

    def _add_reprs(self) -> None:
        """Compute the means of blocks completed by the last append (in place: a new version)."""
        spec, s = self.spec, self.storage
        complete = max(0, self.n - self.n_init) // spec.block_size
        if complete <= self.full:
            return
        start = self.n_init + self.full * spec.block_size
        end = self.n_init + complete * spec.block_size
        keys = s.keys[:, start:end].float()  # (H, m * bs, D)
        heads, _, dim = keys.shape
        means = keys.reshape(heads, complete - self.full, spec.repr_keys, -1, dim).mean(3)
        if complete > s.reprs.shape[0]:
            grown = s.reprs.new_empty(2 * complete, *s.reprs.shape[1:])
            grown[: self.full] = s.reprs[: self.full]
            s.reprs = grown
        s.reprs[self.full : complete] = means.transpose(0, 1).to(spec.dtype)
        self.full = complete
        s.repr_tip = complete

    def _compacted(self, keep_from: int, drop_reprs: int = 0) -> LayerStore:
        """A copy keeping the initial tokens and rows ``[keep_from, n)`` (evicting the rest)."""
        s, n_init = self.storage, self.n_init
        index = torch.cat([torch.arange(n_init), torch.arange(keep_from, self.n)]).to(
            self.spec.device
        )
        kept = LayerStore(self.spec, None, 0, 0, 0)
        fresh = kept._grown(s.keys.shape[0], s.keys.shape[2], index.numel())
        m = index.numel()
        fresh.keys[:, :m] = s.keys[:, index]
        fresh.values[:, :m] = s.values[:, index]
        fresh.positions[:m] = s.positions[index]
        full = self.full - drop_reprs
        fresh.reprs[:full] = s.reprs[drop_reprs : self.full]
        fresh.tip, fresh.repr_tip = m, full
        return LayerStore(self.spec, fresh, m, self.seen, full)
