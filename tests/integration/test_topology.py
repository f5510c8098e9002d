"""The compose topology (docker-compose.yml) with the same programs on one machine, without Docker: PostgreSQL
as MLflow's backend store, a Ray cluster of two nodes (the head and a ``ray start --address`` worker node with
its own CPU and a custom resource), a checkpoint folder both nodes write to (the ``ray-storage`` volume), and
the forecasting BentoML service. One training job with two Ray Train workers, one per node, registers its
model once; the version is read back over MLflow's REST API and from PostgreSQL's own tables, and served.

A stack of its own (ports 27xxx, its own TESSERA_HOME and Ray temp dirs), beside the session's test stack and
whatever else runs here; the environment is put back afterwards. Skipped without PostgreSQL's server binaries
(``.ci/run`` installs Debian's ``postgresql``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared import registry
from tests.integration.conftest import eventually, restore_environ, submit_job, tiny, url, wait_until_served

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# Clear of the session stack (2xxxx), a developer's stack and Ray's worker port range (10002-19999).
PORTS = {"MLFLOW": 27500, "RAY": 27390, "DASHBOARD": 27265, "RAY_CLIENT": 27111, "RAY_AGENT": 27365,
         "WORKER_AGENT": 27366, "FORECASTING": 27001}
PG_PORT = 27432
PG_USER = PG_PASSWORD = "tessera"
PG_DB = "mlflow"
WORKER = "worker"  # the extra Ray node's name (its temp dir, log and agent port variable)
WORKER_RESOURCE = "tessera_worker_node"  # a custom resource only the worker node offers


def _postgres_bin() -> Path | None:
    """The newest PostgreSQL server's bin folder (Debian keeps them under /usr/lib/postgresql/<major>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and (Path(initdb).parent / "pg_ctl").exists() else None


@dataclass
class Postgres:
    bin: Path
    root: Path  # data, socket and log, owned by the user the server runs as
    as_user: list[str]  # the command prefix that runs a program as that user (postgres refuses root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{PG_PORT}/{PG_DB}"

    def run(self, *argv: str) -> None:
        result = subprocess.run([*self.as_user, str(self.bin / argv[0]), *argv[1:]], capture_output=True,
                                text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=self.root)
        assert result.returncode == 0, f"{argv[0]} failed:\n{result.stdout}\n{result.stderr}"

    def start(self) -> None:
        (self.root / "pwfile").write_text(PG_PASSWORD + "\n")
        self.run("initdb", "-D", str(self.data), "-U", PG_USER, "--pwfile", str(self.root / "pwfile"),
                 "--auth-host=scram-sha-256", "--auth-local=peer", "-E", "UTF8", "--no-sync")
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-w", "-t", "60",
                 "-o", f"-p {PG_PORT} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        conn = self.connect("postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE runs outside a transaction
            with conn.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {PG_DB}")
        finally:
            conn.close()

    def connect(self, dbname: str = PG_DB) -> Any:
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=PG_PORT, user=PG_USER, password=PG_PASSWORD,
                                dbname=dbname, connect_timeout=10)

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        conn = self.connect()
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql, args)
                return list(cursor.fetchall())
        finally:
            conn.close()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                            "-t", "60", "stop"], capture_output=True, timeout=90, cwd=self.root, check=False)


def _postgres_or_skip() -> Postgres:
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="psycopg2 (the postgres extra) is not installed")
    root = Path(tempfile.mkdtemp(prefix="tsrpg"))  # short: the unix socket path lives here too
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server will not run as root: as the `postgres` user Debian's package creates
        import pwd

        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip("running as root and there is no `postgres` user to run the PostgreSQL server as")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    return Postgres(bin_dir, root, as_user)


@dataclass
class Topology:
    home: Path
    storage: Path  # the checkpoint folder both Ray nodes write to
    postgres: Postgres


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    postgres = _postgres_or_skip()
    home = tmp_path_factory.mktemp("topology-home")
    ray_tmp = Path(f"/tmp/tsrt{os.getpid()}")  # not a prefix of the session stack's /tmp/tsr<pid>, nor it of this
    worker_tmp = Path(f"{ray_tmp}-{WORKER}")  # stack.ray_worker_temp_dir(WORKER) while env is in force
    env = {f"TESSERA_{k}_PORT": str(v) for k, v in PORTS.items()}
    env.update(TESSERA_HOME=str(home), TESSERA_RAY_TMP=str(ray_tmp), TESSERA_RELOAD_SECONDS="2",
               TESSERA_CACHE=str(home / "cache"), TESSERA_MLFLOW_BACKEND_URI=postgres.uri)
    saved = {k: os.environ.get(k) for k in [*env, "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE"]}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)
    from infra import stack

    os.environ["MLFLOW_TRACKING_URI"] = stack.mlflow_url()
    try:
        t0 = time.monotonic()
        postgres.start()
        t1 = time.monotonic()
        # the head offers one CPU, the worker node one: two workers of one CPU each cannot share a node
        stack.up(["forecasting"], num_cpus=1, timeout=240)
        t2 = time.monotonic()
        stack.start_ray_worker(WORKER, num_cpus=1, resources={WORKER_RESOURCE: 1})
        print(f"started: PostgreSQL {t1 - t0:.0f} s, MLflow + Ray head + service {t2 - t1:.0f} s, "
              f"Ray worker node {time.monotonic() - t2:.0f} s")
        assert stack.ray_worker_temp_dir(WORKER) == worker_tmp
        yield Topology(home, home / "shared-storage", postgres)
    finally:
        try:
            stack.stop_ray_worker(WORKER)
            stack.down(["forecasting"])
        finally:
            postgres.stop()
            restore_environ(saved)
            for folder in (postgres.root, ray_tmp, worker_tmp):
                shutil.rmtree(folder, ignore_errors=True)


