"""BlockManager: allocation, reference counts, free list order and the prefix cache."""
import hashlib
import struct
import subprocess
import sys

import pytest

from sparse_serve.engine.core.block_manager import BlockManager
from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.engine.core.sequence import Sequence

BS = 4


def make_seq(tokens, request_id="r"):
    return Sequence(request_id, 0, list(tokens), SamplingParams())


def compute(bm, seq, num_new):
    """What the scheduler + runner do for one step: allocate, compute, commit."""
    assert bm.can_allocate(seq, num_new)
    bm.allocate(seq, num_new)
    seq.num_computed_tokens += num_new
    bm.commit_computed(seq)


def test_modules_do_not_import_torch():
    code = ("import sys; from sparse_serve.engine.core import sequence, block_manager, scheduler, config; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-P", "-c", code], check=True)


def test_allocate_grows_table_and_free_returns_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(range(10))
    assert bm.can_allocate(seq, 10)
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    seq.num_computed_tokens = 10
    bm.allocate(seq, 2)                    # 12 tokens still fit 3 blocks
    assert len(seq.block_table) == 3
    bm.allocate(seq, 3)                    # 13 tokens need a 4th
    assert len(seq.block_table) == 4
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8 and bm.usage == 0.0


def test_can_allocate_refuses_beyond_free_blocks():
    bm = BlockManager(num_blocks=2, block_size=BS)
    seq = make_seq(range(9))
    assert bm.can_allocate(seq, 8) and not bm.can_allocate(seq, 9)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(seq, 9)
    assert bm.num_free_blocks == 2 and seq.block_table == []


def test_prefix_hit_on_second_sequence_and_counters():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(range(10))
    assert bm.match_prefix(a) == 0
    compute(bm, a, 10)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (10, 0)

    b = make_seq([0, 1, 2, 3, 4, 5, 6, 7, 99, 98, 97])   # same first two blocks
    assert bm.match_prefix(b) == 8
    assert b.num_computed_tokens == 8 and b.block_table == a.block_table[:2]
    compute(bm, b, 3)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (21, 8)
    assert b.block_table[2] != a.block_table[2]

    c = make_seq([0, 1, 2, 3, 9, 9, 9, 9, 9])               # diverges in block 1
    assert bm.match_prefix(c) == 4


def test_hit_requires_whole_chain_not_just_equal_block():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq([1, 1, 1, 1, 2, 2, 2, 2, 0])
    compute(bm, a, 9)
    b = make_seq([3, 3, 3, 3, 2, 2, 2, 2, 0])               # block 1 equal, parent differs
    assert bm.match_prefix(b) == 0


def test_match_leaves_last_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(range(8))
    compute(bm, a, 8)
    b = make_seq(range(8))                                   # identical, block aligned
    assert bm.match_prefix(b) == 4                           # (8 - 1) // 4 blocks
    c = make_seq(range(9))
    assert bm.match_prefix(c) == 8


def test_no_hit_for_block_still_being_filled():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(range(12))
    bm.allocate(a, 6)                      # chunk 1 allocated, not yet computed
    b = make_seq(range(12))
    assert bm.match_prefix(b) == 0
    bm.free(b)
    a.num_computed_tokens = 6
    bm.commit_computed(a)                  # block 0 full + computed, block 1 half filled
    c = make_seq(range(12))
    assert bm.match_prefix(c) == 4
    assert c.block_table == a.block_table[:1]


def test_freed_block_revived_by_match():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(range(9))
    compute(bm, a, 9)
    head = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = make_seq(range(9))                 # revives a's two full blocks from the free list
    assert bm.match_prefix(b) == 8 and b.block_table == head
    assert bm.num_free_blocks == 2


def test_eviction_takes_least_recently_freed_cached_block():
    bm = BlockManager(num_blocks=4, block_size=BS)
    x, y = make_seq(range(5)), make_seq(range(50, 55))
    compute(bm, x, 5)
    bm.free(x)                             # freed first
    compute(bm, y, 5)
    bm.free(y)
    z = make_seq(range(100, 112))
    bm.allocate(z, 12)                     # 2 unkeyed blocks first, then evicts x's block
    assert bm.match_prefix(make_seq(range(5))) == 0
    assert bm.match_prefix(make_seq(range(50, 55))) == 4


def test_unkeyed_blocks_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(range(8))
    compute(bm, a, 8)                      # 2 keyed blocks
    p = make_seq(range(50, 53))
    compute(bm, p, 3)                      # 1 partial block: nothing reusable in it
    bm.free(a)
    bm.free(p)                             # freed last, yet handed out first
    other = make_seq(range(70, 78))
    compute(bm, other, 8)
    assert bm.match_prefix(make_seq(range(9))) == 8     # both of a's blocks survived


