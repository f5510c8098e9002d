"""Static checks of the compose stack and its Dockerfiles (no Docker engine needed).

The file is parsed with PyYAML (merge keys `<<:` resolve as compose resolves them) and `${VAR:-default}` is
interpolated with its default, i.e. the stack a user gets with no .env file. When a compose binary is on
PATH, `config -q` must accept the file too (CI installs Debian's `docker-compose`, v1.29).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import registry

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"

INFRA_SERVICES = {"postgres", "mlflow", "ray-head", "ray-worker"}
# Services that may go without a healthcheck (optional, profile-gated).
NO_HEALTHCHECK_OK = {"ray-worker-gpu"}
# Every registered domain is served on its own port (Domain.port, the DESIGN.md port table).
DOMAIN_PORTS = {d.name: d.port for d in registry.domains()}
DOMAINS = sorted(DOMAIN_PORTS)
TRACKING_URI = "http://mlflow:5000"

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?]([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Resolve `${VAR:-default}` to its default (`${VAR}` to "") and `$$` to `$`, recursively."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value.replace("$$", "\0")).replace("\0", "$")
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    assert COMPOSE_FILE.is_file(), f"{COMPOSE_FILE} is missing"
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(raw_compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return interpolate(raw_compose["services"])


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command_of(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def published_ports(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) for every port published on the host."""
    out: list[tuple[int, int]] = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            if entry.get("published") is not None:
                out.append((int(entry["published"]), int(entry["target"])))
            continue
        spec = str(entry).split("/")[0]
        parts = spec.rsplit(":", 2)
        if len(parts) == 1:  # "8000": container port only, random host port
            continue
        out.append((int(parts[-2]), int(parts[-1])))
    return out


def healthcheck_of(service: dict[str, Any]) -> list[str]:
    test = (service.get("healthcheck") or {}).get("test")
    if test is None:
        return []
    return test.split() if isinstance(test, str) else [str(t) for t in test]


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {} for name in deps}
    return deps


def uses_project_image(service: dict[str, Any]) -> bool:
    return "build" in service or str(service.get("image", "")).startswith("tessera")


def transitive_deps(services: dict[str, Any], name: str) -> set[str]:
    seen: set[str] = set()
    todo = list(depends_on(services[name]))
    while todo:
        dep = todo.pop()
        if dep not in seen:
            seen.add(dep)
            todo.extend(depends_on(services[dep]))
    return seen


def dockerfile_of(service: dict[str, Any]) -> Path:
    build = service["build"]
    if isinstance(build, str):
        return ROOT / build / "Dockerfile"
    return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


# --- services and ports -----------------------------------------------------------------------------------


def test_expected_services_exist(services: dict[str, Any]) -> None:
    missing = (INFRA_SERVICES | set(DOMAINS)) - services.keys()
    assert not missing, f"missing services: {sorted(missing)} (a registered domain needs a compose block)"


def test_every_domain_service_is_a_registered_domain_on_its_port(services: dict[str, Any]) -> None:
    """Both ways: each `bentoml serve` block serves a registered domain (its `Domain.service`, named after it,
    on its `Domain.port`), and each registered domain has such a block."""
    served = {}
    for name, svc in services.items():
        cmd = command_of(svc)
        if cmd[:2] == ["bentoml", "serve"]:
            served[name] = (cmd[2], env_of(svc).get("BENTOML_PORT"))
    assert sorted(served) == DOMAINS, f"compose serves {sorted(served)}, the registry has {DOMAINS}"
    for domain in registry.domains():
        assert served[domain.name] == (domain.service, str(domain.port)), domain.name


def test_no_obsolete_version_key(raw_compose: dict[str, Any]) -> None:
    # Compose v2 warns on it and v1.29 does not need it.
    assert "version" not in raw_compose


@pytest.mark.parametrize(
    ("service", "port"),
    [("mlflow", 5000), ("ray-head", 8265), ("ray-head", 6379), *DOMAIN_PORTS.items()],
)
def test_port_published_on_the_right_service(services: dict[str, Any], service: str, port: int) -> None:
    assert (port, port) in published_ports(services[service]), (
        f"{service} must publish {port}:{port}, has {published_ports(services[service])}"
    )


def test_host_ports_do_not_collide(services: dict[str, Any]) -> None:
    seen: dict[int, str] = {}
    for name, svc in services.items():
        for host, _ in published_ports(svc):
            assert host not in seen, f"host port {host} published by both {seen[host]} and {name}"
            seen[host] = name