def _nodes() -> list[Any]:
    from ray.util.state import list_nodes

    from infra import stack
    from pipelines.cli import _use_ray_token_if_present

    _use_ray_token_if_present()  # the state API, like the jobs client, sends the token only in token mode
    return [n for n in list_nodes(address=stack.dashboard_url(), detail=True) if n.state == "ALIVE"]


@pytest.fixture(scope="module")
def two_node_job(topology: Topology) -> dict[str, Any]:
    """The forecasting job with two Ray Train workers of one CPU each, its result once served."""
    assert eventually(lambda: len(_nodes()) == 2, timeout=60, every=1), f"not two live Ray nodes: {_nodes()}"
    started = time.monotonic()
    code, result = submit_job("pipelines.train", "forecasting", "itransformer",
                              [*tiny("forecasting"), "ray_workers=2"],  # tiny: cpus_per_worker=1
                              ["--storage", str(topology.storage)])
    assert code == 0 and result is not None, "the two-node training job failed"
    print(f"training job: {time.monotonic() - started:.0f} s")
    wait_until_served("forecasting", result["version"], timeout=90)
    return result


def test_the_cluster_has_a_head_and_a_worker_node_with_its_own_resources(topology: Topology) -> None:
    nodes = {n.is_head_node: n for n in _nodes()}
    assert set(nodes) == {True, False}, nodes
    head, worker = nodes[True], nodes[False]
    assert head.resources_total["CPU"] == 1 and worker.resources_total["CPU"] == 1
    assert worker.resources_total.get(WORKER_RESOURCE) == 1 and WORKER_RESOURCE not in head.resources_total


def test_the_two_training_workers_ran_on_both_nodes(two_node_job: dict[str, Any]) -> None:
    from ray.util.state import list_actors

    from infra import stack

    nodes = {n.node_id: n.is_head_node for n in _nodes()}
    workers = list_actors(address=stack.dashboard_url(), filters=[("class_name", "=", "RayTrainWorker")],
                          detail=True, limit=100)
    assert len(workers) == 2, [(w.actor_id, w.node_id, w.state) for w in workers]
    placed = {w.node_id for w in workers}
    assert placed == set(nodes), f"Ray Train workers on {placed}, cluster nodes {nodes}"
    print("Ray Train workers: " + ", ".join(f"pid {w.pid} on {'head' if nodes[w.node_id] else 'worker'} node "
                                            f"{str(w.node_id)[:12]}" for w in workers))


def test_checkpoints_land_in_the_shared_storage_folder(topology: Topology, two_node_job: dict[str, Any]) -> None:
    run_folder = topology.storage / f"forecasting-{two_node_job['run_id']}"
    checkpoints = sorted(run_folder.glob("checkpoint_*/state.pt"))
    assert checkpoints, f"no checkpoint under {run_folder}: {sorted(p.name for p in topology.storage.rglob('*'))}"
    assert two_node_job["epochs_run"] == 2 and len(checkpoints) == 2  # one per epoch, num_to_keep=2


def test_the_run_and_its_one_registered_version_are_in_mlflow_and_postgres(topology: Topology,
                                                                           two_node_job: dict[str, Any]) -> None:
    from infra import stack

    api = f"{stack.mlflow_url()}/api/2.0/mlflow"
    run = httpx.get(f"{api}/runs/get", params={"run_id": two_node_job["run_id"]}, timeout=30).json()["run"]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert {"train_loss", "val_mse", "test_mse", "kept_val_mse"} <= set(metrics)
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["ray_workers"] == "2" and params["cpus_per_worker"] == "1"
    versions = httpx.get(f"{api}/model-versions/search", params={"filter": "name='forecasting'"},
                         timeout=30).json()["model_versions"]
    assert [(v["version"], v["run_id"]) for v in versions] == [(str(two_node_job["version"]), two_node_job["run_id"])]
    assert two_node_job["version"] == 1 and two_node_job["promoted"] is True
    model = httpx.get(f"{api}/registered-models/get", params={"name": "forecasting"}, timeout=30).json()
    assert {"alias": "production", "version": "1"} in model["registered_model"]["aliases"]

    db = topology.postgres
    assert db.query("SELECT name FROM registered_models") == [("forecasting",)]
    assert db.query("SELECT name, version, run_id FROM model_versions") == [("forecasting", 1, two_node_job["run_id"])]
    assert db.query("SELECT status FROM runs WHERE run_uuid = %s", (two_node_job["run_id"],)) == [("FINISHED",)]
    stored = dict(db.query("SELECT key, value FROM latest_metrics WHERE run_uuid = %s", (two_node_job["run_id"],)))
    assert stored["test_mse"] == pytest.approx(metrics["test_mse"])


def test_the_service_serves_that_version(two_node_job: dict[str, Any]) -> None:
    info = httpx.get(url("forecasting", "/model"), timeout=30).json()
    assert info["version"] == str(two_node_job["version"]) and info["run_id"] == two_node_job["run_id"]
    domain = registry.get("forecasting")
    response = httpx.post(url("forecasting", domain.example_path),
                          json=domain.example_request(), timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"]["version"] == str(two_node_job["version"]) and answer["values"]
