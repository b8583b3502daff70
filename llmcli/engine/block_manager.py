"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, an LRU free list and prefix caching.

A full block is keyed by a chained hash of (previous block's hash, its token ids), so equal prefixes map to
equal keys. Blocks whose sequence finished keep their key on the free list and can be picked up again by a
later prompt with the same prefix, until they are evicted (least recently freed first).
The manager owns no tensors: copies it needs (copy-on-write on rollback) are returned to the caller.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from llmcli.engine.sequence import Sequence


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


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation -------------------------------------------------------------------------
    def _take(self, prefer: int | None = None) -> int:
        """A free block: `prefer` when it is free, else the least recently freed one."""
        if not self.free:
            raise OutOfBlocks("the KV cache is full")
        if prefer is not None and prefer in self.free:
            del self.free[prefer]
            bid = prefer
        else:
            bid, _ = self.free.popitem(last=False)
        b = self.blocks[bid]
        self._unhash(b)
        b.ref_count = 1
        return bid

    def _unhash(self, b: Block) -> None:
        if b.hash is not None and self.hash_to_block.get(b.hash) == b.block_id:
            del self.hash_to_block[b.hash]
        b.hash, b.token_ids = None, ()

    def _acquire(self, bid: int) -> None:
        b = self.blocks[bid]
        if b.ref_count == 0:
            del self.free[bid]
        b.ref_count += 1

    def match_prefix(self, seq: Sequence) -> None:
        """Attach cached blocks for the longest cached prefix of an unstarted sequence's tokens.

        At least one token is always left to compute, since its logits are needed.
        """
        assert not seq.block_table
        bs, h = self.block_size, None
        for i in range((len(seq) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(h, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            self._acquire(bid)
            seq.block_table.append(bid)
        seq.num_computed = seq.num_cached_prompt = len(seq.block_table) * bs

    def can_fit(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether growing seq to num_tokens would find enough free blocks."""
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> None:
        # Prefer the block after the sequence's last one: a run of consecutive blocks is read by batch-1
        # attention as a slice of the pool instead of a gather (a copy of the whole context per layer per step).
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self._take(seq.block_table[-1] + 1 if seq.block_table else None))

    def commit(self, seq: Sequence, num_computed: int) -> None:
        """Record that K/V of tokens [0, num_computed) are in the cache; key the blocks that became full."""
        bs = self.block_size
        for i in range(seq.num_computed // bs, num_computed // bs):
            b = self.blocks[seq.block_table[i]]
            if b.hash is not None:
                continue
            prev = self.blocks[seq.block_table[i - 1]].hash if i else None
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            b.hash, b.token_ids = chain_hash(prev, tokens), tokens
            self.hash_to_block.setdefault(b.hash, b.block_id)
        seq.num_computed = num_computed

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let child share every block of parent (n samples of one prompt): reference counts, no copies. The
        shared partial last block is copied when either side first writes into it (prepare_append)."""
        for bid in parent.block_table:
            self._acquire(bid)
        child.block_table = list(parent.block_table)
        child.num_computed = parent.num_computed

    def append_blocks_needed(self, seq: Sequence) -> int:
        """Free blocks seq takes to compute its pending tokens: new blocks, plus a private copy of a shared
        partial block it would write into."""
        n = self.blocks_needed(len(seq)) - len(seq.block_table)
        i = seq.num_computed // self.block_size
        partial = seq.num_computed % self.block_size and i < len(seq.block_table)
        if partial and self.blocks[seq.block_table[i]].ref_count > 1:
            n += 1
        return max(n, 0)

    def prepare_append(self, seq: Sequence) -> list[tuple[int, int]]:
        """Make room for seq's pending tokens: copy-on-write of a shared block they land in, then new blocks.
        Returns the (src, dst) copies the caller must do before the forward."""
        copies = []
        i = seq.num_computed // self.block_size
        if seq.num_computed % self.block_size and i < len(seq.block_table):
            copies = self._private(seq, i)
        self.ensure_capacity(seq, len(seq))
        return copies

    # ---- release ----------------------------------------------------------------------------
    def _release(self, bid: int) -> None:
        b = self.blocks[bid]
        b.ref_count -= 1
        if b.ref_count == 0:
            self.free[bid] = None  # most recently freed: evicted last

    def free_sequence(self, seq: Sequence) -> None:
        # Tail first, so a sequence's first blocks (the most shareable prefix) are evicted last.
        for bid in reversed(seq.block_table):
            self._release(bid)
        seq.block_table = []
        seq.num_computed = 0

    def truncate(self, seq: Sequence, length: int) -> list[tuple[int, int]]:
        """Roll seq back to its first `length` tokens. Returns (src, dst) block copies the caller must do.

        Blocks past the new end are released; a now-partial last block loses its prefix key (its content
        will change), and if another sequence shares it, seq gets a private copy (copy-on-write).
        """
        bs = self.block_size
        keep = self.blocks_needed(length)
        for bid in reversed(seq.block_table[keep:]):
            self._release(bid)
        del seq.block_table[keep:]
        del seq.token_ids[length:]
        seq.num_computed = min(seq.num_computed, length)
        seq.num_prompt_tokens = min(seq.num_prompt_tokens, length)
        seq.num_cached_prompt = min(seq.num_cached_prompt, length)
        copies = []
        if length % bs and seq.block_table:
            copies = self._private(seq, len(seq.block_table) - 1)
            self._unhash(self.blocks[seq.block_table[-1]])
        return copies

    def _private(self, seq: Sequence, i: int) -> list[tuple[int, int]]:
        """Make block i of seq writable by seq alone (copy-on-write when shared)."""
        b = self.blocks[seq.block_table[i]]
        if b.ref_count == 1:
            return []
        new = self._take()
        b.ref_count -= 1
        seq.block_table[i] = new
        return [(b.block_id, new)]

    def uncompute_last(self, seq: Sequence) -> list[tuple[int, int]]:
        """Mark the last token as pending again (its logits are needed), so its K/V will be rewritten."""
        seq.num_computed = len(seq) - 1
        return self._private(seq, seq.num_computed // self.block_size)
