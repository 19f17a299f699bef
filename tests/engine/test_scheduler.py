"""Scheduler, model-free: hand-made sampled tokens stand in for the model runner."""
import pytest

from sparse_serve.engine.core.block_manager import BlockManager
from sparse_serve.engine.core.config import SchedulerConfig
from sparse_serve.engine.core.errors import PromptTooLongError
from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.engine.core.scheduler import Scheduler
from sparse_serve.engine.core.sequence import Sequence, SequenceStatus

EOS = 2


def make_scheduler(num_blocks=64, block_size=4, budget=64, max_seqs=8, prefix=True, max_model_len=1024):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs),
                     bm, eos_token_ids={EOS}, max_model_len=max_model_len)


def add(sched, request_id, prompt, n=1, **params):
    sp = SamplingParams(n=n, **params)
    seqs = [Sequence(request_id, i, list(prompt), sp) for i in range(n)]
    for seq in seqs:
        sched.add_sequence(seq)
    return seqs


def script_token(seq):
    """The token 'the model' samples next: a pure function of the sequence and position, so a
    preempted sequence that recomputes must produce the very same list."""
    return 1000 + 100 * seq.index + seq.num_output_tokens + 7 * (hash(seq.request_id) % 13)


def step(sched, token_fn=script_token):
    out = sched.schedule()
    for entry in out.scheduled:                   # invariants every model runner relies on
        seq = entry.seq
        assert entry.num_new_tokens > 0
        assert seq.num_computed_tokens + entry.num_new_tokens <= seq.num_tokens
        assert len(seq.block_table) * sched.block_manager.block_size >= seq.num_computed_tokens + entry.num_new_tokens
    assert out.num_batched_tokens == sum(e.num_new_tokens for e in out.scheduled)
    assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
    assert len(out.scheduled) <= sched.config.max_num_seqs
    sampled = {e.seq.seq_id: token_fn(e.seq) for e in out.scheduled if e.samples}
    finished = sched.update_from_output(out, sampled)
    return out, finished


def run_to_end(sched, max_steps=1000, token_fn=script_token):
    outs = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return outs
        outs.append(step(sched, token_fn))
    raise AssertionError("scheduler did not drain")


def expected_output(seq, count):
    probe = Sequence(seq.request_id, seq.index, [0], seq.params)
    tokens = []
    for _ in range(count):
        tokens.append(script_token(probe))
        probe.append_token(tokens[-1])
    return tokens


def test_token_budget_and_seq_cap():
    sched = make_scheduler(budget=10, max_seqs=3)
    seqs = [add(sched, f"r{i}", range(10 * i, 10 * i + 6), max_tokens=4)[0] for i in range(5)]

    def plan(out):
        return [(e.seq.request_id, e.num_new_tokens, e.samples) for e in out.scheduled]

    out = sched.schedule()
    # 6 + 4 tokens: the second prompt is chunked by the budget and does not sample yet
    assert plan(out) == [("r0", 6, True), ("r1", 4, False)]
    sched.update_from_output(out, {seqs[0].seq_id: 7})
    out = sched.schedule()
    # decode first, then the rest of r1's prompt, then r2 until the seq cap (3) is reached
    assert plan(out) == [("r0", 1, True), ("r1", 2, True), ("r2", 6, True)]
    assert out.num_batched_tokens == 9 and sched.num_running == 3 and sched.num_waiting == 2
    sched.update_from_output(out, {s.seq_id: 7 for s in seqs[:3]})
    out = sched.schedule()
    assert plan(out) == [("r0", 1, True), ("r1", 1, True), ("r2", 1, True)]
    sched.update_from_output(out, {s.seq_id: 7 for s in seqs[:3]})
    for _ in range(20):
        out, _ = step(sched)
        assert sched.num_running <= 3
    assert not sched.has_unfinished()
    assert all(s.finish_reason == "length" and s.num_output_tokens == 4 for s in seqs)


def test_chunked_prefill_while_decodes_continue():
    sched = make_scheduler(budget=8, num_blocks=64)
    decoders = [add(sched, f"d{i}", range(3), max_tokens=30)[0] for i in range(2)]
    step(sched)
    assert all(d.num_output_tokens == 1 for d in decoders)
    long = add(sched, "long", range(100, 140), max_tokens=2)[0]   # 40 tokens, budget 8
    chunks = []
    while long.num_output_tokens == 0:
        before = [d.num_output_tokens for d in decoders]
        out, _ = step(sched)
        by_seq = {e.seq.seq_id: e for e in out.scheduled}
        assert [d.num_output_tokens for d in decoders] == [b + 1 for b in before]  # no stall
        assert by_seq[decoders[0].seq_id].num_new_tokens == 1
        chunks.append(by_seq[long.seq_id].num_new_tokens)
    assert chunks == [6] * 6 + [4] and sum(chunks) == 40
    run_to_end(sched)
    assert long.output_token_ids == expected_output(long, 2)


def test_blocks_all_free_after_finish_and_abort():
    sched = make_scheduler(num_blocks=32)
    bm = sched.block_manager
    a = add(sched, "a", range(9), max_tokens=5)[0]
    b = add(sched, "b", range(20, 33), max_tokens=50)[0]
    c = add(sched, "c", range(40, 45), max_tokens=50)[0]
    for _ in range(3):
        step(sched)
    assert bm.num_free_blocks < 32
    assert sched.abort_request("b") == [b]
    assert b.finish_reason == "abort" and b.block_table == [] and b.is_finished
    sched.finish_sequence(c, "stop", stop_reason="</s>")       # a stop string, from the engine
    assert c.stop_reason == "</s>" and c not in sched.running
    run_to_end(sched)
    assert a.finish_reason == "length" and a.output_token_ids == expected_output(a, 5)
    assert bm.num_free_blocks == 32 and not sched.has_unfinished()


def test_abort_of_waiting_and_of_in_flight_sequences():
    sched = make_scheduler(budget=8, max_seqs=1)
    a = add(sched, "a", range(6), max_tokens=10)[0]
    b = add(sched, "b", range(6), max_tokens=10)[0]
    out = sched.schedule()
    assert [e.seq for e in out.scheduled] == [a]
    sched.abort_request("b")                       # still waiting
    sched.abort_request("a")                       # while the model runs its step
    assert sched.update_from_output(out, {a.seq_id: 5}) == []
    assert a.output_token_ids == [] and b.finish_reason == "abort"
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    assert sched.num_waiting == sched.num_running == 0
    assert sched.abort_request("unknown") == []


def test_prefix_cache_hit_for_second_request():
    sched = make_scheduler(block_size=4)
    bm = sched.block_manager
    a = add(sched, "a", range(18), max_tokens=3)[0]
    run_to_end(sched)
    b = add(sched, "b", list(range(16)) + [77, 78], max_tokens=3)[0]
    out, _ = step(sched)
    assert b.num_cached_tokens == 16 and out.scheduled[0].num_new_tokens == 2
    assert bm.prefix_cache_hits == 16 and bm.prefix_cache_queries == 18 + 18
    run_to_end(sched)
    assert a.num_cached_tokens == 0
    assert b.output_token_ids == expected_output(b, 3)


def test_no_hit_for_block_still_being_filled():
    sched = make_scheduler(block_size=4, budget=10)
    a = add(sched, "a", range(14), max_tokens=2)[0]
    step(sched)                                    # a: tokens 0..9, block 2 half filled
    b = add(sched, "b", range(14), max_tokens=2)[0]
    out, _ = step(sched)                           # a: 4 more, b admitted with the rest
    assert [(e.seq, e.num_new_tokens) for e in out.scheduled] == [(a, 4), (b, 6)]
    assert b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]


def test_preemption_requeues_newest_at_front_and_recomputes():
    # 6 blocks of 4: two sequences of 5 prompt tokens outgrow the cache while decoding.
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64, max_seqs=2)
    old = add(sched, "old", range(5), max_tokens=12)[0]
    new = add(sched, "new", range(50, 55), max_tokens=12)[0]
    other = add(sched, "other", range(60, 62), max_tokens=1)[0]   # waits for the seq cap
    events = []
    for _ in range(200):
        if not sched.has_unfinished():
            break
        out, _ = step(sched)
        if out.preempted:
            events.append(out)
            assert out.preempted == [new]
            assert list(sched.waiting)[:2] == [new, other] and new.status is SequenceStatus.WAITING
            assert new.num_computed_tokens == 0 and new.block_table == []
            assert new.seq_id not in {e.seq.seq_id for e in out.scheduled}
    assert events, "expected a preemption"
    assert sched.num_preemptions == new.num_preemptions >= 1 and old.num_preemptions == 0
    assert old.output_token_ids == expected_output(old, 12)
    assert new.output_token_ids == expected_output(new, 12)
    assert other.output_token_ids == expected_output(other, 1)
    assert sched.block_manager.num_free_blocks == 6


def test_running_sequence_preempts_itself_when_newest():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64)
    a = add(sched, "a", range(7), max_tokens=6)[0]          # grows to 2 blocks, then 3
    b = add(sched, "b", range(20, 27), max_tokens=6)[0]
    preempted = []
    for _ in range(100):
        if not sched.has_unfinished():
            break
        out, _ = step(sched)
        preempted += out.preempted
    assert preempted and set(preempted) == {b}
    assert a.output_token_ids == expected_output(a, 6) and b.output_token_ids == expected_output(b, 6)


def test_lone_sequence_bigger_than_cache_finishes_with_length():
    sched = make_scheduler(num_blocks=3, block_size=4)
    seq = add(sched, "a", range(10), max_tokens=100)[0]
    outs = run_to_end(sched, max_steps=20)
    # the cache holds 12 tokens' K/V; the 13th was sampled from them, the 14th cannot be
    assert seq.finish_reason == "length" and seq.num_tokens == 13 and seq.num_computed_tokens == 12
    assert any(seq in o[1] for o in outs)                             # reported as finished
    assert sched.block_manager.num_free_blocks == 3


def test_waiting_sequence_that_can_never_fit_does_not_block_the_queue():
    # Defensive path: a requeued sequence whose prompt + output outgrew the whole cache.
    sched = make_scheduler(num_blocks=3, block_size=4)
    big = add(sched, "big", range(5), max_tokens=100)[0]
    for token in range(8):                        # as if it had generated 8 tokens before
        big.append_token(500 + token)
    small = add(sched, "small", range(3), max_tokens=2)[0]
    out, finished = step(sched)
    assert finished == [big] and big.finish_reason == "length"
    assert [e.seq for e in out.scheduled] == [small]
    run_to_end(sched)
    assert small.output_token_ids == expected_output(small, 2)


def test_add_sequence_rejects_prompts_that_cannot_fit():
    sched = make_scheduler(num_blocks=3, block_size=4, max_model_len=16)
    with pytest.raises(PromptTooLongError):
        add(sched, "big", range(12))               # no room for one more token in 12 slots
    with pytest.raises(PromptTooLongError):
        add(make_scheduler(max_model_len=8), "long", range(9))
    add(sched, "ok", range(11))


@pytest.mark.parametrize("params, tokens, reason, stop_reason, num_out", [
    ({"max_tokens": 10}, [5, EOS, 6], "stop", None, 2),
    ({"max_tokens": 10, "min_tokens": 3}, [EOS, EOS, EOS, 6], "stop", None, 3),
    ({"max_tokens": 4, "ignore_eos": True}, [EOS, EOS, EOS, EOS, 7], "length", None, 4),
    ({"max_tokens": 10, "stop_token_ids": [9]}, [5, 9, 6], "stop", 9, 2),
    ({"max_tokens": 10, "stop_token_ids": [9], "min_tokens": 2}, [9, 5, 9], "stop", 9, 3),
    ({"max_tokens": 3}, [5, 6, 7, 8], "length", None, 3),
    ({"max_tokens": None}, [5] * 20, "length", None, 16 - 6),   # max_model_len 16
])
def test_token_stop_rules(params, tokens, reason, stop_reason, num_out):
    sched = make_scheduler(max_model_len=16)
    seq = add(sched, "r", range(10, 16), **params)[0]
    feed = iter(tokens)
    run_to_end(sched, token_fn=lambda s: next(feed))
    assert (seq.finish_reason, seq.stop_reason) == (reason, stop_reason)
    assert seq.output_token_ids == tokens[:num_out]


