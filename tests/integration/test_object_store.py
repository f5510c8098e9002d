"""Data and checkpoints in an object store, on the real stack: a Ray training job reads its Parquet file from
S3 (a moto server on loopback; the Ray head has its AWS_* variables, as a cluster node has its credentials),
streams it into the memory-mapped cache, and writes Ray Train's checkpoints to S3 (``--storage``)."""

from __future__ import annotations

import pytest

from tests.integration.conftest import tiny

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_a_ray_job_trains_from_s3_and_checkpoints_to_s3(stack_env: dict[str, str], s3: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import s3fs

    from infra import stack
    from pipelines.cli import job_entrypoint, submit_and_follow
    from services.forecasting.data import synthetic_frame
    from shared.tracking import client

    bucket = s3fs.S3FileSystem()
    with bucket.open(f"{s3}/jobs/series.parquet", "wb") as handle:
        synthetic_frame(1500, 7).to_parquet(handle)
    entrypoint = job_entrypoint("pipelines.train", "forecasting", "itransformer", f"{s3}/jobs/series.parquet",
                                [*tiny("forecasting"), "max_in_memory_mb=0"],
                                ["--storage", f"{s3}/checkpoints", "--no-register"])
    code, result = submit_and_follow(entrypoint, stack.dashboard_url(), None)
    log = capsys.readouterr().out
    assert code == 0 and result is not None, log[-3000:]
    assert "streaming series into" in log and result["version"] is None and result["epochs_run"] == 2
    checkpoints = [p for p in bucket.find(f"{s3}/checkpoints") if "/checkpoint_" in p]
    assert checkpoints, "no checkpoint in the bucket"
    assert all(f"forecasting-{result['run_id']}" in p for p in checkpoints)
    run = client(stack.mlflow_url()).get_run(result["run_id"])
    assert run.data.tags["data"] == "series.parquet" and run.data.params["data"] == f"{s3}/jobs/series.parquet"
