"""Ed25519 signatures over a model's SHA256SUMS (the `cryptography` package).

    SHA256SUMS.sig = base64(Ed25519 signature of the exact bytes of SHA256SUMS) + "\\n"

Signing the manifest signs every file through its hash. Keys: a PKCS#8 PEM private key (optionally
encrypted, its passphrase from $PAGEDSERVE_MODEL_KEY_PASSWORD) and the public key as PEM
(SubjectPublicKeyInfo) or an OpenSSH `ssh-ed25519 AAAA...` line, given as a file or as the text.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pagedserve.model_repo.manifest import MANIFEST_NAME, SIGNATURE_NAME, ModelVerificationError

PASSWORD_ENV = "PAGEDSERVE_MODEL_KEY_PASSWORD"


def generate_keypair(private_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Writes PATH (private, mode 0600) and PATH.pub; refuses to overwrite either."""
    priv, pub = Path(private_path), Path(f"{private_path}.pub")
    for p in (priv, pub):
        if p.exists():
            raise FileExistsError(f"{p} exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())  # fmt: skip
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(public_key_pem(key.public_key()))
    return priv, pub


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _text_or_file(value: str) -> bytes:
    stripped = value.strip()
    if stripped.startswith("-----BEGIN") or stripped.startswith("ssh-ed25519 "):
        return stripped.encode()
    return Path(value).expanduser().read_bytes()


def load_private_key(value: str) -> Ed25519PrivateKey:
    data = _text_or_file(value)
    password = os.environ.get(PASSWORD_ENV)
    try:
        key = serialization.load_pem_private_key(data, password.encode() if password else None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"cannot read the signing key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the signing key is not an Ed25519 key")
    return key


def load_public_key(value: str) -> Ed25519PublicKey:
    try:
        data = _text_or_file(value)
    except OSError as e:
        raise ValueError(f"cannot read the model public key {value!r}: {e.strerror}") from None
    key: object
    try:
        if data.startswith(b"ssh-ed25519 "):
            key = serialization.load_ssh_public_key(data)
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, binascii.Error) as e:
        raise ValueError(f"cannot read the model public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the model public key is not an Ed25519 key")
    return key


def sign_manifest(manifest: bytes, key: Ed25519PrivateKey) -> bytes:
    return base64.b64encode(key.sign(manifest)) + b"\n"


def verify_signature(manifest: bytes, signature: bytes | None, key: Ed25519PublicKey, where: str) -> None:
    """Raises ModelVerificationError unless `signature` (SHA256SUMS.sig's bytes) signs `manifest`."""
    if signature is None:
        raise ModelVerificationError(
            f"{where}: {SIGNATURE_NAME} is missing and a model public key is required; "
            "refusing to load an unsigned model")
    try:
        raw = base64.b64decode(signature.strip(), validate=True)
        key.verify(raw, manifest)
    except (InvalidSignature, binascii.Error, ValueError):
        raise ModelVerificationError(
            f"{where}: {SIGNATURE_NAME} does not verify {MANIFEST_NAME} with the model public key; "
            "refusing to load this model") from None
