"""Deployment pieces: the local stack launcher (``tessera up``), Dockerfiles and cluster configs."""
