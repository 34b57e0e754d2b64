"""A running server with TLS (self-signed cert made here), --api-key and HS256 JWT auth."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import openai
import pytest

from tests.server.conftest import RunningServer, start_server

API_KEY = "sk-test-key-0123456789"
JWT_SECRET = "jwt-secret-for-tests-0123456789abcdef"
AUDIENCE = "pagedserve-tests"


def self_signed_cert(tmp: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = tmp / "key.pem", tmp / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


@pytest.fixture(scope="module")
def secure_server(tiny_checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("secure_server")
    tls = self_signed_cert(tmp)
    extra = ["--api-key", API_KEY, "--jwt-secret", JWT_SECRET, "--jwt-audience", AUDIENCE]
    with start_server(tiny_checkpoints["llama"], tmp, extra=extra, tls=tls) as server:
        yield server


def sdk(server: RunningServer, key: str) -> openai.OpenAI:
    http = httpx.Client(verify=server.verify)
    return openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0, timeout=60, http_client=http)


def token(**overrides: Any) -> str:
    claims: dict[str, Any] = {
        "sub": "alice",
        "tenant": "acme",
        "aud": AUDIENCE,
        "exp": int(time.time()) + 300,
    }
    claims.update(overrides)
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def test_tls_serves_and_plain_http_fails(secure_server: RunningServer) -> None:
    assert secure_server.base_url.startswith("https://")
    assert httpx.get(secure_server.base_url + "/health", verify=secure_server.verify).status_code == 200
    with pytest.raises(httpx.HTTPError):  # the cert is not in the system store
        httpx.get(secure_server.base_url + "/health", timeout=5)
    with pytest.raises(httpx.HTTPError):
        httpx.get(secure_server.base_url.replace("https", "http") + "/health", timeout=5)


def test_api_key_refusals(secure_server: RunningServer) -> None:
    r = httpx.get(secure_server.v1 + "/models", verify=secure_server.verify)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        sdk(secure_server, "sk-wrong-key").completions.create(model="tiny", prompt="x", max_tokens=1)
    r2 = sdk(secure_server, API_KEY).completions.create(model="tiny", prompt="the cat", max_tokens=2)
    assert r2.usage.completion_tokens >= 1  # type: ignore[union-attr]


def test_jwt_valid_expired_wrong_audience(secure_server: RunningServer) -> None:
    chat = sdk(secure_server, token()).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert chat.choices[0].message.role == "assistant"
    with pytest.raises(openai.AuthenticationError) as e:
        sdk(secure_server, token(exp=int(time.time()) - 60)).models.list()
    assert "expired" in str(e.value)
    with pytest.raises(openai.AuthenticationError) as e:
        sdk(secure_server, token(aud="someone-else")).models.list()
    assert "audience" in str(e.value)


def test_secrets_not_in_logs(secure_server: RunningServer) -> None:
    sdk(secure_server, API_KEY).models.list()
    log = secure_server.log()
    assert API_KEY not in log and JWT_SECRET not in log
    assert '"tenant": "acme"' in log or "acme" in log  # the JWT tenant reaches the access log
