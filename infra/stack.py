"""The local stack without Docker: a Ray head, an MLflow server on SQLite and one BentoML server per domain.

State, logs and PIDs live under one folder (``TESSERA_HOME``, default ``./.tessera``): ``mlflow/`` (SQLite
database and artifacts), ``ray/`` (Ray's temp dir), ``ray_results/`` (training checkpoints), ``bentoml/``,
``logs/`` and ``pids/``. Ports follow the design (MLflow 5000, Ray 6379/8265, services 3001...) and can be
moved with ``TESSERA_<NAME>_PORT`` variables (tests run a second stack beside a user's).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import registry

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def home() -> Path:
    return Path(os.environ.get("TESSERA_HOME", Path.cwd() / ".tessera")).resolve()


def port(name: str, default: int) -> int:
    return int(os.environ.get(f"TESSERA_{name.upper()}_PORT", default))


def mlflow_url() -> str:
    return f"http://127.0.0.1:{port('mlflow', 5000)}"


def dashboard_url() -> str:
    return f"http://127.0.0.1:{port('dashboard', 8265)}"


def service_url(domain: str) -> str:
    return f"http://127.0.0.1:{port(domain, registry.get(domain).port)}"


@dataclass
class Component:
    name: str
    url: str
    health: str  # path answering 200 when healthy

    @property
    def pid_file(self) -> Path:
        return home() / "pids" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return home() / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.health, timeout=timeout) as response:
                return 200 <= response.status < 300
        except (OSError, ValueError):
            return False


def components(domains: Iterable[str] | None = None) -> list[Component]:
    """MLflow, Ray and the services of ``domains`` (default: every domain whose extra is installed)."""
    chosen = list(domains) if domains is not None else registry.installed()
    return [
        Component("mlflow", mlflow_url(), "/health"),
        Component("ray", dashboard_url(), "/api/gcs_healthz"),  # public even with Ray token auth on
        *[Component(d, service_url(d), "/livez") for d in chosen],
    ]


def child_env() -> dict[str, str]:
    """Environment of every stack process (and, through the Ray head, of every job driver)."""
    env = dict(os.environ)
    env.update({
        "MLFLOW_TRACKING_URI": mlflow_url(),
        "TESSERA_HOME": str(home()),
        "TESSERA_STORAGE": str(home() / "ray_results"),
        "BENTOML_HOME": str(home() / "bentoml"),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "BENTOML_DO_NOT_TRACK": "true",
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # Everything started by this stack talks to this stack's Ray, even with another Ray on the machine.
        "RAY_ADDRESS": f"127.0.0.1:{port('ray', 6379)}",
    })
    # Job entrypoints say `python`: make it this environment's interpreter on the Ray head.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _spawn(component: Component, argv: list[str]) -> None:
    component.log_file.parent.mkdir(parents=True, exist_ok=True)
    component.pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(component.log_file, "ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=child_env(), cwd=PROJECT_ROOT, start_new_session=True)
    component.pid_file.write_text(str(process.pid))


def _ray_temp_dir() -> Path:
    # Ray's unix sockets live under its temp dir; keep the path short (the socket path limit is 107 bytes).
    return Path(os.environ.get("TESSERA_RAY_TMP", home() / "ray"))


def mlflow_backend_uri() -> str:
    """MLflow's backend store: ``TESSERA_MLFLOW_BACKEND_URI`` (e.g. ``postgresql+psycopg2://user@host:5432/mlflow``,
    the compose stack's), else the SQLite database under TESSERA_HOME."""
    return os.environ.get("TESSERA_MLFLOW_BACKEND_URI") or f"sqlite:///{home() / 'mlflow' / 'mlflow.db'}"


def start_mlflow(component: Component) -> None:
    state = home() / "mlflow"
    (state / "artifacts").mkdir(parents=True, exist_ok=True)
    _spawn(component, [
        _bin("mlflow"), "server",
        "--backend-store-uri", mlflow_backend_uri(),
        "--artifacts-destination", str(state / "artifacts"), "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port("mlflow", 5000)), "--workers", "1",
    ])


def start_ray(component: Component, num_cpus: int | None) -> None:
    temp = _ray_temp_dir()
    temp.mkdir(parents=True, exist_ok=True)
    argv = [
        _bin("ray"), "start", "--head", f"--port={port('ray', 6379)}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={port('dashboard', 8265)}",
        f"--temp-dir={temp}", "--include-dashboard=true", "--disable-usage-stats",
        f"--num-cpus={num_cpus or os.cpu_count() or 2}",
        f"--ray-client-server-port={port('ray_client', 10001)}",
        f"--dashboard-agent-listen-port={port('ray_agent', 52365)}",
    ]
    component.log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(component.log_file, "ab") as log:
        subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env(),
                       cwd=PROJECT_ROOT, check=True, timeout=180)
    gcs = _ray_processes()
    component.pid_file.parent.mkdir(parents=True, exist_ok=True)
    component.pid_file.write_text(str(gcs[0] if gcs else ""))


def ray_worker_temp_dir(name: str) -> Path:
    """Temp dir of the extra Ray node ``name``: beside the head's and named after it, so that the head's
    :func:`_ray_processes` (and :func:`down`) include this node's processes too."""
    return Path(f"{_ray_temp_dir()}-{name}")