def test_refcounts_shared_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(range(9))
    compute(bm, a, 9)
    b = make_seq(range(9))
    bm.match_prefix(b)
    compute(bm, b, 1)
    assert bm.num_free_blocks == 8 - 4
    bm.free(a)                             # shared blocks still held by b
    assert bm.num_free_blocks == 8 - 3
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_duplicate_content_keeps_first_key():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq(range(5)), make_seq(range(5))
    bm.allocate(a, 5)
    bm.allocate(b, 5)                      # both admitted in one step, no hits
    for s in (a, b):
        s.num_computed_tokens = 5
        bm.commit_computed(s)
    c = make_seq(range(5))
    assert bm.match_prefix(c) == 4 and c.block_table[0] == a.block_table[0]
    bm.free(a)
    bm.free(b)
    bm.free(c)
    assert bm.num_free_blocks == 8


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_seq(range(9))
    assert bm.match_prefix(a) == 0
    compute(bm, a, 9)
    b = make_seq(range(9))
    assert bm.match_prefix(b) == 0 and b.block_table == []
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (0, 0)


def test_counters_only_count_admissions_that_allocate():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_seq(range(9))
    compute(bm, a, 9)
    queries = bm.prefix_cache_queries
    b = make_seq(list(range(8)) + list(range(200, 220)))
    for _ in range(3):                     # a head of queue that does not fit, retried
        assert bm.match_prefix(b) == 8
        assert not bm.can_allocate(b, b.num_tokens - 8)
        bm.free(b)
    assert bm.prefix_cache_queries == queries and bm.num_free_blocks == 0
    bm.free(a)
    c = make_seq(range(9))
    bm.match_prefix(c)
    bm.allocate(c, 1)
    assert (bm.prefix_cache_queries - queries, bm.prefix_cache_hits) == (9, 8)


def test_share_prefix_between_siblings_without_prefix_cache():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(10))
    a = Sequence("r", 0, prompt, SamplingParams(n=2))
    b = Sequence("r", 1, prompt, SamplingParams(n=2))
    compute(bm, a, 10)
    assert bm.share_prefix(b, a) == 8
    assert b.block_table == a.block_table[:2] and b.num_computed_tokens == 8
    compute(bm, b, 2)
    assert bm.num_free_blocks == 16 - 4
    with pytest.raises(ValueError):
        bm.share_prefix(make_seq(range(1, 11)), a)


# ---- prefix cache keys: SHA-256 chain ----------------------------------------------------------
def sha256_chain(tokens, block_size=BS):
    """The documented layout, recomputed here: SHA-256(parent digest || tokens as <int64), parent
    of the first block = 32 zero bytes."""
    parent, out = bytes(32), []
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size:(i + 1) * block_size]
        parent = hashlib.sha256(parent + struct.pack(f"<{block_size}q", *block)).digest()
        out.append(parent)
    return out


def test_keys_are_sha256_digests_of_the_documented_layout():
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = [5, 2**40, 0, 151_000, 7, 7, 7, 7, 1]        # an id above 32 bits checks the width
    a = make_seq(tokens)
    compute(bm, a, len(tokens))
    digests = sha256_chain(tokens)
    assert [len(d) for d in digests] == [32, 32]
    layout = b"".join(t.to_bytes(8, "little") for t in tokens[:4])
    assert digests[0] == hashlib.sha256(bytes(32) + layout).digest()
    assert bm._cached == {digests[0]: a.block_table[0], digests[1]: a.block_table[1]}


def test_earlier_token_changes_every_later_key_and_equal_prefixes_share():
    bm = BlockManager(num_blocks=32, block_size=BS)
    base = list(range(100, 116)) + [0]                     # 4 full blocks + 1 token
    a = make_seq(base)
    compute(bm, a, len(base))
    keys_a = set(bm._cached)
    for pos in (0, 5, 10):                                 # one token differs in block 0, 1, 2
        tokens = list(base)
        tokens[pos] += 1
        b = make_seq(tokens)
        assert bm.match_prefix(b) == (pos // BS) * BS      # shares exactly the blocks before it
        assert b.block_table == a.block_table[:pos // BS]
        compute(bm, b, len(tokens) - b.num_computed_tokens)
        new = sha256_chain(tokens)[pos // BS:]
        assert new and not keys_a & set(new)               # every later key changed
        assert all(bm._cached[k] in b.block_table for k in new)
        bm.free(b)


def test_python_hash_collision_does_not_alias_blocks():
    """hash(2**61 - 1) == hash(0), so Python's tuple hash chains of these two prompts collide
    after block 0; c (= b's prompt) must get b's block 1, not a's."""
    m = 2**61 - 1
    a_tokens = [0, 0, 0, 0, 5, 5, 5, 5, 9]
    b_tokens = [m, 0, 0, 0, 5, 5, 5, 5, 9]
    assert hash((None, tuple(a_tokens[:4]))) == hash((None, tuple(b_tokens[:4])))
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(a_tokens)
    compute(bm, a, 9)
    b = make_seq(b_tokens)
    assert bm.match_prefix(b) == 0
    compute(bm, b, 9)
    c = make_seq(b_tokens)
    assert bm.match_prefix(c) == 8
    assert c.block_table == b.block_table[:2] and not set(c.block_table) & set(a.block_table)
