"""Tamper-evident audit log: one JSON line per request, linked by a SHA-256 hash chain.

Line n (1-based) holds seq = n and:

    body_n      = every field except line_hash, as canonical JSON (sorted keys, no spaces, UTF-8)
    line_hash_n = sha256(body_n)
    prev_hash_n = line_hash_{n-1}            (GENESIS_HASH for n = 1)

    GENESIS ──> [seq 1 | prev=GENESIS | h1] ──> [seq 2 | prev=h1 | h2] ──> [seq 3 | prev=h2 | h3]

Editing any field of a line breaks that line's own line_hash; deleting or reordering lines breaks
seq / prev_hash at the first displaced line. Only the text's and token ids' hashes are stored,
never the prompt or the output. What a hash chain alone cannot show is a cut at the end of the
file: pin the head (`AuditLog.head`, e.g. exported to metrics or a remote log) and pass it to
`verify_audit_log(..., expected_head=...)`.

One writer per file (a lock serialises threads of one process; processes need one file each).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GENESIS_HASH = "0" * 64
FIELDS: tuple[str, ...] = (
    "seq",
    "request_id",
    "tenant",
    "model",
    "arrival_time",
    "finish_time",
    "prompt_tokens",
    "completion_tokens",
    "status",
    "input_sha256",
    "output_sha256",
    "prev_hash",
    "line_hash",
)


def canonical_bytes(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def payload_sha256(payload: str | Sequence[int] | None) -> str | None:
    """SHA-256 of a text (its UTF-8 bytes) or of token ids (their JSON list, e.g. b"[1,2,3]")."""
    if payload is None:
        return None
    if isinstance(payload, str):
        data = payload.encode("utf-8")
    else:
        data = json.dumps([int(t) for t in payload], separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()


@dataclass(slots=True)
class AuditRecord:
    seq: int
    request_id: str
    tenant: str | None
    model: str
    arrival_time: float
    finish_time: float
    prompt_tokens: int
    completion_tokens: int
    status: str
    input_sha256: str | None
    output_sha256: str | None
    prev_hash: str
    line_hash: str = ""

    def body(self) -> dict[str, Any]:
        d = asdict(self)
        del d["line_hash"]
        return d

    def compute_hash(self) -> str:
        return hashlib.sha256(canonical_bytes(self.body())).hexdigest()


@dataclass(slots=True)
class VerifyResult:
    ok: bool
    lines_checked: int
    first_bad_line: int | None  # 1-based line number of the first line that breaks the chain
    reason: str


def _read_tail(path: Path) -> tuple[int, str]:
    """(seq, line_hash) of the last line of an existing log, or (0, GENESIS_HASH) when empty."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        chunk = b""
        pos = end
        # Read backwards until the buffer holds a complete last line.
        while pos > 0 and chunk.rstrip(b"\n").count(b"\n") == 0:
            step = min(4096, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step) + chunk
    stripped = chunk.rstrip(b"\n")
    if not stripped:
        return 0, GENESIS_HASH
    if not chunk.endswith(b"\n"):
        raise ValueError(f"audit log {path} ends with a partial line; run `pagedserve audit verify` on it")
    last = stripped.rsplit(b"\n", 1)[-1]
    try:
        obj = json.loads(last)
        return int(obj["seq"]), str(obj["line_hash"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"audit log {path}: last line is not a valid audit record; refusing to extend it"
        ) from None


class AuditLog:
    """Append-only, thread-safe writer. Reopening an existing file continues its chain."""

    def __init__(self, path: str | os.PathLike[str], fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(exist_ok=True)
        self._seq, self._prev = _read_tail(self.path)
        self._file = self.path.open("ab")

    @property
    def head(self) -> tuple[int, str]:
        """(seq, line_hash) of the newest line: pin it elsewhere to detect truncation."""
        with self._lock:
            return self._seq, self._prev

    def record(
        self,
        *,
        request_id: str,
        tenant: str | None,
        model: str,
        arrival_time: float,
        finish_time: float,
        prompt_tokens: int,
        completion_tokens: int,
        status: str,
        input: str | Sequence[int] | None = None,
        output: str | Sequence[int] | None = None,
    ) -> AuditRecord:
        """Append one request. `input` / `output` are hashed here; their content is not stored."""
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError(
                f"prompt_tokens and completion_tokens must be >= 0, got {prompt_tokens}, {completion_tokens}."
            )
        in_hash, out_hash = payload_sha256(input), payload_sha256(output)
        with self._lock:
            rec = AuditRecord(
                seq=self._seq + 1,
                request_id=request_id,
                tenant=tenant,
                model=model,
                arrival_time=float(arrival_time),
                finish_time=float(finish_time),
                prompt_tokens=int(prompt_tokens),
                completion_tokens=int(completion_tokens),
                status=str(status),
                input_sha256=in_hash,
                output_sha256=out_hash,
                prev_hash=self._prev,
            )
            rec.line_hash = rec.compute_hash()
            self._file.write(canonical_bytes(asdict(rec)) + b"\n")
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            self._seq, self._prev = rec.seq, rec.line_hash
        return rec

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_line(raw: bytes, expected_seq: int, expected_prev: str) -> tuple[str | None, str]:
    """(problem or None, this line's line_hash)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return "not valid JSON", ""
    if not isinstance(obj, dict) or set(obj) != set(FIELDS):
        return f"fields must be exactly {list(FIELDS)}", ""
    try:
        rec = AuditRecord(**obj)
    except TypeError as e:
        return f"bad record: {e}", ""
    if rec.line_hash != rec.compute_hash():
        return "line_hash does not match the line's content (line edited)", str(rec.line_hash)
    if rec.seq != expected_seq:
        return f"seq is {rec.seq}, expected {expected_seq} (line deleted, inserted or moved)", rec.line_hash
    if rec.prev_hash != expected_prev:
        return "prev_hash does not match the previous line's line_hash (chain broken)", rec.line_hash
    return None, rec.line_hash


def verify_audit_log(
    path: str | os.PathLike[str], expected_head: tuple[int, str] | None = None
) -> VerifyResult:
    """Walk the chain from GENESIS.

    expected_head=(seq, line_hash), pinned earlier from `AuditLog.head`, also catches a cut-off
    tail: line `seq` must still exist with that hash (lines appended since are fine).
    """
    prev, n = GENESIS_HASH, 0
    pinned_hash: str | None = None
    with Path(path).open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                return VerifyResult(False, n, n, "partial last line (no newline)")
            problem, prev = _check_line(raw.rstrip(b"\n"), n, prev)
            if problem is not None:
                return VerifyResult(False, n, n, problem)
            if expected_head is not None and n == expected_head[0]:
                pinned_hash = prev
    if expected_head is not None:
        seq, head_hash = expected_head
        if n < seq:
            return VerifyResult(
                False, n, n + 1, f"log ends at line {n} but the pinned head is line {seq} (truncated)"
            )
        if seq > 0 and pinned_hash != head_hash:
            return VerifyResult(False, n, seq, "line_hash differs from the pinned head (log rewritten)")
    return VerifyResult(True, n, None, "ok")


def audit_main(argv: Sequence[str] | None = None) -> int:
    """`pagedserve audit verify FILE [--expect-head SEQ:HASH]` -> exit 0 ok, 1 broken."""
    parser = argparse.ArgumentParser(prog="pagedserve audit", description="Audit log tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_verify = sub.add_parser("verify", help="check the hash chain of an audit log")
    p_verify.add_argument("file")
    p_verify.add_argument(
        "--expect-head", default=None, help="SEQ:LINE_HASH pinned earlier (detects truncation)"
    )
    args = parser.parse_args(argv)
    head: tuple[int, str] | None = None
    if args.expect_head:
        seq_s, _, hash_s = args.expect_head.partition(":")
        if not seq_s.isdigit() or len(hash_s) != 64:
            parser.error("--expect-head must be SEQ:LINE_HASH (an integer and 64 hex digits)")
        head = (int(seq_s), hash_s)
    try:
        result = verify_audit_log(args.file, expected_head=head)
    except OSError as e:
        print(f"error: cannot read {args.file}: {e}", file=sys.stderr)
        return 1
    if result.ok:
        print(f"OK: {result.lines_checked} lines verified")
        return 0
    print(f"FAIL: {args.file}: chain breaks at line {result.first_bad_line}: {result.reason}")
    return 1