def test_domain_services_follow_the_port_table(services: dict[str, Any]) -> None:
    """Every `bentoml serve services.<domain>...` block is named after its domain and uses its port."""
    found = 0
    for name, svc in services.items():
        cmd = command_of(svc)
        if cmd[:2] != ["bentoml", "serve"]:
            continue
        found += 1
        target = cmd[2]
        domain = target.split(".")[1]
        assert target.startswith(f"services.{domain}.service:"), target
        assert name == domain, f"compose service {name!r} serves domain {domain!r}"
        port = DOMAIN_PORTS[domain]
        assert published_ports(svc) == [(port, port)], f"{name}: expected {port}:{port}"
        bento_port = env_of(svc).get("BENTOML_PORT") or next(
            (cmd[i + 1] for i, c in enumerate(cmd[:-1]) if c in ("--port", "-p")), None
        )
        assert bento_port == str(port), f"{name}: bentoml listens on {bento_port}, publishes {port}"
        assert (ROOT / "services" / domain).is_dir(), f"services/{domain}/ does not exist"
    assert found >= 1, "no BentoML service in the compose file"


# --- health and start order -------------------------------------------------------------------------------


def test_every_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        if name in NO_HEALTHCHECK_OK:
            continue
        test = healthcheck_of(svc)
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        assert not (svc.get("healthcheck") or {}).get("disable"), f"{name} disables its healthcheck"


def test_project_healthchecks_use_python_not_curl(services: dict[str, Any]) -> None:
    """The slim images have no curl/wget: checks of project images must run python (urllib)."""
    for name, svc in services.items():
        if not uses_project_image(svc):
            continue
        test = healthcheck_of(svc)
        if not test:
            continue
        joined = " ".join(test)
        assert "curl" not in joined and "wget" not in joined, f"{name}: {joined}"
        assert test[:2] == ["CMD", "python"], f"{name}: healthcheck should be a python one-liner: {joined}"
        compile(test[-1], f"<{name} healthcheck>", "exec")


@pytest.mark.parametrize(
    ("service", "dependency"),
    [("mlflow", "postgres"), ("ray-head", "mlflow"), ("ray-worker", "ray-head"), *((d, "mlflow") for d in DOMAINS)],
)
def test_depends_on_healthy(services: dict[str, Any], service: str, dependency: str) -> None:
    deps = depends_on(services[service])
    assert dependency in deps, f"{service} must depend on {dependency}"
    assert deps[dependency].get("condition") == "service_healthy", (
        f"{service} -> {dependency} must wait for condition: service_healthy"
    )