def test_update_requires_a_token_for_every_sampling_sequence():
    sched = make_scheduler()
    add(sched, "r", range(5))
    out = sched.schedule()
    with pytest.raises(KeyError):
        sched.update_from_output(out, {})


@pytest.mark.parametrize("prefix", [True, False])
def test_n_siblings_share_prompt_blocks(prefix):
    sched = make_scheduler(num_blocks=64, block_size=16, budget=512, prefix=prefix)
    bm = sched.block_manager
    seqs = add(sched, "r", range(100, 164), n=4, max_tokens=8)
    peak_used = 0
    for _ in range(50):
        if not sched.has_unfinished():
            break
        step(sched)
        peak_used = max(peak_used, bm.num_blocks - bm.num_free_blocks)
    # alone, each holds 5 blocks (64 + 8 tokens), 4 copies 20. Shared: the first sibling 5,
    # the others share 3 full prompt blocks and own 2 (last prompt block + output): 5 + 3 * 2.
    assert peak_used == 11, peak_used
    assert all(s.num_cached_tokens == 48 for s in seqs[1:]) and seqs[0].num_cached_tokens == 0
    for s in seqs:
        assert s.output_token_ids == expected_output(s, 8)
    assert bm.num_free_blocks == 64
    if not prefix:
        assert bm.prefix_cache_queries == bm.prefix_cache_hits == 0


def test_siblings_wait_only_for_the_prompt_not_the_queue():
    sched = make_scheduler(block_size=4, budget=8)
    s0, s1 = add(sched, "r", range(12), n=2, max_tokens=3)
    other = add(sched, "o", range(50, 52), max_tokens=3)[0]
    out, _ = step(sched)
    # s0 takes a chunk; s1 is held back (its prompt is being computed) and "o" goes ahead.
    assert [e.seq for e in out.scheduled] == [s0]
    out, _ = step(sched)
    assert {e.seq.seq_id for e in out.scheduled} == {s0.seq_id, other.seq_id}
    assert list(sched.waiting) == [s1]
    out, _ = step(sched)
    assert s1 in [e.seq for e in out.scheduled] and s1.num_cached_tokens == 8
    run_to_end(sched)
    assert s1.output_token_ids == expected_output(s1, 3)


@pytest.mark.parametrize("seed, prefix", [(0, True), (1, False), (2, True), (3, False)])
def test_random_workload_keeps_blocks_and_outputs_consistent(seed, prefix):
    import random
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=24, block_size=4, budget=rng.choice([8, 16, 64]),
                           max_seqs=rng.choice([2, 4, 8]), prefix=prefix, max_model_len=48)
    bm = sched.block_manager
    shared = [rng.randrange(3, 900) for _ in range(12)]
    seqs = []
    for step_no in range(400):
        if step_no < 150 and rng.random() < 0.3:
            head = shared[:rng.randrange(0, 12)]
            prompt = head + [rng.randrange(3, 900) for _ in range(rng.randrange(1, 20))]
            seqs += add(sched, f"r{step_no}", prompt, n=rng.choice([1, 1, 2, 3]),
                        max_tokens=rng.randrange(1, 30), min_tokens=0)
        if sched.running and rng.random() < 0.03:
            sched.abort_request(rng.choice(sched.running).request_id)
        step(sched)
        held = {b for s in sched.running for b in s.block_table}
        assert len(held) == bm.num_blocks - bm.num_free_blocks
        assert all(not s.block_table for s in sched.waiting)
        if step_no > 150 and not sched.has_unfinished():
            break
    assert not sched.has_unfinished() and bm.num_free_blocks == bm.num_blocks
    for s in seqs:
        assert s.is_finished
        if s.finish_reason != "abort":
            assert s.finish_reason == "length"
            assert s.output_token_ids == expected_output(s, s.num_output_tokens)
            assert s.num_output_tokens == s.params.max_tokens or s.num_tokens >= 48 \
                or s.num_computed_tokens == bm.num_blocks * bm.block_size
