"""De-identification on a real server: the engine receives placeholders (its prompt token ids are
those of the redacted text), "reversible" restores them in the response, and no identifier value
reaches the server log or the audit log (request logging is on, at DEBUG)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.server.conftest import RunningServer
from tests.tenants.conftest import audit_lines, headers, metric_value, metrics

PHONE, EMAIL = "13800138000", "li.na@example.com"
VALID_ID, INVALID_ID = "11010519491231002X", "110105194912310021"  # check character X; 1 is wrong
CARD = "4111 1111 1111 1111"  # Luhn-valid
MRN = "HN-204518"  # the tenant's pattern replaces the digits
PROMPT = (f"Patient phone {PHONE}, mail {EMAIL}; ID {VALID_ID} (not {INVALID_ID}); card {CARD}; "
          f"record {MRN}.")  # fmt: skip
REDACTED = ("Patient phone <PHONE_1>, mail <EMAIL_1>; ID <CN_ID_1> (not 110105194912310021); "
            "card <BANK_CARD_1>; record HN-<MRN_1>.")  # fmt: skip
BLOCK = 16
VALUES = (PHONE, EMAIL, VALID_ID, CARD, CARD.replace(" ", ""), "204518")


def post(server: RunningServer, body: dict[str, Any], route: str = "/completions") -> httpx.Response:
    r = httpx.post(server.v1 + route, json={"model": "tiny", **body}, headers=headers("clinic"), timeout=60)
    assert r.status_code == 200, r.text
    return r


def cached(server: RunningServer, ids: list[int]) -> tuple[float, int]:
    """Tenant ward sends token ids: (engine prefix-cache hits it added, its cached_tokens)."""
    before = metric_value(metrics(server), "vllm:prefix_cache_hits_total")
    r = httpx.post(server.v1 + "/completions", headers=headers("ward"), timeout=60,
                   json={"model": "tiny", "prompt": ids, "max_tokens": 1})  # fmt: skip
    assert r.status_code == 200, r.text
    details = r.json()["usage"].get("prompt_tokens_details") or {}
    return metric_value(metrics(server), "vllm:prefix_cache_hits_total") - before, int(details.get("cached_tokens") or 0)


def tokenize(server: RunningServer, text: str) -> list[int]:
    r = httpx.post(server.base_url + "/tokenize", json={"model": "tiny", "prompt": text}, headers=headers("clinic"))
    return list(r.json()["tokens"])


def test_the_engine_gets_placeholders_and_reversible_restores(tenant_server: RunningServer) -> None:
    expected_ids = tokenize(tenant_server, REDACTED)
    # mask (the tenant's default): the engine's prompt is the redacted text, echoed as such
    masked = post(tenant_server, {"prompt": PROMPT, "max_tokens": 2, "echo": True, "return_token_ids": True}).json()
    assert masked["choices"][0]["prompt_token_ids"] == expected_ids
    assert masked["choices"][0]["text"].startswith(REDACTED)
    # the engine's own prefix cache holds the blocks it computed: those of the redacted token ids
    # (tenant ward shares clinic's cache group), none of the identifiers' text
    full = (len(expected_ids) - 1) // BLOCK * BLOCK
    assert full >= BLOCK
    assert cached(tenant_server, expected_ids) == (full, full)
    assert cached(tenant_server, tokenize(tenant_server, PROMPT)) == (0, 0)

    # reversible: the model is made to write placeholders (regex); the caller reads the values
    body = {"prompt": PROMPT, "deidentify": "reversible", "max_tokens": 120, "return_token_ids": True,
            "guided_regex": "<PHONE_1> or <EMAIL_1> <CN_ID_1>"}  # fmt: skip
    choice = post(tenant_server, body).json()["choices"][0]
    assert choice["prompt_token_ids"] == expected_ids
    assert choice["text"] == f"{PHONE} or {EMAIL} {VALID_ID}"
    generated = httpx.post(tenant_server.base_url + "/detokenize", headers=headers("clinic"),
                           json={"model": "tiny", "tokens": choice["token_ids"]}).json()["prompt"]
    assert generated.removesuffix("</s>") == "<PHONE_1> or <EMAIL_1> <CN_ID_1>"  # what the model produced
    assert choice["output_validation"] == {"valid": True, "error": None}

    # streamed (chat): placeholders split across deltas are restored too
    with httpx.stream("POST", tenant_server.v1 + "/chat/completions", headers=headers("clinic"), timeout=60,
                      json={"model": "tiny", "stream": True, "deidentify": "reversible", "max_tokens": 120,
                            "messages": [{"role": "user", "content": PROMPT}],
                            "guided_regex": "<BANK_CARD_1>!<PHONE_1>"}) as r:  # fmt: skip
        assert r.status_code == 200
        text = ""
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for c in chunk["choices"]:
                    text += c["delta"].get("content") or ""
    assert text == f"{CARD}!{PHONE}"

    # token ids cannot be de-identified: refused when de-identification is on
    r = httpx.post(tenant_server.v1 + "/completions", headers=headers("clinic"),
                   json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"

    count = metric_value(metrics(tenant_server), "pagedserve:tenant_deidentified_entities_total", tenant="clinic")
    assert count == 3 * 5  # five identifiers in each of the three requests (the invalid ID is none)

    # no value in any log line or audit line (the request log shows the redacted prompt)
    log = tenant_server.log()
    assert "Received request" in log and "<PHONE_1>" in log
    audit = (tenant_server.audit_path.read_text() if tenant_server.audit_path else "")
    for value in VALUES:
        assert value not in log, value
        assert value not in audit, value
    assert any(a["tenant"] == "clinic" and a["status"] == "ok" for a in audit_lines(tenant_server))
