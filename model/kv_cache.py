"""KV cache that, in routing layers, holds only the attention-routed tokens of each sequence.

One `LayerKV` per attention-capable layer: keys/values [rows, H, capacity, hd] packed per sequence
in token order, and `lengths` [rows] = entries used. The buffers are over-allocated on both axes
and grow geometrically, so a serving engine can add sequences (`DecodeState.add`) and drop them
(`DecodeState.remove`) in place: the cost of an admission or a finish is the rows it touches, not a
copy of the whole running cache. The memory a sequence holds follows the tokens that actually
attended, not the sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _grown(size: int, needed: int) -> int:
    return max(needed, int(size * 1.5) + 16)


class LiveRows:
    """The first `rows` rows of an over-allocated buffer attribute: a view, and assigning writes into it."""

    def __init__(self, buffer: str, doc: str) -> None:
        self.buffer, self.__doc__ = buffer, doc

    def __get__(self, obj: object, owner: type | None = None) -> Tensor:
        return getattr(obj, self.buffer)[: obj.rows]  # type: ignore[attr-defined]

    def __set__(self, obj: object, value: Tensor) -> None:
        getattr(obj, self.buffer)[: obj.rows] = value  # type: ignore[attr-defined]


class LayerKV:
    """One layer's cache: the first `rows` rows of the buffers are live sequences."""

    keys = LiveRows("_k", "[rows, H, capacity, hd], roped at true positions (entries past each length are garbage)")
    values = LiveRows("_v", "[rows, H, capacity, hd]")
    lengths = LiveRows("_len", "[rows] long, a view: in-place updates reach the cache")

    def __init__(self, keys: Tensor, values: Tensor, lengths: Tensor) -> None:
        self._k, self._v, self._len = keys, values, lengths
        self.rows = keys.shape[0]

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    def reserve(self, rows: int, capacity: int) -> None:
        """Make room for `rows` sequences of `capacity` entries (geometric growth; data kept)."""
        r_alloc, _, c_alloc, _ = self._k.shape
        if rows <= r_alloc and capacity <= c_alloc:
            return
        new_r = r_alloc if rows <= r_alloc else _grown(r_alloc, rows)
        new_c = c_alloc if capacity <= c_alloc else _grown(c_alloc, capacity)
        keys = self._k.new_zeros((new_r, self._k.shape[1], new_c, self._k.shape[3]))
        values = torch.zeros_like(keys)
        keys[: self.rows, :, :c_alloc] = self._k[: self.rows]
        values[: self.rows, :, :c_alloc] = self._v[: self.rows]
        lengths = self._len.new_zeros(new_r)
        lengths[: self.rows] = self._len[: self.rows]
        self._k, self._v, self._len = keys, values, lengths

    def append(self, seq_idx: Tensor, keys: Tensor, values: Tensor, reserved: bool = False) -> None:
        """Write one entry ([n, H, 1, hd]) at the end of each selected sequence's cache.

        reserved: the caller made room already (`DecodeState.reserve_step`), so no host read of
        the lengths is needed here (decode calls this in every attending layer)."""
        if seq_idx.numel() == 0:
            return
        slots = self.lengths[seq_idx]
        if not reserved:
            self.reserve(self.rows, int(slots.max()) + 1)
        self._k[seq_idx, :, slots] = keys[:, :, 0]
        self._v[seq_idx, :, slots] = values[:, :, 0]
        self._len[seq_idx] += 1

    def extend_row(self, row: int, keys: Tensor, values: Tensor) -> int:
        """Write n entries ([H, n, hd]) after row `row`'s cache; returns the length before."""
        start = int(self._len[row])
        n = keys.shape[1]
        self.reserve(self.rows, start + n)
        self._k[row, :, start: start + n] = keys
        self._v[row, :, start: start + n] = values
        self._len[row] += n
        return start

    def add(self, other: LayerKV) -> None:
        """Append other's sequences as new rows (in place)."""
        n, span = other.rows, int(other.lengths.max()) if other.rows else 0
        self.reserve(self.rows + n, span)
        self._k[self.rows: self.rows + n, :, :span] = other.keys[:, :, :span]
        self._v[self.rows: self.rows + n, :, :span] = other.values[:, :, :span]
        self._len[self.rows: self.rows + n] = other.lengths
        self.rows += n

    def move(self, moves: list[tuple[int, int]], rows: int) -> None:
        """Copy row src to row dst for each (src, dst), then keep the first `rows` rows."""
        if moves:
            src = torch.tensor([s for s, _ in moves], device=self._len.device)
            dst = torch.tensor([d for _, d in moves], device=self._len.device)
            span = int(self._len[src].max())
            self._k[dst, :, :span] = self._k[src, :, :span]
            self._v[dst, :, :span] = self._v[src, :, :span]
            self._len[dst] = self._len[src]
        self.rows = rows

    def select(self, index: Tensor) -> LayerKV:
        """A compact copy of the sequences at `index`."""
        lengths = self.lengths[index]
        span = int(lengths.max()) if lengths.numel() else 0
        return LayerKV(self.keys[index, :, :span].clone(), self.values[index, :, :span].clone(), lengths.clone())

    @staticmethod
    def concat(parts: list[LayerKV]) -> LayerKV:
        span = max(p.capacity for p in parts)
        keys = torch.cat([torch.nn.functional.pad(p.keys, (0, 0, 0, span - p.capacity)) for p in parts])
        values = torch.cat([torch.nn.functional.pad(p.values, (0, 0, 0, span - p.capacity)) for p in parts])
        return LayerKV(keys, values, torch.cat([p.lengths for p in parts]))

    def used_bytes(self) -> Tensor:
        """Bytes of K and V entries each sequence holds, [rows]."""
        per_entry = 2 * self._k.shape[1] * self._k.shape[3] * self._k.element_size()
        return self.lengths * per_entry

    def allocated_bytes(self) -> int:
        return self._k.nbytes + self._v.nbytes


