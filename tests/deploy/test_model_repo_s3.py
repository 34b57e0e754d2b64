"""The model repository against a real S3-protocol server on loopback (moto's standalone server) with
real clients (s3fs inside pagedserve, boto3 in the test): push, pull, verify; a tampered file, an
unsigned manifest, a wrong key and a re-written manifest are all refused, naming what is wrong."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from pagedserve.model_repo import ModelVerificationError, prepare_model, pull, push, verify
from pagedserve.model_repo.cli import model_main
from pagedserve.model_repo.manifest import CACHE_META_DIR, build_manifest
from pagedserve.model_repo.repo import cache_dir_for
from pagedserve.model_repo.signing import generate_keypair
from tests.deploy.conftest import make_model_dir

SHARD = "model-00001-of-00002.safetensors"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[str, str]:
    priv, pub = generate_keypair(tmp_path / "signing.key")
    return str(priv), str(pub)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and CACHE_META_DIR not in p.parts}  # fmt: skip


def test_push_pull_verify_signed_round_trip(bucket: str, s3: Any, keys: tuple[str, str], tmp_path: Path) -> None:
    priv, pub = keys
    model = make_model_dir(tmp_path / "model")
    url = f"s3://{bucket}/llama/v1"
    assert model_main(["push", str(model), url, "--key", priv, "--quiet"]) == 0
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"llama/v1/SHA256SUMS", "llama/v1/SHA256SUMS.sig", f"llama/v1/{SHARD}",
            "llama/v1/nested/extra.txt"} <= listed  # fmt: skip
    manifest = s3.get_object(Bucket=bucket, Key="llama/v1/SHA256SUMS")["Body"].read()
    expected = hashlib.sha256((model / SHARD).read_bytes()).hexdigest()
    assert f"{expected}  {SHARD}\n".encode() in manifest

    cache = tmp_path / "cache"
    local = pull(url, pub, str(cache), progress=False)
    assert local == cache_dir_for(url, cache)
    assert _files(local) == _files(model)  # the files, the manifest and its signature
    verify(str(local), pub)
    assert model_main(["verify", str(local), "--public-key", pub]) == 0
    # A second start is a cache hit: nothing is written again.
    before = {p: p.stat().st_mtime_ns for p in local.rglob("*.safetensors")}
    assert prepare_model(url, pub, str(cache), progress=False) == str(local)
    assert {p: p.stat().st_mtime_ns for p in local.rglob("*.safetensors")} == before


def test_tampered_file_in_the_store_is_refused(bucket: str, s3: Any, keys: tuple[str, str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    priv, pub = keys
    url = f"s3://{bucket}/m"
    push(str(make_model_dir(tmp_path / "model")), url, priv, progress=False)
    body = bytearray(s3.get_object(Bucket=bucket, Key=f"m/{SHARD}")["Body"].read())
    body[1000] ^= 0xFF  # one flipped bit, same size
    s3.put_object(Bucket=bucket, Key=f"m/{SHARD}", Body=bytes(body))
    cache = tmp_path / "cache"
    with pytest.raises(ModelVerificationError, match=f"model file '{SHARD}' does not match SHA256SUMS"):
        pull(url, pub, str(cache), progress=False)
    assert not (cache_dir_for(url, cache) / SHARD).exists()  # never renamed into place
    assert model_main(["pull", url, "--public-key", pub, "--cache-dir", str(cache), "--quiet"]) == 1
    assert SHARD in capsys.readouterr().err


def test_unsigned_or_wrongly_signed_manifest_is_refused(bucket: str, s3: Any, keys: tuple[str, str],
                                                         tmp_path: Path) -> None:  # fmt: skip
    priv, pub = keys
    model = make_model_dir(tmp_path / "model")
    cache = str(tmp_path / "cache")
    # Unsigned: refused with a key, accepted (verified against the manifest) without one.
    push(str(model), f"s3://{bucket}/unsigned", progress=False)
    with pytest.raises(ModelVerificationError, match="SHA256SUMS.sig is missing"):
        pull(f"s3://{bucket}/unsigned", pub, cache, progress=False)
    assert (pull(f"s3://{bucket}/unsigned", None, cache, progress=False) / SHARD).is_file()
    # Signed with another key.
    _, other_pub = generate_keypair(tmp_path / "other.key")
    push(str(model), f"s3://{bucket}/signed", priv, progress=False)
    with pytest.raises(ModelVerificationError, match="does not verify SHA256SUMS"):
        pull(f"s3://{bucket}/signed", str(other_pub), cache, progress=False)
    # An attacker who changes a file and re-writes the manifest to match cannot re-sign it.
    (model / SHARD).write_bytes(b"evil weights")
    s3.put_object(Bucket=bucket, Key=f"signed/{SHARD}", Body=b"evil weights")
    s3.put_object(Bucket=bucket, Key="signed/SHA256SUMS", Body=build_manifest(model))
    with pytest.raises(ModelVerificationError, match="does not verify SHA256SUMS"):
        pull(f"s3://{bucket}/signed", pub, cache, progress=False)
    # A URL without a manifest at all cannot satisfy a key; without a key its files come unverified
    # (and only its own: not those of a sibling prefix).
    s3.put_object(Bucket=bucket, Key="bare/config.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key="bare2/stray.bin", Body=b"not this model's")
    with pytest.raises(ModelVerificationError, match="no SHA256SUMS"):
        pull(f"s3://{bucket}/bare", pub, cache, progress=False)
    assert _files(pull(f"s3://{bucket}/bare", None, cache, progress=False)) == {"config.json": b"{}"}


def test_download_resumes_from_a_partial_file(bucket: str, keys: tuple[str, str], tmp_path: Path) -> None:
    priv, pub = keys
    model = make_model_dir(tmp_path / "model")
    url = f"s3://{bucket}/resume"
    push(str(model), url, priv, progress=False)
    dest = cache_dir_for(url, tmp_path / "cache")
    parts = dest / CACHE_META_DIR / "parts"
    parts.mkdir(parents=True)
    data = (model / SHARD).read_bytes()
    # A wrong prefix proves the prefix is kept and hashed, not re-downloaded: the result mismatches,
    # is refused and the part deleted, so the next attempt starts afresh and succeeds.
    (parts / f"{SHARD}.part").write_bytes(b"\0" * 4096)
    with pytest.raises(ModelVerificationError, match=SHARD):
        pull(url, pub, str(tmp_path / "cache"), progress=False)
    assert not (parts / f"{SHARD}.part").exists()
    (parts / f"{SHARD}.part").write_bytes(data[: len(data) // 2])  # a download cut half-way
    local = pull(url, pub, str(tmp_path / "cache"), progress=False)
    assert (local / SHARD).read_bytes() == data
    assert not list(parts.iterdir())


def test_local_cache_edited_on_disk_is_repaired_or_refused(bucket: str, keys: tuple[str, str],
                                                           tmp_path: Path) -> None:  # fmt: skip
    priv, pub = keys
    model = make_model_dir(tmp_path / "model")
    url = f"s3://{bucket}/cached"
    push(str(model), url, priv, progress=False)
    local = pull(url, pub, str(tmp_path / "cache"), progress=False)
    (local / SHARD).write_bytes(b"edited")
    with pytest.raises(ModelVerificationError, match=f"model file '{SHARD}' does not match"):
        verify(str(local), pub)  # verifying the directory in place refuses it
    (local / "evil.safetensors").write_bytes(b"x")
    with pytest.raises(ModelVerificationError, match="'evil.safetensors' is not listed"):
        verify(str(local), pub)
    assert pull(url, pub, str(tmp_path / "cache"), progress=False) == local  # a pull repairs from the store
    verify(str(local), pub)
    assert (local / SHARD).read_bytes() == (model / SHARD).read_bytes()


def test_local_directory_is_verified_before_loading(tmp_path: Path, keys: tuple[str, str]) -> None:
    priv, pub = keys
    model = make_model_dir(tmp_path / "model")
    assert prepare_model(str(model)) == str(model)  # no manifest, no key: loaded as before
    assert model_main(["sign", str(model), "--key", priv]) == 0
    assert prepare_model(str(model), pub) == str(model)
    (model / "nested" / "extra.txt").write_text("changed\n")
    with pytest.raises(ModelVerificationError, match="'nested/extra.txt' does not match"):
        prepare_model(str(model))  # a manifest beside the model is checked even without a key
    with pytest.raises(ValueError, match="needs a local model directory or an fsspec URL"):
        prepare_model("org/some-hub-id", pub)


class _DroppingFile:
    """A real file whose second read fails once, as a connection dropped mid-download does."""

    dropped = 0

    def __init__(self, inner: Any) -> None:
        self.inner, self.reads = inner, 0

    def read(self, n: int = -1) -> bytes:
        self.reads += 1
        if self.reads == 2 and _DroppingFile.dropped == 0:
            _DroppingFile.dropped += 1
            raise ConnectionResetError("connection reset by peer")
        return bytes(self.inner.read(min(n, 1 << 20) if n > 0 else 1 << 20))

    def seek(self, offset: int) -> int:
        return int(self.inner.seek(offset))

    def __enter__(self) -> _DroppingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()


def test_a_dropped_connection_resumes_within_the_same_pull(tmp_path: Path, keys: tuple[str, str]) -> None:
    from fsspec.implementations.local import LocalFileSystem

    from pagedserve.model_repo.remote import download

    class Dropping(LocalFileSystem):  # the local filesystem, with the failure injected into open()
        def open(self, path: str, mode: str = "rb", **kw: Any) -> Any:  # type: ignore[override]
            return _DroppingFile(super().open(path, mode, **kw))

    model = make_model_dir(tmp_path / "model")
    data = (model / SHARD).read_bytes()
    expected = hashlib.sha256(data).hexdigest()
    dest = tmp_path / "dest"
    download(Dropping(), str(model), [(SHARD, len(data), expected)], dest, jobs=1, progress=False)
    assert _DroppingFile.dropped == 1 and (dest / SHARD).read_bytes() == data
