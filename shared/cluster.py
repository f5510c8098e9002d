"""Connecting to Ray from a job driver or an evaluation: the cluster the job runs on, or a local one."""

from __future__ import annotations

import os
from typing import Any


def connect_ray() -> Any:
    """``ray``, initialised: the cluster of ``RAY_ADDRESS`` (the job's own inside a Ray job), else a local Ray
    started on the spot. A jobs/dashboard URL in ``RAY_ADDRESS`` is for submission, not for ``ray.init``."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS", "")
        if address.startswith("http"):
            address = ""
        ray.init(address=address or None, log_to_driver=True, configure_logging=False)
    return ray
