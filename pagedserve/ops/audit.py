"""Tamper-evident audit log: one JSON line per request outcome, a keyed hash chain, checkpoints.

Line n (1-based) holds seq = n and:

    body_n      = every field except line_hash, as canonical JSON (sorted keys, no spaces, UTF-8)
    line_hash_n = HMAC-SHA256(key, body_n)   keyed log    ("chain": "hmac-sha256")
                = SHA-256(body_n)            unkeyed log  ("chain": "sha256"; v1 lines have no "chain")
    prev_hash_n = line_hash_{n-1}            (GENESIS_HASH for n = 1)

    GENESIS ──> [seq 1 | prev=GENESIS | h1] ──> [seq 2 | prev=h1 | h2] ──> [seq 3 | prev=h2 | h3]

Editing any field breaks that line's own line_hash; deleting or reordering lines breaks seq /
prev_hash at the first displaced line. With a key nobody without it can forge, append or
re-chain lines. A chain alone cannot show a cut at its end, so the writer also keeps a
checkpoint next to the log (FILE.checkpoint, one JSON object, replaced atomically on open,
every `checkpoint_interval` lines and on close):

    {"format", "seq": lines so far, "head": line_hash of line seq, "chain", "closed", "interval", "time",
     "mac": HMAC-SHA256(key, canonical body) (SHA-256 of it when unkeyed)}

`pagedserve audit verify` (audit_verify.py) checks lines and checkpoint. Only the text's and
token ids' hashes are stored, never the prompt or the output. Lines of the first format (v1:
no client_request_id ... chain fields) stay verifiable; they are unkeyed.

One writer per file (a lock serialises threads of one process; processes need one file each).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GENESIS_HASH = "0" * 64
CHAIN_SHA256 = "sha256"
CHAIN_HMAC = "hmac-sha256"
CHECKPOINT_FORMAT = "pagedserve-audit-checkpoint-v1"
ENV_AUDIT_KEY = "PAGEDSERVE_AUDIT_KEY"
MIN_KEY_BYTES = 16
LEGACY_FIELDS: tuple[str, ...] = (
    "seq", "request_id", "tenant", "model", "arrival_time", "finish_time", "prompt_tokens",
    "completion_tokens", "status", "input_sha256", "output_sha256", "prev_hash", "line_hash",
)  # fmt: skip
FIELDS: tuple[str, ...] = (
    *LEGACY_FIELDS[:-2], "client_request_id", "key_id", "method", "path", "http_status", "chain",
    "prev_hash", "line_hash",
)  # fmt: skip
CHECKPOINT_FIELDS = ("format", "seq", "head", "chain", "closed", "interval", "time", "mac")


class AuditLogClosedError(RuntimeError):
    """record() after close(): the line is not written (the caller logs that)."""


def canonical_bytes(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def mac_hex(body: Mapping[str, Any], key: bytes | None) -> str:
    """line_hash of a line body (or mac of a checkpoint body): HMAC-SHA256 with a key, else SHA-256."""
    data = canonical_bytes(body)
    if key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def payload_sha256(payload: str | Sequence[int] | None) -> str | None:
    """SHA-256 of a text (its UTF-8 bytes) or of token ids (their JSON list, e.g. b"[1,2,3]")."""
    if payload is None:
        return None
    if isinstance(payload, str):
        data = payload.encode("utf-8")
    else:
        data = json.dumps([int(t) for t in payload], separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()


def load_audit_key(key_file: str | os.PathLike[str] | None = None,
                   environ: Mapping[str, str] | None = None) -> bytes | None:  # fmt: skip
    """The audit key: the key file's content (surrounding whitespace stripped), else $PAGEDSERVE_AUDIT_KEY,
    else None (an unkeyed log). Never a command-line value: argv is visible to every local user."""
    env = os.environ if environ is None else environ
    if key_file is not None:
        key = Path(key_file).read_bytes().strip()
        source = f"audit key file {key_file}"
    elif env.get(ENV_AUDIT_KEY):
        key = env[ENV_AUDIT_KEY].strip().encode()
        source = f"${ENV_AUDIT_KEY}"
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{source}: an audit key needs at least {MIN_KEY_BYTES} bytes, got {len(key)}.")
    return key


def default_checkpoint_path(log_path: str | os.PathLike[str]) -> Path:
    path = Path(log_path)
    return path.with_name(path.name + ".checkpoint")


@dataclass(slots=True)
class AuditRecord:
    seq: int
    request_id: str
    tenant: str | None
    model: str | None
    arrival_time: float
    finish_time: float
    prompt_tokens: int
    completion_tokens: int
    status: str
    input_sha256: str | None
    output_sha256: str | None
    prev_hash: str
    client_request_id: str | None = None  # the client's X-Request-Id (correlation only, not unique)
    key_id: str | None = None  # fingerprint of the credential (never the credential)
    method: str | None = None
    path: str | None = None
    http_status: int | None = None  # None: no response was sent (client gone, cut at shutdown)
    chain: str = CHAIN_SHA256
    line_hash: str = ""

    def body(self) -> dict[str, Any]:
        d = asdict(self)
        del d["line_hash"]
        return d


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint object, None when the file does not exist; ValueError when it is not one."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(raw)
    except ValueError:
        raise ValueError(f"checkpoint {path} is not valid JSON") from None
    if not isinstance(obj, dict) or set(obj) != set(CHECKPOINT_FIELDS) or obj["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} object")
    return obj


def checkpoint_problem(cp: Mapping[str, Any], key: bytes | None) -> str | None:
    """Why a checkpoint object cannot be trusted with this key, or None."""
    if cp["chain"] != (CHAIN_HMAC if key is not None else CHAIN_SHA256):
        return f"checkpoint is {cp['chain']!r} but the log is read {'with' if key else 'without'} a key"
    body = {k: v for k, v in cp.items() if k != "mac"}
    if not isinstance(cp["mac"], str) or not hmac.compare_digest(cp["mac"], mac_hex(body, key)):
        return "checkpoint mac does not match (forged, edited, or another key)"
    if not isinstance(cp["seq"], int) or isinstance(cp["seq"], bool) or cp["seq"] < 0:
        return "checkpoint seq is not a line count"
    return None


def _read_tail(path: Path) -> dict[str, Any] | None:
    """The last line of an existing log as an object, or None when the log is empty."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        pos = f.tell()
        chunk = b""
        # Read backwards until the buffer holds a complete last line.
        while pos > 0 and chunk.rstrip(b"\n").count(b"\n") == 0:
            step = min(4096, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step) + chunk
    stripped = chunk.rstrip(b"\n")
    if not stripped:
        return None
    if not chunk.endswith(b"\n"):
        raise ValueError(f"audit log {path} ends with a partial line; run `pagedserve audit verify` on it")
    try:
        obj = json.loads(stripped.rsplit(b"\n", 1)[-1])
        ok = isinstance(obj, dict) and isinstance(obj.get("seq"), int) and isinstance(obj.get("line_hash"), str)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"audit log {path}: last line is not a valid audit record; refusing to extend it")
    return obj  # type: ignore[no-any-return]


