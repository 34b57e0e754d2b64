"""`pagedserve audit verify`: walk an audit log's chain from GENESIS and check its checkpoint.

What each check catches (the line format is in audit.py):

    edited / inserted / deleted / reordered line   line_hash, seq, prev_hash       (any log)
    forged, appended or re-chained line            HMAC line_hash                  (keyed log + key)
    deleted last line(s), emptied file             checkpoint seq / head           (checkpoint)
    line appended after close                      checkpoint "closed"             (checkpoint)
    cut back to a pinned point                     --expect-head                   (any log)

An unkeyed log (v1 lines, or a server without an audit key) can be rewritten and re-chained by
anyone with write access, checkpoint included; verify says so. A keyed log cannot be verified
without its key, and with a key every line and the checkpoint must carry a valid HMAC (no
downgrade to unkeyed lines).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagedserve.ops.audit import (
    CHAIN_HMAC,
    CHAIN_SHA256,
    ENV_AUDIT_KEY,
    FIELDS,
    GENESIS_HASH,
    LEGACY_FIELDS,
    checkpoint_problem,
    default_checkpoint_path,
    load_audit_key,
    mac_hex,
    read_checkpoint,
)

_V2, _V1 = frozenset(FIELDS), frozenset(LEGACY_FIELDS)


@dataclass(slots=True)
class VerifyResult:
    ok: bool
    lines_checked: int
    first_bad_line: int | None  # 1-based line number of the first line that is bad or missing
    reason: str
    keyed: bool = False  # every line carries an HMAC checked with the given key
    notes: list[str] = field(default_factory=list)  # what the checks could not cover


def _check_line(raw: bytes, n: int, prev: str, key: bytes | None) -> tuple[str | None, str, bool]:
    """(problem or None, this line's line_hash, keyed) for line n, expected to follow `prev`."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return "not valid JSON", "", False
    if not isinstance(obj, dict) or frozenset(obj) not in (_V2, _V1):
        return f"fields must be exactly {list(FIELDS)} (or the unkeyed v1 set)", "", False
    chain = obj.get("chain", CHAIN_SHA256)
    if chain not in (CHAIN_SHA256, CHAIN_HMAC):
        return f"unknown chain {chain!r}", "", False
    keyed = chain == CHAIN_HMAC
    if key is not None and not keyed:
        return "an unkeyed line in a log verified with a key (written without the key: forged?)", "", False
    if key is None and keyed:
        return (f"the log is keyed ({CHAIN_HMAC}): pass --key-file FILE or set ${ENV_AUDIT_KEY} "
                "to verify it"), "", True  # fmt: skip
    line_hash = obj["line_hash"]
    body = {k: v for k, v in obj.items() if k != "line_hash"}
    if not isinstance(line_hash, str) or not hmac.compare_digest(line_hash, mac_hex(body, key)):
        how = "edited, or forged without the key" if keyed else "line edited"
        return f"line_hash does not match the line's content ({how})", "", keyed
    if obj["seq"] != n:
        return f"seq is {obj['seq']}, expected {n} (line deleted, inserted or moved)", line_hash, keyed
    if obj["prev_hash"] != prev:
        return "prev_hash does not match the previous line's line_hash (chain broken)", line_hash, keyed
    return None, line_hash, keyed


def verify_audit_log(
    path: str | os.PathLike[str], expected_head: tuple[int | None, str] | None = None,
    key: bytes | None = None, checkpoint_path: str | os.PathLike[str] | None = None,
    use_checkpoint: bool = True,
) -> VerifyResult:  # fmt: skip
    """Check every line, then the pinned head and the checkpoint (FILE.checkpoint by default).

    expected_head=(seq, line_hash), pinned earlier from `AuditLog.head`: line `seq` must still
    exist with that hash (lines appended since are fine); seq None: some line has that hash.
    The checkpoint is required for a keyed log, when a key is given, for an empty log and when
    `checkpoint_path` is given; otherwise (an old unkeyed log) it is used when present.
    """
    cp_file = Path(checkpoint_path) if checkpoint_path else default_checkpoint_path(path)
    # The checkpoint is read BEFORE the log: a live writer only ever moves it forward, so
    # the log read afterwards holds at least the lines it counts.
    cp: dict[str, Any] | None = None
    if use_checkpoint:
        try:
            cp = read_checkpoint(cp_file)
        except ValueError as e:
            return VerifyResult(False, 0, None, str(e))
    prev, n, keyed = GENESIS_HASH, 0, False
    hashes: dict[int, str] = {}  # line -> line_hash, only for the lines pinned by head / checkpoint
    wanted = {s for s in ((expected_head or (None, ""))[0], cp["seq"] if cp else None) if s}
    head_line: int | None = None
    with Path(path).open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                return VerifyResult(False, n, n, "partial last line (no newline)", keyed)
            problem, prev, keyed = _check_line(raw.rstrip(b"\n"), n, prev, key)
            if problem is not None:
                no_key = keyed and key is None  # not a bad line: a check that cannot be done
                return VerifyResult(False, n, None if no_key else n, problem, keyed)
            if n in wanted:
                hashes[n] = prev
            if expected_head is not None and expected_head[0] is None and prev == expected_head[1]:
                head_line = n
    notes: list[str] = []
    if expected_head is not None:
        bad = _head_problem(expected_head, n, hashes, head_line)
        if bad is not None:
            return VerifyResult(False, n, bad[0], bad[1], keyed)
    if use_checkpoint:
        need = key is not None or keyed or n == 0 or checkpoint_path is not None
        if cp is None and need:
            why = ("an empty log: cannot tell it from a truncated one" if n == 0
                   else "a keyed log always has one: truncation cannot be ruled out")  # fmt: skip
            return VerifyResult(False, n, n + 1 if n == 0 else None, f"checkpoint {cp_file} is missing ({why})", keyed)
        if cp is not None:
            bad = _checkpoint_problem(cp, key, n, hashes, notes)
            if bad is not None:
                return VerifyResult(False, n, bad[0], bad[1], keyed, notes)
        else:
            notes.append("no checkpoint: lines deleted at the end cannot be detected")
    if not keyed:
        notes.append("UNKEYED chain: anyone able to write the file can rewrite and re-chain it "
                     "(and its checkpoint); run the server with --audit-key-file")  # fmt: skip
    return VerifyResult(True, n, None, "ok", keyed, notes)


def _head_problem(expected: tuple[int | None, str], n: int, hashes: dict[int, str],
                  head_line: int | None) -> tuple[int | None, str] | None:  # fmt: skip
    seq, head_hash = expected
    if seq is None:
        return None if head_line is not None else (None, "no line has the pinned head hash (log cut or rewritten)")
    if n < seq:
        return n + 1, f"log ends at line {n} but the pinned head is line {seq} (truncated)"
    if seq > 0 and hashes.get(seq) != head_hash:
        return seq, "line_hash differs from the pinned head (log rewritten)"
    return None


def _checkpoint_problem(cp: dict[str, Any], key: bytes | None, n: int, hashes: dict[int, str],
                        notes: list[str]) -> tuple[int | None, str] | None:  # fmt: skip
    problem = checkpoint_problem(cp, key)
    if problem is not None:
        return None, problem
    seq, interval = cp["seq"], cp["interval"]
    if n < seq:
        return n + 1, f"the checkpoint counts {seq} lines but the log ends at line {n} (lines deleted)"
    if hashes.get(seq, GENESIS_HASH) != cp["head"]:
        return seq, f"line {seq} is not the checkpoint's head (log rewritten or re-chained)"
    if n > seq and cp["closed"]:
        return seq + 1, f"line {seq + 1} was appended after the writer closed the log (forged?)"
    if isinstance(interval, int) and n > seq + interval:
        return seq + interval + 1, (f"line {seq + interval + 1} is beyond the checkpoint's reach "
                                    f"(it is rewritten every {interval} lines): appended by someone else?")  # fmt: skip
    if n > seq:
        notes.append(f"{n - seq} line(s) after the last checkpoint (writer still running, or it stopped unclosed)")
    return None


def _parse_head(value: str) -> tuple[int | None, str] | None:
    seq_s, sep, hash_s = value.rpartition(":")
    ok_hash = len(hash_s) == 64 and all(c in "0123456789abcdef" for c in hash_s)
    if not ok_hash or (sep and not seq_s.isdigit()):
        return None
    return (int(seq_s) if sep else None), hash_s


def audit_main(argv: Sequence[str] | None = None) -> int:
    """`pagedserve audit verify FILE [--key-file K] [--expect-head [SEQ:]HASH] [--checkpoint CP]`
    -> exit 0 ok, 1 broken or unverifiable."""
    parser = argparse.ArgumentParser(prog="pagedserve audit", description="Audit log tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check an audit log's chain, HMACs and checkpoint")
    p.add_argument("file")
    p.add_argument("--key-file", default=None, help=f"the audit key (default: ${ENV_AUDIT_KEY}, if set)")
    p.add_argument("--expect-head", default=None,
                   help="[SEQ:]LINE_HASH pinned earlier (detects a cut back past it)")  # fmt: skip
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: FILE.checkpoint)")
    args = parser.parse_args(argv)
    head = _parse_head(args.expect_head) if args.expect_head else None
    if args.expect_head and head is None:
        parser.error("--expect-head must be [SEQ:]LINE_HASH (an integer, ':', 64 lowercase hex digits)")
    try:
        key = load_audit_key(args.key_file)
        result = verify_audit_log(args.file, expected_head=head, key=key, checkpoint_path=args.checkpoint)
    except (OSError, ValueError) as e:
        print(f"FAIL: {args.file}: {e}", file=sys.stderr)
        return 1
    for note in result.notes:
        print(f"note: {note}")
    if result.ok:
        kind = "keyed, HMAC-SHA256" if result.keyed else "UNKEYED"
        print(f"OK: {result.lines_checked} lines verified ({kind})")
        return 0
    where = f"line {result.first_bad_line}: " if result.first_bad_line is not None else ""
    print(f"FAIL: {args.file}: {where}{result.reason}")
    return 1
