"""Property test: random add / step / abort sequences on small pools (so preemption, swapping,
prefix hits and forks all happen) keep the block accounting exact after every step, produce the
same tokens as an undisturbed run, and leave everything free when the engine is idle.

Two driving orders: synchronous (update each step right after it runs) and async scheduling's
(plan and run step n+1 before the update of step n; step n's tokens reach the scheduler only at
its update, while the worker, like the GPU, already has them). In the async order a "flush" op
updates the step in flight at once, as the engine does after a step that sampled synchronously.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.core.async_scheduler import AsyncScheduler
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.sampling_params import SamplingParams
from tests.core.sim import SimWorker, check_accounting, make_scheduler
from tests.core.test_scheduler import expected_tokens

BLOCK = 4

add_op = st.tuples(
    st.just("add"),
    st.integers(1, 40),  # prompt length
    st.integers(1, 12),  # max tokens
    st.integers(1, 3),  # n
    st.integers(0, 2),  # shared-prefix family (same leading tokens within a family)
    st.integers(0, 3),  # priority
)
ops = st.lists(
    st.one_of(add_op, st.tuples(st.just("step")), st.tuples(st.just("abort"), st.integers(0, 50)),
              st.tuples(st.just("flush"))),
    min_size=8,
    max_size=80,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=ops,
    num_blocks=st.integers(12, 40),
    mode=st.sampled_from(["recompute", "swap"]),
    policy=st.sampled_from(["fcfs", "priority"]),
    caching=st.booleans(),
    budget=st.sampled_from([8, 16, 64]),
    chunked=st.booleans(),
    async_order=st.booleans(),
)
def test_random_workloads_keep_exact_accounting(
    ops: list[tuple], num_blocks: int, mode: str, policy: str, caching: bool, budget: int,
    chunked: bool, async_order: bool,
) -> None:
    s = make_scheduler(
        num_gpu_blocks=num_blocks, num_cpu_blocks=16, block_size=BLOCK, max_num_seqs=6,
        # without chunking a whole prompt must fit the budget (the config enforces this)
        max_num_batched_tokens=budget if chunked else num_blocks * BLOCK,
        max_model_len=num_blocks * BLOCK, enable_prefix_caching=caching, preemption_mode=mode,
        policy=policy, enable_chunked_prefill=chunked,
        scheduler_cls=AsyncScheduler if async_order else Scheduler,
    )
    w = SimWorker(BLOCK)
    prompts: dict[str, list[int]] = {}
    max_tokens: dict[str, int] = {}
    produced: dict[str, list[int]] = {}
    aborted: set[str] = set()
    ids: list[str] = []
    clock = 0.0

    in_flight: list[tuple] = []  # async order: the (plan, worker output) not yet updated

    def update(plan, result) -> None:
        for out in s.update_from_output(plan, result):
            produced.setdefault(out.req_id, []).extend(out.new_token_ids)
        check_accounting(s)

    def flush() -> None:
        while in_flight:
            update(*in_flight.pop(0))

    def do_step() -> None:
        plan = s.schedule()
        result = w.execute(plan)
        check_accounting(s)
        if async_order:
            in_flight.append((plan, result))
            if len(in_flight) == 2:
                update(*in_flight.pop(0))
        else:
            update(plan, result)

    for op in ops:
        if op[0] == "add":
            _, plen, mt, n, family, priority = op
            clock += 1.0
            prompt = [family * 1000 + i for i in range(plen)]
            if plen + mt > num_blocks * BLOCK:
                continue
            children = []
            for _ in range(n):
                rid = f"r{len(ids)}"
                ids.append(rid)
                prompts[rid], max_tokens[rid] = prompt, mt
                children.append(Request(
                    rid, prompt, SamplingParams(max_tokens=mt, ignore_eos=True), None,
                    arrival_time=clock, priority=priority,
                ))
            if plen > 1:
                children[0].followers = children[1:]
                s.add_request(children[0])
            else:
                for child in children:
                    s.add_request(child)
        elif op[0] == "step":
            do_step()
        elif op[0] == "flush":
            flush()
        else:
            if ids:
                victim = ids[op[1] % len(ids)]
                request = s.requests.get(victim)
                if request is not None:  # followers not yet forked go with their leader
                    aborted.update(f.request_id for f in request.followers)
                s.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
                aborted.add(victim)
                check_accounting(s)

    for _ in range(2000):
        if not s.has_unfinished_requests():
            break
        do_step()
    flush()  # its results belong to finished requests: dropped
    assert not s.has_unfinished_requests()
    check_accounting(s)
    assert s.kv.pool.num_free_blocks == num_blocks
    assert s.kv.swap_space.num_free_blocks == 16
    assert not s.running and not s.waiting and not s.swapped
    for rid in ids:
        if rid in aborted:
            continue
        assert produced.get(rid) == expected_tokens(prompts[rid], max_tokens[rid]), rid
