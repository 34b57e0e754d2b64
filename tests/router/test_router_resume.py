"""Mid-stream resume on fake backends: a stream cut after k tokens continues on another backend
and the client sees one stream equal to the undisturbed one, with one id and correct usage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.router.conftest import region, running_router, wait_for
from tests.router.fakes import expected_chat, expected_completion, generate, render_chat, sse_events

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me"}]


def _stream(url: str, path: str, body: dict[str, Any]) -> list[Any]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return sse_events(r.iter_lines())


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_completion_stream_resumes_exactly(fakes: Any, tmp_path: Path) -> None:
    a, b = fakes("a", die_after=5, cut_remaining=1), fakes("b")
    prompt = "the quick brown fox"
    with running_router({"regions": [region("a", 0, a), region("b", 1, b)]}, tmp_path) as (_, url):
        events = _stream(url, "/v1/completions", {"prompt": prompt, "max_tokens": 16,
                                                   "stream_options": {"include_usage": True}})
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        chunks = events[:-1]
        assert all("error" not in c for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected_completion(prompt, 16)
        assert {c["id"] for c in chunks} == {"cmpl-a-1"} and len({c["created"] for c in chunks}) == 1
        assert chunks[-1]["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 16,
                                       "total_tokens": len(prompt) + 16}
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert all(c["choices"][0].get("token_ids") is None for c in chunks if c["choices"])  # not asked for
        cont = b.gen_bodies()[0]  # the continuation: prompt ids + the 5 ids already sent
        ids = [ord(ch) for ch in prompt]
        assert cont["prompt"] == ids + generate(ids, 5) and cont["max_tokens"] == 11
        assert _metric(url, "pagedserve_router_resumed_streams_total") == 1.0


def test_chat_stream_resumes_on_token_ids(fakes: Any, tmp_path: Path) -> None:
    a, b = fakes("a", die_after=3, cut_remaining=1), fakes("b")
    with running_router({"regions": [region("a", 0, a), region("b", 1, b)]}, tmp_path) as (_, url):
        events = _stream(url, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 10,
                                                        "stream_options": {"include_usage": True}})
        chunks = events[:-1]
        assert events[-1] == "[DONE]" and all("error" not in ch for ch in chunks)
        assert {ch["object"] for ch in chunks} == {"chat.completion.chunk"} and len({ch["id"] for ch in chunks}) == 1
        deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
        assert [d.get("role") for d in deltas].count("assistant") == 1
        assert "".join(d.get("content") or "" for d in deltas) == expected_chat(MSGS, 10)
        assert all(ch["choices"][0]["token_ids"] is None and ch["prompt_token_ids"] is None
                   for ch in chunks if ch["choices"])  # not asked for
        assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == "length"
        prompt_len = len(render_chat({"messages": MSGS}))
        assert chunks[-1]["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 10,
                                       "total_tokens": prompt_len + 10}
        cont = b.gen_bodies()[0]  # continued on /v1/completions with the exact ids
        ids = [ord(ch) for ch in render_chat({"messages": MSGS})]
        assert "messages" not in cont and cont["prompt"] == ids + generate(ids, 3) and cont["max_tokens"] == 7


def test_chat_stream_resumes_with_continue_final_message(fakes: Any, tmp_path: Path) -> None:
    old = {"no_token_ids": True}  # backends that do not return token ids: the text continuation
    a = fakes("a", die_after=3, cut_remaining=1, **old)
    b, c = fakes("b", die_after=4, cut_remaining=1, **old), fakes("c", **old)
    with running_router({"regions": [region("a", 0, a), region("b", 1, b), region("c", 2, c)]}, tmp_path) as (_, url):
        events = _stream(url, "/v1/chat/completions", {
            "messages": MSGS, "max_completion_tokens": 12,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        chunks = events[:-1]
        assert events[-1] == "[DONE]" and all("error" not in ch for ch in chunks)
        content = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
        assert sum(1 for d in content if d.get("role")) == 1 and content[0]["role"] == "assistant"
        assert "".join(d.get("content") or "" for d in content) == expected_chat(MSGS, 12)
        assert {ch["id"] for ch in chunks} == {"chatcmpl-a-1"}
        prompt_len = len(render_chat({"messages": MSGS}))
        # continuous usage is the spliced total on every chunk, rising by one per token
        used = [ch["usage"]["completion_tokens"] for ch in chunks if ch["choices"]]
        assert used == list(range(13))
        assert chunks[-1]["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 12,
                                       "total_tokens": prompt_len + 12}
        first_cont, second_cont = b.gen_bodies()[0], c.gen_bodies()[0]
        assert first_cont["continue_final_message"] is True and first_cont["add_generation_prompt"] is False
        assert first_cont["messages"][:-1] == MSGS
        assert first_cont["messages"][-1] == {"role": "assistant", "content": expected_chat(MSGS, 3)}
        assert first_cont["max_completion_tokens"] == 9
        assert second_cont["messages"][-1]["content"] == expected_chat(MSGS, 7)
        assert second_cont["max_completion_tokens"] == 5
        assert _metric(url, "pagedserve_router_resumed_streams_total") == 2.0


def test_return_token_ids_spliced_and_break_after_finish(fakes: Any, tmp_path: Path) -> None:
    a, b = fakes("a", die_after=4, cut_remaining=1), fakes("b", die_at_end=True)
    prompt = [5, 6, 7, 8]
    with running_router({"regions": [region("a", 0, a), region("b", 1, b)]}, tmp_path) as (_, url):
        events = _stream(url, "/v1/completions", {"prompt": prompt, "max_tokens": 10, "return_token_ids": True,
                                                   "stream_options": {"include_usage": True}})
        chunks = [ch for ch in events[:-1] if ch["choices"]]
        assert events[-1] == "[DONE]"
        assert [t for ch in chunks for t in ch["choices"][0]["token_ids"]] == generate(prompt, 10)
        assert [ch["choices"][0]["prompt_token_ids"] for ch in chunks if ch["choices"][0]["prompt_token_ids"]] \
            == [prompt]  # once, the client's own prompt
        # b died after its finish chunk: nothing to resume, the router closes the stream itself
        assert events[-2]["usage"]["completion_tokens"] == 10 and len(c_bodies := b.gen_bodies()) == 1
        assert c_bodies[0]["prompt"] == prompt + generate(prompt, 4)


def test_unresumable_stream_gets_an_error_event(fakes: Any, tmp_path: Path) -> None:
    a, b = fakes("a", die_after=2, cut_remaining=1), fakes("b")
    with running_router({"regions": [region("a", 0, a), region("b", 1, b)]}, tmp_path) as (_, url):
        events = _stream(url, "/v1/completions", {"prompt": "xy", "max_tokens": 8, "n": 2})
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["type"] == "service_unavailable_error"
        assert b.gen_bodies() == []  # n=2 is not resumed: the client is told, not given a wrong splice
        assert _metric(url, "pagedserve_router_broken_streams_total") == 1.0


def test_stream_dying_before_first_token_is_retried_and_non_stream_drop(fakes: Any, tmp_path: Path) -> None:
    a, b = fakes("a", die_after=0, die_non_stream=True, cut_remaining=2), fakes("b")
    cfg = {"regions": [region("a", 0, a), region("b", 1, b)], "breaker": {"failure_threshold": 5, "open_s": 1}}
    with running_router(cfg, tmp_path) as (_, url):
        events = _stream(url, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 6})
        content = [ch["choices"][0]["delta"] for ch in events[:-1] if ch["choices"]]
        assert sum(1 for d in content if d.get("role")) == 1
        assert "".join(d.get("content") or "" for d in content) == expected_chat(MSGS, 6)
        assert b.gen_bodies()[0]["messages"] == MSGS  # nothing was generated: the original request
        r = httpx.post(url + "/v1/completions", json={"prompt": "q", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_completion("q", 4)
        assert len(a.gen_bodies()) == 2 and len(b.gen_bodies()) == 2


def test_resume_deadline_counts_from_the_break(fakes: Any, tmp_path: Path) -> None:
    a, b = fakes("a", die_after=6, cut_remaining=1, delay_s=0.1), fakes("b")
    cfg = {"regions": [region("a", 0, a), region("b", 1, b)], "retry_deadline_s": 0.3}
    with running_router(cfg, tmp_path) as (_, url):
        # the stream breaks >= 0.6 s after it started, past retry_deadline_s: it is still resumed
        events = _stream(url, "/v1/completions", {"prompt": "slow", "max_tokens": 10})
        assert all("error" not in e for e in events[:-1])
        assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == expected_completion("slow", 10)


def test_held_back_tokens_are_regenerated(fakes: Any, tmp_path: Path) -> None:
    # Token 4's text is held back (as a server holds an incomplete UTF-8 sequence) and the backend
    # dies before token 5 would have carried it: the id was sent, its text was not.
    a, b = fakes("a", die_after=5, cut_remaining=1, hold_back=(4,)), fakes("b")
    prompt = "held back"
    with running_router({"regions": [region("a", 0, a), region("b", 1, b)]}, tmp_path) as (_, url):
        events = _stream(url, "/v1/completions", {"prompt": prompt, "max_tokens": 9, "return_token_ids": True,
                                                   "stream_options": {"include_usage": True}})
        assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == expected_completion(prompt, 9)
        ids = [t for e in events[:-1] if e["choices"] for t in e["choices"][0]["token_ids"]]
        assert ids == generate([ord(ch) for ch in prompt], 9)  # the regenerated id is not sent twice
        assert events[-2]["usage"]["completion_tokens"] == 9
        ids = [ord(ch) for ch in prompt]
        cont = b.gen_bodies()[0]
        assert cont["prompt"] == ids + generate(ids, 4) and cont["max_tokens"] == 5  # token 4 regenerated


def test_losing_a_backend_then_a_region_under_load_loses_nothing(fakes: Any, tmp_path: Path) -> None:
    import threading

    a1, a2 = fakes("a1", delay_s=0.15), fakes("a2", delay_s=0.15)  # streams outlive the 1 s grace
    b1, b2 = fakes("b1", delay_s=0.02), fakes("b2", delay_s=0.02)
    cfg = {"regions": [region("a", 0, a1, a2), region("b", 1, b1, b2)], "affinity": {"prefix": False}}
    failures: list[str] = []
    served = 0
    stop = threading.Event()

    def client(i: int, url: str) -> None:
        nonlocal served
        n = 0
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                n += 1
                chat, prompt = n % 2 == 0, f"c{i}-{n}"
                path = "/v1/chat/completions" if chat else "/v1/completions"
                body: dict[str, Any] = {"max_tokens": 10}
                body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
                want = expected_chat(body["messages"], 10) if chat else expected_completion(prompt, 10)
                try:
                    if n % 3 == 0:
                        r = http.post(url + path, json=body)
                        c = r.json()["choices"][0]
                        text = c["message"]["content"] if chat else c["text"]
                    else:
                        with http.stream("POST", url + path, json={**body, "stream": True}) as r:
                            events = sse_events(r.iter_lines())
                        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
                        key = "delta" if chat else None
                        text = "".join((e["choices"][0][key].get("content") or "") if key else e["choices"][0]["text"]
                                       for e in events[:-1] if e["choices"])
                    if text != want:
                        failures.append(f"{prompt}: {text!r} != {want!r}")
                except (httpx.HTTPError, AssertionError, KeyError, ValueError) as e:
                    failures.append(f"{prompt}: {e!r}")
                served += 1

    with running_router(cfg, tmp_path) as (_, url):
        threads = [threading.Thread(target=client, args=(i, url)) for i in range(3)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: served >= 6, what="load")
            a1.stop()  # one backend goes (its in-flight streams are cut after 1 s of grace)
            seen = served
            wait_for(lambda: served >= seen + 6, what="load after one backend died")
            a2.stop()  # then the whole region
            seen = served
            wait_for(lambda: served >= seen + 9, what="load after the region died")
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert failures == []
        assert len(b1.gen_bodies()) + len(b2.gen_bodies()) >= 9  # region b took over
