from __future__ import annotations

import os
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
