"""Fixtures of the deployment tests.

    s3_server     moto's standalone S3 server (`python -m moto.server`) on a free loopback port, with
                  the AWS environment (dummy credentials, AWS_ENDPOINT_URL) pointing every client at it:
                  boto3 here, s3fs inside pagedserve, and the servers the tests start
    s3            a boto3 client of it
    bucket        a fresh bucket per test
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import free_port

_counter = itertools.count()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"moto server exited: {log.read_text()[-2000:]}")
            try:
                httpx.get(env["AWS_ENDPOINT_URL"], timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise AssertionError("moto server did not start") from None
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "PAGEDSERVE_MODEL_STORAGE_OPTIONS"):
                mp.delenv(k, raising=False)
            yield env
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3(s3_server: dict[str, str]) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"models-{os.getpid()}-{next(_counter)}"
    s3.create_bucket(Bucket=name)
    return name


def make_model_dir(root: Path, weight_bytes: int = 3 << 20) -> Path:
    """A directory shaped like a checkpoint (not a loadable one): config, tokenizer, two shards."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    (root / "tokenizer.json").write_text('{"model": {}}\n')
    for i in range(2):
        (root / f"model-0000{i + 1}-of-00002.safetensors").write_bytes(os.urandom(weight_bytes))
    (root / "nested").mkdir(exist_ok=True)
    (root / "nested" / "extra.txt").write_text("hello\n")
    return root
