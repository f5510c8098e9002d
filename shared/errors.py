"""The errors a service answers with, apart from the serving machinery (a model process imports them without
BentoML): :mod:`shared.serving` turns them into ``{"error": reason}`` answers."""

from __future__ import annotations


class RequestError(Exception):
    """A request the service refuses, with the HTTP status and the reason shown to the caller."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class ModelUnavailable(RequestError):
    """No model holds the production alias yet (or the registry is unreachable): a 503 with the reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=503)