def test_depends_on_targets_have_healthchecks(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for dep, spec in depends_on(svc).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if spec.get("condition") == "service_healthy":
                assert healthcheck_of(services[dep]), f"{name} waits for {dep}, which has no healthcheck"


# --- scaling ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["ray-worker", "ray-worker-gpu"])
def test_ray_workers_can_scale(services: dict[str, Any], service: str) -> None:
    if service not in services:
        pytest.skip(f"{service} is not defined")
    svc = services[service]
    assert "container_name" not in svc, f"{service} must not set container_name (breaks --scale)"
    assert not published_ports(svc), f"{service} must not publish host ports (breaks --scale)"
    cmd = command_of(svc)
    assert cmd[:2] == ["ray", "start"] and "--block" in cmd
    assert any(c.startswith("--address") and "ray-head:6379" in " ".join(cmd) for c in cmd)


def test_gpu_worker_is_optional(services: dict[str, Any]) -> None:
    if "ray-worker-gpu" not in services:
        pytest.skip("no GPU worker defined")
    svc = services["ray-worker-gpu"]
    assert svc.get("profiles") == ["gpu"], "the GPU worker must stay behind `--profile gpu`"
    assert dockerfile_of(svc).name == "Dockerfile.cuda"
    assert any(c.startswith("--num-gpus") for c in command_of(svc))
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    for d in devices:  # v1 rejects an interpolated count (it arrives as a string)
        assert d.get("count") is None or isinstance(d["count"], int) or d["count"] == "all"


# --- images -------------------------------------------------------------------------------------------------


def test_referenced_dockerfiles_exist(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        if "build" in svc:
            assert dockerfile_of(svc).is_file(), f"{name}: {dockerfile_of(svc)} does not exist"


def test_project_services_share_one_image_built_once(services: dict[str, Any]) -> None:
    """mlflow, the Ray nodes and the domain services run one CPU image, built by exactly one service.

    Several services with a build section for the same tag make Compose v2 (bake) fail with
    'image already exists'; the others must depend on the builder (so v1 builds it first) and never pull.
    """
    cpu_image = services["mlflow"].get("image")
    assert cpu_image and cpu_image.startswith("tessera:")
    users = {n for n, s in services.items() if s.get("image") == cpu_image}
    assert {"mlflow", "ray-head", "ray-worker", *DOMAINS} <= users
    builders = [n for n in users if "build" in services[n]]
    assert len(builders) == 1, f"exactly one service should build {cpu_image}, found {builders}"
    assert dockerfile_of(services[builders[0]]) == ROOT / "infra" / "Dockerfile"
    for name in users:
        assert services[name].get("pull_policy") == "never", f"{name}: {cpu_image} is local, never pull it"
        if name != builders[0]:
            assert builders[0] in transitive_deps(services, name), f"{name} must start after {builders[0]}"


def _constraint_pin(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(rf"^{re.escape(name)}==([^\s;#]+)", line.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned in constraints.txt")


@pytest.mark.parametrize("dockerfile", ["infra/Dockerfile", "infra/Dockerfile.cuda"])
def test_dockerfile_basics(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    assert f"ARG TORCH_VERSION={_constraint_pin('torch')}" in text, (
        "torch version differs from constraints.txt"
    )
    assert "-c constraints.txt" in text
    assert '".[postgres,s3,${TESSERA_EXTRAS}]"' in text, (
        "the image installs the postgres extra (MLflow), the s3 one (object stores) and the domains'")
    assert "ARG TESSERA_EXTRAS=all" in text and 'infra/requirements.py postgres s3 "${TESSERA_EXTRAS}"' in text
    assert "PYTHONUNBUFFERED=1" in text
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] == "tessera", "the image must run as the non-root user tessera"
    assert "useradd --uid 1000" in text, "both images use uid 1000 so they can share named volumes"
    # CPU and CUDA images may differ in the Python patch release; Ray refuses such a worker by default.
    assert "RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor" in text
    # Dependencies are installed before the source is copied (layer cache).
    assert text.index("pip install -c constraints.txt -r") < text.index("COPY shared")
    for copied in re.findall(r"^COPY\s+(?!--from)(\S+)", text, flags=re.M):
        assert (ROOT / copied).exists() or copied == "README.md", f"{dockerfile} copies missing {copied}"


def test_each_domain_has_an_extra_with_its_dependencies_and_all_has_every_one() -> None:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("requirements", ROOT / "infra" / "requirements.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["requirements"] = module
    spec.loader.exec_module(module)
    pyproject = ROOT / "pyproject.toml"
    base = set(module.requirements(pyproject, []))

    def names(reqs: set[str]) -> set[str]:
        return {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}

    everything = set()
    for domain in registry.domains():
        own = set(module.requirements(pyproject, [domain.name])) - base
        assert own, f"no extra named {domain.name!r} in pyproject.toml"
        packages = {"sklearn": "scikit-learn"}  # module names that are not their package's
        needed = {packages.get(m, m).lower().replace("_", "-") for m in domain.requires}
        assert needed <= names(own), f"{domain.name} needs {needed - names(own)} outside its extra"
        assert not (needed & names(base)), "a domain's dependencies stay out of the base"
        everything |= own
    assert set(module.requirements(pyproject, ["all"])) == base | everything
    assert '".[dev,all]"' in (ROOT / "Makefile").read_text(), "make install installs every domain"
    with pytest.raises(SystemExit, match="unknown extra 'nope'"):
        module.requirements(pyproject, ["nope"])


def test_cpu_image_uses_cpu_torch() -> None:
    text = (ROOT / "infra/Dockerfile").read_text()
    assert "FROM python:3.11" in text
    assert "download.pytorch.org/whl/cpu" in text


def test_cuda_image_flash_attn_matches_pyproject() -> None:
    text = (ROOT / "infra/Dockerfile.cuda").read_text()
    assert re.search(r"^ARG FLASH_ATTN=1$", text, flags=re.M)
    assert "--no-build-isolation" in text
    spec = re.search(r'^ARG FLASH_ATTN_SPEC="([^"]+)"', text, flags=re.M)
    assert spec, "FLASH_ATTN_SPEC build arg missing"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert [spec.group(1)] == pyproject["project"]["optional-dependencies"]["flash"]


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".venv", ".git", ".tessera", "mlruns", "data", "**/__pycache__", "**/*.egg-info", ".env"):
        assert needed in patterns, f".dockerignore should exclude {needed}"
    for kept in ("README.md", "pyproject.toml", "constraints.txt", "shared", "services", "pipelines"):
        assert kept not in patterns, f".dockerignore must not exclude {kept} (the images copy it)"


# --- MLflow and the environment of training/serving ---------------------------------------------------------


def test_mlflow_server_command(services: dict[str, Any]) -> None:
    cmd = command_of(services["mlflow"])
    joined = " ".join(cmd)
    assert cmd[:2] == ["mlflow", "server"]
    store = cmd[cmd.index("--backend-store-uri") + 1]
    assert store.startswith("postgresql"), f"backend store must be PostgreSQL, is {store}"
    assert "@postgres:5432/" in store
    for flag in ("--workers", "--allowed-hosts", "--serve-artifacts", "--artifacts-destination"):
        assert flag in cmd, f"mlflow server lacks {flag}: {joined}"
    hosts = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert {"mlflow", "mlflow:5000", "localhost:5000", "127.0.0.1:5000"} <= set(hosts)
    assert env_of(services["mlflow"]).get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION") == "false"


def test_mlflow_state_is_on_named_volumes(raw_compose: dict[str, Any], services: dict[str, Any]) -> None:
    named = set((raw_compose.get("volumes") or {}).keys())
    dest = command_of(services["mlflow"])[command_of(services["mlflow"]).index("--artifacts-destination") + 1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["mlflow"].get("volumes", [])}
    assert mounts.get(dest) in named, f"artifact destination {dest} is not on a named volume"
    pg = {v.split(":")[1]: v.split(":")[0] for v in services["postgres"].get("volumes", [])}
    assert pg.get("/var/lib/postgresql/data") in named, "postgres data is not on a named volume"


@pytest.mark.parametrize("service", ["ray-head", "ray-worker", "ray-worker-gpu", *DOMAINS])
def test_tracking_uri_is_set(services: dict[str, Any], service: str) -> None:
    if service not in services:
        pytest.skip(f"{service} is not defined")
    assert env_of(services[service]).get("MLFLOW_TRACKING_URI") == TRACKING_URI


@pytest.mark.parametrize("service", ["ray-head", "ray-worker", "ray-worker-gpu"])
def test_ray_nodes_share_storage_and_data(
    raw_compose: dict[str, Any], services: dict[str, Any], service: str
) -> None:
    if service not in services:
        pytest.skip(f"{service} is not defined")
    svc = services[service]
    storage = env_of(svc).get("TESSERA_STORAGE")
    assert storage, f"{service}: TESSERA_STORAGE is not set"
    mounts = [str(v).split(":") for v in svc.get("volumes", [])]
    by_target = {m[1]: m for m in mounts}
    assert storage in by_target, f"{service}: nothing mounted at {storage}"
    assert by_target[storage][0] in (raw_compose.get("volumes") or {}), "checkpoints need a named volume"
    assert "/data" in by_target and by_target["/data"][2:] == ["ro"], f"{service}: /data must be read-only"
    assert svc.get("shm_size"), f"{service}: Ray's object store needs a larger /dev/shm"


def test_ray_head_command(services: dict[str, Any]) -> None:
    cmd = command_of(services["ray-head"])
    joined = " ".join(cmd)
    assert cmd[:2] == ["ray", "start"]
    for flag in ("--head", "--block", "--port=6379", "--dashboard-host=0.0.0.0", "--dashboard-port=8265"):
        assert flag in cmd, f"ray-head lacks {flag}: {joined}"
    assert any(c.startswith("--num-cpus") for c in cmd)


@pytest.mark.parametrize("service", DOMAINS)
def test_service_env(services: dict[str, Any], service: str) -> None:
    env = env_of(services[service])
    assert env.get("BENTOML_HOME") == "/home/tessera/bentoml"
    assert "/livez" in " ".join(healthcheck_of(services[service]))


# --- the real parser ---------------------------------------------------------------------------------------


def _compose_v2(docker: str | None) -> bool:
    if not docker:
        return False
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    return probe.returncode == 0


def _compose_commands() -> list[Any]:
    v1 = shutil.which("docker-compose")
    docker = shutil.which("docker")
    v2 = _compose_v2(docker)
    no_v1 = pytest.mark.skip(reason="docker-compose not on PATH (apt-get install docker-compose)")
    no_v2 = pytest.mark.skip(reason="the `docker compose` plugin is not installed")
    return [
        pytest.param([v1] if v1 else None, id="docker-compose-v1", marks=[] if v1 else [no_v1]),
        pytest.param(
            [docker, "compose"] if v2 else None, id="docker-compose-v2", marks=[] if v2 else [no_v2]
        ),
    ]


@pytest.mark.parametrize("compose", _compose_commands())
@pytest.mark.parametrize("profile", [None, "gpu"])
def test_compose_config_is_valid(compose: list[str], profile: str | None) -> None:
    args = [*compose, "-f", str(COMPOSE_FILE)]
    if profile:
        args += ["--profile", profile]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_HOST"))}
    result = subprocess.run(
        [*args, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, f"{' '.join(args)} config -q failed:\n{result.stdout}\n{result.stderr}"


def test_each_domain_has_an_up_to_date_bentofile() -> None:
    from infra.bentofiles import bentofile

    for domain in registry.domains():
        path = ROOT / "services" / domain.name / "bentofile.yaml"
        assert path.exists(), f"{path} is missing: python -m infra.bentofiles"
        assert path.read_text() == bentofile(domain.name), f"{path} is stale: python -m infra.bentofiles"
        parsed = yaml.safe_load(path.read_text())
        assert parsed["service"] == domain.service and parsed["python"]["lock_packages"] is False
        assert any(p.startswith("torch==") for p in parsed["python"]["packages"])
