from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("TESSERA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_data(*parts: str) -> Path:
    """A file under ../shared/data; skips the test (with the reason) where it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (set TESSERA_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Unit tests use tiny tensors: one thread avoids oversubscribing the 2-core CI machine."""
    import torch

    torch.set_num_threads(1)


def error_of(response: object) -> tuple[int, str]:
    """(status, reason) of an endpoint's error answer (what ``shared.serving.answers_errors`` returns)."""
    import json

    from starlette.responses import JSONResponse

    assert isinstance(response, JSONResponse), f"expected an error answer, got {response!r}"
    return response.status_code, json.loads(bytes(response.body))["error"]


@pytest.fixture(scope="session")
def s3() -> Iterator[str]:
    """A real S3-compatible server (moto's, on loopback) with a bucket ``tessera-test``: the URL of the bucket
    (``s3://tessera-test``). The ``AWS_*`` variables that point s3fs, boto3 and pyarrow at it are set for the
    session (and so reach the processes the tests start: the integration stack's Ray head and its jobs)."""
    import socket
    import subprocess
    import sys
    import time

    pytest.importorskip("s3fs")
    moto_server = Path(sys.executable).with_name("moto_server")
    if not moto_server.exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket="tessera-test")
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.3)
        yield "s3://tessera-test"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
