"""Copying model files between a local directory and any fsspec URL (s3://, gs://, az://, file://...).

    download(fs, root, plan, dest, jobs)   plan: [(relpath, size, sha256 or None)] -> dest/relpath
    upload(local_dir, fs, root, files, jobs)

Downloads are concurrent (one thread per file, `jobs` at a time; s3fs and gcsfs are thread-safe)
and resumable: bytes land in dest/.pagedserve-cache/parts/<name>.part and a dropped connection (a
few times, backing off) or a restarted process continues from the part's length with a ranged read
(its prefix is re-hashed first). A file is renamed into place
only when complete and matching its sha256; a mismatching part is deleted, so the next attempt
downloads it afresh. One tqdm bar counts the bytes of all files.

Credentials and endpoints are the filesystem's own (for S3: the AWS environment, AWS_ENDPOINT_URL
for MinIO and other S3-protocol stores); $PAGEDSERVE_MODEL_STORAGE_OPTIONS may hold a JSON object of
extra fsspec options (e.g. {"endpoint_url": "http://minio:9000"}).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pagedserve.model_repo.manifest import CACHE_META_DIR, CHUNK, ModelVerificationError, mismatch_message

logger = logging.getLogger(__name__)
STORAGE_OPTIONS_ENV = "PAGEDSERVE_MODEL_STORAGE_OPTIONS"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
PlanItem = tuple[str, int, "str | None"]  # relative path, size in bytes, expected sha256 (None: unverified)


def is_url(model: str) -> bool:
    return bool(_URL.match(model))


def open_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, root path inside it without a trailing '/')."""
    import fsspec

    text = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"${STORAGE_OPTIONS_ENV} is not a JSON object: {e}") from None
    if not isinstance(options, dict):
        raise ValueError(f"${STORAGE_OPTIONS_ENV} must be a JSON object")
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:  # e.g. s3:// without s3fs
        raise ValueError(f"cannot open {url}: {e} (for s3:// install pagedserve[s3])") from None
    return fs, str(root).rstrip("/")


def read_optional(fs: Any, path: str) -> bytes | None:
    try:
        return bytes(fs.cat_file(path))
    except FileNotFoundError:
        return None


def remote_sizes(fs: Any, root: str) -> dict[str, int]:
    """relative path -> size of every file under root (directory markers left out)."""
    out: dict[str, int] = {}
    fs.invalidate_cache(root)  # s3fs and gcsfs cache listings: a long-lived process must see changes
    for path, info in fs.find(root, detail=True).items():
        path = str(path)
        if info.get("type", "file") != "file" or not path.startswith(root + "/"):
            continue  # a directory marker, or a sibling prefix (s3://b/m2 when root is s3://b/m)
        out[path[len(root) + 1:]] = int(info.get("size") or 0)
    return out


def _bar(total: int, desc: str, enabled: bool) -> Any:
    # Logs of a pod are no TTY: then a line every 5 s instead of a redraw every 0.1 s.
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled,
                mininterval=0.1 if os.isatty(2) else 5.0, dynamic_ncols=True)  # fmt: skip


class _Progress:
    def __init__(self, bar: Any) -> None:
        self._bar, self._lock = bar, threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)


def _fetch_one(fs: Any, src: str, item: PlanItem, dest: Path, parts: Path, progress: _Progress) -> None:
    rel, size, expected = item
    final = dest / rel
    part = parts / (rel.replace("/", "%2F") + ".part")
    h = hashlib.sha256()
    offset = part.stat().st_size if part.is_file() else 0
    if offset > size:  # the remote file changed under a stale part
        part.unlink()
        offset = 0
    if offset:
        with part.open("rb") as f:  # resume: the hash covers the bytes already there
            while chunk := f.read(CHUNK):
                h.update(chunk)
        progress.update(offset)
    with fs.open(src, "rb") as reader, part.open("ab") as writer:
        if offset:
            reader.seek(offset)
        while chunk := reader.read(CHUNK):
            writer.write(chunk)
            h.update(chunk)
            progress.update(len(chunk))
        writer.flush()
        os.fsync(writer.fileno())
    got = part.stat().st_size
    if got != size:
        raise OSError(f"{src}: got {got} bytes, expected {size}")
    if expected is not None and h.hexdigest() != expected:
        part.unlink()
        raise ModelVerificationError(mismatch_message(rel, expected, h.hexdigest()))
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, final)


def _fetch_with_retries(fs: Any, src: str, item: PlanItem, dest: Path, parts: Path, progress: _Progress,
                       attempts: int) -> None:  # fmt: skip
    """A dropped connection resumes from the part's length (at most `attempts` tries, backing off);
    a verification failure is final."""
    for attempt in range(1, attempts + 1):
        try:
            _fetch_one(fs, src, item, dest, parts, progress)
            return
        except ModelVerificationError:
            raise
        except (OSError, TimeoutError, ConnectionError) as e:
            if attempt == attempts:
                raise
            logger.warning("%s: %s; resuming (attempt %d of %d)", src, e, attempt + 1, attempts)
            time.sleep(min(8.0, 0.5 * 2**attempt))


def _is_cached(final: Path, size: int, expected: str | None) -> bool:
    if not final.is_file() or final.stat().st_size != size:
        return False
    if expected is None:
        return True
    from pagedserve.model_repo.manifest import sha256_file

    return sha256_file(final) == expected


def download(fs: Any, root: str, plan: Sequence[PlanItem], dest: Path, jobs: int = 8,
             progress: bool = True, attempts: int = 4) -> None:  # fmt: skip
    """Brings every planned file to dest/relpath, verified against its sha256 when one is given.
    Files already in dest with the right size and hash are kept (the cache hit)."""
    parts = dest / CACHE_META_DIR / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    todo = [item for item in plan if not _is_cached(dest / item[0], item[1], item[2])]
    if not todo:
        return
    bar = _bar(sum(size for _, size, _ in todo), f"download {len(todo)} file(s)", progress)
    tracker = _Progress(bar)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(todo)))) as pool:
            futures = [pool.submit(_fetch_with_retries, fs, f"{root}/{item[0]}", item, dest, parts, tracker,
                                   attempts) for item in todo]  # fmt: skip
            errors = [f.exception() for f in futures]
    finally:
        bar.close()
    # A refused file first: it names the file, which is the message an operator needs.
    for kind in (ModelVerificationError, BaseException):
        for e in errors:
            if isinstance(e, kind):
                raise e


def upload(local_dir: Path, fs: Any, root: str, files: Sequence[str], jobs: int = 8,
           progress: bool = True) -> None:  # fmt: skip
    """Streams local_dir/relpath to root/relpath for each file (concurrently, one bar)."""
    total = sum((local_dir / f).stat().st_size for f in files)
    bar = _bar(total, f"upload {len(files)} file(s)", progress)
    tracker = _Progress(bar)

    def put(rel: str) -> None:
        with (local_dir / rel).open("rb") as reader, fs.open(f"{root}/{rel}", "wb") as writer:
            while chunk := reader.read(CHUNK):
                writer.write(chunk)
                tracker.update(len(chunk))

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(files) or 1))) as pool:
            for f in [pool.submit(put, rel) for rel in files]:
                f.result()
    finally:
        bar.close()
