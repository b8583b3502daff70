"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, an LRU free list and prefix caching.

A full block is keyed by a chained hash of (previous block's hash, its token ids), so equal prefixes map to
equal keys. Blocks whose sequence finished keep their key on the free list and can be picked up again by a
later prompt with the same prefix, until they are evicted (least recently freed first).
The manager owns no tensors: copies it needs (copy-on-write on rollback) are returned to the caller.

Layer groups: layers that attend to the whole context and layers with each sliding-window size have a pool of
their own (block ids index only that group's layers' caches), and a sequence holds one block table per group
(one entry per block_size tokens). A windowed group returns the blocks that left its window to its pool: their
table entries become the group's `scratch` id (the runner's padding block, which windowed attention masks out).
The window rule: once K/V of tokens [0, n) are cached, a group with window w keeps the blocks from the one
holding position n - w + 1 - rollback_slack (the oldest key the next query can see) on, so a sequence holds
ceil(n / bs) - (n - w + 1 - slack) // bs of them (llmcli.estimate.kv_blocks), never more than
ceil((w + slack + bs - 2) / bs) (kv_blocks_max). One pool for every layer (an int num_blocks) keeps every block, as
before windows released theirs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from llmcli.engine.sequence import Sequence
from llmcli.estimate import kv_blocks_max

Copies = list[tuple[int, int, int]]  # (group, src block, dst block) the caller copies in that group's layers


class OutOfBlocks(RuntimeError):
    """The KV-cache pool has no free block left."""


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(prev: int | None, tokens) -> int:
    return hash((prev, tuple(tokens)))


class BlockPool:
    """One layer group's blocks: reference counts, the free list (LRU) and the prefix-cache keys."""

    def __init__(self, num_blocks: int, window: int | None = None):
        self.window = window  # None: full attention, the group keeps every block
        self.scratch = num_blocks  # table entry of a released block: the runner's padding block
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    def take(self, prefer: int | None = None) -> int:
        """A free block: `prefer` when it is free, else the least recently freed one."""
        if not self.free:
            raise OutOfBlocks("the KV cache is full")
        if prefer is not None and prefer in self.free:
            del self.free[prefer]
            bid = prefer
        else:
            bid, _ = self.free.popitem(last=False)
        b = self.blocks[bid]
        self.unhash(b)
        b.ref_count = 1
        return bid

    def unhash(self, b: Block) -> None:
        if b.hash is not None and self.hash_to_block.get(b.hash) == b.block_id:
            del self.hash_to_block[b.hash]
        b.hash, b.token_ids = None, ()

    def acquire(self, bid: int) -> None:
        b = self.blocks[bid]
        if b.ref_count == 0:
            del self.free[bid]
        b.ref_count += 1

    def release(self, bid: int) -> None:
        b = self.blocks[bid]
        b.ref_count -= 1
        if b.ref_count == 0:
            self.free[bid] = None  # most recently freed: evicted last

    def key(self, bid: int, h: int, tokens: tuple[int, ...]) -> None:
        b = self.blocks[bid]
        if b.hash is None:
            b.hash, b.token_ids = h, tokens
            self.hash_to_block.setdefault(h, bid)

    def cached(self, h: int, tokens: tuple[int, ...]) -> int | None:
        bid = self.hash_to_block.get(h)
        return bid if bid is not None and self.blocks[bid].token_ids == tokens else None

    def private(self, table: list[int], i: int) -> tuple[int, int] | None:
        """Make block i of a table writable by its sequence alone: the (src, dst) copy when it was shared."""
        b = self.blocks[table[i]]
        if b.ref_count == 1:
            return None
        new = self.take()
        b.ref_count -= 1
        table[i] = new
        return b.block_id, new

    def grow(self, table: list[int], num_blocks: int) -> None:
        # Prefer the block after the sequence's last one: a run of consecutive blocks is read by batch-1
        # attention as a slice of the pool instead of a gather (a copy of the whole context per layer per step).
        while len(table) < num_blocks:
            table.append(self.take(table[-1] + 1 if table and table[-1] != self.scratch else None))

    def first_kept(self, num_computed: int, bs: int, slack: int) -> int:
        """Index of the first block a windowed group must keep once num_computed tokens are cached."""
        return max(0, num_computed - self.window + 1 - slack) // bs

    def drop_before(self, table: list[int], first: int) -> None:
        """Release the blocks before index `first` (back to front, stopping at the ones released earlier)."""
        j = first - 1
        while j >= 0 and table[j] != self.scratch:
            self.release(table[j])
            table[j] = self.scratch
            j -= 1


