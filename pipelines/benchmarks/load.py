"""Benchmark: closed-loop load on every domain's JSON endpoint, beside a no-op BentoML endpoint of the same shape.

    python -m pipelines.benchmarks.load [--clients 100] [--seconds 60] [--domains forecasting,transients,...]
        [--body forecasting=request.json ...]

Needs the stack up with models served (``make demo``, or ``tessera up`` and ``tessera train``). For each domain,
``--clients`` clients each send the domain's example request (``Domain.example_request``, the Swagger example,
which fits the demo's models; ``--body DOMAIN=FILE`` sends a JSON body of your own instead, for a model trained
on other data),
wait for the answer and send the next, for ``--seconds``. Every answer is counted by status (429s with and
without ``Retry-After``; a client waits as Retry-After says before it asks again, unless
``--ignore-retry-after``) and every failed exchange by transport error (a dropped or refused connection, a
timeout); latencies (p50, p99) are of the 2xx answers, and answers/s counts 2xx only. Then the same load goes to
a no-op BentoML service (``pipelines.benchmarks.noop_service``) with the same request and response schemas
and the answer recorded from the real endpoint: the serving overhead's ceiling, measured in the same run. For
both, the CPU time the serving processes spent per 2xx answer (the processes listening on the port and their
children: the BentoML server and its workers) and the load generator's own: with the clients on the same cores,
the sum sets the rate, and the difference between the service and its twin is what Tessera's code and the
model cost per answer. The last line is one JSON object with every figure. Traffic stays on loopback.

Targets (issue 20): 0 5xx and 0 dropped connections; 429 (with Retry-After) only above the service's in-flight
limit (``TESSERA_<DOMAIN>_MAX_IN_FLIGHT``); 2xx answers/s at least 70 % of the no-op endpoint's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from shared import registry

NOOP_PORT = 3999


@dataclass
class Tally:
    """What a closed-loop load run saw."""

    clients: int
    seconds: float
    statuses: Counter[int] = field(default_factory=Counter)
    transport: Counter[str] = field(default_factory=Counter)  # exception type -> count
    retry_after_missing: int = 0  # 429 answers without a Retry-After header
    latencies: list[float] = field(default_factory=list)  # of 2xx answers, seconds
    first_error: str | None = None

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if 200 <= s < 300)

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)

    @property
    def dropped(self) -> int:
        return sum(self.transport.values())

    def quantile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        p50, p99 = self.quantile(0.5), self.quantile(0.99)
        return {"clients": self.clients, "seconds": round(self.seconds, 2), "answers_2xx": self.ok,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())}, "server_errors": self.server_errors,
                "dropped": self.dropped, "transport_errors": dict(self.transport),
                "too_many_without_retry_after": self.retry_after_missing,
                "answers_per_s": round(self.ok / self.seconds, 2) if self.seconds else 0.0,
                "p50_ms": round(p50 * 1e3, 1) if p50 is not None else None,
                "p99_ms": round(p99 * 1e3, 1) if p99 is not None else None, "first_error": self.first_error}


def serving_processes(port: int) -> list[psutil.Process]:
    """The processes with a listening socket on ``port`` (a BentoML server and the workers it passed the socket
    to) and all their children."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in process.net_connections(kind="tcp")):
                for member in (process, *process.children(recursive=True)):
                    found[member.pid] = member
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return list(found.values())


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU seconds the ``processes`` have used so far (those that exited count no more)."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total += times.user + times.system
    return total


def measured(url: str, body: dict[str, Any], clients: int, seconds: float, honour_retry_after: bool) -> dict[str, Any]:
    """One closed-loop run on ``url`` with the CPU time per 2xx answer of the serving processes and of this
    process (the clients)."""
    from urllib.parse import urlsplit

    servers = serving_processes(urlsplit(url).port or 80)
    me = psutil.Process()
    before_server, before_client = cpu_seconds(servers), cpu_seconds([me])
    tally = asyncio.run(closed_loop(url, body, clients, seconds, honour_retry_after=honour_retry_after))
    server, client = cpu_seconds(servers) - before_server, cpu_seconds([me]) - before_client
    per = 1000.0 / max(tally.ok, 1)
    return {**tally.summary(), "server_processes": len(servers), "server_cpu_s": round(server, 2),
            "server_cpu_ms_per_answer": round(server * per, 3) if servers and tally.ok else None,
            "client_cpu_ms_per_answer": round(client * per, 3) if tally.ok else None}


