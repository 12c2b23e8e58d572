"""What every ``rdv`` process shares: settings from arguments, the stop signal, log format."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from gateway.settings import Settings

log = logging.getLogger("rdv")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def settings_from_args(args: argparse.Namespace) -> Settings:
    updates: dict[str, Any] = {}
    for key in ("host", "port", "data_dir"):
        value = getattr(args, key, None)
        if value is not None:
            updates[key] = value
    settings = Settings()
    return settings.model_copy(update=updates) if updates else settings


def stop_event() -> threading.Event:
    """Set on SIGTERM or SIGINT: the process finishes its batch and exits."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        log.info("received signal %d; stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def share_metrics_between_processes() -> None:
    """prometheus-client's multi-process mode: each worker process writes its values to files
    in one folder, and ``/metrics`` sums them. The folder must be empty at start (stale files
    of an earlier run would be summed too) and set before a worker imports prometheus_client."""
    import tempfile

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in Path(path).glob("*.db"):
            stale.unlink(missing_ok=True)
    else:
        path = tempfile.mkdtemp(prefix="rdv-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
