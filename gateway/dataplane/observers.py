"""What the data plane reports, and to whom: the observers a ``PredictionService`` is given
(``gateway.observability`` implements them), so the data plane imports nothing of
observability."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class RequestTally(Protocol):
    """Counts each request once, by outcome (``gateway.observability.metrics``)."""

    def request_done(self, deployment: str | None, outcome: str, seconds: float | None) -> None: ...

    def held_changed(self) -> None:
        """The requests held moved (``PredictionService.held``): the gauge follows soon."""


class RowSink(Protocol):
    """Takes the feature rows of each accepted request (``gateway.observability.drift_feed``)."""

    def observe_rows(self, deployment: str, features: np.ndarray) -> None: ...


class NoTally:
    """Counts nothing (a service built without metrics: tests, tools)."""

    def request_done(self, deployment: str | None, outcome: str, seconds: float | None) -> None:
        pass

    def held_changed(self) -> None:
        pass


__all__ = ["NoTally", "RequestTally", "RowSink"]