class DecodeState:
    """Everything a batch of sequences needs to continue decoding.

    `layers[l]` is None for layers without attention (L1 of CHIAR). `embed_sum` is the running sum
    of token embeddings that the MetaRouter's causal mean needs. Row b of every tensor is sequence b.
    """

    lengths = LiveRows("_len", "[B] tokens so far (the next token's position); a view")
    embed_sum = LiveRows("_sum", "[B, d] running sum of token embeddings; a view")

    def __init__(self, layers: list[LayerKV | None], lengths: Tensor, embed_sum: Tensor) -> None:
        self.layers = layers
        self._len, self._sum = lengths, embed_sum
        self.rows = lengths.shape[0]


    def __len__(self) -> int:
        return self.rows

    def select(self, index: list[int] | Tensor) -> DecodeState:
        """A compact copy holding only the sequences at `index` (in that order)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self._len.device)
        return DecodeState(
            [None if layer is None else layer.select(index) for layer in self.layers],
            self.lengths[index].clone(),
            self.embed_sum[index].clone(),
        )

    @staticmethod
    def concat(states: list[DecodeState]) -> DecodeState:
        """A new state joining batches (copies); engines use `add` instead."""
        states = [s for s in states if len(s)]
        if not states:
            raise ValueError("states: nothing to concatenate")
        if len(states) == 1:
            return states[0]
        layers: list[LayerKV | None] = []
        for per_layer in zip(*(s.layers for s in states)):
            layers.append(None if per_layer[0] is None else LayerKV.concat(list(per_layer)))
        return DecodeState(layers, torch.cat([s.lengths for s in states]), torch.cat([s.embed_sum for s in states]))

    def add(self, other: DecodeState) -> None:
        """Append other's sequences as new rows, in place; touches only those rows."""
        n = len(other)
        if self.rows + n > self._len.shape[0]:
            size = _grown(self._len.shape[0], self.rows + n)
            lengths = self._len.new_zeros(size)
            lengths[: self.rows] = self.lengths
            embed_sum = self._sum.new_zeros((size, self._sum.shape[1]))
            embed_sum[: self.rows] = self.embed_sum
            self._len, self._sum = lengths, embed_sum
        self._len[self.rows: self.rows + n] = other.lengths
        self._sum[self.rows: self.rows + n] = other.embed_sum
        for mine, theirs in zip(self.layers, other.layers):
            if mine is not None and theirs is not None:
                mine.add(theirs)
        self.rows += n

    def remove(self, drop: list[int]) -> list[int]:
        """Drop the rows in `drop` in place by moving tail rows into the holes.

        Returns the new row order as old row indices (row i now holds what was row order[i])."""
        dropped = set(drop)
        keep = [r for r in range(self.rows) if r not in dropped]
        n = len(keep)
        holes = sorted(r for r in dropped if r < n)
        tail = [r for r in range(n, self.rows) if r not in dropped]
        moves = list(zip(tail, holes))
        order = list(range(n))
        for src, dst in moves:
            order[dst] = src
        if moves:
            src = torch.tensor([s for s, _ in moves], device=self._len.device)
            dst = torch.tensor([d for _, d in moves], device=self._len.device)
            self._len[dst] = self._len[src]
            self._sum[dst] = self._sum[src]
        for layer in self.layers:
            if layer is not None:
                layer.move(moves, n)
        self.rows = n
        return order

    def reserve_step(self, longest: int) -> None:
        """Room for one more entry per sequence in every layer, given the longest sequence so far
        (a layer's cache never holds more entries than its sequence has tokens)."""
        for layer in self.layers:
            if layer is not None:
                layer.reserve(layer.rows, longest + 1)

    def snapshot(self) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        """Cheap copy of everything a failed step could have advanced (see `restore`)."""
        return (self.lengths.clone(), self.embed_sum.clone(),
                [None if layer is None else layer.lengths.clone() for layer in self.layers])

    def restore(self, snap: tuple[Tensor, Tensor, list[Tensor | None]]) -> None:
        """Undo a partly applied step: entries past the restored lengths are ignored and overwritten."""
        lengths, embed_sum, layer_lengths = snap
        self.lengths.copy_(lengths)
        self.embed_sum.copy_(embed_sum)
        for layer, saved in zip(self.layers, layer_lengths):
            if layer is not None and saved is not None:
                layer.lengths.copy_(saved)

    def kv_cache_bytes(self) -> Tensor:
        """K/V bytes held per sequence, [B] (entries actually used, all layers)."""
        total = torch.zeros_like(self.lengths)
        for layer in self.layers:
            if layer is not None:
                total += layer.used_bytes()
        return total