class AuditLog:
    """Append-only, thread-safe writer. Reopening an existing file continues its chain, after
    checking that its last line is chained as this writer would chain it (same key, or both
    unkeyed) and that the checkpoint does not show lines that are gone."""

    def __init__(
        self, path: str | os.PathLike[str], fsync: bool = False, key: bytes | None = None,
        checkpoint_interval: int = 1, checkpoint_path: str | os.PathLike[str] | None = None,
    ) -> None:  # fmt: skip
        if checkpoint_interval < 1:
            raise ValueError(f"checkpoint_interval must be >= 1, got {checkpoint_interval}.")
        self.path = Path(path)
        self.fsync = fsync
        self.key = key
        self.chain = CHAIN_HMAC if key is not None else CHAIN_SHA256
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else default_checkpoint_path(self.path)
        # Status for a request that ends without an outcome of its own (cancelled): "aborted",
        # "shutdown" once begin_shutdown() was called.
        self.cut_status = "aborted"
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(exist_ok=True)
        self._seq, self._prev = self._resume()
        self._closed = False
        self._file = self.path.open("ab")
        self._write_checkpoint(closed=False)

    def _resume(self) -> tuple[int, str]:
        tail = _read_tail(self.path)
        seq, head = (0, GENESIS_HASH) if tail is None else (int(tail["seq"]), str(tail["line_hash"]))
        if tail is not None:
            tail_chain = tail.get("chain", CHAIN_SHA256)
            body = {k: v for k, v in tail.items() if k != "line_hash"}
            if tail_chain != self.chain or not hmac.compare_digest(head, mac_hex(body, self.key)):
                how = "with this audit key" if self.key else "without an audit key"
                raise ValueError(
                    f"audit log {self.path}: its last line was not written {how} ({tail_chain!r} chain); "
                    "refusing to extend it: start a new file, or pass the key it was written with"
                )
        cp = read_checkpoint(self.checkpoint_path)
        if cp is None:
            if tail is not None and self.key is not None:
                raise ValueError(f"audit log {self.path} has lines but its checkpoint "
                                 f"{self.checkpoint_path} is missing; run `pagedserve audit verify`")  # fmt: skip
            return seq, head
        problem = checkpoint_problem(cp, self.key)
        if problem is None and (cp["seq"] > seq or (cp["seq"] == seq and cp["head"] != head)):
            problem = f"the checkpoint covers {cp['seq']} lines up to {cp['head'][:12]}, the log has {seq}"
        elif problem is None and cp["closed"] and cp["seq"] < seq:
            problem = f"{seq - cp['seq']} lines were appended after the log was closed"
        if problem is not None:
            raise ValueError(f"audit log {self.path} does not match its checkpoint {self.checkpoint_path} "
                             f"({problem}); run `pagedserve audit verify`")  # fmt: skip
        return seq, head

    def _write_checkpoint(self, closed: bool) -> None:
        """Replace the checkpoint atomically (write a temp file, then rename over it)."""
        body: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT, "seq": self._seq, "head": self._prev, "chain": self.chain,
            "closed": closed, "interval": self.checkpoint_interval, "time": time.time(),
        }  # fmt: skip
        body["mac"] = mac_hex(body, self.key)
        tmp = self.checkpoint_path.with_name(self.checkpoint_path.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(canonical_bytes(body) + b"\n")
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint_path)

    @property
    def head(self) -> tuple[int, str]:
        """(seq, line_hash) of the newest line: pin it elsewhere to detect truncation."""
        with self._lock:
            return self._seq, self._prev

    def begin_shutdown(self) -> None:
        """From now on requests cut without an outcome are audited as "shutdown", not "aborted"."""
        self.cut_status = "shutdown"

    def record(
        self, *, request_id: str, tenant: str | None, model: str | None, arrival_time: float,
        finish_time: float, prompt_tokens: int, completion_tokens: int, status: str,
        input: str | Sequence[int] | None = None, output: str | Sequence[int] | None = None,
        client_request_id: str | None = None, key_id: str | None = None, method: str | None = None,
        path: str | None = None, http_status: int | None = None,
    ) -> AuditRecord:  # fmt: skip
        """Append one request. `input` / `output` are hashed here; their content is not stored."""
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError(
                f"prompt_tokens and completion_tokens must be >= 0, got {prompt_tokens}, {completion_tokens}."
            )
        in_hash, out_hash = payload_sha256(input), payload_sha256(output)
        with self._lock:
            if self._closed:
                raise AuditLogClosedError(f"audit log {self.path} is closed; request {request_id} not recorded")
            rec = AuditRecord(
                seq=self._seq + 1, request_id=request_id, tenant=tenant, model=model,
                arrival_time=float(arrival_time), finish_time=float(finish_time),
                prompt_tokens=int(prompt_tokens), completion_tokens=int(completion_tokens), status=str(status),
                input_sha256=in_hash, output_sha256=out_hash, prev_hash=self._prev,
                client_request_id=client_request_id, key_id=key_id, method=method, path=path,
                http_status=None if http_status is None else int(http_status), chain=self.chain,
            )  # fmt: skip
            rec.line_hash = mac_hex(rec.body(), self.key)
            self._file.write(canonical_bytes(asdict(rec)) + b"\n")
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            self._seq, self._prev = rec.seq, rec.line_hash
            if self._seq % self.checkpoint_interval == 0:
                self._write_checkpoint(closed=False)
        return rec

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._file.close()
            self._write_checkpoint(closed=True)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
