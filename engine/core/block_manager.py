"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, a free list and a prefix
cache (pure Python, no torch; the model runner owns the tensors, this owns the block ids).

Prefix caching keys each FULL block by a SHA-256 chain (`block_hash`): the digest of the
parent block's digest followed by the block's token ids, so a block matches only when every
token before it matches too. A key is registered only after the block's tokens are computed
(`commit_computed`, called after the step), never at allocation: a block still being filled
by a chunked prefill is never served to others.
A freed block keeps its key and can be revived by a later match until it is handed out for
something else; the free list is ordered so the least recently freed cached block goes first.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import struct
from collections import OrderedDict

from sparse_serve.engine.core.sequence import Sequence

logger = logging.getLogger(__name__)

# NOTE: a cryptographic hash because prompts come from clients: with a hash that is not collision
# resistant (Python's 64-bit `hash()`), a crafted prompt could alias another request's cached
# blocks and be served KV computed for a different prefix. The digest alone is the key (the
# tokens are not kept), so the chain must be collision resistant end to end.
ROOT_HASH = bytes(32)        # the "parent" of a sequence's first block


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """SHA-256 over `parent` (32 bytes) then the token ids as int64 little-endian: fixed widths,
    so the byte string determines the (parent, tokens) pair."""
    return hashlib.sha256(parent + _pack_int64_le(len(token_ids))(*token_ids)).digest()


@functools.cache
def _pack_int64_le(n: int):
    # a compiled Struct per length: parsing the format on every call costs nearly as much as
    # the SHA-256 itself
    return struct.Struct(f"<{n}q").pack


class _Block:
    __slots__ = ("block_id", "ref_count", "key")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.key: bytes | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # NOTE: an OrderedDict used as a queue with O(1) removal from the middle (a cached block
        # revived by a match leaves the free list wherever it sits). Front = handed out first.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}
        # seq_id -> chain digests of its leading full blocks that were matched or committed
        self._seq_hashes: dict[int, list[bytes]] = {}
        # seq_id -> (queries, hits) of a match whose admission is not yet confirmed by allocate
        self._pending_stats: dict[int, tuple[int, int]] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- capacity -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return (self.num_blocks - len(self._free)) / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._num_missing_blocks(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        missing = self._num_missing_blocks(seq, num_new_tokens)
        if missing > len(self._free):
            raise RuntimeError(f"out of KV blocks: {seq!r} needs {missing}, {len(self._free)} free "
                               "(call can_allocate first)")
        for _ in range(missing):
            seq.block_table.append(self._take_free_block())
        # NOTE: a match is counted once its admission goes through, so a sequence that waits
        # at the head of the queue for blocks is not counted again on every step.
        queries, hits = self._pending_stats.pop(seq.seq_id, (0, 0))
        self.prefix_cache_queries += queries
        self.prefix_cache_hits += hits

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.key is not None:        # evict: its cached content is about to be overwritten
            del self._cached[block.key]
            block.key = None
        block.ref_count = 1
        return block_id

    def _acquire(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def free(self, seq: Sequence) -> None:
        # NOTE: released last block first, so under LRU a sequence's tail (least likely to be
        # shared) is evicted before its head. Blocks without a key hold nothing reusable and go
        # to the front of the free list, so cached blocks survive as long as possible.
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.key is None:
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []
        self._seq_hashes.pop(seq.seq_id, None)
        self._pending_stats.pop(seq.seq_id, None)

    # ---- prefix cache ---------------------------------------------------------------------
    def _max_reusable_blocks(self, seq: Sequence) -> int:
        # NOTE: never reuse the block holding the last token: it must be computed so the model
        # produces logits for the next one. (num_tokens - 1) rounded down to whole blocks.
        return (seq.num_tokens - 1) // self.block_size

    def _block_hash(self, parent: bytes, seq: Sequence, i: int) -> bytes:
        return block_hash(parent, seq.token_ids[i * self.block_size:(i + 1) * self.block_size])

    def match_prefix(self, seq: Sequence) -> int:
        """At admission of a sequence holding no blocks: take the cached full blocks that match
        its leading tokens, set block_table and num_computed_tokens, return the tokens found."""
        if seq.block_table:
            raise RuntimeError(f"match_prefix on {seq!r}, which already holds blocks")
        if not self.enable_prefix_caching:
            return 0
        hashes: list[bytes] = []
        parent = ROOT_HASH
        for i in range(self._max_reusable_blocks(seq)):
            parent = self._block_hash(parent, seq, i)
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            self._acquire(block_id)
            seq.block_table.append(block_id)
            hashes.append(parent)
        num_hit_tokens = len(hashes) * self.block_size
        self._seq_hashes[seq.seq_id] = hashes
        self._pending_stats[seq.seq_id] = (seq.num_tokens, num_hit_tokens)
        seq.num_computed_tokens = num_hit_tokens
        return num_hit_tokens

    def share_prefix(self, seq: Sequence, source: Sequence) -> int:
        """Give `seq` (holding no blocks) the computed full prompt blocks of a sibling with the
        same prompt, by reference. Works with prefix caching off; counters are not touched.
        Returns the tokens shared and sets block_table and num_computed_tokens."""
        if seq.block_table:
            raise RuntimeError(f"share_prefix on {seq!r}, which already holds blocks")
        if seq.prompt_token_ids != source.prompt_token_ids:
            raise ValueError(f"{seq!r} and {source!r} do not share a prompt")
        num_shared = min(source.num_computed_tokens // self.block_size,
                         seq.num_prompt_tokens // self.block_size,
                         self._max_reusable_blocks(seq),
                         len(source.block_table))
        for block_id in source.block_table[:num_shared]:
            self._acquire(block_id)
            seq.block_table.append(block_id)
        if self.enable_prefix_caching:
            self._seq_hashes[seq.seq_id] = list(self._seq_hashes.get(source.seq_id, [])[:num_shared])
        seq.num_computed_tokens = num_shared * self.block_size
        return seq.num_computed_tokens

    def commit_computed(self, seq: Sequence) -> None:
        """After a step: register the keys of the sequence's blocks that are now full and
        computed, so later matches can find them."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        parent = hashes[-1] if hashes else ROOT_HASH
        for i in range(len(hashes), num_full):
            key = parent = self._block_hash(parent, seq, i)
            block = self._blocks[seq.block_table[i]]
            # NOTE: if another block already holds this key (two sequences computed the same
            # prefix in the same step), keep the first; this one stays unkeyed.
            if block.key is None and key not in self._cached:
                block.key = key
                self._cached[key] = block.block_id
            hashes.append(key)
