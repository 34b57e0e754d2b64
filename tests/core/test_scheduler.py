"""Scheduler behaviour on a simulated worker: budgets, chunking, preemption, swap, fork, abort."""

from __future__ import annotations

from pagedserve.core.outputs import EngineCoreOutput, FinishReason
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.sampling_params import SamplingParams
from tests.core.sim import SimState, SimWorker, check_accounting, make_scheduler, next_token


def req(req_id: str, prompt_len: int, max_tokens: int = 4, arrival: float = 0.0, priority: int = 0,
        base: int = 0, **params: object) -> Request:
    return Request(
        req_id, [base + i for i in range(prompt_len)],
        SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params),  # type: ignore[arg-type]
        eos_token_id=None, arrival_time=arrival, priority=priority,
    )


def step(scheduler: Scheduler, worker: SimWorker) -> tuple[dict[str, int], list[EngineCoreOutput]]:
    plan = scheduler.schedule()
    outputs = scheduler.update_from_output(plan, worker.execute(plan))
    check_accounting(scheduler)
    return plan.num_scheduled_tokens, outputs


def run(scheduler: Scheduler, worker: SimWorker, max_steps: int = 500) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            break
        _, outputs = step(scheduler, worker)
        for out in outputs:
            tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
    assert not scheduler.has_unfinished_requests(), "did not finish"
    assert scheduler.kv.pool.num_free_blocks == scheduler.kv.pool.num_blocks
    return tokens


def expected_tokens(prompt: list[int], n: int, vocab: int = 1000) -> list[int]:
    state = SimState(list(prompt), [], [], 0, SamplingParams())
    for _ in range(n):
        state.outputs.append(next_token(state, vocab))
    return state.outputs


def test_chunked_prefill_shares_the_budget_with_decodes() -> None:
    s = make_scheduler(max_num_batched_tokens=8, block_size=4)
    w = SimWorker(4)
    s.add_request(req("a", 3, max_tokens=5))
    sched, _ = step(s, w)
    assert sched == {"a": 3}
    s.add_request(req("b", 20, arrival=1.0))
    sched, _ = step(s, w)
    assert sched == {"a": 1, "b": 7}  # a decodes, b's prompt takes the rest of the budget
    sched, _ = step(s, w)
    assert sched == {"a": 1, "b": 7}
    sched, outputs = step(s, w)
    assert sched == {"a": 1, "b": 6}
    first_b = [o.new_token_ids for o in outputs if o.req_id == "b"]
    tokens = run(s, w)
    assert first_b[0] + tokens["b"] == expected_tokens(list(range(20)), 4)


def test_no_chunking_admits_whole_prompts_only() -> None:
    s = make_scheduler(max_num_batched_tokens=16, enable_chunked_prefill=False)
    w = SimWorker(4)
    s.add_request(req("a", 10))
    s.add_request(req("b", 10, arrival=1.0))
    sched, _ = step(s, w)
    assert sched == {"a": 10}


def test_max_num_seqs_caps_the_batch() -> None:
    s = make_scheduler(max_num_seqs=2)
    w = SimWorker(4)
    for i in range(3):
        s.add_request(req(f"r{i}", 3, arrival=float(i)))
    sched, _ = step(s, w)
    assert set(sched) == {"r0", "r1"}


def test_recompute_preemption_takes_the_newest_and_outputs_match() -> None:
    # 6 blocks of 4 tokens; two requests of 8 prompt + 12 output tokens cannot both fit.
    s = make_scheduler(num_gpu_blocks=6, block_size=4, max_num_batched_tokens=64)
    w = SimWorker(4)
    s.add_request(req("old", 8, max_tokens=12, arrival=0.0))
    s.add_request(req("new", 8, max_tokens=12, arrival=1.0, base=100))
    preempted_first = None
    tokens: dict[str, list[int]] = {}
    for _ in range(200):
        if not s.has_unfinished_requests():
            break
        before = s.num_preemptions
        _, outputs = step(s, w)
        for out in outputs:
            tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
        if s.num_preemptions > before and preempted_first is None:
            preempted_first = [r.request_id for r in s.waiting]
    assert preempted_first == ["new"]
    assert tokens["old"] == expected_tokens(list(range(8)), 12)
    assert tokens["new"] == expected_tokens([100 + i for i in range(8)], 12)


def test_swap_preemption_round_trips_the_kv() -> None:
    s = make_scheduler(num_gpu_blocks=6, num_cpu_blocks=8, block_size=4, preemption_mode="swap")
    w = SimWorker(4)
    s.add_request(req("old", 8, max_tokens=12, arrival=0.0))
    s.add_request(req("new", 8, max_tokens=12, arrival=1.0, base=100))
    swapped_seen = False
    tokens: dict[str, list[int]] = {}
    for _ in range(200):
        if not s.has_unfinished_requests():
            break
        _, outputs = step(s, w)
        swapped_seen |= bool(s.swapped)
        for out in outputs:
            tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
    assert swapped_seen
    assert tokens["new"] == expected_tokens([100 + i for i in range(8)], 12)
    assert s.kv.swap_space.num_free_blocks == 8


