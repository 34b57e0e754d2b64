"""Audit log hash chain: verifies when intact; any edit, deletion or reordering is found."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from pagedserve.ops.audit import (
    FIELDS,
    GENESIS_HASH,
    AuditLog,
    AuditLogClosedError,
    canonical_bytes,
    load_audit_key,
    mac_hex,
)
from pagedserve.ops.audit_verify import audit_main, verify_audit_log

PROMPT = "my secret prompt about the merger"


def _write(path: Path, n: int, start: int = 0) -> list[dict[str, Any]]:
    out = []
    with AuditLog(path) as log:
        for i in range(start, start + n):
            rec = log.record(
                request_id=f"req-{i}",
                tenant="acme" if i % 2 else None,
                model="tiny",
                arrival_time=1000.0 + i,
                finish_time=1000.5 + i,
                prompt_tokens=10 + i,
                completion_tokens=i,
                status="stop",
                input=f"{PROMPT} {i}",
                output=[1, 2, i],
            )
            out.append({"seq": rec.seq, "line_hash": rec.line_hash})
    return out


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_chain_verifies_and_holds_no_text(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    heads = _write(path, 5)
    result = verify_audit_log(path)
    assert (result.ok, result.lines_checked, result.first_bad_line) == (True, 5, None)
    raw = path.read_text()
    assert PROMPT not in raw
    rows = [json.loads(line) for line in raw.splitlines()]
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["prev_hash"] == GENESIS_HASH
    assert all(rows[i]["prev_hash"] == rows[i - 1]["line_hash"] for i in range(1, 5))
    assert set(rows[0]) == set(FIELDS)
    assert rows[2]["input_sha256"] == hashlib.sha256(f"{PROMPT} 2".encode()).hexdigest()
    assert rows[2]["output_sha256"] == hashlib.sha256(b"[1,2,2]").hexdigest()
    assert heads[-1]["line_hash"] == rows[-1]["line_hash"]


def _edit(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return "x"
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.25
    assert isinstance(value, str)
    return value[:-1] + ("0" if value[-1] != "0" else "1")


@pytest.mark.parametrize("field", FIELDS)
def test_editing_any_field_fails_at_that_line(tmp_path: Path, field: str) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 5)
    lines = _lines(path)
    row = json.loads(lines[2])
    row[field] = _edit(row[field])
    lines[2] = json.dumps(row, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    result = verify_audit_log(path)
    assert not result.ok and result.first_bad_line == 3 and result.lines_checked == 3


def test_byte_level_edit_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 4)
    lines = _lines(path)
    lines[1] = lines[1].replace(b'"model":"tiny"', b'"model":"tinz"')
    path.write_bytes(b"".join(lines))
    assert verify_audit_log(path).first_bad_line == 2
    lines[1] = b"not json\n"
    path.write_bytes(b"".join(lines))
    result = verify_audit_log(path)
    assert result.first_bad_line == 2 and "JSON" in result.reason
    row = json.loads(_lines(tmp_path / "audit.jsonl")[0])
    row["extra"] = 1
    lines[1] = json.dumps(row).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    assert verify_audit_log(path).first_bad_line == 2


@pytest.mark.parametrize("deleted", [0, 2, 3])
def test_deleting_a_line_is_detected(tmp_path: Path, deleted: int) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 5)
    lines = _lines(path)
    del lines[deleted]
    path.write_bytes(b"".join(lines))
    result = verify_audit_log(path)
    assert not result.ok and result.first_bad_line == deleted + 1


def test_truncated_tail_needs_the_pinned_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    heads = _write(path, 5)
    pinned = (heads[-1]["seq"], heads[-1]["line_hash"])
    assert verify_audit_log(path, expected_head=pinned).ok
    path.write_bytes(b"".join(_lines(path)[:-1]))
    assert verify_audit_log(path, use_checkpoint=False).ok  # a chain alone cannot see a cut at the end ...
    result = verify_audit_log(path, expected_head=pinned, use_checkpoint=False)  # ... the pinned head can
    assert not result.ok and result.first_bad_line == 5
    # A head pinned earlier stays valid while the log grows.
    path2 = tmp_path / "grow.jsonl"
    early = _write(path2, 2)[-1]
    _write(path2, 3, start=2)
    assert verify_audit_log(path2, expected_head=(early["seq"], early["line_hash"])).ok
    bad = verify_audit_log(path2, expected_head=(2, "f" * 64))
    assert not bad.ok and bad.first_bad_line == 2
    # A bare head hash (no seq): some line must still have it.
    assert verify_audit_log(path2, expected_head=(None, early["line_hash"])).ok
    assert not verify_audit_log(path2, expected_head=(None, "e" * 64)).ok


def test_reordering_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 5)
    lines = _lines(path)
    lines[1], lines[3] = lines[3], lines[1]
    path.write_bytes(b"".join(lines))
    result = verify_audit_log(path)
    assert not result.ok and result.first_bad_line == 2


def test_reopen_resumes_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 2)
    _write(path, 3, start=2)
    result = verify_audit_log(path)
    assert result.ok and result.lines_checked == 5
    log = AuditLog(path)
    assert log.head[0] == 5
    log.close()
    # Empty file -> starts from genesis.
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    with AuditLog(empty) as log:
        assert log.head == (0, GENESIS_HASH)


def test_refuses_to_extend_a_broken_tail(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 2)
    with path.open("ab") as f:
        f.write(b'{"seq":3,"request_')  # crash mid-write
    with pytest.raises(ValueError, match="partial"):
        AuditLog(path)
    result = verify_audit_log(path)
    assert not result.ok and result.first_bad_line == 3


def test_concurrent_appends_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)

    def worker(t: int) -> None:
        for i in range(40):
            log.record(
                request_id=f"t{t}-{i}", tenant=None, model="m", arrival_time=0.0, finish_time=1.0,
                prompt_tokens=1, completion_tokens=1, status="stop", input="x", output="y",
            )  # fmt: skip

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    result = verify_audit_log(path)
    assert result.ok and result.lines_checked == 160


def test_record_rejects_negative_counts(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.jsonl") as log, pytest.raises(ValueError, match="prompt_tokens"):
        log.record(
            request_id="r", tenant=None, model="m", arrival_time=0, finish_time=0,
            prompt_tokens=-1, completion_tokens=0, status="stop",
        )  # fmt: skip


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    heads = _write(path, 4)
    assert audit_main(["verify", str(path)]) == 0
    assert "OK: 4 lines" in capsys.readouterr().out
    head_arg = f"{heads[-1]['seq']}:{heads[-1]['line_hash']}"
    assert audit_main(["verify", str(path), "--expect-head", head_arg]) == 0
    capsys.readouterr()
    lines = _lines(path)
    lines[2] = lines[2].replace(b'"status":"stop"', b'"status":"okay"')
    path.write_bytes(b"".join(lines))
    assert audit_main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "line 3" in out and "FAIL" in out
    assert audit_main(["verify", str(tmp_path / "missing.jsonl")]) == 1
    with pytest.raises(SystemExit):
        audit_main(["verify", str(path), "--expect-head", "nonsense"])


# ---------------------------------------------------------------------------- keyed chain, checkpoints

KEY = b"audit-key-0123456789-abcdef"


def _write_keyed(path: Path, n: int, key: bytes | None = KEY, close: bool = True, **kw: Any) -> AuditLog:
    log = AuditLog(path, key=key, **kw)
    for i in range(n):
        log.record(
            request_id=f"req-{i}", tenant="acme", model="tiny", arrival_time=1.0 + i, finish_time=2.0 + i,
            prompt_tokens=3, completion_tokens=i, status="ok", input="p", output="o",
            client_request_id="client-1", key_id="abc123", method="POST", path="/v1/completions",
            http_status=200,
        )  # fmt: skip
    if close:
        log.close()
    return log


def _forge_next(path: Path, key: bytes | None, chain: str = "hmac-sha256", **over: Any) -> bytes:
    """A line an attacker appends: right seq and prev_hash, hashed with `key` (not the real one)."""
    last = json.loads(_lines(path)[-1])
    row = {**last, "seq": last["seq"] + 1, "prev_hash": last["line_hash"], "request_id": "forged",
           "chain": chain, **over}  # fmt: skip
    del row["line_hash"]
    row["line_hash"] = mac_hex(row, key)
    return json.dumps(row, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def test_keyed_lines_are_hmacs_and_need_the_key(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_keyed(path, 4)
    rows = [json.loads(line) for line in _lines(path)]
    assert all(r["chain"] == "hmac-sha256" for r in rows) and set(rows[0]) == set(FIELDS)
    body = {k: v for k, v in rows[1].items() if k != "line_hash"}
    assert rows[1]["line_hash"] == hmac.new(KEY, canonical_bytes(body), hashlib.sha256).hexdigest()
    assert rows[1]["client_request_id"] == "client-1" and rows[1]["http_status"] == 200
    ok = verify_audit_log(path, key=KEY)
    assert (ok.ok, ok.keyed, ok.lines_checked, ok.notes) == (True, True, 4, [])
    no_key = verify_audit_log(path)
    assert not no_key.ok and "--key-file" in no_key.reason and no_key.first_bad_line is None
    wrong = verify_audit_log(path, key=b"another-key-0123456789")
    assert not wrong.ok and wrong.first_bad_line == 1 and "forged without the key" in wrong.reason


@pytest.mark.parametrize("forger_key", [None, b"guessed-key-0123456789"])
def test_forged_appended_line_is_found(tmp_path: Path, forger_key: bytes | None) -> None:
    path = tmp_path / "audit.jsonl"
    _write_keyed(path, 5)
    chain = "sha256" if forger_key is None else "hmac-sha256"
    with path.open("ab") as f:
        f.write(_forge_next(path, forger_key, chain=chain))
    result = verify_audit_log(path, key=KEY)
    assert not result.ok and result.first_bad_line == 6
    # Without the key, the checkpoint alone shows it: the writer closed the log at line 5.
    plain = tmp_path / "plain.jsonl"
    _write_keyed(plain, 5, key=None)
    with plain.open("ab") as f:
        f.write(_forge_next(plain, None, chain="sha256"))
    result = verify_audit_log(plain)
    assert not result.ok and result.first_bad_line == 6 and "after the writer closed" in result.reason


def test_rechained_tail_is_found(tmp_path: Path) -> None:
    for key in (KEY, None):
        path = tmp_path / f"audit-{key is None}.jsonl"
        _write_keyed(path, 5, key=key)
        lines = _lines(path)
        kept = b"".join(lines[:3])
        path.write_bytes(kept)
        # Line 4 edited, then 4 and 5 re-chained as the attacker can (without the real key).
        fake_key = None if key is None else b"guessed-key-0123456789"
        chain = "sha256" if key is None else "hmac-sha256"
        for _ in range(2):
            with path.open("ab") as f:
                f.write(_forge_next(path, fake_key, chain=chain, completion_tokens=0))
        assert len(_lines(path)) == 5
        result = verify_audit_log(path, key=key)
        assert not result.ok
        # keyed: the first re-chained line fails its HMAC; unkeyed: the chain is valid again,
        # only the checkpoint's head shows the rewrite.
        assert result.first_bad_line == (4 if key else 5), result
        if key is None:
            assert "re-chained" in result.reason


def test_truncation_is_found_by_the_checkpoint(tmp_path: Path) -> None:
    for key in (KEY, None):
        path = tmp_path / f"audit-{key is None}.jsonl"
        _write_keyed(path, 5, key=key)
        path.write_bytes(b"".join(_lines(path)[:-2]))  # the last two lines deleted
        result = verify_audit_log(path, key=key)
        assert not result.ok and result.first_bad_line == 4 and "lines deleted" in result.reason
        # The attacker also deletes the checkpoint: a keyed log without one does not verify.
        Path(str(path) + ".checkpoint").unlink()
        result = verify_audit_log(path, key=key)
        assert result.ok is (key is None)
        if key is not None:
            assert "missing" in result.reason
        else:
            assert any("cannot be detected" in n for n in result.notes)


def test_empty_file_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_keyed(path, 3)
    path.write_bytes(b"")
    result = verify_audit_log(path, key=KEY)
    assert not result.ok and result.first_bad_line == 1
    # An empty log with no checkpoint cannot be told from a truncated one, key or not.
    Path(str(path) + ".checkpoint").unlink()
    for key in (KEY, None):
        result = verify_audit_log(path, key=key)
        assert not result.ok and "empty log" in result.reason and result.first_bad_line == 1
    # A forged unkeyed checkpoint for the empty file does not pass a keyed verify.
    AuditLog(path).close()
    result = verify_audit_log(path, key=KEY)
    assert not result.ok and "checkpoint is 'sha256'" in result.reason
    # A genuinely empty log (writer opened and closed it) verifies.
    fresh = tmp_path / "fresh.jsonl"
    AuditLog(fresh, key=KEY).close()
    assert verify_audit_log(fresh, key=KEY).ok


def test_checkpoint_interval_and_running_writer(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _write_keyed(path, 7, close=False, checkpoint_interval=3)
    cp = json.loads(Path(str(path) + ".checkpoint").read_text())
    assert (cp["seq"], cp["closed"], cp["head"]) == (6, False, json.loads(_lines(path)[5])["line_hash"])
    running = verify_audit_log(path, key=KEY)  # one line after the last checkpoint: fine
    assert running.ok and any("after the last checkpoint" in n for n in running.notes)
    log.close()
    cp = json.loads(Path(str(path) + ".checkpoint").read_text())
    assert (cp["seq"], cp["closed"]) == (7, True)
    assert verify_audit_log(path, key=KEY).ok
    # An edited checkpoint fails its MAC.
    cp["seq"] = 3
    Path(str(path) + ".checkpoint").write_text(json.dumps(cp))
    result = verify_audit_log(path, key=KEY)
    assert not result.ok and "checkpoint mac" in result.reason
    # Unkeyed, writer not closed: more lines past the checkpoint than its interval allows.
    plain = tmp_path / "plain.jsonl"
    _write_keyed(plain, 4, key=None, close=False, checkpoint_interval=2)
    for _ in range(3):
        with plain.open("ab") as f:
            f.write(_forge_next(plain, None, chain="sha256"))
    result = verify_audit_log(plain)
    assert not result.ok and result.first_bad_line == 7 and "beyond the checkpoint" in result.reason


def test_writer_refuses_what_it_cannot_extend(tmp_path: Path) -> None:
    keyed, plain = tmp_path / "keyed.jsonl", tmp_path / "plain.jsonl"
    _write_keyed(keyed, 2)
    _write_keyed(plain, 2, key=None)
    with pytest.raises(ValueError, match="without an audit key"):
        AuditLog(keyed)
    with pytest.raises(ValueError, match="with this audit key"):
        AuditLog(keyed, key=b"another-key-0123456789")
    with pytest.raises(ValueError, match="with this audit key"):
        AuditLog(plain, key=KEY)
    _write_keyed(keyed, 2)  # the same key continues the chain
    assert verify_audit_log(keyed, key=KEY).lines_checked == 4
    # A truncated log is not silently extended (that would rewrite the checkpoint over the evidence).
    keyed.write_bytes(b"".join(_lines(keyed)[:-1]))
    with pytest.raises(ValueError, match="does not match its checkpoint"):
        AuditLog(keyed, key=KEY)
    Path(str(keyed) + ".checkpoint").unlink()
    with pytest.raises(ValueError, match="checkpoint .* is missing"):
        AuditLog(keyed, key=KEY)
    with pytest.raises(ValueError, match="checkpoint_interval"):
        AuditLog(tmp_path / "x.jsonl", checkpoint_interval=0)


def test_legacy_v1_log_still_verifies(tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    prev, out = GENESIS_HASH, b""
    for seq in (1, 2):  # what the first format wrote: no chain / client id / http fields
        row: dict[str, Any] = {
            "seq": seq, "request_id": f"r{seq}", "tenant": None, "model": "m", "arrival_time": 0.0,
            "finish_time": 1.0, "prompt_tokens": 1, "completion_tokens": 1, "status": "ok",
            "input_sha256": None, "output_sha256": None, "prev_hash": prev,
        }  # fmt: skip
        row["line_hash"] = hashlib.sha256(canonical_bytes(row)).hexdigest()
        prev = row["line_hash"]
        out += canonical_bytes(row) + b"\n"
    path.write_bytes(out)
    result = verify_audit_log(path)
    assert result.ok and not result.keyed and any("UNKEYED" in n for n in result.notes)
    assert not verify_audit_log(path, key=KEY).ok  # with a key, unkeyed lines are refused
    with pytest.raises(ValueError):
        AuditLog(path, key=KEY)
    _write_keyed(path, 1, key=None)  # an unkeyed writer extends it in the new format
    assert verify_audit_log(path).lines_checked == 3


def test_load_audit_key(tmp_path: Path) -> None:
    key_file = tmp_path / "audit.key"
    key_file.write_text("file-key-0123456789abcdef\n")
    env = {"PAGEDSERVE_AUDIT_KEY": "env-key-0123456789abcdef"}
    assert load_audit_key(key_file, env) == b"file-key-0123456789abcdef"  # the file wins
    assert load_audit_key(None, env) == b"env-key-0123456789abcdef"
    assert load_audit_key(None, {}) is None
    key_file.write_text("short\n")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        load_audit_key(key_file, {})


def test_closed_log_and_shutdown_status(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    assert log.cut_status == "aborted"
    log.begin_shutdown()
    assert log.cut_status == "shutdown"
    log.close()
    log.close()  # idempotent
    with pytest.raises(AuditLogClosedError):
        log.record(request_id="r", tenant=None, model="m", arrival_time=0, finish_time=0, prompt_tokens=0,
                   completion_tokens=0, status="ok")  # fmt: skip


def test_cli_keyed(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(KEY + b"\n")
    _write_keyed(path, 3)
    monkeypatch.delenv("PAGEDSERVE_AUDIT_KEY", raising=False)
    assert audit_main(["verify", str(path), "--key-file", str(key_file)]) == 0
    assert "OK: 3 lines verified (keyed, HMAC-SHA256)" in capsys.readouterr().out
    assert audit_main(["verify", str(path)]) == 1
    assert "--key-file" in capsys.readouterr().out
    monkeypatch.setenv("PAGEDSERVE_AUDIT_KEY", KEY.decode())
    moved = tmp_path / "elsewhere.checkpoint"
    Path(str(path) + ".checkpoint").rename(moved)
    assert audit_main(["verify", str(path)]) == 1  # the default checkpoint is gone
    assert "missing" in capsys.readouterr().out
    assert audit_main(["verify", str(path), "--checkpoint", str(moved)]) == 0
    capsys.readouterr()
    head = json.loads(_lines(path)[-1])["line_hash"]
    assert audit_main(["verify", str(path), "--checkpoint", str(moved), "--expect-head", f"3:{head}"]) == 0
    path.write_bytes(b"".join(_lines(path)[:-1]))
    assert audit_main(["verify", str(path), "--checkpoint", str(moved)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "line 3" in out and "lines deleted" in out
    moved.unlink()  # no checkpoint at all, but the pinned head still shows the cut
    assert audit_main(["verify", str(path), "--expect-head", head]) == 1
    assert "pinned head" in capsys.readouterr().out
    plain = tmp_path / "plain.jsonl"
    _write_keyed(plain, 2, key=None)
    monkeypatch.delenv("PAGEDSERVE_AUDIT_KEY")
    assert audit_main(["verify", str(plain)]) == 0
    assert "UNKEYED" in capsys.readouterr().out
