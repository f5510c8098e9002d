"""Where data lives: a local path or an object-store URI (``s3://``, ``gs://``, ``az://``, ... through fsspec).

Every ``--data`` goes through :func:`normalize` (local paths become absolute, so a Ray job finds them from its
own working directory; URIs stay as given) and :func:`require` (a clear error before anything trains). Readers
open files with :func:`open_file` and stores with :func:`mapper`, which work the same for both. Credentials
for object stores come from the environment of the process that reads (for a Ray job: the cluster nodes, e.g.
their IAM role or ``AWS_*`` variables where ``ray start`` ran), never through Tessera's settings.

``s3://`` needs ``s3fs`` (``pip install 'tessera[s3]'``); ``gs://`` needs ``gcsfs``, ``az://`` ``adlfs``.
``AWS_ENDPOINT_URL`` points s3fs (and pyarrow, which Ray uses for checkpoints) at an S3-compatible store.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import MutableMapping

    import fsspec
    import pandas as pd

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]+)://")
_BACKENDS = {"s3": "s3fs (pip install 'tessera[s3]')", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
             "abfs": "adlfs", "abfss": "adlfs"}


def scheme(value: str | os.PathLike[str]) -> str | None:
    """The URI scheme (``s3``, ``gs``, ...), or None for a local path (``file://`` counts as local)."""
    found = _SCHEME.match(str(value))
    if found is None or found.group(1).lower() == "file":
        return None
    return found.group(1).lower()


def is_uri(value: str | os.PathLike[str]) -> bool:
    return scheme(value) is not None


def normalize(value: str | os.PathLike[str]) -> str:
    """A URI unchanged; a local path (or ``file://`` URI) absolute."""
    text = str(value)
    if is_uri(text):
        return text
    if text.startswith("file://"):
        text = text[len("file://"):]
    return str(Path(text).expanduser().resolve())


def name(value: str | os.PathLike[str]) -> str:
    """The last component (``ETTh1.parquet``), for run names, tags and saved states."""
    return PurePosixPath(str(value).rstrip("/")).name


def suffix(value: str | os.PathLike[str]) -> str:
    return PurePosixPath(name(value)).suffix.lower()


def stem(value: str | os.PathLike[str]) -> str:
    return PurePosixPath(name(value)).stem


def filesystem(value: str | os.PathLike[str]) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it); ImportError naming the package when the scheme's backend is absent."""
    import fsspec

    text = str(value)
    try:
        fs, path = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as exc:
        found = scheme(text)
        hint = _BACKENDS.get(found or "", "an fsspec backend for it")
        raise ImportError(f"{text}: reading {found}:// needs {hint} ({exc})") from None
    return fs, path


def exists(value: str | os.PathLike[str]) -> bool:
    if not is_uri(value):
        return Path(normalize(value)).exists()
    fs, path = filesystem(value)
    return bool(fs.exists(path))


def is_dir(value: str | os.PathLike[str]) -> bool:
    if not is_uri(value):
        return Path(normalize(value)).is_dir()
    fs, path = filesystem(value)
    return bool(fs.isdir(path))


def require(value: str | os.PathLike[str], what: str = "data") -> None:
    """FileNotFoundError naming the path (and, for a URI, the store's own reason) unless it exists."""
    try:
        found = exists(value)
    except ImportError:
        raise
    except Exception as exc:  # no credentials, no such bucket, endpoint down: the store's reason in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"{what} {value}: cannot be read ({first})") from None
    if not found:
        where = "" if is_uri(value) else " on this machine"
        raise FileNotFoundError(f"{what} {value} does not exist{where}")


def open_file(value: str | os.PathLike[str], mode: str = "rb") -> IO[Any]:
    """An open file object for a local path or a URI (a context manager)."""
    if not is_uri(value):
        return open(normalize(value), mode)  # noqa: SIM115 - the caller closes it
    fs, path = filesystem(value)
    return fs.open(path, mode)


def table_format(value: str | os.PathLike[str]) -> str:
    """``parquet`` or ``csv`` (also gzipped) from the file name; ValueError for anything else."""
    kind = suffix(value)
    if kind in (".parquet", ".pq"):
        return "parquet"
    if kind in (".csv", ".txt", ".gz"):
        return "csv"
    raise ValueError(f"{name(value)}: unsupported format {kind!r} (use .csv or .parquet)")


def read_table(value: str | os.PathLike[str]) -> pd.DataFrame:
    """A CSV or Parquet table at a local path or a URI (needs pandas, which the domains that read tables
    install); ValueError for another format, FileNotFoundError when it is absent."""
    import pandas as pd

    kind = table_format(value)
    require(value, "data file")
    with open_file(value) as handle:
        if kind == "parquet":
            return pd.read_parquet(handle)
        return pd.read_csv(handle, compression="gzip" if suffix(value) == ".gz" else None)


def mapper(value: str | os.PathLike[str]) -> str | MutableMapping[str, bytes]:
    """What zarr / xarray open as a store: the local path itself, or an fsspec mapping for a URI."""
    if not is_uri(value):
        return normalize(value)
    fs, path = filesystem(value)
    return fs.get_mapper(path)


def size(value: str | os.PathLike[str]) -> int:
    if not is_uri(value):
        return Path(normalize(value)).stat().st_size
    fs, path = filesystem(value)
    return int(fs.size(path))


def fingerprint(value: str | os.PathLike[str]) -> str:
    """The first 16 hex digits of the content's SHA-256 (the same for a file and its copy in a bucket)."""
    digest = hashlib.sha256()
    with open_file(value) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def local_copy(value: str | os.PathLike[str], cache: Path | None = None) -> str:
    """A local path to read with libraries that need one (GRIB through cfgrib, netCDF4): the path itself, or for
    a URI a copy under ``cache`` (kept, and fetched again only when the object's size changes)."""
    if not is_uri(value):
        return normalize(value)
    folder = cache or cache_dir("downloads")
    key = hashlib.sha256(str(value).encode()).hexdigest()[:16]
    target = folder / f"{key}-{name(value)}"
    if target.exists() and target.stat().st_size == size(value):
        return str(target)
    fs, path = filesystem(value)
    partial = target.with_name(target.name + f".{os.getpid()}.part")
    fs.get(path, str(partial))
    partial.replace(target)
    return str(target)


def cache_dir(kind: str) -> Path:
    """``$TESSERA_CACHE/<kind>`` (default ``~/.cache/tessera/<kind>``): derived files a job can rebuild."""
    root = os.environ.get("TESSERA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tessera")
    folder = Path(root) / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder
