"""Unit tests without a server: recognizers, de-identification, policies, the limiter, labels,
output post-checks."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from pagedserve.ops.auth import read_key_file
from pagedserve.ops.deid import Deidentifier, cn_id_is_valid, find_identifiers, luhn_is_valid, recognizers_for
from pagedserve.ops.output_check import check_for
from pagedserve.ops.rate_limit import WINDOW_S, LimitExceeded, TenantLimiter
from pagedserve.ops.tenants import OTHER_LABEL, TenantContext, TenantLabels, TenantPolicy, load_registry
from pagedserve.sampling_params import StructuredOutputsParams


def cn_id(first17: str) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return first17 + "10X98765432"[sum(int(d) * w for d, w in zip(first17, weights)) % 11]


# ---------------------------------------------------------------------------- recognizers


def test_resident_id_checksum_and_birth_date() -> None:
    good = cn_id("44030419900307123")
    assert cn_id_is_valid(good) and cn_id_is_valid("11010519491231002X")
    assert not cn_id_is_valid(good[:-1] + ("0" if good[-1] != "0" else "1"))  # wrong check character
    assert not cn_id_is_valid(cn_id("44030419901307123"))  # month 13: right checksum, no such date
    assert not cn_id_is_valid(good[:17])


def test_luhn() -> None:
    assert luhn_is_valid("4111 1111 1111 1111") and luhn_is_valid("6222-0212-3456-7898-121")
    assert not luhn_is_valid("4111 1111 1111 1112") and not luhn_is_valid("4111")


@pytest.mark.parametrize(("text", "entities"), [
    ("call +86 138-0013-8000 now", ["PHONE"]),
    ("office 010-62751234", ["PHONE"]),
    ("US (415) 555-2671 or 415-555-2671", ["PHONE", "PHONE"]),
    ("mail a.b+c@mail.example.co.uk.", ["EMAIL"]),
    ("DOB: 1980-03-14 and date of birth 14 March 1980; 出生日期：1990年3月7日", ["DOB", "DOB", "DOB"]),
    ("MRN: A1234567; 病历号：ZY2023001", ["MRN", "MRN"]),
    ("Patient: John Smith saw Dr. Alice Wong", ["NAME", "NAME"]),
    ("姓名：张三，联系人：李四", ["NAME", "NAME"]),
    ("Address: 1 Main St, Springfield\nnext", ["ADDRESS"]),
    ("lives at 221 Baker Street.", ["ADDRESS"]),
    ("住址：北京市海淀区中关村大街27号", ["ADDRESS"]),
])  # fmt: skip
def test_recognizers_find(text: str, entities: list[str]) -> None:
    assert [f.entity for f in find_identifiers(text, recognizers_for())] == entities


@pytest.mark.parametrize("text", [
    "order 12345 costs 3.50 on 2024-01-02", "version 1.2.3, ip 10.0.0.1, year 2023",
    "card 4111 1111 1111 1112 (bad Luhn)", "ID 110105194912310021 (bad checksum)", "the patient is stable",
])  # fmt: skip
def test_no_false_positives(text: str) -> None:
    assert find_identifiers(text, recognizers_for()) == []


def test_redact_is_consistent_and_restores() -> None:
    d = Deidentifier("reversible")
    a = d.redact("phone 13800138000, again 13800138000, other 13900139000")
    b = d.redact("mail x@y.org then 13900139000")
    assert a == "phone <PHONE_1>, again <PHONE_1>, other <PHONE_2>"
    assert b == "mail <EMAIL_1> then <PHONE_2>"
    assert d.restore("<PHONE_2> and <EMAIL_1> and <PHONE_9>") == "13900139000 and x@y.org and <PHONE_9>"
    assert Deidentifier("mask").restore("<PHONE_1>") == "<PHONE_1>"


def test_a_placeholder_in_the_input_is_never_reused() -> None:
    d = Deidentifier("reversible")
    out = d.redact("literal <PHONE_1> and 13800138000")
    assert out == "literal <PHONE_1> and <PHONE_2>"
    assert d.restore(out) == "literal <PHONE_1> and 13800138000"


def test_stream_restorer_across_any_split() -> None:
    d = Deidentifier("reversible")
    text = d.redact("a 13800138000 b x@y.org c") + " <PHONE tail <"
    expected = "a 13800138000 b x@y.org c <PHONE tail <"
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        s = d.stream_restorer()
        got = "".join(s.feed(p, final=k == len(pieces) - 1) for k, p in enumerate(pieces))
        assert got == expected


def test_tenant_mrn_pattern() -> None:
    d = Deidentifier("mask", recognizers_for([r"\bHN-(?P<value>\d{6})\b"]))
    assert d.redact("record HN-204518 ok") == "record HN-<MRN_1> ok"
    with pytest.raises(ValueError, match="does not compile"):
        recognizers_for(["("])


# ---------------------------------------------------------------------------- policies


def test_key_file_policy_fields_keep_old_lines_valid(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-old\nsk-t acme\nsk-p bank rpm=10 tpm=1000 concurrency=2 models=a,b priority=batch "
                    "deidentify=reversible cache_group=g  # comment\nsk-p2 bank rpm=10 tpm=1000 concurrency=2 "
                    "models=a,b priority=batch deidentify=reversible cache_group=g\n")  # fmt: skip
    assert read_key_file(keys) == [("sk-old", None), ("sk-t", "acme"), ("sk-p", "bank"), ("sk-p2", "bank")]
    reg = load_registry(None, keys)
    p = reg.tenants["bank"]
    assert (p.requests_per_minute, p.tokens_per_minute, p.max_concurrent) == (10, 1000, 2)
    assert p.allowed_models == frozenset({"a", "b"}) and p.priority_class == "batch"
    assert p.deidentify == "reversible" and p.cache_group == "g"
    assert reg.resolve("acme").policy == TenantPolicy()
    for bad, match in [("k t rpm=0", "positive integer"), ("k t color=red", "unknown tenant policy field"),
                       ("k t priority=urgent", "priority_class"), ("k rpm=5", "need a tenant"),
                       ("k t rpm=1\nk2 t rpm=2", "different policy")]:  # fmt: skip
        keys.write_text(bad + "\n")
        with pytest.raises(ValueError, match=match):
            load_registry(None, keys)


def test_config_file_defaults_tenants_routes_and_jwt_claims(tmp_path: Path) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text("defaults: {requests_per_minute: 100}\ntenants:\n  acme: {max_tokens: 64}\n"
                   "routes:\n  /v1/chat/completions: {output: {regex: '[0-9]+'}}\n")  # fmt: skip
    reg = load_registry(cfg, None)
    assert reg.resolve(None).policy.requests_per_minute == 100
    assert reg.resolve("acme").policy == TenantPolicy(requests_per_minute=100, max_tokens=64)
    assert reg.resolve("acme", {"max_tokens": 8, "priority_class": "interactive"}).policy.max_tokens == 8
    assert reg.route_output("/v1/chat/completions").regex == "[0-9]+"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="max_tokens"):
        reg.resolve("acme", {"max_tokens": -1})


def test_cache_salts() -> None:
    a = TenantContext("a", "a", TenantPolicy())
    b = TenantContext("b", "b", TenantPolicy())
    g1 = TenantContext("x", "x", TenantPolicy(cache_group="pub"))
    g2 = TenantContext("y", "y", TenantPolicy(cache_group="pub"))
    anon = TenantContext(None, "anonymous", TenantPolicy())
    assert a.cache_salt(None) != b.cache_salt(None) and g1.cache_salt(None) == g2.cache_salt(None)
    assert anon.cache_salt(None) is None
    # no request salt reproduces another tenant's salt
    assert b.cache_salt(a.cache_salt(None)) != a.cache_salt(None)
    assert anon.cache_salt(a.cache_salt(None)) != a.cache_salt(None)


def test_labels_are_bounded() -> None:
    labels = TenantLabels(["configured"], limit=2)
    assert [labels.label(t) for t in ("j1", "j2", "j3", "configured", "j1", None)] == [
        "j1", "j2", OTHER_LABEL, "configured", "j1", "anonymous"]  # fmt: skip


# ---------------------------------------------------------------------------- limiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_sliding_window_and_retry_after() -> None:
    clock = Clock()
    lim = TenantLimiter(clock)
    ctx = TenantContext("t", "t", TenantPolicy(requests_per_minute=2))
    lim.admit(ctx, 1, 1).release()
    clock.now += 10
    lim.admit(ctx, 1, 1).release()
    with pytest.raises(LimitExceeded) as e:
        lim.admit(ctx, 1, 1)
    assert e.value.limit == "requests_per_minute" and e.value.retry_after_s == pytest.approx(WINDOW_S - 10)
    clock.now += WINDOW_S - 10  # the first one leaves the window
    lim.admit(ctx, 1, 1)


def test_tokens_reserved_then_refunded() -> None:
    clock = Clock()
    lim = TenantLimiter(clock)
    ctx = TenantContext("t", "t", TenantPolicy(tokens_per_minute=100))
    first = lim.admit(ctx, 10, 60)  # 70 reserved
    with pytest.raises(LimitExceeded, match="tokens_per_minute"):
        lim.admit(ctx, 10, 30)  # 70 + 40 > 100 while the first may still use its 60
    first.completion_tokens = 5
    first.release()  # used 15: 55 refunded
    second = lim.admit(ctx, 10, 60)
    assert lim.state("t").tokens_in_window == 15 + 70
    second.release()
    clock.now += WINDOW_S
    lim.admit(ctx, 10, 90)
    with pytest.raises(LimitExceeded, match="Request too large"):
        lim.admit(ctx, 1, 100)


def test_concurrent_admissions_never_exceed_the_cap() -> None:
    """200 tasks interleaving at random: the number holding a lease, counted by the tasks
    themselves, never passes the cap, and every refusal names max_concurrent."""
    lim = TenantLimiter()
    ctx = TenantContext("t", "t", TenantPolicy(max_concurrent=3))
    rng = random.Random(1)
    active = peak = refused = 0

    async def one() -> None:
        nonlocal active, peak, refused
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
        try:
            lease = lim.admit(ctx, 1, 1)
        except LimitExceeded as e:
            assert e.limit == "max_concurrent"
            refused += 1
            return
        active += 1
        peak = max(peak, active)
        for _ in range(rng.randrange(1, 5)):
            await asyncio.sleep(0)
        active -= 1
        lease.release()
        lease.release()  # idempotent

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(200)))

    asyncio.run(main())
    assert peak == 3 and lim.peak(ctx) == 3 and lim.in_flight(ctx) == 0 and refused > 0


# ---------------------------------------------------------------------------- output checks


def test_output_checks() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    check = check_for(StructuredOutputsParams(json=schema))
    assert check is not None
    assert check.check('{"n": 3}') is None
    assert "not valid JSON" in (check.check('{"n": ') or "")
    assert "schema" in (check.check('{"n": "x"}') or "")
    regex = check_for(StructuredOutputsParams(regex="[0-9]+"))
    assert regex is not None and regex.check("123") is None and regex.check("12a") is not None
    choice = check_for(StructuredOutputsParams(choice=["yes", "no"]))
    assert choice is not None and choice.check("no") is None and choice.check("maybe") is not None
    assert check_for(StructuredOutputsParams(grammar='root ::= "a"')) is None
    assert check_for(None) is None


def test_jwt_policy_claim_reaches_the_tenant_policy() -> None:
    import time

    import jwt

    from pagedserve.ops.auth import AuthConfig, Authenticator

    auth = Authenticator(AuthConfig(jwt_secret="s" * 32, jwt_audience="aud", policy_claim="limits"), environ={})
    claims = {"tenant": "bank", "aud": "aud", "exp": time.time() + 60,
              "limits": {"rpm": 7, "priority_class": "batch", "deidentify": "mask"}}  # fmt: skip
    principal = auth.authenticate("Bearer " + jwt.encode(claims, "s" * 32, algorithm="HS256"))
    ctx = load_registry(None, None).resolve(principal.tenant, principal.policy)
    assert ctx.policy == TenantPolicy(requests_per_minute=7, priority_class="batch", deidentify="mask")
    assert ctx.priority_class == "batch"


def test_tenant_middleware_sets_state_releases_leases_and_refuses_bad_claims() -> None:
    from pagedserve.ops.auth import Principal
    from pagedserve.ops.tenants import TenantMiddleware, TenantRegistry

    registry = TenantRegistry(tenants={"bank": TenantPolicy(priority_class="batch", max_concurrent=1)})
    limiter = TenantLimiter()
    seen: dict[str, object] = {}
    sent: list[dict[str, object]] = []

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        state = scope["state"]
        seen.update(priority_class=state["priority_class"], tenant=state["tenant"].name)
        state["tenant_lease"] = limiter.admit(state["tenant"], 1, 1)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async def receive() -> dict[str, object]:
        return {"type": "http.request"}

    mw = TenantMiddleware(app, registry)  # type: ignore[arg-type]
    bank = Principal(kind="api_key", tenant="bank", key_id="k")
    for _ in range(2):  # the lease ends with the request: the second one fits the cap of 1 again
        asyncio.run(mw({"type": "http", "state": {"principal": bank}}, receive, send))  # type: ignore[arg-type]
    assert seen == {"priority_class": "batch", "tenant": "bank"}
    assert limiter.state("bank").in_flight == 0 and limiter.state("bank").peak_in_flight == 1
    bad = Principal(kind="jwt", tenant="bank", key_id="j", policy={"rpm": "lots"})
    asyncio.run(mw({"type": "http", "state": {"principal": bad}}, receive, send))  # type: ignore[arg-type]
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 401


def test_output_check_leaves_bad_specs_to_the_compiler() -> None:
    assert check_for(StructuredOutputsParams(json='{"type": ')) is None
    assert check_for(StructuredOutputsParams(json="[1, 2]")) is None
    assert check_for(StructuredOutputsParams(regex="(x")) is None