def test_priority_policy_runs_lower_value_first_and_preempts_for_it() -> None:
    s = make_scheduler(max_num_seqs=1, policy="priority")
    w = SimWorker(4)
    s.add_request(req("low", 3, max_tokens=10, priority=5, arrival=0.0))
    step(s, w)
    s.add_request(req("high", 3, max_tokens=2, priority=0, arrival=1.0, base=50))
    sched, _ = step(s, w)
    assert sched == {"high": 3}
    assert [r.request_id for r in s.waiting] == ["low"]
    tokens = run(s, w)
    assert tokens["low"][-1] == expected_tokens([0, 1, 2], 10)[-1]


def test_prefix_cache_hit_skips_computed_blocks() -> None:
    s = make_scheduler(block_size=4)
    w = SimWorker(4)
    s.add_request(req("a", 13))
    run(s, w)
    s.add_request(req("b", 13, arrival=1.0))
    sched, _ = step(s, w)
    assert sched == {"b": 1}  # 12 of 13 prompt tokens were cached
    assert s.kv.prefix_stats.hits == 12
    tokens = run(s, w)
    assert len(tokens["b"]) == 3  # 4 max tokens, one came from the first step


def test_fork_gives_each_follower_the_shared_prompt() -> None:
    s = make_scheduler(block_size=4)
    w = SimWorker(4)
    leader = req("0_x", 10, max_tokens=3)
    followers = [req(f"{i}_x", 10, max_tokens=3) for i in (1, 2)]
    leader.followers = followers
    s.add_request(leader)
    sched, _ = step(s, w)
    assert sched == {"0_x": 9}  # stops one short of the prompt end
    plan = s.schedule()
    assert plan.num_scheduled_tokens == {"0_x": 1, "1_x": 1, "2_x": 1}
    assert len(plan.blocks_to_copy) == 2  # each follower copies the partial third block
    s.update_from_output(plan, w.execute(plan))
    check_accounting(s)
    tokens = run(s, w)
    assert len(tokens) == 3


def test_abort_at_any_moment_frees_everything() -> None:
    s = make_scheduler(num_gpu_blocks=8, num_cpu_blocks=8, preemption_mode="swap")
    w = SimWorker(4)
    s.add_request(req("a", 12, max_tokens=20))
    s.add_request(req("b", 12, max_tokens=20, arrival=1.0, base=40))
    leader = req("0_c", 6, arrival=2.0, base=80)
    leader.followers = [req("1_c", 6, arrival=2.0, base=80)]
    s.add_request(leader)
    for _ in range(6):
        step(s, w)
    s.finish_requests(["a", "b", "0_c", "1_c"], RequestStatus.FINISHED_ABORTED)
    check_accounting(s)
    assert not s.has_unfinished_requests()
    assert s.kv.pool.num_free_blocks == 8 and s.kv.swap_space.num_free_blocks == 8
    plan = s.schedule()
    assert {"a", "b"} <= plan.finished_req_ids


def test_length_finish_reason() -> None:
    s = make_scheduler(max_model_len=10)
    w = SimWorker(4)
    s.add_request(req("a", 8, max_tokens=50))
    outs: list[EngineCoreOutput] = []
    for _ in range(5):
        outs += step(s, w)[1]
    assert outs[-1].finish_reason == FinishReason.LENGTH
    assert sum(len(o.new_token_ids) for o in outs) == 2


def test_leader_that_cannot_fork_everyone_detaches_followers_instead_of_waiting() -> None:
    # 4 blocks of 4: the leader holds 3 blocks after 9 prompt tokens and only 1 block is free,
    # while its 2 followers need one copy block each. Waiting would never end.
    s = make_scheduler(num_gpu_blocks=4, block_size=4, max_model_len=16, max_num_seqs=4,
                       max_num_batched_tokens=16)
    w = SimWorker(4)
    kids = [req(f"{i}_x", 10, max_tokens=4) for i in range(3)]
    kids[0].followers = kids[1:]
    s.add_request(kids[0])
    tokens = run(s, w, max_steps=200)
    expected = expected_tokens(list(range(10)), 4)
    assert all(tokens[f"{i}_x"] == expected for i in range(3))


def test_priority_request_is_admitted_while_a_lower_one_is_swapped() -> None:
    s = make_scheduler(num_gpu_blocks=6, num_cpu_blocks=8, block_size=4, preemption_mode="swap",
                       policy="priority")
    w = SimWorker(4)
    s.add_request(req("a", 8, max_tokens=12, priority=1, arrival=0.0))
    s.add_request(req("b", 8, max_tokens=12, priority=2, arrival=1.0, base=100))
    while not s.swapped:
        step(s, w)
    assert [r.request_id for r in s.swapped] == ["b"]
    s.add_request(req("urgent", 3, max_tokens=2, priority=0, arrival=2.0, base=300))
    sched, _ = step(s, w)
    assert "urgent" in sched
    tokens = run(s, w)
    assert tokens["b"][-1] == expected_tokens([100 + i for i in range(8)], 12)[-1]


def test_fcfs_preempts_the_latest_arrival_even_if_admitted_earlier() -> None:
    s = make_scheduler(num_gpu_blocks=6, block_size=4)
    w = SimWorker(4)
    late = req("late", 8, max_tokens=12, arrival=5.0)
    early = req("early", 8, max_tokens=12, arrival=1.0, base=100)
    s.add_request(late)  # admitted first, but arrived later
    step(s, w)
    s.add_request(early)
    while s.num_preemptions == 0:
        step(s, w)
    assert [r.request_id for r in s.waiting] == ["late"]
