"""The prefix cache: the routed KV of token blocks already computed, reused by every sequence that starts
with the same tokens (vLLM's automatic prefix caching, for a routed cache).

A sequence is cut into blocks of TOKENS tokens. A block's key is (its parent block's id, its tokens), so
a key covers the whole prefix (a chained hash that compares the tokens instead of trusting a digest).
Each cached block (a `Node`) keeps what a row needs to start right after it: per attention layer the
cache entries the prefix holds (routing decides how many, so each layer has its own count) and the
blocks those entries sit in, and the MetaRouter's running embedding sum. Since a token's routing and
K/V depend only on the tokens before it (causal layers, a running-mean gate) and the kernels are batch-
and chunking-invariant, a row started from a cached prefix computes exactly what it would have computed
from scratch.

Blocks are shared, not copied (docs/ARCHITECTURE.md has the measurements): a node holds its own part of
each layer's block list (`own`: from its parent's last full block on) and a row attached to it shares
every full block and copies each layer's partly filled last one (`PagedKVCache.attach`). A node also
keeps what the forward gave for its tokens (routing, and where the logits were computed the log-
probabilities of its tokens and the top alternatives), so scoring and echo requests can reuse it too.

Eviction: least recently used first, among leaves no row is using (a row locks the deepest block of its
sequence; its ancestors are inner nodes). Everything lives inside the KV pool, so the cache grows into
whatever the running sequences leave free and gives it back on demand.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from model.kv_cache import BLOCK, PagedKVCache

if TYPE_CHECKING:
    from model.chiar import ChiarLM

TOKENS = BLOCK  # tokens per cached block (the same 8 as a KV block: small nodes, fine-grained matches)
TOP = 5  # top alternatives kept per position: the API's most (logprobs <= 5)


@dataclass
class BlockOutputs:
    """What the forward gave for the TOKENS tokens of one block (position-indexed, then token-indexed)."""

    operator: np.ndarray  # [TOKENS, L] int8, per input position
    entropy: np.ndarray  # [TOKENS, L] (float64 holds the forward's float32 or float64 values exactly)
    gate: np.ndarray | None  # [TOKENS]
    logprob: np.ndarray | None  # [TOKENS] log p(token | tokens before) of the block's own tokens (NaN: nothing predicts it)
    top_ids: np.ndarray | None  # [TOKENS, TOP] the top alternatives where each of its tokens was predicted
    top_logprobs: np.ndarray | None


class Node:
    """One cached block: the prefix ending with it, as a row needs it to continue."""

    __slots__ = ("children", "depth", "embed_sum", "id", "key", "lengths", "locks", "out", "own", "parent", "used")

    def __init__(self, node_id: int, parent: Node | None, key: tuple, lengths: np.ndarray, own: list[np.ndarray],
                 embed_sum: Tensor, out: BlockOutputs | None) -> None:
        self.id, self.parent, self.key = node_id, parent, key
        self.depth = 0 if parent is None else parent.depth + 1
        self.lengths = lengths  # [n_layers] entries the prefix holds per layer
        self.own = own  # per layer: block ids from the parent's last full block to this prefix's last block
        self.embed_sum = embed_sum  # the MetaRouter's running sum after the prefix
        self.out = out
        self.children = 0
        self.locks = 0  # rows whose sequence ends here
        self.used = 0  # LRU clock

    def own_blocks(self) -> np.ndarray:
        return np.concatenate(self.own) if self.own else np.zeros(0, dtype=np.int32)


@dataclass
class CachedPrefix:
    """The prefix a new row starts from: its length and the outputs of its positions [0, tokens)."""

    tokens: int
    operator: np.ndarray  # [tokens, L]
    entropy: np.ndarray
    gate: np.ndarray | None
    logprob: np.ndarray | None  # [tokens]: position p's log-probability of token p + 1 (None: not kept)
    top_ids: np.ndarray | None  # [tokens, TOP]
    top_logprobs: np.ndarray | None


@dataclass
class Processed:
    """One row's tokens in one forward, as the cache records them."""

    row: int
    start: int  # the row's position before these tokens
    tokens: list[int]
    next_tokens: list[int]  # the known targets of `tokens`: next_tokens[i] follows tokens[i] (may be fewer)
    operator: np.ndarray  # [n, L]
    entropy: np.ndarray
    gate: np.ndarray | None
    attended: np.ndarray  # [n, L] bool: the token took a cache entry in that layer
    logp: Callable[[], Tensor] | None  # [n - logits_from, V] log-probabilities at positions start + logits_from ...
    logits_from: int


