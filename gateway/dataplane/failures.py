"""The data plane's failures, one type each, so that every transport maps them to the same
answer (``gateway.transport.problems``)."""

from __future__ import annotations

from gateway.dataplane.matcher import Answer, DuplicateRequest


class UnknownDeployment(LookupError):
    pass


class Unavailable(RuntimeError):
    """Redis cannot take the request now; the caller may retry."""


class Overloaded(RuntimeError):
    """This gateway already holds as many requests as it may (answer 429 at once)."""


class Backlogged(RuntimeError):
    """The deployment's input stream is too far behind (answer 503 at once)."""


class NoAnswer(TimeoutError):
    def __init__(self, request_id: str, answer: Answer):
        super().__init__(answer.reason)
        self.request_id = request_id
        self.answer = answer


__all__ = [
    "Backlogged",
    "DuplicateRequest",
    "NoAnswer",
    "Overloaded",
    "Unavailable",
    "UnknownDeployment",
]
