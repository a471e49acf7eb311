"""KV cache that, in routing layers, holds only the attention-routed tokens of each sequence.

One `LayerKV` per attention-capable layer: keys/values [B, H, capacity, hd] packed per sequence
in token order, and `lengths` [B] = entries used. Capacity grows geometrically, so the memory a
sequence holds follows the tokens that actually attended, not the sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerKV:
    keys: Tensor  # [B, H, capacity, hd], roped at true positions
    values: Tensor
    lengths: Tensor  # [B] long

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def _grow(self, needed: int) -> None:
        new_capacity = max(needed, int(self.capacity * 1.5) + 16)
        pad = new_capacity - self.capacity
        self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, pad))
        self.values = torch.nn.functional.pad(self.values, (0, 0, 0, pad))

    def append(self, seq_idx: Tensor, keys: Tensor, values: Tensor) -> None:
        """Write one entry ([n, H, 1, hd]) at the end of each selected sequence's cache."""
        if seq_idx.numel() == 0:
            return
        slots = self.lengths[seq_idx]
        needed = int(slots.max()) + 1
        if needed > self.capacity:
            self._grow(needed)
        self.keys[seq_idx, :, slots] = keys[:, :, 0]
        self.values[seq_idx, :, slots] = values[:, :, 0]
        self.lengths[seq_idx] += 1

    def select(self, index: Tensor) -> LayerKV:
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
        """Bytes of K and V entries each sequence holds, [B]."""
        per_entry = 2 * self.keys.shape[1] * self.keys.shape[3] * self.keys.element_size()
        return self.lengths * per_entry


@dataclass
class DecodeState:
    """Everything a batch of sequences needs to continue decoding.

    `layers[l]` is None for layers without attention (L1 of CHIAR). `embed_sum` is the running sum
    of token embeddings that the MetaRouter's causal mean needs.
    """

    layers: list[LayerKV | None]
    lengths: Tensor  # [B] tokens so far (the next token's position)
    embed_sum: Tensor  # [B, d]

    def __len__(self) -> int:
        return int(self.lengths.numel())

    def select(self, index: list[int] | Tensor) -> DecodeState:
        """Keep only the sequences at `index` (in that order)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.lengths.device)
        return DecodeState(
            [None if layer is None else layer.select(index) for layer in self.layers],
            self.lengths[index].clone(),
            self.embed_sum[index].clone(),
        )

    @staticmethod
    def concat(states: list[DecodeState]) -> DecodeState:
        """Join batches (e.g. freshly prefilled requests into the running decode batch)."""
        states = [s for s in states if len(s)]
        if not states:
            raise ValueError("states: nothing to concatenate")
        if len(states) == 1:
            return states[0]
        layers: list[LayerKV | None] = []
        for per_layer in zip(*(s.layers for s in states)):
            layers.append(None if per_layer[0] is None else LayerKV.concat(list(per_layer)))
        return DecodeState(layers, torch.cat([s.lengths for s in states]), torch.cat([s.embed_sum for s in states]))

    def kv_cache_bytes(self) -> Tensor:
        """K/V bytes held per sequence, [B] (entries actually used, all layers)."""
        total = torch.zeros_like(self.lengths)
        for layer in self.layers:
            if layer is not None:
                total += layer.used_bytes()
        return total

    def allocated_bytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer is not None)