class BlockManager:
    def __init__(self, num_blocks: int | list[int], block_size: int, windows: list[int | None] | None = None):
        """num_blocks: one pool for every layer (an int), or a pool per layer group, windows[g] being group g's
        window (None: full attention), in the runner's group order."""
        self.block_size = block_size
        if isinstance(num_blocks, int):
            num_blocks, windows = [num_blocks], [None]
        self.pools = [BlockPool(n, w) for n, w in zip(num_blocks, windows)]
        self.windowed = [p for p in self.pools if p.window is not None]
        self.rollback_slack = 0  # tokens a rollback may undo without recompute (speculative decoding's drafts)

    # pool 0's view, what single-pool callers (stats, tests) read
    @property
    def blocks(self) -> list[Block]:
        return self.pools[0].blocks

    @property
    def free(self) -> OrderedDict[int, None]:
        return self.pools[0].free

    @free.setter
    def free(self, free: OrderedDict[int, None]) -> None:
        self.pools[0].free = free

    @property
    def hash_to_block(self) -> dict[int, int]:
        return self.pools[0].hash_to_block

    @property
    def num_free(self) -> int:
        """Free blocks of the tightest group (a new block row needs one in every group)."""
        return min(len(p.free) for p in self.pools)

    @property
    def num_used(self) -> list[int]:
        """Blocks in use per group."""
        return [len(p.blocks) - len(p.free) for p in self.pools]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def max_tokens(self, max_context: int) -> int:
        """The most tokens one sequence can hold (up to max_context): a full group's pool, or a windowed group's
        when it cannot hold one sequence's window through a decode step (the window, the new token, the slack)."""
        most = max_context
        for p in self.pools:
            if p.window is None or len(p.blocks) < kv_blocks_max(p.window + 1 + self.rollback_slack, self.block_size):
                most = min(most, len(p.blocks) * self.block_size)
        return most

    def _tables(self, seq: Sequence) -> list[list[int]]:
        while len(seq.block_tables) < len(self.pools):
            seq.block_tables.append([])
        return seq.block_tables

    # ---- allocation -------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> None:
        """Attach cached blocks for the longest cached prefix of an unstarted sequence's tokens. A windowed group
        needs only the blocks its window sees at the prefix's end; where it lacks one, the prefix is shortened.

        At least one token is always left to compute, since its logits are needed.
        """
        assert not seq.block_table
        bs, h, hashes, found = self.block_size, None, [], []
        for i in range((len(seq) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(h, tokens)
            ids = [p.cached(h, tokens) for p in self.pools]
            if any(bid is None for p, bid in zip(self.pools, ids) if p.window is None):
                break
            hashes.append(h)
            found.append(ids)
        k = len(found)
        while k and not all(
            found[j][g] is not None
            for g, p in enumerate(self.pools)
            if p.window is not None
            for j in range(p.first_kept(k * bs, bs, 0), k)
        ):
            k -= 1
        tables = self._tables(seq)
        for g, p in enumerate(self.pools):
            first = 0 if p.window is None else p.first_kept(k * bs, bs, 0)
            for j in range(first, k):
                p.acquire(found[j][g])
            tables[g][:] = [p.scratch] * first + [found[j][g] for j in range(first, k)]
        seq.block_hashes = hashes[:k]
        seq.num_computed = seq.num_cached_prompt = k * bs

    def can_fit(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether growing seq to num_tokens would find enough free blocks."""
        n = self.blocks_needed(num_tokens)
        return all(n - len(t) <= len(p.free) for p, t in zip(self.pools, self._tables(seq)))

    def room(self, seq: Sequence) -> int:
        """Tokens seq can grow to with the free blocks of every group."""
        return min((len(t) + len(p.free)) * self.block_size for p, t in zip(self.pools, self._tables(seq)))

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> None:
        n = self.blocks_needed(num_tokens)
        for p, t in zip(self.pools, self._tables(seq)):
            p.grow(t, n)

    def commit(self, seq: Sequence, num_computed: int) -> None:
        """Record that K/V of tokens [0, num_computed) are in the cache; key the blocks that became full; a
        windowed group releases the blocks that left its window."""
        bs, hashes, tables = self.block_size, seq.block_hashes, seq.block_tables
        for i in range(len(hashes), num_computed // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(hashes[-1] if i else None, tokens)
            hashes.append(h)
            for p, t in zip(self.pools, tables):
                p.key(t[i], h, tokens)
        seq.num_computed = num_computed
        for g, p in enumerate(self.pools):
            if p.window is not None:
                p.drop_before(tables[g], p.first_kept(num_computed, bs, self.rollback_slack))

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let child share every block of parent (n samples of one prompt): reference counts, no copies. The
        shared partial last block is copied when either side first writes into it (prepare_append)."""
        for p, t in zip(self.pools, parent.block_tables):
            for bid in t:
                if bid != p.scratch:
                    p.acquire(bid)
        child.block_tables = [list(t) for t in parent.block_tables]
        child.block_hashes = list(parent.block_hashes)
        child.num_computed = parent.num_computed

    def can_append(self, seq: Sequence) -> bool:
        """Whether every group has the free blocks seq takes to compute its pending tokens: new blocks, plus a
        private copy of a shared partial block it would write into."""
        n, i = self.blocks_needed(len(seq)), seq.num_computed // self.block_size
        partial = seq.num_computed % self.block_size
        for p, t in zip(self.pools, self._tables(seq)):
            need = n - len(t) + (1 if partial and i < len(t) and p.blocks[t[i]].ref_count > 1 else 0)
            if need > len(p.free):
                return False
        return True

    def prepare_append(self, seq: Sequence) -> Copies:
        """Make room for seq's pending tokens: copy-on-write of a shared block they land in, then new blocks.
        Returns the copies the caller must do before the forward."""
        copies = []
        i = seq.num_computed // self.block_size
        if seq.num_computed % self.block_size:
            copies = self._private(seq, i)
        self.ensure_capacity(seq, len(seq))
        return copies

    # ---- release ----------------------------------------------------------------------------
    def free_sequence(self, seq: Sequence) -> None:
        # Tail first, so a sequence's first blocks (the most shareable prefix) are evicted last.
        for p, t in zip(self.pools, seq.block_tables):
            for bid in reversed(t):
                if bid != p.scratch:
                    p.release(bid)
        seq.block_tables = [[] for _ in self.pools]
        seq.block_hashes = []
        seq.num_computed = 0

    def truncate(self, seq: Sequence, length: int) -> Copies:
        """Roll seq back to its first `length` tokens. Returns the block copies the caller must do.

        Blocks past the new end are released; a now-partial last block loses its prefix key (its content
        will change), and if another sequence shares it, seq gets a private copy (copy-on-write). When a windowed
        group already released a block the next query sees, the sequence starts over from the prefix cache.
        """
        bs = self.block_size
        keep = self.blocks_needed(length)
        for p, t in zip(self.pools, self._tables(seq)):
            for bid in reversed(t[keep:]):
                if bid != p.scratch:
                    p.release(bid)
            del t[keep:]
        del seq.token_ids[length:]
        del seq.block_hashes[length // bs :]
        seq.num_computed = min(seq.num_computed, length)
        seq.num_prompt_tokens = min(seq.num_prompt_tokens, length)
        seq.num_cached_prompt = min(seq.num_cached_prompt, length)
        if self.windowed and self._window_lost(seq):
            cached = seq.num_cached_prompt
            self.free_sequence(seq)
            self.match_prefix(seq)
            seq.num_cached_prompt = cached
            return []
        copies = []
        if length % bs and seq.block_table:
            copies = self._private(seq, len(seq.block_table) - 1)
            for p, t in zip(self.pools, seq.block_tables):
                p.unhash(p.blocks[t[-1]])
        return copies

    def _window_lost(self, seq: Sequence) -> bool:
        """Whether the next query (the first pending token, or the last one recomputed) needs a released block."""
        start = min(seq.num_computed, len(seq) - 1)
        for p, t in zip(self.pools, seq.block_tables):
            if p.window is not None and any(b == p.scratch for b in t[p.first_kept(start, self.block_size, 0) :]):
                return True
        return False

    def _private(self, seq: Sequence, i: int) -> Copies:
        """Make block i of seq writable by seq alone in every group (copy-on-write when shared)."""
        copies = []
        for g, (p, t) in enumerate(zip(self.pools, seq.block_tables)):
            if i < len(t) and t[i] != p.scratch:
                c = p.private(t, i)
                if c is not None:
                    copies.append((g, *c))
        return copies

    def uncompute_last(self, seq: Sequence) -> Copies:
        """Mark the last token as pending again (its logits are needed), so its K/V will be rewritten."""
        seq.num_computed = len(seq) - 1
        return self._private(seq, seq.num_computed // self.block_size)
