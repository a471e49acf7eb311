"""Shared blocks of the paged KV cache (a cached prefix, server/engine/prefix_cache.py), mixed into
PagedKVCache: `shared[b]` counts the holders of block b beyond the first; `attach` starts a row from a
prefix's blocks, sharing full ones and copying each layer's partly filled last block (copy-on-write)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

BLOCK = 8  # entries per block: the attention kernel scores keys 8 at a time, one block per group


class SharedBlocks:
    """hold / drop / attach / take over PagedKVCache's pool, free stack and tables."""

    shared: np.ndarray
    free_stack: Tensor
    free_top: Tensor
    keys: Tensor
    values: Tensor
    tables: Tensor
    lengths: Tensor
    entries: list[list[int]]
    positions: list[int]
    embed_sum: Tensor
    free_blocks: int  # a property of PagedKVCache

    def hold(self, blocks: np.ndarray) -> None:
        """One more holder for each of `blocks` (distinct ids, all in use)."""
        self.shared[blocks] += 1

    def drop(self, blocks: np.ndarray) -> int:
        """One holder fewer for each of `blocks` (distinct ids); those nobody holds go back to the free
        stack. Returns how many did."""
        blocks = np.asarray(blocks, dtype=np.int32)
        last = blocks[self.shared[blocks] == 0]
        self.shared[blocks] = np.maximum(self.shared[blocks] - 1, 0)
        if last.size:
            top = self.free_blocks
            self.free_stack[top: top + last.size] = torch.from_numpy(last)
            self.free_top[0] = top + last.size
        return int(last.size)

    def attach(self, row: int, tables: list[list[int]], lengths: list[int], position: int, embed_sum: Tensor,
               copy: bool = False) -> None:
        """Start the empty row `row` from a cached prefix: per layer its block ids and entries, the tokens it
        covers and the MetaRouter sum after them. Full blocks are shared; each layer's partly filled last
        block is copied, since this row will append to it (with `copy`, every block is: the alternative
        design, measured in docs/ARCHITECTURE.md). The caller made sure enough blocks are free."""
        for layer, (ids, n) in enumerate(zip(tables, lengths)):
            if not ids:
                continue
            own = len(ids) if copy else (1 if n % BLOCK else 0)  # blocks this row gets its own copy of
            shared = np.asarray(ids[: len(ids) - own], dtype=np.int32)
            if shared.size:
                self.hold(shared)
            if own:
                src = torch.tensor(ids[len(ids) - own:], dtype=torch.long)
                dst = self.take(own)
                self.keys[dst.long()] = self.keys[src]
                self.values[dst.long()] = self.values[src]
                ids = [*ids[: len(ids) - own], *dst.tolist()]
            self.tables[row, layer, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
            self.lengths[row, layer] = n
            self.entries[row][layer] = n
        self.positions[row] = position
        self.embed_sum[row] = embed_sum

    def take(self, n: int) -> Tensor:
        """Pop n blocks off the free stack (the attention kernel pops the same way)."""
        top = self.free_blocks
        if n > top:
            raise RuntimeError(f"KV cache: {n} free blocks needed, {top} left")
        self.free_top[0] = top - n
        return self.free_stack[top - n: top].flip(0).clone()