async def closed_loop(url: str, body: dict[str, Any], clients: int, seconds: float,
                      timeout: float = 120.0, honour_retry_after: bool = True) -> Tally:
    """``clients`` clients, each posting ``body`` to ``url`` and waiting for the answer, for ``seconds``. After
    a 429 a client waits as its Retry-After says (``honour_retry_after=False``: it asks again at once, the
    harshest case, where refusing takes the service's CPU)."""
    import aiohttp

    tally = Tally(clients=clients, seconds=seconds)
    payload = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def client() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    async with session.post(url, data=payload, headers=headers) as response:
                        text = await response.read()
                        status = response.status
                        retry_after = response.headers.get("Retry-After")
                        if status == 429 and retry_after is None:
                            tally.retry_after_missing += 1
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    tally.transport[type(exc).__name__] += 1
                    tally.first_error = tally.first_error or f"{type(exc).__name__}: {exc}"
                    continue
                tally.statuses[status] += 1
                if 200 <= status < 300:
                    tally.latencies.append(time.perf_counter() - started)
                elif status >= 500 and tally.first_error is None:
                    tally.first_error = f"{status}: {text[:300].decode(errors='replace')}"
                elif status == 429 and honour_retry_after and retry_after is not None:
                    await asyncio.sleep(min(float(retry_after), max(0.0, deadline - time.perf_counter())))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        tally.seconds = time.perf_counter() - started
    return tally


def json_route(domain: str) -> str:
    return registry.get(domain).example_path


