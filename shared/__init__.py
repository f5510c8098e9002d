"""Tessera's common transformer core: attention, blocks, registry, config and MLflow model I/O."""

# The system SQLite first: eccodes' bundled eckit carries an SQLite 3.26, and once it is loaded, a Python
# `sqlite3` imported afterwards runs on it, which MLflow's SQL store refuses (it needs 3.31+). Reading a GRIB
# file (or xarray merely listing its engines) loads eccodes; this keeps an in-process job on a SQLite tracking
# URI working after that.
import sqlite3  # noqa: F401
