"""The routed KV cache: one pool of fixed-size blocks shared by every attention layer.

A sequence holds a *row*: per attention layer a block table and an entry count, plus its position
(tokens seen) and the running embedding sum of the MetaRouter. In a routing layer a token takes a
cache entry only if it was routed to attention, so each layer of a row fills at its own pace and
takes blocks only for the tokens that attended. Blocks come from a free stack when a layer's entry
count crosses a block boundary (the attention kernel pops them, see `model.kernels`), and go back
when the row is freed; rows are allocated and freed in any order, so admitting or finishing a
request touches only its own blocks (vLLM's paged cache, per layer because routing is per layer).

Blocks can be shared (a cached prefix, server/engine/prefix_cache.py): `shared[b]` counts the
holders of block b beyond the first, so a block popped by the kernel has exactly one holder at no
bookkeeping cost, and `drop` returns a block to the free stack only when its last holder lets go.
A row that starts from shared blocks (`attach`) gets a private copy of each layer's partly filled
last block, since the kernel appends into it (copy-on-write); full blocks are never written again.

The pool is allocated uninitialised: a block costs resident memory only once a token is written
into it, and the free stack hands out recently freed blocks first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .kv_sharing import BLOCK, SharedBlocks


@dataclass
class CacheSnapshot:
    """Everything a failed forward could have advanced in some rows (see `restore`)."""

    rows: list[int]
    lengths: Tensor
    entries: list[list[int]]
    positions: list[int]
    embed_sum: Tensor
    free_top: int
    n_blocks: int


class PagedKVCache(SharedBlocks):
    """Blocks of K/V entries [blocks, heads, BLOCK, head_dim], block tables [rows, layers, max_blocks]
    (int32, -1 = none), entries per (row, layer), and per row its position and embedding sum."""

    def __init__(self, n_layers: int, attention_layers: list[int], n_heads: int, head_dim: int, d_model: int, max_seq_len: int, *,
                 blocks: int, rows: int, dtype: torch.dtype, device: torch.device | str = "cpu", growable: bool = True) -> None:
        # `lengths` (device) is what the kernels read and advance; `entries` mirrors it on the host from
        # the routing counts every forward returns anyway, so planning a step reads no device memory
        self.n_layers, self.n_heads, self.head_dim = n_layers, n_heads, head_dim
        self.attention_layers = attention_layers  # the layers that hold entries
        self.max_blocks = math.ceil(max_seq_len / BLOCK)
        self.dtype, self.device = dtype, torch.device(device)
        self.growable = growable
        self.keys = torch.empty((blocks, n_heads, BLOCK, head_dim), dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.free_stack = torch.arange(blocks - 1, -1, -1, dtype=torch.int32)  # pops block 0 first
        self.free_top = torch.tensor([blocks], dtype=torch.int64)
        self.shared = np.zeros(blocks, dtype=np.int32)  # holders of each block beyond the first
        self.tables = torch.full((rows, n_layers, self.max_blocks), -1, dtype=torch.int32, device=device)
        self.lengths = torch.zeros((rows, n_layers), dtype=torch.int32, device=device)
        self.embed_sum = torch.zeros((rows, d_model), dtype=dtype, device=device)
        self.positions: list[int] = [0] * rows  # tokens each row has seen (host copy: no device read to plan a step)
        self.entries: list[list[int]] = [[0] * n_layers for _ in range(rows)]  # host mirror of `lengths` (see `advance`)
        self._free_rows = list(range(rows - 1, -1, -1))
        self.n_rows_used = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, *, rows: int, tokens_per_row: int | None = None, blocks: int | None = None,
                  growable: bool = True) -> PagedKVCache:
        """A cache for `rows` sequences of about `tokens_per_row` tokens each, or of `blocks` blocks (it grows if allowed)."""
        cfg = model.config
        param = next(model.parameters())
        layers = [i for i, block in enumerate(model.blocks) if block.has_attention]
        if blocks is None:
            blocks = rows * len(layers) * math.ceil(max(tokens_per_row or 1, 1) / BLOCK)
        return cls(cfg.n_layers, layers, cfg.n_heads, cfg.head_dim, cfg.d_model, cfg.max_seq_len, blocks=max(blocks, 1), rows=rows,
                   dtype=param.dtype, device=param.device, growable=growable)

    # ------------------------------------------------------------------ sizes
    @staticmethod
    def bytes_per_block(model: torch.nn.Module) -> int:
        """K+V bytes of one block of `model`'s cache."""
        cfg = model.config
        return 2 * cfg.n_heads * BLOCK * cfg.head_dim * next(model.parameters()).element_size()

    @property
    def n_blocks(self) -> int:
        return self.keys.shape[0]

    @property
    def free_blocks(self) -> int:
        return int(self.free_top.item())

    @property
    def block_bytes(self) -> int:
        return 2 * self.n_heads * BLOCK * self.head_dim * self.keys.element_size()

    def row_blocks(self, row: int) -> int:
        """Blocks row `row` holds, over all layers."""
        return sum(math.ceil(n / BLOCK) for n in self.entries[row])

    def used_bytes(self) -> int:
        return (self.n_blocks - self.free_blocks) * self.block_bytes

    def entry_bytes(self, rows: list[int] | None = None) -> int:
        """Bytes of the K/V entries the rows hold (all rows in use by default); blocks round this up."""
        rows = range(len(self.entries)) if rows is None else rows
        return sum(sum(self.entries[row]) for row in rows) * self.block_bytes // BLOCK

    # ------------------------------------------------------------------ rows
    def allocate(self) -> int:
        """A free row, empty (position 0)."""
        if not self._free_rows:
            self._grow_rows(max(2 * self.tables.shape[0], 4))
        self.n_rows_used += 1
        return self._free_rows.pop()

    def free(self, row: int) -> None:
        """Let go of the row's blocks (back to the free stack unless shared) and make the row available."""
        held = [self.tables[row, layer, : math.ceil(n / BLOCK)] for layer, n in enumerate(self.entries[row]) if n]
        if held:
            self.drop(torch.cat(held).cpu().numpy())
        self.tables[row] = -1
        self.lengths[row] = 0
        self.entries[row] = [0] * self.n_layers
        self.embed_sum[row] = 0
        self.positions[row] = 0
        self._free_rows.append(row)
        self.n_rows_used -= 1

    def _grow_rows(self, rows: int) -> None:
        old = self.tables.shape[0]
        self.tables = torch.cat([self.tables, self.tables.new_full((rows - old, *self.tables.shape[1:]), -1)])
        self.lengths = torch.cat([self.lengths, self.lengths.new_zeros((rows - old, self.n_layers))])
        self.embed_sum = torch.cat([self.embed_sum, self.embed_sum.new_zeros((rows - old, self.embed_sum.shape[1]))])
        self.positions += [0] * (rows - old)
        self.entries += [[0] * self.n_layers for _ in range(rows - old)]
        self._free_rows = list(range(rows - 1, old - 1, -1)) + self._free_rows

    # ------------------------------------------------------------------ blocks
    def blocks_needed(self, spans: list[tuple[int | None, int]]) -> list[int]:
        """For each (row, new tokens) (row None: a new row), the most blocks those tokens can take: as
        if every one of them attended in every attention layer (one device read for all spans)."""
        layers = self.attention_layers
        needs = []
        for row, n in spans:
            held = self.entries[row] if row is not None else None
            needs.append(sum(-(-(held[layer] + n) // BLOCK) + (held[layer] // -BLOCK) for layer in layers)
                         if held is not None else len(layers) * -(-n // BLOCK))
        return needs

    def most_tokens(self, row: int | None, blocks: int, at_most: int) -> int:
        """The most new tokens (up to `at_most`) row `row` (None: a new row) can take within `blocks` blocks,
        counted as `blocks_needed` counts them."""
        held = [self.entries[row][layer] for layer in self.attention_layers] if row is not None else [0] * len(self.attention_layers)

        def need(n: int) -> int:
            return sum(-(-(m + n) // BLOCK) - (-(-m // BLOCK)) for m in held)

        lo, hi = 0, at_most  # need(lo) <= blocks; find the largest such n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if need(mid) <= blocks else (lo, mid - 1)
        return lo

    def advance(self, spans: list[tuple[int, int]], attended: list[list[int]]) -> None:
        """After a forward: each span's row saw its tokens, of which attended[k][layer] took an entry."""
        for (row, n), per_layer in zip(spans, attended):
            self.positions[row] += n
            mirror = self.entries[row]
            for layer, m in enumerate(per_layer):
                mirror[layer] += m

    def reserve(self, blocks: int) -> None:
        """Make sure `blocks` blocks are free (grow the pool if allowed, else raise)."""
        if blocks <= self.free_blocks:
            return
        if not self.growable:
            raise RuntimeError(f"KV cache: {blocks} free blocks needed, {self.free_blocks} left")
        old = self.n_blocks
        new = max(2 * old, old + blocks - self.free_blocks)
        keys = torch.empty((new, *self.keys.shape[1:]), dtype=self.dtype, device=self.device)
        values = torch.empty_like(keys)
        keys[:old], values[:old] = self.keys, self.values
        self.keys, self.values = keys, values
        top = self.free_blocks
        stack = torch.empty(new, dtype=torch.int32)
        stack[:top] = self.free_stack[:top]
        stack[top: top + new - old] = torch.arange(new - 1, old - 1, -1, dtype=torch.int32)
        self.free_stack = stack
        self.free_top[0] = top + new - old
        self.shared = np.concatenate([self.shared, np.zeros(new - old, dtype=np.int32)])

    # ------------------------------------------------------------------ undo
    def snapshot(self, rows: list[int]) -> CacheSnapshot:
        """Cheap copy of what a forward over `rows` can change (entries past restored lengths are ignored)."""
        return CacheSnapshot(list(rows), self.lengths[rows], [list(self.entries[r]) for r in rows], [self.positions[r] for r in rows],
                             self.embed_sum[rows], self.free_blocks, self.n_blocks)

    def restore(self, snap: CacheSnapshot) -> None:
        """Undo a partly applied forward: lengths, positions, sums, and the blocks it took (table entries
        past a restored length are never read, and the blocks they name are free again)."""
        self.lengths[snap.rows] = snap.lengths
        self.embed_sum[snap.rows] = snap.embed_sum
        for row, entries in zip(snap.rows, snap.entries):
            self.entries[row] = list(entries)
        for row, position in zip(snap.rows, snap.positions):
            self.positions[row] = position
        # blocks popped since are free again (their ids are still in the stack); a pool grown since (only
        # ever at the start of a forward, before any pop) pushed its new blocks on top
        self.free_top[0] = snap.free_top + self.n_blocks - snap.n_blocks

    # ------------------------------------------------------------------ reading (eager kernels, tests)
    def gather(self, row: int, layer: int, n: int) -> tuple[Tensor, Tensor]:
        """The first n entries of a row in a layer, as keys and values [heads, n, head_dim]."""
        blocks = self.tables[row, layer, : math.ceil(n / BLOCK)].long()
        keys = self.keys[blocks].permute(1, 0, 2, 3).reshape(self.n_heads, -1, self.head_dim)[:, :n]
        values = self.values[blocks].permute(1, 0, 2, 3).reshape(self.n_heads, -1, self.head_dim)[:, :n]
        return keys, values


@dataclass
class DecodeState:
    """Sequences of a cache in batch order: what `ChiarLM.prefill` returns and `decode_step` continues."""

    cache: PagedKVCache
    rows: list[int]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> Tensor:
        """Tokens each sequence has seen, [B]."""
        return torch.tensor([self.cache.positions[row] for row in self.rows])

    @property
    def embed_sum(self) -> Tensor:
        return self.cache.embed_sum[self.rows]

    def select(self, index: list[int]) -> DecodeState:
        """The sequences at `index` (same cache; the others keep their rows until released)."""
        return DecodeState(self.cache, [self.rows[i] for i in index])

    def release(self) -> None:
        """Free every row of this state."""
        for row in self.rows:
            self.cache.free(row)
        self.rows = []

    def kv_cache_bytes(self) -> Tensor:
        """K/V bytes each sequence's entries take, [B] (entries actually written, all layers)."""
        per_entry = self.cache.block_bytes // BLOCK
        return self.cache.lengths[self.rows].sum(1).long() * per_entry