def record_answer(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = httpx.post(url, json=body, timeout=300)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


def start_noop(answers: dict[str, Any], port: int, folder: Path, timeout: float = 120.0) -> subprocess.Popen[bytes]:
    """``bentoml serve`` the no-op service on ``port`` with ``answers`` (route -> answer); waits for /readyz."""
    path = folder / "answers.json"
    path.write_text(json.dumps(answers))
    env = {**os.environ, "TESSERA_NOOP_ANSWERS": str(path), "BENTOML_DO_NOT_TRACK": "true"}
    bentoml = Path(sys.executable).parent / "bentoml"
    log = open(folder / "noop.log", "wb")  # noqa: SIM115 - the server's log, open while it runs
    process = subprocess.Popen([str(bentoml), "serve", "pipelines.benchmarks.noop_service:NoOp", "--host",
                                "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the no-op service exited ({folder / 'noop.log'})")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"the no-op service did not start in {timeout:.0f} s ({folder / 'noop.log'})")


def stop(process: subprocess.Popen[bytes]) -> None:
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


def in_flight_limit(domain: str) -> int:
    from shared.serving import setting

    return setting(domain, "MAX_IN_FLIGHT", registry.get(domain).max_in_flight)


def run(domains: list[str], clients: int, seconds: float, service_url: Any, noop: bool = True,
        noop_port: int = NOOP_PORT, honour_retry_after: bool = True,
        given_bodies: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load each domain's endpoint, then (``noop``) the no-op twins of those that answered; the figures.
    ``given_bodies``: the request per domain where it is not the domain's example request."""
    results: dict[str, Any] = {}
    bodies, answers = {}, {}
    for name in domains:
        url = service_url(name) + json_route(name)
        given = given_bodies or {}
        body = given[name] if name in given else registry.get(name).example_request()
        status, answer = record_answer(url, body)
        if status != 200:
            results[name] = {"skipped": f"the example request got {status}: {str(answer)[:300]}"}
            print(f"{name}: skipped ({results[name]['skipped']})", flush=True)
            continue
        bodies[name], answers[json_route(name)] = body, answer
        asyncio.run(closed_loop(url, body, min(clients, 8), 2.0))  # warm-up
        print(f"{name}: {clients} clients for {seconds:.0f} s on {url} ...", flush=True)
        results[name] = {"route": json_route(name), "in_flight_limit": in_flight_limit(name),
                         **measured(url, body, clients, seconds, honour_retry_after)}
    if noop and bodies:
        with tempfile.TemporaryDirectory() as folder:
            process = start_noop(answers, noop_port, Path(folder))
            try:
                for name, body in bodies.items():
                    url = f"http://127.0.0.1:{noop_port}{json_route(name)}"
                    asyncio.run(closed_loop(url, body, min(clients, 8), 2.0))
                    print(f"{name}: the same load on the no-op twin ...", flush=True)
                    results[name]["noop"] = measured(url, body, clients, seconds, honour_retry_after)
                    if results[name]["noop"]["answers_2xx"]:
                        results[name]["ratio_to_noop"] = round(results[name]["answers_per_s"]
                                                               / results[name]["noop"]["answers_per_s"], 3)
            finally:
                stop(process)
    return results


def parse_bodies(items: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``DOMAIN=FILE`` pairs -> {domain: the file's JSON}; a usage error (exit 2) names what is wrong."""
    bodies: dict[str, Any] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--body {item!r}: expected DOMAIN=FILE")
        if name not in registry.names():
            parser.error(f"--body {item!r}: unknown domain {name!r} (one of: {', '.join(registry.names())})")
        try:
            bodies[name] = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--body {item!r}: {exc}")
    return bodies


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(results: dict[str, Any]) -> str:
    head = (f"{'domain':<14}{'route':<15}{'2xx/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'2xx':>7}{'429':>6}{'5xx':>5}"
            f"{'dropped':>8}{'limit':>6}{'no-op/s':>9}{'ratio':>7}{'CPU ms/ans':>11}{'no-op':>7}{'client':>7}")
    lines = [head]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"{name:<14}skipped: {r['skipped'][:80]}")
            continue
        noop = r.get("noop", {})
        lines.append(f"{name:<14}{r['route']:<15}{r['answers_per_s']:>8.1f}{r['p50_ms'] or 0:>9.0f}"
                     f"{r['p99_ms'] or 0:>9.0f}{r['answers_2xx']:>7}{r['statuses'].get('429', 0):>6}"
                     f"{r['server_errors']:>5}{r['dropped']:>8}{r['in_flight_limit']:>6}"
                     f"{noop.get('answers_per_s', 0):>9.1f}{r.get('ratio_to_noop', 0):>7.2f}"
                     f"{_ms(r.get('server_cpu_ms_per_answer')):>11}{_ms(noop.get('server_cpu_ms_per_answer')):>7}"
                     f"{_ms(r.get('client_cpu_ms_per_answer')):>7}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--domains", default=",".join(registry.names()), help="comma-separated (default: all)")
    parser.add_argument("--no-noop", action="store_true", help="skip the no-op comparison")
    parser.add_argument("--noop-port", type=int, default=NOOP_PORT)
    parser.add_argument("--ignore-retry-after", action="store_true",
                        help="clients ask again at once after a 429 (default: they wait as Retry-After says)")
    parser.add_argument("--body", action="append", default=[], metavar="DOMAIN=FILE",
                        help="send this JSON file as the domain's request instead of its example request (for a "
                             "model trained on other data than the demo's); repeatable")
    args = parser.parse_args()
    from infra.stack import service_url

    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    given = parse_bodies(args.body, parser)
    results = run(domains, args.clients, args.seconds, service_url, noop=not args.no_noop, noop_port=args.noop_port,
                  honour_retry_after=not args.ignore_retry_after, given_bodies=given)
    print(table(results))
    failed = [n for n, r in results.items() if "skipped" not in r and (r["server_errors"] or r["dropped"])]
    if failed:
        print(f"5xx or dropped connections on: {', '.join(failed)}")
    print(json.dumps({"clients": args.clients, "seconds": args.seconds, "results": results}))


if __name__ == "__main__":
    main()
