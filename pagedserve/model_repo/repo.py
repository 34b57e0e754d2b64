"""The model repository: what `--model URL`, `--model-public-key` and `pagedserve model ...` do.

    prepare_model(model, public_key, cache_dir)  -> a local path for the loader (URL: pulled)
    pull(url, public_key, cache_dir)             -> the verified cache directory of url
    push(local_dir, url, key)                    files, then SHA256SUMS (+ .sig), in that order
    sign_dir(local_dir, key)                     writes SHA256SUMS and, with a key, SHA256SUMS.sig
    verify(dir_or_url, public_key)               raises ModelVerificationError naming the bad file

Order of checks on a pull: the signature over the remote manifest (before a byte of the model is
fetched), then each file's sha256 as it arrives; only then is the cache directory handed to the
loader, which reads config.json from it. A cached file is re-hashed on every start, so a cache
edited on disk is repaired from the store or refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from pagedserve.model_repo.manifest import (
    CACHE_META_DIR,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    ModelVerificationError,
    build_manifest,
    check_no_unlisted,
    list_files,
    parse_manifest,
    verify_dir,
)
from pagedserve.model_repo.remote import (
    PlanItem,
    download,
    is_url,
    open_fs,
    read_optional,
    remote_sizes,
    upload,
)

logger = logging.getLogger(__name__)
CACHE_ENV = "PAGEDSERVE_MODEL_CACHE"


def default_cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pagedserve" / "models")


def cache_dir_for(url: str, cache_root: str | os.PathLike[str] | None = None) -> Path:
    """<root>/<last path part>-<16 hex of sha256(url)>: readable, and distinct per URL."""
    url = url.rstrip("/")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rsplit("/", 1)[-1])[:64].strip(".") or "model"
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(cache_root or default_cache_root()).expanduser() / f"{name}-{digest}"


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """One puller per cache directory (init container and server, replicas sharing a volume)."""
    meta = dest / CACHE_META_DIR
    meta.mkdir(parents=True, exist_ok=True)
    with (meta / "lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_model(model: str, public_key: str | None = None, cache_dir: str | None = None,
                  jobs: int = 8, progress: bool = True) -> str:  # fmt: skip
    """A URL is pulled into the cache; a local directory is verified in place when it has a
    SHA256SUMS or a public key is given; anything else (a hub id) is returned unchanged."""
    if is_url(model):
        return str(pull(model, public_key, cache_dir, jobs, progress))
    path = Path(model).expanduser()
    if path.is_dir():
        if public_key is not None or (path / MANIFEST_NAME).is_file():
            verify(str(path), public_key)
        return model
    if public_key is not None:
        raise ValueError(f"--model-public-key needs a local model directory or an fsspec URL "
                         f"(s3://...); {model!r} is neither")  # fmt: skip
    return model


def _check_signature(manifest: bytes | None, signature: bytes | None, public_key: str | None,
                     where: str) -> None:  # fmt: skip
    if public_key is None:
        return
    if manifest is None:
        raise ModelVerificationError(f"{where}: no {MANIFEST_NAME} and a model public key is required; "
                                     "refusing to load an unsigned model")  # fmt: skip
    from pagedserve.model_repo.signing import (  # cryptography: only when signed
        load_public_key,
        verify_signature,
    )

    verify_signature(manifest, signature, load_public_key(public_key), where)


def pull(url: str, public_key: str | None = None, cache_dir: str | None = None, jobs: int = 8,
         progress: bool = True) -> Path:  # fmt: skip
    fs, root = open_fs(url)
    manifest = read_optional(fs, f"{root}/{MANIFEST_NAME}")
    signature = read_optional(fs, f"{root}/{SIGNATURE_NAME}")
    _check_signature(manifest, signature, public_key, url)
    sizes = remote_sizes(fs, root)
    if manifest is not None:
        entries = parse_manifest(manifest)
        missing = [e.path for e in entries if e.path not in sizes]
        if missing:
            raise ModelVerificationError(f"model file {missing[0]!r} listed in {MANIFEST_NAME} is missing "
                                         f"at {url}")  # fmt: skip
        plan: list[PlanItem] = [(e.path, sizes[e.path], e.sha256) for e in entries]
    else:
        logger.warning("%s has no %s: downloading its files unverified", url, MANIFEST_NAME)
        skip = {MANIFEST_NAME, SIGNATURE_NAME}
        plan = [(rel, size, None) for rel, size in sorted(sizes.items()) if rel not in skip]
        if not plan:
            raise ValueError(f"{url}: no files found")
    dest = cache_dir_for(url, cache_dir)
    with _locked(dest):
        # Files of an earlier version of this URL's model, and a stale manifest, go first.
        wanted = {p for p, _, _ in plan}
        for rel in list_files(dest):
            if rel not in wanted:
                (dest / rel).unlink()
        for name in (MANIFEST_NAME, SIGNATURE_NAME):
            (dest / name).unlink(missing_ok=True)
        download(fs, root, plan, dest, jobs, progress)
        if manifest is not None:
            check_no_unlisted(dest, parse_manifest(manifest))
            (dest / MANIFEST_NAME).write_bytes(manifest)
        if signature is not None:
            (dest / SIGNATURE_NAME).write_bytes(signature)
    logger.info("model %s ready in %s (%d files%s)", url, dest, len(plan),
                ", signature verified" if public_key else "")  # fmt: skip
    return dest


def verify(target: str, public_key: str | None = None) -> None:
    """A local directory, or a URL (checked by pulling it into the cache)."""
    if is_url(target):
        pull(target, public_key, progress=False)
        return
    path = Path(target).expanduser()
    if not path.is_dir():
        raise ValueError(f"{target}: not a directory")
    manifest_path = path / MANIFEST_NAME
    manifest = manifest_path.read_bytes() if manifest_path.is_file() else None
    if manifest is None:
        raise ModelVerificationError(f"{target}: no {MANIFEST_NAME} to verify the model against")
    sig_path = path / SIGNATURE_NAME
    _check_signature(manifest, sig_path.read_bytes() if sig_path.is_file() else None, public_key, target)
    verify_dir(path, parse_manifest(manifest))


def sign_dir(local_dir: str, key: str | None = None) -> tuple[Path, Path | None]:
    """Writes a fresh SHA256SUMS over every file, and SHA256SUMS.sig with a key (else removes a
    stale one, which could never verify the new manifest)."""
    path = Path(local_dir)
    manifest = build_manifest(path)
    (path / MANIFEST_NAME).write_bytes(manifest)
    sig = path / SIGNATURE_NAME
    if key is None:
        sig.unlink(missing_ok=True)
        return path / MANIFEST_NAME, None
    from pagedserve.model_repo.signing import load_private_key, sign_manifest

    sig.write_bytes(sign_manifest(manifest, load_private_key(key)))
    return path / MANIFEST_NAME, sig


def push(local_dir: str, url: str, key: str | None = None, jobs: int = 8, progress: bool = True) -> None:
    """Uploads a model with its manifest: with `key`, a fresh manifest is written and signed; else
    the directory's own SHA256SUMS is verified (or one is written), and pushed as it is."""
    path = Path(local_dir)
    if not path.is_dir():
        raise ValueError(f"{local_dir}: not a directory")
    if key is not None or not (path / MANIFEST_NAME).is_file():
        sign_dir(local_dir, key)
    else:
        verify_dir(path, parse_manifest((path / MANIFEST_NAME).read_bytes()))
    fs, root = open_fs(url)
    upload(path, fs, root, list_files(path), jobs, progress)
    # The manifest last: a reader never sees a manifest naming files not yet uploaded.
    upload(path, fs, root, [MANIFEST_NAME], 1, progress=False)
    if (path / SIGNATURE_NAME).is_file():
        upload(path, fs, root, [SIGNATURE_NAME], 1, progress=False)
    elif fs.exists(f"{root}/{SIGNATURE_NAME}"):
        fs.rm_file(f"{root}/{SIGNATURE_NAME}")  # an older model's signature