def start_ray_worker(name: str = "worker", *, num_cpus: int = 1, resources: dict[str, float] | None = None) -> None:
    """One more Ray node on this machine (``ray start --address`` the head), with its own CPUs, custom resources
    and temp dir: a second node of the cluster as the compose ``ray-worker`` is, on loopback. Its dashboard
    agent listens on ``TESSERA_<NAME>_AGENT_PORT`` (the head's default one, 52365, is taken by the head or by
    another Ray); its other ports are picked by Ray."""
    import json

    temp = ray_worker_temp_dir(name)
    temp.mkdir(parents=True, exist_ok=True)
    argv = [
        _bin("ray"), "start", f"--address=127.0.0.1:{port('ray', 6379)}", f"--temp-dir={temp}",
        "--disable-usage-stats", f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources or {})}",
        f"--dashboard-agent-listen-port={port(f'{name}_agent', 52366)}",
    ]
    env = child_env()
    if "RAY_AUTH_MODE" not in env and _ray_token_available():
        env["RAY_AUTH_MODE"] = "token"  # the head switched token auth on by itself; a joining node does not
    log_file = home() / "logs" / f"ray-{name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                       cwd=PROJECT_ROOT, check=True, timeout=180)


def _ray_token_available() -> bool:
    """Whether a Ray auth token is at hand (``RAY_AUTH_TOKEN``, its path, ``~/.ray/auth_token``): ``ray start
    --head`` then starts the cluster with token authentication, and every other node must use it too."""
    try:
        from ray._private.authentication.authentication_token_setup import AuthenticationTokenLoader
    except ImportError:  # a Ray without token authentication
        return False
    return bool(AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True))


def stop_ray_worker(name: str = "worker") -> None:
    """Stop the processes of the extra Ray node ``name`` only (the head and any other Ray keep running)."""
    _terminate(_ray_processes(ray_worker_temp_dir(name)))


def start_service(component: Component) -> None:
    domain = registry.get(component.name)
    _spawn(component, [
        _bin("bentoml"), "serve", domain.service, "--host", "127.0.0.1",
        "--port", str(port(domain.name, domain.port)),
    ])


def _ray_processes(temp_dir: Path | None = None) -> list[int]:
    """PIDs of the Ray processes of this stack (their command lines name our temp dir, or ``temp_dir``; the
    head's Ray Client server names none, only the head's GCS address, and outlives the GCS: it is found by that).
    """
    import re

    import psutil

    marker = str(temp_dir or _ray_temp_dir())
    client = re.compile(rf"ray\.util\.client\.server .*--address=\S+:{port('ray', 6379)}(\s|$)")
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        ours = marker in cmdline or (temp_dir is None and client.search(cmdline) is not None)
        if ours and proc.info["pid"] != os.getpid():
            found.append(proc.info["pid"])
    return sorted(found)


def wait_healthy(items: list[Component], timeout: float) -> list[Component]:
    """Wait until every component answers its health check; returns the ones that did not."""
    deadline = time.monotonic() + timeout
    pending = list(items)
    while pending and time.monotonic() < deadline:
        pending = [c for c in pending if not c.healthy()]
        if pending:
            time.sleep(1.0)
    return pending


def up(domains: Iterable[str] | None = None, *, num_cpus: int | None = None, timeout: float = 240.0) -> list[Component]:
    """Start whatever is not running yet and wait for health; returns the components."""
    items = components(domains)
    for component in items:
        if component.healthy():
            continue
        if component.name == "mlflow":
            start_mlflow(component)
        elif component.name == "ray":
            start_ray(component, num_cpus)
        else:
            start_service(component)
    failed = wait_healthy(items, timeout)
    if failed:
        names = ", ".join(f"{c.name} (log: {c.log_file})" for c in failed)
        raise RuntimeError(f"not healthy after {timeout:.0f}s: {names}")
    return items


def _terminate(pids: list[int], grace: float = 15.0) -> None:
    import psutil

    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs.extend([proc, *proc.children(recursive=True)])
        except psutil.NoSuchProcess:
            continue
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM) if proc.pid == os.getpgid(proc.pid) else proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def down(domains: Iterable[str] | None = None) -> None:
    """Stop the stack's processes (services first, Ray, then MLflow). Saved state stays on disk."""
    items = components(domains)
    for component in reversed(items):
        if component.name == "ray":
            if _owns_all_ray():  # graceful first; `ray stop` would also stop other Rays on this machine
                component.log_file.parent.mkdir(parents=True, exist_ok=True)
                with open(component.log_file, "ab") as log:
                    subprocess.run([_bin("ray"), "stop", "--grace-period", "10"], stdout=log,
                                   stderr=subprocess.STDOUT, env=child_env(), check=False, timeout=60)
            _terminate(_ray_processes())
        else:
            pid = component.pid()
            if pid is not None:
                _terminate([pid])
        component.pid_file.unlink(missing_ok=True)


def stop_services(domains: Iterable[str]) -> None:
    """Stop the BentoML services of ``domains`` only; MLflow, Ray and the other services keep running."""
    for component in components(domains)[2:]:
        pid = component.pid()
        if pid is not None:
            _terminate([pid])
        component.pid_file.unlink(missing_ok=True)


def _owns_all_ray() -> bool:
    """`ray stop` stops every Ray on the machine; use it only when all Ray processes here are ours."""
    import psutil

    ours = set(_ray_processes())
    for proc in psutil.process_iter(["pid", "name"]):
        name = proc.info.get("name") or ""
        if name in ("raylet", "gcs_server") and proc.info["pid"] not in ours:
            return False
    return bool(ours)


def status(domains: Iterable[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for component in components(domains):
        if component.name == "ray":
            ray_pids = _ray_processes()
            pid = ray_pids[0] if ray_pids else None
        else:
            pid = component.pid()
        rows.append({"component": component.name, "url": component.url, "pid": pid,
                     "healthy": component.healthy(), "log": str(component.log_file)})
    return rows
