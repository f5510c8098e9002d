"""Importing the shared core sets up the process for what every job needs."""

from __future__ import annotations

from pathlib import Path


def test_grib_support_does_not_downgrade_the_sqlite_mlflow_runs_on() -> None:
    import subprocess
    import sys

    code = "import shared, cfgrib, sqlite3; print(sqlite3.sqlite_version)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2], check=True)
    assert tuple(int(p) for p in out.stdout.split(".")) >= (3, 31), out.stdout
