"""What every ``rdv`` process shares: settings from arguments, the stop signal, log format."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
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
