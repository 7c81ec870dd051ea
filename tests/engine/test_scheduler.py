"""Scheduler tests: pure Python, no model."""

from framework.engine.block_pool import KVCacheManager
from framework.engine.scheduler import Scheduler
from framework.engine.sequence import SequenceStatus
from framework.engine.sequence_group import SequenceGroup
from framework.sampling_params import SamplingParams


class Width:
    """A stand-in decoding strategy: ``fanout`` sequences from the prompt, never finished."""

    def __init__(self, fanout=1, max_width=None):
        self.fanout, self.max_width = fanout, max_width or fanout
        self.num_top_logprobs, self.uses_processed_logprobs = 0, False


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=64):
    return Scheduler(KVCacheManager(num_blocks, block_size), max_num_seqs, budget)


def request(name, prompt_len, fanout=1, max_width=None):
    group = SequenceGroup(name, None, list(range(prompt_len)), SamplingParams())
    group.attach(Width(fanout, max_width))
    return group


def run_step(sched, batch, sampled_token=7):
    """What the engine does after the model ran: advance and append a token where one is sampled."""
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
    for group in batch.groups:
        for s in group.live_seqs():
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(sampled_token)
                group.sampled = True


def test_prefill_then_decode_in_one_mechanism():
    sched = make()
    a, b = request("a", 5), request("b", 3)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a.seqs[0], b.seqs[0]] and batch.num_new_tokens == [5, 3]
    run_step(sched, batch)
    batch = sched.schedule()
    assert batch.num_new_tokens == [1, 1]  # decodes


def test_long_prompt_is_prefilled_in_chunks_under_the_token_budget():
    sched = make(budget=8)
    a = request("a", 20)
    sched.add(a)
    chunks = []
    while a.seqs[0].num_tokens == 20:
        batch = sched.schedule()
        chunks.append(batch.num_new_tokens[0])
        run_step(sched, batch)
    assert chunks == [8, 8, 4]


def test_budget_is_shared_and_sequence_cap_holds():
    sched = make(max_num_seqs=2, budget=10)
    for i in range(4):
        sched.add(request(str(i), 6))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["0", "1"]
    assert batch.num_new_tokens == [6, 4]  # second prompt gets the rest of the budget
    assert len(sched.running) == 2 and len(sched.waiting) == 2


def test_a_request_counts_with_its_width_against_max_num_seqs():
    sched = make(max_num_seqs=5)
    wide, narrow, third = request("wide", 4, fanout=4), request("narrow", 4), request("third", 4)
    for g in (wide, narrow, third):
        sched.add(g)
    batch = sched.schedule()
    assert batch.groups == [wide, narrow]  # 4 + 1 sequences: "third" must wait
    assert len(wide.seqs) == 4 and len(batch.forks) == 3  # forked at its first sample
    assert all(child.block_ids == wide.seqs[0].block_ids for _, child in batch.forks)
    assert all(child.num_computed_tokens == 4 for _, child in batch.forks)


def test_fork_happens_at_the_chunk_that_samples_and_children_share_every_block():
    sched = make(block_size=4, budget=6)
    g = request("g", 10, fanout=3)
    sched.add(g)
    first = sched.schedule()
    assert first.num_new_tokens == [6] and not first.forks and len(g.seqs) == 1
    run_step(sched, first)
    second = sched.schedule()
    assert second.num_new_tokens == [4] and [c for _, c in second.forks] == g.seqs[1:]
    pool = sched.kv.pool
    assert pool.total_allocated == 3 and all(pool.ref_counts[b] == 3 for b in g.seqs[0].block_ids)
    run_step(sched, second)
    third = sched.schedule()  # each writes token 10 into the shared partial block 2: two copy on write
    assert third.num_new_tokens == [1, 1, 1] and len(third.block_copies) == 2
    assert pool.total_allocated == 5
    assert pool.ref_counts[g.seqs[0].block_ids[0]] == 3  # full blocks stay shared


def test_a_request_samples_all_together_or_not_at_all():
    sched = make(budget=100)
    g = request("g", 6, fanout=3)
    sched.add(g)
    run_step(sched, sched.schedule())
    for seq in g.seqs:  # as after a preemption: every sequence recomputes prompt + output
        sched.kv.free(seq)
        seq.num_computed_tokens = 0
    sched.max_num_batched_tokens = 10
    batch = sched.schedule()
    # 7 tokens each would let two of them sample alone; each stops short of its end instead
    assert batch.num_new_tokens == [6, 4] and all(s.num_computed_tokens < s.num_tokens for s in batch.seqs)


def test_preemption_takes_the_newest_request_and_requeues_it_first():
    # 4 blocks of 4 tokens; two sequences of 7 tokens use 2 blocks each.
    sched = make(num_blocks=4, block_size=4)
    a, b = request("a", 7), request("b", 7)
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule())  # both now 8 tokens, 7 computed: the 8th fits block 2
    run_step(sched, sched.schedule())  # both 9 tokens; token 9 needs a third block each
    batch = sched.schedule()
    assert batch.preempted == [b]
    assert batch.seqs == [a.seqs[0]]
    seq_b = b.seqs[0]
    assert seq_b.status is SequenceStatus.WAITING and seq_b.num_computed_tokens == 0 and seq_b.block_ids == []
    assert sched.waiting[0] is b and sched.num_preemptions == 1
    # once a finishes, b is recomputed from scratch (prompt + its generated tokens)
    sched.finish([a])
    batch = sched.schedule()
    assert batch.seqs == [seq_b] and batch.num_new_tokens == [seq_b.num_tokens]


def test_preempting_a_forked_request_frees_all_its_sequences():
    sched = make(num_blocks=6, block_size=4)
    a, b = request("a", 7), request("b", 7, fanout=2)
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule())  # a: 2 blocks; b: 2 shared blocks
    assert sched.kv.pool.num_free == 2
    run_step(sched, sched.schedule())  # b's second sequence copies block 1: one free block left
    batch = sched.schedule()  # a needs a new block for token 9, and so do both of b's sequences
    assert batch.preempted == [b] and sched.kv.pool.num_free == 3
    assert all(s.block_ids == [] and s.num_computed_tokens == 0 for s in b.seqs)


def test_abort_frees_blocks_everywhere():
    sched = make(num_blocks=8)
    a, b = request("a", 5, fanout=2), request("b", 5)
    sched.add(a)
    sched.schedule()
    sched.add(b)
    aborted = sched.abort({"a", "b"})
    assert {g.request_id for g in aborted} == {"a", "b"}
    assert not sched.has_unfinished() and sched.kv.pool.num_free == 8
