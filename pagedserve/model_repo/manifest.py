"""SHA256SUMS manifests: the list of a model directory's files with their SHA-256, in the format of
`sha256sum` (so `sha256sum -c SHA256SUMS` checks a directory by hand):

    <64 lowercase hex digits><two spaces><relative path, '/'-separated>\\n      one line per file

Invariants, checked by `parse_manifest` and `verify_dir`:
- paths are relative, '/'-separated, with no '.', '..' or empty part and no backslash; one line each;
- the manifest lists EVERY file of the directory except the manifest, its signature and the
  bookkeeping folder of the download cache. An unlisted file is refused too: the loader globs
  `*.safetensors` and transformers may import `*.py` files, so an extra file is as dangerous as a
  changed one.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "SHA256SUMS"
SIGNATURE_NAME = "SHA256SUMS.sig"
CACHE_META_DIR = ".pagedserve-cache"  # partial downloads and the lock of a cache directory
# Never listed: our own files, VCS metadata, and huggingface_hub's local-dir metadata.
_EXCLUDED_TOP = {MANIFEST_NAME, SIGNATURE_NAME, CACHE_META_DIR, ".git", ".cache"}
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
CHUNK = 8 << 20


class ModelVerificationError(ValueError):
    """A model that must not load: a file does not match, is missing or unlisted, or the manifest's
    signature does not verify. A ValueError, so the CLI prints it and exits 1 before serving."""


@dataclass(frozen=True, slots=True)
class Entry:
    path: str  # relative, '/'-separated
    sha256: str  # 64 lowercase hex digits


def check_relative_path(path: str) -> str:
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts) or "\n" in path:
        raise ModelVerificationError(f"{MANIFEST_NAME}: unsafe path {path!r} (must be relative, no '..')")
    return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(root: str | os.PathLike[str]) -> list[str]:
    """Every regular file under root (relative '/'-paths, sorted), less the excluded names."""
    base = Path(root)
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        rel_dir = Path(dirpath).relative_to(base)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_TOP]
            filenames = [f for f in filenames if f not in _EXCLUDED_TOP]
        for name in filenames:
            out.append((rel_dir / name).as_posix())
    return sorted(out)


def render_manifest(entries: Iterable[Entry]) -> bytes:
    return "".join(f"{e.sha256}  {e.path}\n" for e in sorted(entries, key=lambda e: e.path)).encode()


def build_manifest(root: str | os.PathLike[str]) -> bytes:
    """The manifest text of every file under root (sorted by path)."""
    files = list_files(root)
    if not files:
        raise ModelVerificationError(f"{root}: no files to list in a manifest")
    return render_manifest(Entry(check_relative_path(p), sha256_file(Path(root) / p)) for p in files)


def parse_manifest(data: bytes) -> list[Entry]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelVerificationError(f"{MANIFEST_NAME} is not UTF-8 text") from None
    entries: list[Entry] = []
    seen: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            raise ModelVerificationError(f"{MANIFEST_NAME} line {n} is not '<sha256>  <path>': {line[:120]!r}")
        path = check_relative_path(m.group(2))
        if path in seen:
            raise ModelVerificationError(f"{MANIFEST_NAME} lists {path!r} twice")
        seen.add(path)
        entries.append(Entry(path, m.group(1)))
    if not entries:
        raise ModelVerificationError(f"{MANIFEST_NAME} lists no files")
    return entries


def mismatch_message(path: str, expected: str, actual: str) -> str:
    return (f"model file {path!r} does not match {MANIFEST_NAME} (expected sha256 {expected}, got {actual}); "
            "refusing to load this model")  # fmt: skip


def check_no_unlisted(root: str | os.PathLike[str], entries: list[Entry]) -> None:
    listed = {e.path for e in entries}
    for path in list_files(root):
        if path not in listed:
            raise ModelVerificationError(
                f"model file {path!r} is not listed in {MANIFEST_NAME}; refusing to load this model")


def verify_dir(root: str | os.PathLike[str], entries: list[Entry]) -> None:
    """Every listed file present with its hash, and no other file; raises naming the first bad one."""
    base = Path(root)
    check_no_unlisted(base, entries)
    for e in entries:
        file = base / e.path
        if not file.is_file():
            raise ModelVerificationError(f"model file {e.path!r} listed in {MANIFEST_NAME} is missing")
        actual = sha256_file(file)
        if actual != e.sha256:
            raise ModelVerificationError(mismatch_message(e.path, e.sha256, actual))