@dataclass
class RowTrace:
    """A row's tokens since the last cached block of its sequence (`node`), and their outputs."""

    node: Node
    tokens: list[int] = field(default_factory=list)
    # per recorded forward, the positions' (operator, entropy, gate, attended): views, joined when a block completes
    positions: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)  # per target (from node's end): [known, logprob, top ids, top lps]


class PrefixCache:
    """Cached token blocks over one PagedKVCache (the runner's), for one model."""

    def __init__(self, model: ChiarLM, cache: PagedKVCache, copy: bool = False) -> None:
        self.model, self.cache, self.copy = model, cache, copy
        cfg = model.config
        self.n_layers = cfg.n_layers
        self.layers = cache.attention_layers
        self.gated = model.metarouter is not None
        empty = [np.zeros(0, dtype=np.int32) for _ in range(cfg.n_layers)]
        self.root = Node(0, None, (), np.zeros(cfg.n_layers, dtype=np.int32), empty,
                         torch.zeros(cfg.d_model, dtype=cache.dtype, device=cache.device), None)
        self.nodes: dict[tuple, Node] = {}
        self.rows: dict[int, RowTrace] = {}
        self.node_refs = np.zeros(cache.n_blocks, dtype=np.int32)  # nodes holding each block
        self.cached_blocks = 0  # blocks at least one node holds
        self.evicted = 0  # nodes evicted since start
        self._ids = itertools.count(1)
        self.order = EvictionOrder(self.root, self.nodes)

    # ------------------------------------------------------------------ sizes
    @property
    def cached_tokens(self) -> int:
        return len(self.nodes) * TOKENS

    @property
    def cached_bytes(self) -> int:
        return self.cached_blocks * self.cache.block_bytes

    def evictable_blocks(self) -> int:
        """Blocks only cached prefixes hold (no row): what eviction could give back, about."""
        refs = self.node_refs[: self.cache.n_blocks]
        return int(np.count_nonzero((refs > 0) & (refs == self.cache.shared + 1)))

    # ------------------------------------------------------------------ lookup
    def match(self, ids: list[int], outputs: bool) -> list[Node]:
        """The cached blocks `ids` starts with (with `outputs`: only blocks that kept log-probabilities)."""
        path: list[Node] = []
        node = self.root
        for j in range(len(ids) // TOKENS):
            child = self.nodes.get((node.id, tuple(ids[j * TOKENS: (j + 1) * TOKENS])))
            if child is None or (outputs and (child.out is None or child.out.logprob is None)):
                break
            path.append(child)
            node = child
        return path

    def usable(self, ids: list[int], outputs: bool, inputs: int) -> tuple[list[Node], int]:
        """The matched blocks of `ids` (a row's `inputs` tokens, then possibly the token its last one predicts)
        and how many a new row starts from: at least one input is left to compute (its logits sample or score
        the next token); with `outputs`, the block after those attached must be cached too (it holds the
        log-probability of the first token the row computes)."""
        path = self.match(ids, outputs)
        depth = min(len(path) - (1 if outputs else 0), (inputs - 1) // TOKENS)
        return path, max(depth, 0)

    def peek(self, ids: list[int], outputs: bool) -> int:
        """Tokens a new row for `ids` would start with (no side effects)."""
        return self.usable(ids, outputs, len(ids))[1] * TOKENS

    def attach(self, row: int, ids: list[int], outputs: bool, inputs: int | None = None) -> CachedPrefix | None:
        """Start the new row `row` from the longest usable cached prefix of `ids` (its first `inputs` tokens are
        the row's inputs; default: all), and trace it from there."""
        path, depth = self.usable(ids, outputs, len(ids) if inputs is None else inputs)
        self.rows[row] = RowTrace(self.root)
        self._start_targets(self.rows[row], None)
        if depth == 0:
            return None
        node = path[depth - 1]
        node.locks += 1  # before making room: eviction must not take the prefix being attached
        tails = sum(1 for layer in self.layers if node.lengths[layer] % BLOCK) if not self.copy else \
            sum(-(-int(node.lengths[layer]) // BLOCK) for layer in self.layers)
        if not self.make_room(tails):
            node.locks -= 1
            self.order.offer(node)
            return None
        tables = block_tables(path[:depth], self.layers, self.n_layers)
        self.cache.attach(row, tables, [int(n) for n in node.lengths], depth * TOKENS, node.embed_sum, copy=self.copy)
        for n in path[: depth + 1]:
            self.order.touch(n)
        self.rows[row].node = node
        self._start_targets(self.rows[row], path[depth] if len(path) > depth else None)
        return cached_outputs(path, depth, outputs, self.gated)

    # ------------------------------------------------------------------ recording
    def _start_targets(self, trace: RowTrace, next_node: Node | None) -> None:
        """The first target of a trace: the token right after its cached prefix, predicted before it."""
        known, lp = (1.0, np.nan) if trace.node is self.root else (0.0, np.nan)  # a sequence's first token has no prediction
        ids, lps = np.full(TOP, -1.0), np.full(TOP, np.nan)
        if next_node is not None and next_node.out is not None and next_node.out.logprob is not None:
            known, lp = 1.0, next_node.out.logprob[0]
            ids, lps = next_node.out.top_ids[0], next_node.out.top_logprobs[0]  # type: ignore[index]
        trace.targets = [np.concatenate([[known, lp], ids, lps])[None]]

    def record(self, done: Processed, complete: bool = True) -> None:
        """Append one forward's tokens of a row to its trace and cache every block they complete (with
        `complete` False, a decode token, only when the row is released: a block per 8 decode steps would
        cost more than the step's own bookkeeping, and the cache keeps finished sequences)."""
        trace = self.rows.get(done.row)
        if trace is None:
            return
        n = len(done.tokens)
        gate = done.gate[:, None] if done.gate is not None else np.full((n, 1), np.nan)
        trace.tokens += done.tokens
        trace.positions.append((done.operator, done.entropy, gate, done.attended))
        trace.targets.append(targets_of(done))
        if complete and len(trace.tokens) >= TOKENS:
            self._complete_blocks(done.row, trace)

    def _complete_blocks(self, row: int, trace: RowTrace) -> None:
        blocks = len(trace.tokens) // TOKENS
        fields = [np.concatenate(f) for f in zip(*trace.positions)]  # operator, entropy, gate, attended of the positions
        positions = np.concatenate(fields, axis=1, dtype=np.float64)
        targets = np.concatenate(trace.targets)
        L = self.n_layers
        x = self.model.embed.weight.detach()[torch.tensor(trace.tokens[: blocks * TOKENS], device=self.cache.device)]
        sums = self.model.kernels.running_sums(trace.node.embed_sum, x.to(self.cache.dtype))
        table = self.cache.tables[row].cpu().numpy()
        for b in range(blocks):
            at = slice(b * TOKENS, (b + 1) * TOKENS)
            pos, tgt = positions[at], targets[at]
            parent = trace.node
            lengths = parent.lengths + pos[:, 2 * L + 1:].sum(0).astype(np.int32)
            out = BlockOutputs(pos[:, :L].astype(np.int8), pos[:, L: 2 * L].copy(), pos[:, 2 * L].copy() if self.gated else None,
                               None, None, None)
            if bool(tgt[:, 0].all()):
                out.logprob, out.top_ids = tgt[:, 1].copy(), tgt[:, 2: 2 + TOP].astype(np.int64)
                out.top_logprobs = tgt[:, 2 + TOP:].copy()
            key = (parent.id, tuple(trace.tokens[at]))
            node = self.nodes.get(key)
            if node is None:
                own = [table[layer, int(parent.lengths[layer]) // BLOCK: -(-int(lengths[layer]) // BLOCK)].copy()
                       if layer in self.layers else np.zeros(0, dtype=np.int32) for layer in range(L)]
                node = self._insert(parent, key, lengths, own, sums[(b + 1) * TOKENS - 1].clone(), out)
            elif not np.array_equal(node.lengths, lengths):  # another computation routed differently (inexact kernels)
                self._stop(row)
                return
            elif node.out is not None and node.out.logprob is None and out.logprob is not None:
                node.out = out  # the same block, now with its log-probabilities
            node.locks += 1  # the row's sequence now ends here
            if parent is not self.root:
                parent.locks -= 1
            self.order.touch(node)
            trace.node = node
        keep = blocks * TOKENS
        trace.tokens = trace.tokens[keep:]
        L1 = 2 * L + 1
        trace.positions = [(positions[keep:, :L], positions[keep:, L: 2 * L], positions[keep:, 2 * L: L1], positions[keep:, L1:])]
        trace.targets = [targets[keep:]]

    def _insert(self, parent: Node, key: tuple, lengths: np.ndarray, own: list[np.ndarray], embed_sum: Tensor,
                out: BlockOutputs) -> Node:
        node = Node(next(self._ids), parent, key, lengths, own, embed_sum, out)
        blocks = node.own_blocks()
        self.cache.hold(blocks)
        if self.node_refs.size < self.cache.n_blocks:  # the pool grew (a growable cache)
            self.node_refs = np.concatenate([self.node_refs, np.zeros(self.cache.n_blocks - self.node_refs.size, np.int32)])
        self.cached_blocks += int(np.count_nonzero(self.node_refs[blocks] == 0))
        self.node_refs[blocks] += 1
        self.nodes[key] = node
        parent.children += 1
        return node

    def _stop(self, row: int) -> None:
        """Record nothing more for this row (its blocks already cached stay); it no longer locks its last one."""
        trace = self.rows.pop(row, None)
        if trace is not None and trace.node is not self.root:
            trace.node.locks -= 1
            self.order.offer(trace.node)

    # ------------------------------------------------------------------ rows and eviction
    def release_row(self, row: int) -> None:
        """The row is about to be freed: cache the blocks its last tokens completed; its sequence no longer
        locks its last cached block."""
        trace = self.rows.get(row)
        if trace is not None and len(trace.tokens) >= TOKENS:
            self._complete_blocks(row, trace)
        self._stop(row)

    def make_room(self, blocks: int) -> bool:
        """Evict least recently used unlocked prefixes until `blocks` blocks are free; False if they cannot be."""
        while self.cache.free_blocks < blocks:
            node = self.order.pop()
            if node is None:
                return False
            self._evict(node)
        return True

    def _evict(self, node: Node) -> None:
        blocks = node.own_blocks()
        self.node_refs[blocks] -= 1
        self.cached_blocks -= int(np.count_nonzero(self.node_refs[blocks] == 0))
        self.cache.drop(blocks)
        del self.nodes[node.key]
        self.evicted += 1
        parent = node.parent
        assert parent is not None
        parent.children -= 1
        self.order.offer(parent)


class EvictionOrder:
    """Least recently used first among the unlocked leaves of the prefix tree (a lazy heap: entries that
    went stale, because the node was used again, got a child or a lock, or was evicted, are skipped)."""

    def __init__(self, root: Node, nodes: dict[tuple, Node]) -> None:
        self.root, self.nodes = root, nodes
        self._clock = itertools.count(1)
        self._heap: list[tuple[int, int, Node]] = []  # (used, id, node)

    def touch(self, node: Node) -> None:
        node.used = next(self._clock)
        self.offer(node)

    def offer(self, node: Node) -> None:
        """Queue the node if it can be evicted now (a leaf nothing locks)."""
        if node is not self.root and node.children == 0 and node.locks == 0:
            heapq.heappush(self._heap, (node.used, node.id, node))
            if len(self._heap) > 4 * len(self.nodes) + 64:  # drop stale entries now and then
                self._heap = [e for e in self._heap if self._valid(e)]
                heapq.heapify(self._heap)

    def _valid(self, entry: tuple[int, int, Node]) -> bool:
        used, _, node = entry
        return self.nodes.get(node.key) is node and node.children == 0 and node.locks == 0 and node.used == used

    def pop(self) -> Node | None:
        while self._heap:
            entry = heapq.heappop(self._heap)
            if self._valid(entry):
                return entry[2]
        return None


def block_tables(path: list[Node], layers: list[int], n_layers: int) -> list[list[int]]:
    """Per layer, the block ids of the prefix ending with path[-1]: each node adds its own blocks after its
    parent's full ones."""
    tables: list[list[int]] = [[] for _ in range(n_layers)]
    before = np.zeros(n_layers, dtype=np.int32)
    for node in path:
        for layer in layers:
            tables[layer] = tables[layer][: int(before[layer]) // BLOCK] + node.own[layer].tolist()
        before = node.lengths
    return tables


def cached_outputs(path: list[Node], depth: int, outputs: bool, gated: bool) -> CachedPrefix:
    """The outputs of positions [0, depth * TOKENS) from the matched blocks (with `outputs`: their log-
    probabilities too, the last from block `depth`, which holds the first computed token's)."""
    outs = [n.out for n in path[:depth]]
    assert all(o is not None for o in outs)
    operator = np.concatenate([o.operator for o in outs])  # type: ignore[union-attr]
    entropy = np.concatenate([o.entropy for o in outs])  # type: ignore[union-attr]
    gate = np.concatenate([o.gate for o in outs]) if gated else None  # type: ignore[union-attr,misc]
    logprob = top_ids = top_lps = None
    if outputs:  # position p predicts token p + 1: the blocks' own tokens from the second on
        chain = [n.out for n in path[: depth + 1]]
        logprob = np.concatenate([o.logprob for o in chain])[1: depth * TOKENS + 1]  # type: ignore[union-attr,misc]
        top_ids = np.concatenate([o.top_ids for o in chain])[1: depth * TOKENS + 1]  # type: ignore[union-attr,misc]
        top_lps = np.concatenate([o.top_logprobs for o in chain])[1: depth * TOKENS + 1]  # type: ignore[union-attr,misc]
    return CachedPrefix(depth * TOKENS, operator, entropy, gate, logprob, top_ids, top_lps)


UNKNOWN = np.array([0.0] + [np.nan] * (1 + 2 * TOP))  # a target whose log-probability nobody computed
UNKNOWN_ONE = np.broadcast_to(UNKNOWN, (1, UNKNOWN.size))  # a decode token's (read-only, built once: every step has them)


def targets_of(done: Processed) -> np.ndarray:
    """[n, 2 + 2 TOP] per target start + 1 ... start + n: known, log-probability, top ids, top log-probabilities."""
    n = len(done.tokens)
    known = min(n, len(done.next_tokens)) - done.logits_from  # positions with logits and a known target
    if done.logp is None or known <= 0:
        return UNKNOWN_ONE if n == 1 else np.broadcast_to(UNKNOWN, (n, UNKNOWN.size))
    out = np.tile(UNKNOWN, (n, 1))
    logp = done.logp()[:known]
    targets = torch.tensor(done.next_tokens[done.logits_from: done.logits_from + known])
    rows = slice(done.logits_from, done.logits_from + known)
    out[rows, 0] = 1.0
    out[rows, 1] = logp.gather(1, targets.to(logp.device)[:, None])[:, 0].double().cpu().numpy()
    values, indices = logp.topk(TOP, dim=-1)
    out[rows, 2: 2 + TOP] = indices.cpu().numpy()
    out[rows, 2 + TOP:] = values.double().cpu().numpy()
    return out
