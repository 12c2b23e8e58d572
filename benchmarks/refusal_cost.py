"""CPU per predict refused at the in-flight bound, in one process and without the network:
uvicorn's httptools protocol with the HTTP guard, in front of the fast path and a
``PredictionService`` already holding its bound, fed one demo request at a time on a stand-in
transport. The ``--overload`` phase of ``benchmarks.run`` measures refusals under load; this
is the same refusal without the machine's noise, for A/B runs of the code:

    PYTHONPATH=<tree> python benchmarks/refusal_cost.py [REQUESTS]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from types import SimpleNamespace
from typing import Any, cast

from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.dataplane.deployments import DeploymentCache
from gateway.dataplane.service import PredictionService
from gateway.settings import Settings
from gateway.transport.app import create_app
from gateway.transport.fast_path import PredictFastPath
from gateway.transport.guarded_protocol import GuardedHttpToolsProtocol, limits_from
from models.train import demo_data
from rendezvous.spec import FeatureSpec

BOUND = 64


class Sink(asyncio.Transport):
    """Keeps the last write; never closes."""

    def __init__(self) -> None:
        super().__init__()
        self.last = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.last = bytes(data)

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5555)}.get(name)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def measure(n: int) -> None:
    data = demo_data()
    deployments = DeploymentCache(cast(Any, None))
    spec = FeatureSpec(names=tuple(data.names))
    deployments.deployments["breast-cancer"] = cast(
        Any, SimpleNamespace(name="breast-cancer", feature_spec=spec, input_rule=None)
    )
    service = PredictionService(
        deployments, cast(Any, None), cast(Any, None),
        max_rows=64, max_in_flight=BOUND, max_backlog=10**6,
    )  # fmt: skip
    service.in_flight = BOUND
    settings = Settings(redis_url="redis://127.0.0.1:1")
    app = create_app(settings)
    app.state.service = service
    config = Config(
        app=PredictFastPath(app, settings.max_body_bytes), http="httptools",
        lifespan="off", access_log=False,
    )  # fmt: skip
    config.load()
    protocol_class = GuardedHttpToolsProtocol.with_limits(limits_from(settings))
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    sink = Sink()
    protocol.connection_made(sink)
    requests = []
    for row in data.x_test.tolist():
        body = json.dumps({"instances": [[float(f"{v:.7g}") for v in row]]}).encode()
        head = (
            b"POST /v1/deployments/breast-cancer/predict HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        requests.append(head + body)
    for _ in range(3):
        cpu0 = time.process_time()
        for i in range(n):
            protocol.data_received(requests[i % len(requests)])
            (task,) = protocol.tasks
            await task
        cpu = time.process_time() - cpu0
        assert b"already holds" in sink.last, sink.last[:200]
        print(f"{cpu / n * 1e6:.1f} µs of CPU per refusal ({n} refusals)")
    if protocol.timeout_keep_alive_task is not None:
        protocol.timeout_keep_alive_task.cancel()


def main() -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
        return
    uvloop.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))


if __name__ == "__main__":
    main()
