"""Scheduler tests: pure Python, no model."""

from framework.engine.block_pool import KVCacheManager
from framework.engine.scheduler import Scheduler
from framework.engine.sequence import Sequence, SequenceStatus
from framework.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=64):
    return Scheduler(KVCacheManager(num_blocks, block_size), max_num_seqs, budget)


def seq(name, prompt_len):
    return Sequence(name, None, list(range(prompt_len)), SamplingParams())


def run_step(sched, batch, sampled_token=7):
    """What the engine does after the model ran: advance and append a token where one is sampled."""
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(sampled_token)


def test_prefill_then_decode_in_one_mechanism():
    sched = make()
    a, b = seq("a", 5), seq("b", 3)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [5, 3]
    run_step(sched, batch)
    batch = sched.schedule()
    assert batch.num_new_tokens == [1, 1]  # decodes


def test_long_prompt_is_prefilled_in_chunks_under_the_token_budget():
    sched = make(budget=8)
    a = seq("a", 20)
    sched.add(a)
    chunks = []
    while a.num_tokens == 20:
        batch = sched.schedule()
        chunks.append(batch.num_new_tokens[0])
        run_step(sched, batch)
    assert chunks == [8, 8, 4]


def test_budget_is_shared_and_sequence_cap_holds():
    sched = make(max_num_seqs=2, budget=10)
    for i in range(4):
        sched.add(seq(str(i), 6))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["0", "1"]
    assert batch.num_new_tokens == [6, 4]  # second prompt gets the rest of the budget
    assert len(sched.running) == 2 and len(sched.waiting) == 2


def test_preemption_takes_newest_and_requeues_it_first():
    # 4 blocks of 4 tokens; two sequences of 7 tokens use 2 blocks each.
    sched = make(num_blocks=4, block_size=4)
    a, b = seq("a", 7), seq("b", 7)
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule())  # both now 8 tokens, 7 computed: the 8th fits block 2
    run_step(sched, sched.schedule())  # both 9 tokens; token 9 needs a third block each
    batch = sched.schedule()
    assert batch.preempted == [b]
    assert batch.seqs == [a]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert sched.waiting[0] is b and sched.num_preemptions == 1
    # once a finishes, b is recomputed from scratch (prompt + its generated tokens)
    sched.finish([a])
    batch = sched.schedule()
    assert batch.seqs == [b] and batch.num_new_tokens == [b.num_tokens]


def test_abort_frees_blocks_everywhere():
    sched = make(num_blocks=8)
    a, b = seq("a", 5), seq("b", 5)
    sched.add(a)
    sched.schedule()
    sched.add(b)
    aborted = sched.abort({"a", "b"})
    assert {s.request_id for s in aborted} == {"a", "b"}
    assert not sched.has_unfinished() and sched.kv.pool.num_free == 8
