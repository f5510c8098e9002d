"""A short version of the load benchmark (``pipelines.benchmarks.load``) on every domain's JSON endpoint of the
real stack: 32 closed-loop clients for 10 s. No 5xx and no dropped connection; a 429 only where the clients
outnumber the service's in-flight limit, and then always with Retry-After."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared import registry
from tests.integration.conftest import DOMAINS, url

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CLIENTS, SECONDS = 32, 10.0


@pytest.mark.parametrize("name", DOMAINS)
def test_load_gets_no_5xx_no_dropped_connection_and_429s_only_above_the_limit(trained: Any, name: str) -> None:
    from pipelines.benchmarks.load import closed_loop, in_flight_limit, json_route

    trained(name)
    domain = registry.get(name)
    tally = asyncio.run(closed_loop(url(name, json_route(name)), domain.example_request(), CLIENTS, SECONDS))
    summary = tally.summary()
    print(name, summary)
    assert tally.server_errors == 0 and tally.dropped == 0, summary
    assert tally.ok > 0, summary
    assert set(tally.statuses) <= {200, 429}, summary
    limit = in_flight_limit(name)
    if limit >= CLIENTS:
        assert tally.statuses[429] == 0, f"429s below the in-flight limit {limit}: {summary}"
    else:  # more clients than the limit: the service sheds the rest, each refusal saying when to retry
        assert tally.statuses[429] > 0 and tally.retry_after_missing == 0, summary
